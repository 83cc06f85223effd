"""The Linux guest's checks (labs.scenarios.guest): parsing a reading, and each check failing on the guest it
is there for (a reboot, a new Oops, an unbound driver, a failed or stuck workload, a workload that restarted)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from labs.inventory.models import LinuxGuest
from labs.scenarios.guest import WORKLOAD_MARK, GuestState, judge, late_echo_only, parse_state

GUEST = LinuxGuest(kernel="/k", initrd="/i", workload="labs-workload", drivers={"4348:3253": "serial"})


def output(boot_id: str = "b1", uptime: float = 100.0, progress: int = 10, ok: bool = True, **extra: str) -> str:
    lines = [
        f"boot_id {boot_id}",
        f"uptime {uptime}",
        "bound 0000:00:01.0 1b36:000c pcieport",
        extra.get("bound", "bound 0000:03:00.0 4348:3253 serial"),
        *extra.get("klog", "").splitlines(),
        WORKLOAD_MARK,
        extra.get("workload", json.dumps({"ok": ok, "progress": progress, "ports": []})),
    ]
    return "\n".join(line for line in lines if line) + "\n"


def reading(**kw: Any) -> GuestState:
    return parse_state(output(**kw), "h")


def test_parse_a_reading() -> None:
    state = parse_state(output(klog="klog [ 5.0] WARNING: CPU: 0 PID: 1 at x"), "h")
    assert state.boot_id == "b1" and state.uptime_s == 100.0
    assert state.bound["0000:03:00.0"] == ("4348:3253", "serial")
    assert state.klog == ["[ 5.0] WARNING: CPU: 0 PID: 1 at x"]
    assert state.progress == 10 and state.workload_error is None


def test_a_guest_that_ran_on_passes() -> None:
    before = reading(uptime=100, progress=10)
    assert judge(GUEST, before, reading(uptime=120, progress=12), reading(uptime=130, progress=20)) == []


BROKEN: dict[str, tuple[dict[str, Any], str]] = {
    "rebooted": ({"boot_id": "b2", "uptime": 5.0, "progress": 1}, "the guest rebooted"),
    "new oops": ({"klog": "klog [ 99.0] Oops: 0000 [#1] SMP"}, "guest kernel: [ 99.0] Oops"),
    "driver unbound": ({"bound": "bound 0000:03:00.0 4348:3253 vfio-pci"}, "4348:3253 is not bound to serial after"),
    "device gone": ({"bound": " "}, "4348:3253 is not bound to serial after the move (bound: nothing)"),
    "workload failed": ({"ok": False}, "the workload's verdict is not ok"),
    "workload restarted": ({"progress": 3}, "progress went back across the move (10 -> 3)"),
    "no verdict": ({"workload": "sh: labs-workload: not found"}, "the workload printed no JSON object"),
    "bad verdict": ({"workload": "{not json"}, "the workload's verdict is not JSON"),
    "no progress field": ({"workload": '{"ok": true}'}, "has no integer progress"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_check_fails_on_its_broken_guest(case: str) -> None:
    kw, problem = BROKEN[case]
    before = reading(uptime=100, progress=10)
    after_kw = {"uptime": 120.0, "progress": 12, **kw}
    later_kw = {**after_kw, "uptime": 130.0, "progress": int(after_kw["progress"]) + 5}
    problems = judge(GUEST, before, reading(**after_kw), reading(**later_kw))
    assert any(problem in p for p in problems), problems


def test_a_stuck_workload_fails() -> None:
    before = reading(progress=10)
    problems = judge(GUEST, before, reading(uptime=120, progress=12), reading(uptime=130, progress=12))
    assert problems == ["the workload made no progress in the 10 s after the move (stuck at 12)"]


def test_an_old_warning_is_not_new() -> None:
    old = "klog [ 5.0] WARNING: at boot"
    before = reading(klog=old)
    assert (
        judge(GUEST, before, reading(uptime=120, progress=12, klog=old), reading(uptime=130, progress=20, klog=old))
        == []
    )


def test_uptime_going_back_fails() -> None:
    before = reading(uptime=100)
    problems = judge(GUEST, before, reading(uptime=95, progress=12), reading(uptime=105, progress=20))
    assert problems == ["the guest's uptime went back (100.0 s -> 95.0 s)"]


def test_a_reading_before_the_move_without_a_verdict_fails() -> None:
    """No verdict before the move is no baseline: the check must not pass for want of one."""
    before = reading(workload="sh: 1: arithmetic syntax error")
    problems = judge(GUEST, before, reading(uptime=120, progress=12), reading(uptime=130, progress=20))
    assert problems == ["before the move: the workload printed no JSON object: 'sh: 1: arithmetic syntax error'"]


def port(**kw: int) -> dict[str, Any]:
    return {"port": "ttyS4", "sent": 10, "received": 10, "mismatches": 0, "stalls": 0, "late": 0, **kw}


LATE_ECHO = {
    "every stalled line came back late": ([port(stalls=1, late=1), port()], True),
    "a line lost": ([port(stalls=1, late=0, received=9)], False),  # what the FIFO-count corruption looks like
    "a line wrong": ([port(stalls=1, late=1, mismatches=1)], False),
    "nothing stalled": ([port()], False),
    "no ports": ([], False),
}


@pytest.mark.parametrize("case", sorted(LATE_ECHO))
def test_only_a_late_echo_is_the_known_issue(case: str) -> None:
    """mtty's known late echo (a lost interrupt, the line arrives with the next) must not cover lost or wrong data."""
    ports, known = LATE_ECHO[case]
    assert late_echo_only({"ok": False, "progress": 1, "ports": ports}) is known
