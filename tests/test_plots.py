"""Metrics recorded as attachments come back out of the results and into PNG plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from labs.reporting.metrics import read_run_metrics
from labs.reporting.plots import append_history, plot_run, plot_trend


def test_metrics_round_trip_and_plots(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(
        test_m="""
        from labs.attachments import record_metrics as record
        def test_a():
            record("hostA->hostB:simv2", "live migration", downtime_ms=42.0, total_ms=900, device_data_bytes=4096)
            record("hostA->hostB:simv2", "ping-pong", downtime_ms=40.0, total_ms=1900)
        """
    )
    results = tmp_path / "results"
    pytester.runpytest_subprocess(f"--alluredir={results}").assert_outcomes(passed=1)
    metrics = read_run_metrics(results)
    assert [m["scenario"] for m in metrics] == ["live migration", "ping-pong"]
    pngs = plot_run(metrics, tmp_path / "plots", "run-1")
    assert len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG"
    history = tmp_path / "history.jsonl"
    append_history(history, "run-1", metrics)
    append_history(history, "run-2", [dict(m, downtime_ms=m["downtime_ms"] + 5) for m in metrics])
    trend = plot_trend(history, tmp_path / "plots" / "trend.png")
    assert trend is not None and trend.stat().st_size > 1000
