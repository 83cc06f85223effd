"""`lab bench`'s table: one row per headline figure, from whatever steps ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labs import bench
from labs.agentpool import agent_for
from labs.bench import headline
from labs.session import LabSession


def test_headline_rows_from_each_step() -> None:
    results = {
        "suite": {"date": "2026-11-26T00:00:00Z", "serial": {"wall_s": 101.2, "pytest_exit": 0},
                  "xdist_2": {"wall_s": 60.4, "pytest_exit": 0}},
        "scaling": {"1": {"wall_s": 30.0, "pytest_exit": 0, "vs_one_pair": 1.0}},
        "memory": {"tests": 1000, "rss_mb": [{"tests": 100, "rss_mb": 80.0}, {"tests": 1000, "rss_mb": 81.5}],
                   "growth_after_warmup_mb": 0.4},
    }  # fmt: skip
    rows = dict(headline(results))
    assert rows["all suites on the sim lab, xdist 2"] == "60 s (exit 0)"
    assert rows["conformance over 1 sim pair(s), 1 worker(s)"] == "30 s (1.0x one pair)"
    assert rows["controller RSS over 1000 tests"] == "80.0 MB at test 100, 81.5 MB at test 1000, +0.4 MB"
    assert headline({"date": "x"}) == []


def test_headline_shows_new_figures_beside_their_baselines() -> None:
    results = {
        "agent": {"agent_op_ms": {"p50": 0.3, "p95": 0.4}, "ssh_exec_per_op_ms": {"p50": 100, "p95": 130},
                  "device_save_1gib": {"mbps": 100.0}, "raw_ssh_copy_mbps": 110.0, "stream_ratio": 1.1,
                  "stream_cpu_s_per_gib": {"save": {"controller": 3.0, "agent": 1.5, "sshd": 1.0},
                                           "raw": {"controller": 1.8, "agent": 0.0, "sshd": 1.1}}},
        "up": {"runs": {"first": {"wall_s": 120.0, "how": "booted"}, "warm": {"wall_s": 9.5, "how": "restored"},
                        "boot": {"wall_s": 95.0, "how": "booted"}}},
    }  # fmt: skip
    rows = dict(headline(results))
    assert rows["1 GiB device save through the agent vs raw SSH copy"] == (
        "1.1x (100.0 vs 110.0 MB/s, median of 1); before 2.1x (118 vs 251 MB/s)"
    )
    assert rows["nested lab `up`, restored"] == "9.5 s (restored); before 73-90 s (booted)"
    assert rows["CPU-s per GiB, save vs raw copy (controller + agent with the sim device + sshd)"] == (
        "3.0 + 1.5 + 1.0 = 5.5 vs 1.8 + 0.0 + 1.1 = 2.9"
    )
    assert rows["nested lab `up`, booted, no snapshot"].startswith("95.0 s (booted)")
    assert rows["nested lab `up` booted and saved (first after a build)"] == "120.0 s"


def test_the_stream_cpu_split_counts_the_agent_and_the_sshd_of_its_connection(sim_session: LabSession) -> None:
    with agent_for(sim_session, "hostA") as client:
        split = bench.CpuSplit(int(client.info["pid"]))
        sshd = Path(f"/proc/{split.pids['sshd']}/comm").read_text()
        assert sshd.startswith("sshd") and split.pids["sshd"] != split.pids["agent"]
        before = split.now()
        client.frames("blob", length=64 << 20).drain()
        after = split.now()
    per_gib = bench.CpuSplit.per_gib(before, after, 64 << 20)
    assert set(per_gib) == {"controller", "agent", "sshd"}
    assert per_gib["sshd"] > 0  # it ciphered the 64 MiB: its CPU, read from /proc, moved
    assert bench.CpuSplit.per_gib({"agent": 1.0}, {"agent": 1.5}, 1 << 29) == {"agent": 1.0}


def test_lab_test_records_its_time_and_each_environments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "REPORTS", tmp_path)
    (tmp_path / "bench.json").write_text(json.dumps({"other": {"date": "kept"}}))
    journal = tmp_path / "tox-result.json"
    envs = {".pkg": {}, "lint": {"result": {"duration": 25.7}}, "nested": {"result": {"duration": 1900.04}}}
    journal.write_text(json.dumps({"testenvs": envs}))
    found = bench.record_ci(journal, 1950.26, 0)
    assert found["wall_s"] == 1950.3 and found["envs"] == {"lint": 25.7, "nested": 1900.0}
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["other"] == {"date": "kept"} and written["ci"] == found  # the other figures stay
    (row,) = [v for k, v in headline(written) if k.startswith("`./lab test`")]
    assert row.startswith("1950 s (lint 26, nested 1900; exit 0); before 2489 s")
    assert bench.record_ci(tmp_path / "missing.json", 10.0, 1)["envs"] == {}  # tox died before its journal
