"""The phase a migration job is in, read from one job-statistics sample and the source domain's state.

setup: the job runs, no data has moved yet (the destination is being prepared, QEMU sets up);
iterating: RAM (and pre-copy device data) moves while the source still runs;
stop-copy: the source is paused for the switchover (vCPUs stopped, the device's final state moving);
finish: the source is paused and nothing is left to send (the destination loads and resumes).
"""

from __future__ import annotations

from typing import Literal

Phase = Literal["setup", "iterating", "stop-copy", "finish"]
PHASES: tuple[Phase, ...] = ("setup", "iterating", "stop-copy", "finish")


def phase_of(processed: int, remaining: int, source_paused: bool) -> Phase:
    """The phase of an active job (source_paused: paused by the migration, libvirt's PAUSED/MIGRATION)."""
    if source_paused:
        return "finish" if processed > 0 and remaining == 0 else "stop-copy"
    return "iterating" if processed > 0 else "setup"
