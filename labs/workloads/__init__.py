"""Guest workloads: a guest that uses the device while it moves, and what it saw, read through the monitor.

A workload belongs to a device model, like its probe (labs.models: the model's
`workload`). It is a kernel booted by libvirt direct kernel boot (`<os><kernel>`,
no disk) that drives the device and publishes its counters in guest memory;
`read` takes them from the domain's monitor on whichever host runs it.
`labs.models.workload_for(device)` finds a device's, or None (the readback then
says the model has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import libvirt

from labs.workloads.mailbox import RTC_SLACK_S, Mailbox, judge, stall_since


@dataclass(frozen=True)
class KernelBoot:
    kernel: Path  # on the controller; the scenario copies it to every host that may run the VM
    cmdline: str


class GuestWorkload(Protocol):
    name: str

    def boot(self) -> KernelBoot:
        """The kernel to boot and its command line (built on first use)."""
        ...

    def read(self, dom: libvirt.virDomain, wait: float = 0.0) -> Mailbox:
        """The mailbox as the running domain holds it now; with `wait`, first until the guest runs its loop."""
        ...


@dataclass
class WorkloadMark:
    """A workload's mailbox read before a move, on the host that ran the VM then (workload None: the model has none)."""

    workload: str | None
    device: str  # LabDevice.id
    host: str
    before: Mailbox | None = None
    taken_at: float = 0.0  # time.time() of the reading
    downtime_s: float | None = None  # the move's measured downtime, where libvirt reports one


@dataclass
class WorkloadReading:
    """The mailbox after a move (twice: the guest must still be running), and the verdict against the mark."""

    workload: str
    host: str
    before: Mailbox | None
    after: Mailbox | None = None
    later: Mailbox | None = None
    allowed_stall_s: float | None = None
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def stall_s(self) -> int | None:
        """The longest pause across the move by the guest's RTC (host wall time, whole seconds)."""
        return stall_since(self.before, self.later) if self.later is not None else None

    @property
    def stall_at_least_s(self) -> int | None:
        """The pause the guest surely saw: its RTC reads whole seconds, the destination's up to a second ahead."""
        return max(0, self.stall_s - RTC_SLACK_S) if self.stall_s is not None else None

    @property
    def stall_guest_ms(self) -> float | None:
        """The longest pause across the move by the guest's TSC (its own clock: stops with the VM under TCG)."""
        if self.later is None or not self.later.tsc_khz:
            return None
        return round(stall_since(self.before, self.later, "tsc") / self.later.tsc_khz, 3)

    def judge(self) -> None:
        if self.after is None or self.later is None:
            self.problems = []  # not read: `error` says why
            return
        self.problems = judge(self.before, self.after, self.later, self.allowed_stall_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "host": self.host,
            "allowed_stall_s": self.allowed_stall_s,
            "stall_s": self.stall_s,
            "stall_guest_ms": self.stall_guest_ms,
            "problems": self.problems,
            "error": self.error,
            "before": self.before.as_dict() if self.before else None,
            "after": self.after.as_dict() if self.after else None,
            "later": self.later.as_dict() if self.later else None,
        }
