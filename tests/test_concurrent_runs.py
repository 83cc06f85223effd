"""Runs sharing one lab never share a device: two plain runs and an xdist run (-n 2) at once.

A probe suite holds each device (the `device` fixture reserves it on its host), opens it
through a pooled agent, writes a pattern of its own, waits, and reads the digest back: a
second user in between would change it. Each test records its interval; the intervals of
one device must not overlap across all runs and workers, and every run must pass.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import write_sim_inventory

PROBE = """
import json, os, time, uuid

import pytest

from labs.agentpool import open_device


@pytest.mark.parametrize("i", range(2))
def test_hold(lab, device, i):
    start = time.time()
    token = uuid.uuid4().hex
    with open_device(lab, device) as dev:
        want = dev.fill(seed=token)
        time.sleep(0.15)
        got = dev.digest()
    end = time.time()
    line = {"device": device.id, "start": start, "end": end, "run": os.environ["PROBE_RUN"],
            "worker": os.environ.get("PYTEST_XDIST_WORKER", "-"), "run_id": lab.run_id}
    with open(os.environ["PROBE_LOG"], "a") as f:
        f.write(json.dumps(line) + "\\n")
    assert got == want, f"{device.id}: someone else wrote the device while this test held it"
"""


PYTEST_ARGS = ("-p", "no:cacheprovider", "-rs")


def _env(name: str, log: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LABS_RUN_ID", "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}
    env.update(PROBE_RUN=name, PROBE_LOG=str(log))
    return env


def overlaps(intervals: list[dict[str, Any]]) -> list[str]:
    """Pairs of intervals on one device that overlap in time."""
    out = []
    by_device: dict[str, list[dict[str, Any]]] = {}
    for iv in intervals:
        by_device.setdefault(str(iv["device"]), []).append(iv)
    for device, ivs in by_device.items():
        ivs.sort(key=lambda iv: float(iv["start"]))
        for a, b in itertools.pairwise(ivs):
            if float(b["start"]) < float(a["end"]):
                out.append(f"{device}: {a['run']}/{a['worker']} and {b['run']}/{b['worker']}")
    return out


def test_overlap_detection() -> None:
    a = {"device": "h:d", "start": 0.0, "end": 2.0, "run": "a", "worker": "-"}
    b = {"device": "h:d", "start": 1.0, "end": 3.0, "run": "b", "worker": "-"}
    c = {"device": "h:e", "start": 1.0, "end": 3.0, "run": "c", "worker": "-"}
    assert overlaps([a, c]) == [] and overlaps([b, a]) == ["h:d: a/- and b/-"]


def test_two_runs_and_an_xdist_run_never_share_a_device(tmp_path: Path) -> None:
    inventory = write_sim_inventory(tmp_path, devices=True)
    probe = tmp_path / "probe" / "test_probe.py"
    probe.parent.mkdir()
    probe.write_text(PROBE)
    log = tmp_path / "intervals.jsonl"
    runs = {"one": [], "two": [], "xdist": ["-n", "2"]}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "pytest", str(probe), "--inventory", str(inventory), *PYTEST_ARGS, *extra],
            cwd=probe.parent,
            env=_env(name, log),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, extra in runs.items()
    }
    try:
        outputs = {name: proc.communicate(timeout=240)[0] for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        subprocess.run(
            [str(Path(sys.executable).with_name("lab")), "sim", "down", "--inventory", str(inventory)],
            capture_output=True,
        )
    for name, proc in procs.items():
        assert proc.returncode == 0, f"run {name} failed:\n{outputs[name][-3000:]}"
        assert "8 passed" in outputs[name], f"run {name}: not every probe passed:\n{outputs[name][-2000:]}"
    intervals = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(intervals) == 24
    assert len({iv["run_id"] for iv in intervals}) == 3, "three runs, three run ids (xdist workers share one)"
    assert {iv["worker"] for iv in intervals if iv["run"] == "xdist"} == {"gw0", "gw1"}
    assert not overlaps(intervals), overlaps(intervals)
