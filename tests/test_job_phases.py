"""Job phases read from job statistics, and faults due at a phase."""

from __future__ import annotations

import libvirt
import pytest

from labs.scenarios.faulted import due, phases_seen
from labs.virt.migrate import JobSample


def sample(processed: int, remaining: int, paused: bool = False, completed: bool = False) -> JobSample:
    kind = libvirt.VIR_DOMAIN_JOB_COMPLETED if completed else libvirt.VIR_DOMAIN_JOB_UNBOUNDED
    return JobSample(0.2, {"type": kind, "data_processed": processed, "data_remaining": remaining}, paused)


SETUP, ITERATING, SENT = sample(0, 0), sample(300, 9000), sample(9300, 0)
STOP_COPY, FINISH, COMPLETING = (
    sample(9000, 300, paused=True),
    sample(9300, 0, paused=True),
    sample(9300, 0, completed=True),
)


def test_phases() -> None:
    assert [s.phase for s in (SETUP, ITERATING, STOP_COPY, FINISH, COMPLETING)] == [
        "setup",
        "iterating",
        "stop-copy",
        "finish",
        "finish",
    ]
    assert phases_seen([SETUP, SETUP, ITERATING, STOP_COPY]) == "setup x2, iterating x1, stop-copy x1"
    assert phases_seen([]) == "none"


@pytest.mark.parametrize(
    ("trigger", "lands_at"),
    [
        ("started", [SETUP, ITERATING, SENT, STOP_COPY, FINISH, COMPLETING]),
        ("mid-flight", [ITERATING]),
        ("stop-copy", [STOP_COPY]),
        ("finish", [FINISH, COMPLETING]),
        ("before", []),
    ],
)
def test_a_fault_is_due_only_in_the_phase_it_is_meant_for(trigger: str, lands_at: list[JobSample]) -> None:
    every = [SETUP, ITERATING, SENT, STOP_COPY, FINISH, COMPLETING]
    assert [s for s in every if due(trigger, s)] == lands_at  # type: ignore[arg-type]


def test_a_mid_flight_fault_is_due_while_a_byte_is_left_to_send() -> None:
    assert due("mid-flight", sample(9299, 1)) and not due("mid-flight", sample(9300, 0))
