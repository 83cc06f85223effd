"""The janitor tells live runs from dead ones: a run whose process still holds its mark keeps its
leftovers; once the process is gone (SIGKILL) they are removed. Stale reservation records go too."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import labs.janitor as janitor_module
from labs.inventory import LabDevice
from labs.janitor import janitor
from labs.liveruns import RunMark, live_runs
from labs.paths import REPO_ROOT
from labs.reservations import reserve
from labs.session import LabSession, open_inventory
from labs.virt.domain import local_image_dir
from tests.conftest import write_sim_inventory

RUN = "labs-20000101-000000-a11ve0"
HOLD = f"""
import sys, time
sys.path.insert(0, {str(REPO_ROOT)!r})
from labs.liveruns import RunMark
mark = RunMark({RUN!r})
print("marked", flush=True)
time.sleep(120)
"""


def test_run_marks(tmp_path: Path) -> None:
    mark = RunMark("labs-x-1", tmp_path)
    assert live_runs(tmp_path) == set(), "this process's own marks do not count"
    proc = subprocess.Popen([sys.executable, "-c", HOLD.replace(repr(RUN), repr("labs-x-2"))], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"marked"
    finally:
        proc.kill()
        proc.wait()
    mark.release()
    assert not list(tmp_path.iterdir())


def test_janitor_keeps_a_live_runs_leftovers_until_it_dies(sim_session: LabSession) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE)
    local_image_dir().mkdir(parents=True, exist_ok=True)
    image = local_image_dir() / f"{RUN}-1abcd-sr-x.1.save"
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"marked"
        assert RUN in live_runs()
        image.write_bytes(b"x")
        assert f"controller: removed {image}" not in janitor(sim_session)
        assert image.exists(), "the janitor removed a live run's image"
    finally:
        proc.kill()  # SIGKILL: no cleanup of its own; the kernel drops the mark's lock
        proc.wait()
    try:
        janitor(sim_session)  # (another janitor running at the same time may be the one that removes it)
        assert not image.exists(), "the janitor left a dead run's image"
        assert RUN not in live_runs()
    finally:
        image.unlink(missing_ok=True)


def test_janitor_removes_stale_reservation_records(sim_session: LabSession) -> None:
    assert sim_session.sim is not None
    locks = sim_session.sim.host_dir("hostA") / "locks"
    locks.mkdir(exist_ok=True)
    (locks / "hostA_ghost.lock").touch()
    owner = locks / "hostA_ghost.lock.owner"
    owner.write_text(json.dumps({"owner": "killed", "run": RUN, "holder": 999999}) + "\n")
    removed = janitor(sim_session)
    assert f"hostA: removed stale reservation hostA_ghost (run {RUN})" in removed
    assert not owner.exists()


class _LeftStopped:
    def __init__(self) -> None:
        self.value = "STOP"

    def state(self) -> str:
        return self.value

    def reset(self) -> None:
        self.value = "RUNNING"


def test_janitor_resets_a_device_a_killed_run_left_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real devices (mtty) keep their migration state across opens; the sim's does not, so a stand-in here."""
    handles: dict[str, _LeftStopped] = {}

    @contextmanager
    def fake_open(session: LabSession, device: LabDevice) -> Iterator[_LeftStopped]:
        yield handles.setdefault(device.id, _LeftStopped())

    monkeypatch.setattr(janitor_module, "open_device", fake_open)
    with LabSession(open_inventory(write_sim_inventory(tmp_path, devices=True))) as session:
        removed = janitor(session)
        busy = session.inventory.device("hostB:simv1")
        held = reserve(session.ssh("hostB"), busy, "other-run", wait=1, expires_in=60)
        try:
            handles.clear()
            again = janitor(session)
        finally:
            held.release()
    assert "hostA:simv2: VFIO_DEVICE_RESET (left STOP); now RUNNING" in removed
    assert len([r for r in removed if "VFIO_DEVICE_RESET" in r]) == 4
    assert "hostB:simv1" not in handles, "the janitor opened a device another run holds"
    assert len([r for r in again if "VFIO_DEVICE_RESET" in r]) == 3
