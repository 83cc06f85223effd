"""Trends across a lab's runs: the metric regression gate (median of this run against the median of the
last N runs' medians), the lab's own history, and the figures Allure 3 charts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from labs.inventory.models import Gates
from labs.reporting import regression, trends
from labs.reporting.suiterun import run_suites
from tests.conftest import write_sim_inventory

DEVICE = "hostA->hostB:dev0"


def _rec(run: str, downtime: float, total: float = 1000.0, ok: int = 1, subject: str = DEVICE) -> dict[str, Any]:
    return {"run": run, "model": "m1", "subject": subject, "scenario": "migrate", "ok": ok,
            "downtime_ms": downtime, "total_ms": total}  # fmt: skip


def _history(*per_run: list[float]) -> list[dict[str, Any]]:
    return [_rec(f"run-{i}", d) for i, downtimes in enumerate(per_run) for d in downtimes]


def test_a_downtime_regression_fails_naming_metric_device_and_both_figures() -> None:
    history = _history([100, 104], [110], [98, 102, 250])  # one slow leg in a run is its median's business
    (failure,) = regression.evaluate(Gates(), [_rec("now", 300), _rec("now", 320)], history)
    assert failure.gate == "regression_pct"
    line = failure.line()
    assert "median downtime of m1 hostA->hostB:dev0 is 310 ms, its baseline 102 ms" in line, line
    assert "(median of the last 3 runs): +204%, at most +50%" in line, line


def test_total_time_is_gated_too_and_only_the_last_n_runs_count() -> None:
    history = [_rec(f"old-{i}", 100, total=9000) for i in range(5)] + [_rec(f"new-{i}", 100) for i in range(3)]
    (failure,) = regression.evaluate(Gates(regression_runs=3), [_rec("now", 100, total=2000)], history)
    assert "median total time of m1 hostA->hostB:dev0 is 2000 ms, its baseline 1000 ms" in failure.line()
    assert regression.evaluate(Gates(regression_runs=8), [_rec("now", 100, total=2000)], history) == []


def test_within_threshold_noise_failed_migrations_and_short_history_pass() -> None:
    history = _history([100], [100], [100])
    assert regression.evaluate(Gates(), [_rec("now", 140)], history) == []  # +40% < +50%
    assert regression.evaluate(Gates(regression_pct=30), [_rec("now", 140)], history) != []
    assert regression.evaluate(Gates(regression_pct=30, regression_min_ms=50), [_rec("now", 140)], history) == []
    assert regression.evaluate(Gates(), [_rec("now", 900, ok=0)], history) == []  # a failed leg: no figure
    assert regression.evaluate(Gates(), [_rec("now", 900)], _history([100])) == []  # one run is no baseline
    other = [_rec("now", 900, subject="hostA->hostB:dev1")]
    assert regression.evaluate(Gates(), other, history) == []  # no history of its own


def test_allure_gets_one_metric_key_per_figure_and_series(tmp_path: Path) -> None:
    path = trends.write_allure_metrics(tmp_path, [_rec("now", 120), _rec("now", 99, ok=0)])
    assert path is not None
    samples = json.loads(path.read_text())
    keys = {s["key"]: s["value"] for s in samples}
    assert keys == {"downtime: m1 hostA->hostB:dev0": 120, "total time: m1 hostA->hostB:dev0": 1000}
    assert {s["better"] for s in samples} == {"lower"} and all(s["unit"] == "ms" for s in samples)
    assert trends.write_allure_metrics(tmp_path / "none", []) is None


SUITE = """
import os
from labs.attachments import record_metrics

def test_migrate():
    for downtime in os.environ["SEEDED_DOWNTIMES"].split(","):
        record_metrics("hostA->hostB:simv2", "migrate", ok=1, downtime_ms=float(downtime), total_ms=1000.0)
"""


def test_a_seeded_downtime_regression_across_a_short_history_fails_lab_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite = tmp_path / "suite" / "test_seeded_metrics.py"
    suite.parent.mkdir()
    suite.write_text(SUITE)
    inventory = write_sim_inventory(tmp_path)
    reports = tmp_path / "reports"
    for downtimes in ("100,110", "95,105,120"):
        monkeypatch.setenv("SEEDED_DOWNTIMES", downtimes)
        assert run_suites(inventory, str(suite), [], Console(record=True, width=200), reports=reports) == 0
    monkeypatch.setenv("SEEDED_DOWNTIMES", "400,420")
    console = Console(record=True, width=250)
    rc = run_suites(inventory, str(suite), [], console, reports=reports)
    text = console.export_text()
    assert rc == 1, text
    assert "gate lab.gates.regression_pct failed: median downtime of " in text, text
    assert "hostA->hostB:simv2 is 410 ms, its baseline 105 ms (median of the last 2 runs)" in text, text
    lab_dirs = list((reports / "history").iterdir())
    assert len(lab_dirs) == 1, lab_dirs  # the lab's own history
    assert len({r["run"] for r in trends.read_history(lab_dirs[0] / "metrics.jsonl")}) == 3
    gates = json.loads((reports / "latest" / "gates.json").read_text())
    assert [f["gate"] for f in gates["failed"]] == ["regression_pct"], gates
