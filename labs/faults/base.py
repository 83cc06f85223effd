"""Fault injectors: named, recorded, and always undone.

A fault is injected through a FaultLedger, which remembers it before it is
injected: a fault that fails halfway (a rule added, the next command timed out)
is still undone at teardown. `undo` is idempotent and safe on a fault that
never got injected, so teardown can call it unconditionally.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

import libvirt

from labs.attachments import attach, step
from labs.errors import InfraError
from labs.virt.sequence import FAILED_DESTINATION, FAILED_SOURCE, EventPattern


class FaultNotInjected(InfraError):
    """A fault's injection raised: the test it was for made no verdict (the lab's failure, not the device's)."""


def _names(prefix: str) -> dict[int, str]:
    levels = ("VIR_ERR_NONE", "VIR_ERR_WARNING", "VIR_ERR_ERROR")  # error levels, not codes, share the prefix
    names = (k for k in vars(libvirt) if k.startswith(prefix) and k not in levels)
    return {getattr(libvirt, k): k for k in sorted(names, reverse=True) if isinstance(getattr(libvirt, k), int)}


_CODES, _DOMAINS = _names("VIR_ERR_"), _names("VIR_FROM_")


@dataclass(frozen=True)
class ExpectedError:
    """A libvirt error by its domain (VIR_FROM_*: who reported it; VIR_FROM_QEMU for QEMU's own) and code."""

    domain: int
    code: int

    def __str__(self) -> str:
        return error_name(self.domain, self.code)


def error_name(domain: int | None, code: int | None) -> str:
    """`VIR_FROM_QEMU/VIR_ERR_OPERATION_FAILED` (numbers where libvirt-python has no name)."""
    dom = _DOMAINS.get(domain, str(domain)) if domain is not None else "no domain"
    num = _CODES.get(code, str(code)) if code is not None else "no code"
    return f"{dom}/{num}"


# which side keeps the running VM after the job: "either" for a fault the job may survive or fail cleanly
Side = Literal["source", "destination", "nowhere", "either"]


@dataclass(frozen=True)
class Outcome:
    """What a migration job under a fault must end with: the expected outcome as data."""

    runs_on: Side  # which side keeps the one running VM
    errors: tuple[ExpectedError, ...]  # the libvirt errors the job may fail with (by domain and code)
    stalls: bool  # the job stalls until our deadline aborts it (no libvirt error of its own)
    source_events: EventPattern  # the lifecycle events the source's connection delivers for the domain
    destination_events: EventPattern

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs_on": self.runs_on,
            "errors": [str(e) for e in self.errors],
            "stalls": self.stalls,
            "source_events": str(self.source_events),
            "destination_events": str(self.destination_events),
        }


@dataclass
class FaultRecord:
    name: str
    target: str
    injected_at: float | None = None
    undone_at: float | None = None
    actions: list[str] = field(default_factory=list)  # what was done on the hosts, in order
    error: str | None = None  # the last error of inject or undo
    phase: str | None = None  # the job phase the fault landed in (labs.virt.phase), for faults due during a job
    expected: dict[str, Any] = field(default_factory=dict)  # the fault's Outcome

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Fault(ABC):
    """One induced failure. Subclasses set `name` and implement _inject/_undo."""

    name: str = "fault"
    # the libvirt errors an operation failing under this fault may end with (never matched by message text)
    expected_errors: tuple[ExpectedError, ...] = ()
    # the expected outcome is a job that stalls until the scenario's deadline aborts it (no libvirt error)
    stalls: bool = False
    # where the VM runs after the job, and the lifecycle events each side delivers (labs.virt.sequence)
    runs_on: Side = "source"
    # the host where the job's outcome leaves the domain defined and shut off (measured), else None
    leaves_defined_on: str | None = None
    source_events: EventPattern = FAILED_SOURCE
    destination_events: EventPattern = FAILED_DESTINATION
    # the fault's own request must be refused with one of these (abort on the destination); empty: none
    refusal: tuple[ExpectedError, ...] = ()
    # how much longer than the lab's downtime budget the job's pause may be under this fault; None: the fault
    # keeps the guest stopped without bound (paused at a deadline, a crawling link) and the budget does not judge
    downtime_allowance_ms: int | None = 0

    def __init__(self, target: str) -> None:
        self.record = FaultRecord(self.name, target, expected=self.outcome.as_dict())
        self.refused_with: tuple[int | None, int | None] | None = None  # (domain, code) of the refusal seen
        # known issues of libvirt or QEMU the fault met, never the device's: an xfail once nothing else is wrong
        self.stack_issues: list[str] = []
        self._attempted = False
        self._undone = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.record.target})"

    @property
    def injected(self) -> bool:
        return self.record.injected_at is not None and not self._undone

    @property
    def attempted(self) -> bool:
        """inject() was called (whether it succeeded, and whether it was undone since)."""
        return self._attempted

    @property
    def needs_undo(self) -> bool:
        return self._attempted and not self._undone

    @property
    def outcome(self) -> Outcome:
        return Outcome(self.runs_on, self.expected_errors, self.stalls, self.source_events, self.destination_events)

    @property
    def refusal_problems(self) -> list[str]:
        if not self.refusal or not self.attempted:
            return []
        want = " or ".join(map(str, self.refusal))
        if self.refused_with is None:
            return [f"{self.name} was accepted; it should have been refused ({want})"]
        domain, code = self.refused_with
        if not any(e.domain == domain and e.code == code for e in self.refusal):
            return [f"{self.name} was refused with {error_name(domain, code)}, not {want}"]
        return []

    def too_late(self, job_ok: bool, destination_events: Sequence[str]) -> str | None:
        """Why the fault reached the job only after the window it was due in, so the job's outcome says nothing
        about it (no verdict); `destination_events`: the destination's lifecycle tokens, `resumed/migrated`."""
        return None

    def errors_at(self, phase: str | None) -> tuple[ExpectedError, ...]:
        """The errors expected of a job this fault landed in at `phase` (None: before the job)."""
        return self.expected_errors

    def matches(self, domain: int | None, code: int | None) -> bool:
        return any(e.domain == domain and e.code == code for e in self.errors_at(self.record.phase))

    def note(self, action: str) -> None:
        self.record.actions.append(action)

    def after_job(self) -> None:
        """What the fault must do once the job under it has ended, before the readback (a host brought back);
        nothing for a fault never injected."""
        return None

    def inject(self) -> None:
        with step(f"fault {self.name}: inject on {self.record.target}"):
            self._attempted = True
            self._undone = False
            self.record.expected = self.outcome.as_dict()
            try:
                self._inject()
            except Exception as exc:
                self.record.error = f"inject: {exc}"
                raise
            self.record.injected_at = time.time()

    def undo(self) -> None:
        if not self.needs_undo:
            return
        with step(f"fault {self.name}: undo on {self.record.target}"):
            try:
                self._undo()
            except Exception as exc:
                self.record.error = f"undo: {exc}"
                raise
            self._undone = True
            self.record.undone_at = time.time()

    @abstractmethod
    def _inject(self) -> None: ...

    @abstractmethod
    def _undo(self) -> None: ...


F = TypeVar("F", bound=Fault)


class FaultLedger:
    """Every fault of one test, undone in reverse order at teardown."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []

    def inject(self, fault: F) -> F:
        self.faults.append(fault)  # before inject: a half-injected fault is undone too
        fault.inject()
        return fault

    def pending(self) -> list[Fault]:
        return [f for f in self.faults if f.needs_undo]

    def undo_all(self) -> list[str]:
        """Undo everything still in place; keep going past errors and return them."""
        errors: list[str] = []
        for fault in reversed(self.faults):
            try:
                fault.undo()
            except Exception as exc:
                errors.append(f"{fault!r}: undo failed: {exc}")
        if self.faults:
            attach("faults", [f.record.as_dict() for f in self.faults], "json")
        return errors
