"""Migrations under an induced fault, and the migration that must succeed afterwards.

For every fault: the migration fails with an error within its timeout, the
source keeps running with its device RUNNING, the destination keeps nothing
(the readback after the leg checks all three), the fault is undone, and a
following migration succeeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import libvirt
import pytest

from labs.faults.base import Fault, FaultNotInjected, error_name
from labs.inventory import LabPair
from labs.scenarios import probing, save_resume
from labs.scenarios.context import Scenario
from labs.scenarios.held import despite_held_device
from labs.scenarios.known import xfail_known
from labs.scenarios.migration import Leg, LegExpectation, migrate_leg
from labs.virt.domain import VM
from labs.virt.migrate import JobSample, MigrationOptions
from labs.virt.phase import PHASES, Phase
from labs.virt.sequence import tokens
from labs.virt.xml import Hostdev, with_hostdevs

# an in-flight fault needs a pass over RAM that lasts seconds: 1 GiB of untouched pages at 1 MiB/s (docs/incidents.md)
IN_FLIGHT_MEMORY_MIB = 1024
SLOW_MIB_S = 1


# a fault due during the job that missed its window is tried on a fresh VM, this many times in all, before no verdict
LANDING_ATTEMPTS = 3


def check_faulted(run: FaultedMigration) -> None:
    """A faulted migration's verdict: a skip when the fault missed its phase in every attempt (unless the
    migration it missed failed by itself), a failure naming each problem, else the known issues it met as xfails."""
    if run.missed:
        assert not run.unfaulted_problems, "; ".join(run.unfaulted_problems)
        attempts = len(run.earlier_misses) + 1
        pytest.skip(run.missed if attempts == 1 else f"missed in each of {attempts} attempts; the last: {run.missed}")
    assert not run.problems, "; ".join(run.problems)
    xfail_known(run.known_issues)


# before: the fault is in place when the job starts; started: at the first sample of an active job, in
# whichever phase it is; mid-flight: while RAM data moves (the iterating phase, some sent, some still to
# send); stop-copy: while the source is paused for the switchover; finish: QEMU is done sending, libvirt
# finishes the job (labs.virt.phase)
Trigger = Literal["before", "started", "mid-flight", "stop-copy", "finish"]
MEANT: dict[str, tuple[Phase, ...]] = {
    "started": PHASES,
    "mid-flight": ("iterating",),
    "stop-copy": ("stop-copy",),
    "finish": ("finish",),
}


CAPPED: tuple[Trigger, ...] = ("started", "mid-flight")  # the triggers whose job runs under SLOW_MIB_S


def due(trigger: Trigger, sample: JobSample) -> bool:
    """Is a fault with this trigger due at this sample? (Never for "before": it is injected before the job.)"""
    if trigger == "mid-flight":
        # once nothing is left to send, QEMU may be completing, and a fault then proves nothing (missed)
        return sample.phase == "iterating" and sample.remaining > 0
    return trigger != "before" and sample.phase in MEANT[trigger]


def phases_seen(samples: list[JobSample]) -> str:
    """`setup x2, iterating x31`: the phases the job's samples showed, in order."""
    runs: list[list[object]] = []
    for s in samples:
        if runs and runs[-1][0] == s.phase:
            runs[-1][1] = int(str(runs[-1][1])) + 1
        else:
            runs.append([s.phase, 1])
    return ", ".join(f"{p} x{n}" for p, n in runs) or "none"


@dataclass
class FaultedMigration:
    fault: Fault
    failed: Leg
    undone: bool
    following: Leg | None
    trigger: Trigger = "before"
    late: str | None = None  # the fault reached the job after its window (Fault.too_late)
    earlier_misses: list[str] = field(default_factory=list)  # why each earlier attempt was no verdict (land_fault)

    @property
    def never_injected(self) -> bool:
        """Due during the job, the fault was never injected: the job ended (or failed) first."""
        return self.trigger != "before" and not self.fault.attempted

    @property
    def missed(self) -> str | None:
        """Why the fault never met the job it was due in (the job ended by itself first, or the fault came too
        late): no verdict."""
        if self.late:
            return self.late
        result = self.failed.result
        if not (self.never_injected and result.ok):
            return None
        first = next((s for s in result.samples if s.processed > 0), None)
        if first is not None:
            seen = f"the first sample with data sent, at {first.elapsed:.1f}s, had {first.remaining} bytes left"
        elif result.samples:
            seen = f"{len(result.samples)} samples saw the job active, none with data sent"
        else:
            seen = "no sample saw the job active"
        return (
            f"{self.fault.name} was due {self.trigger}, but the migration ended by itself in {result.duration:.1f}s "
            f"({seen}; phases seen: {phases_seen(result.samples)}; polled every {MigrationOptions.poll:g}s): "
            "this VM migrates too quickly for the fault to land"
        )

    @property
    def unfaulted_problems(self) -> list[str]:
        """A job the fault never met that completed was a plain migration, and is judged as one: a skip for the
        missed fault must not hide a device that failed it."""
        if not (self.never_injected and self.failed.result.ok):
            return []
        plain = replace(self.failed, expect=None)
        return [f"the migration {self.fault.name} missed (judged as a plain one): {p}" for p in plain.problems]

    @property
    def landed(self) -> str:
        """Where the fault landed, for the report: `before the job`, `in iterating`, `never`."""
        if self.trigger == "before":
            return "before the job"
        return f"in {self.fault.record.phase}" if self.fault.record.phase else "never"

    @property
    def known_issues(self) -> list[str]:
        legs = [self.failed] + ([self.following] if self.following else [])
        return [k for leg in legs for k in leg.readback.known_issues + leg.stack_issues] + self.fault.stack_issues

    @property
    def problems(self) -> list[str]:
        out = []
        if self.never_injected and not self.failed.result.ok:
            out.append(f"the migration failed before {self.fault.name} was injected: {self.failed.result.error}")
        result = self.failed.result
        runs_on = self.fault.outcome.runs_on
        out += self.fault.refusal_problems
        if runs_on == "destination" and not result.ok:
            out.append(f"migration under {self.fault.name} failed; it should have completed: {result.error}")
        elif result.ok and runs_on not in ("destination", "either"):
            out.append(f"migration under {self.fault.name} succeeded; it should have failed")
        elif result.ok:
            pass  # a fault the job survives
        elif not result.error:
            out.append(f"migration under {self.fault.name} failed without an error message")
        elif result.timed_out and not self.fault.stalls:
            out.append(f"migration under {self.fault.name} hung until the deadline: {result.error}")
        elif result.timed_out:
            pass  # the stall is this fault's outcome: our deadline ended it, libvirt reported nothing of its own
        elif not self.fault.matches(result.error_domain, result.error_code):
            expected = " or ".join(map(str, self.fault.errors_at(self.fault.record.phase))) or "nothing declared"
            out.append(
                f"migration under {self.fault.name} (landed {self.landed}) failed with "
                f"{error_name(result.error_domain, result.error_code)}, not the fault's ({expected}): {result.error}"
            )
        out += [f"after {self.fault.name}: {p}" for p in self.failed.problems]
        if not self.undone:
            out.append(f"{self.fault.name} was not undone: {self.fault.record.error}")
        if self.following is None:
            out.append("no following migration was run")
        else:
            if not self.following.result.ok:
                out.append(f"the migration after {self.fault.name} failed: {self.following.result.error}")
            out += [f"following migration: {p}" for p in self.following.problems]
        return out


def migrate_under_fault(
    sc: Scenario,
    vm: VM,
    pair: LabPair,
    make_fault: Callable[[VM], Fault],
    trigger: Trigger,
    *,
    timeout: float | None = None,
    dest_hostdev: Callable[[Fault], Hostdev | None] | None = None,
) -> tuple[VM, FaultedMigration]:
    """Migrate pair.source -> pair.destination with the fault injected before or during the job."""
    fault = make_fault(vm)
    dest_xml = None
    if trigger == "before":
        try:
            sc.inject(fault)
        except Exception as exc:
            raise FaultNotInjected(f"{fault.name} could not be injected: {type(exc).__name__}: {exc}") from exc
        hostdev = dest_hostdev(fault) if dest_hostdev else None
        if hostdev is not None:
            dest_xml = with_hostdevs(str(vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)), (hostdev,))

    # the cap keeps RAM moving until an early fault lands; a job that may then complete must be able to converge
    capped = trigger in CAPPED and fault.runs_on in ("destination", "either")

    def during(sample: JobSample) -> None:
        nonlocal capped
        if due(trigger, sample) and not fault.attempted:
            fault.record.phase = sample.phase
            sc.inject(fault)
        # not in setup: libvirt sets the job's own bandwidth when QEMU starts sending, over an earlier lift
        if capped and fault.attempted and sample.phase != "setup":
            capped = False
            _lift_cap(sc, vm)

    vm_after, failed = migrate_leg(
        sc,
        vm,
        pair.source,
        pair.destination,
        scenario=f"migrate under {fault.name}",
        # a stop-copy or finish fault needs the job to converge: no cap
        bandwidth_mib=SLOW_MIB_S if trigger in CAPPED else None,
        dest_xml=dest_xml,
        timeout=timeout,
        on_progress=during if trigger != "before" else None,
        hang_is_infra=False,  # under a fault, aborting at the deadline is one of the outcomes checked
        expect=expectation(fault),
        downtime_allowance_ms=fault.downtime_allowance_ms,
        after_job=fault.after_job,
    )
    undone = True
    with sc.steps.step(f"undo {fault.name}"):
        try:
            fault.undo()
        except Exception:
            undone = False
    if failed.result.hook_error:
        # whatever the migration did next proves nothing about the fault: the test is broken, not judged
        raise FaultNotInjected(f"{fault.name} could not be injected {trigger}: {failed.result.hook_error}")
    late = fault.too_late(failed.result.ok, tokens((failed.events or {}).get("destination", [])))
    if late:  # the VM may be gone (destroyed after the job completed): nothing follows, no verdict
        return vm_after, FaultedMigration(fault, failed, undone, None, trigger, late)
    following: Leg | None = None
    if failed.result.ok and fault.attempted:  # a fault the job survived: the VM runs on the destination
        vm_after, following = migrate_leg(
            sc, vm_after, pair.destination, pair.source, scenario=f"migrate back after {fault.name}"
        )
    elif not failed.result.ok:
        if fault.runs_on == "nowhere":  # the fault took the VM down: a user starts it again from its definition
            with sc.steps.step(f"start {vm_after.name} again on {vm_after.hv.name}: {fault.name} took it down"):
                despite_held_device(sc, vm_after.hv, vm_after.start)
            probing.mark(sc, vm_after, pair.source)
        vm_after, following = migrate_leg(
            sc, vm_after, pair.source, pair.destination, scenario=f"migrate after {fault.name}"
        )
    return vm_after, FaultedMigration(fault, failed, undone, following, trigger)


def land_fault(
    sc: Scenario,
    pair: LabPair,
    label: str,
    make_fault: Callable[[VM], Fault],
    trigger: Trigger,
    *,
    memory_mib: int | None = IN_FLIGHT_MEMORY_MIB,
    timeout: float | None = None,
) -> tuple[VM, FaultedMigration]:
    """migrate_under_fault on a VM started on pair.source, again on a fresh one while the fault misses its window,
    up to LANDING_ATTEMPTS in all: a miss is no verdict, and whether the next job leaves the fault its moment is
    chance."""
    earlier: list[str] = []
    while True:
        vm = save_resume.start_vm(sc, pair.source, label, memory_mib)
        vm_after, run = migrate_under_fault(sc, vm, pair, make_fault, trigger, timeout=timeout)
        run.earlier_misses = list(earlier)
        if not run.missed or run.unfaulted_problems or len(earlier) + 1 >= LANDING_ATTEMPTS:
            return vm_after, run
        earlier.append(run.missed)
        with sc.steps.step(
            f"{run.fault.name} missed its window (attempt {len(earlier)} of {LANDING_ATTEMPTS}): "
            f"remove {vm.name} everywhere, try again on a fresh VM"
        ) as rec:
            # the VM may have reached the destination, where it holds that host's device
            removed = [done for hv in sc.hypervisors for done in VM(hv, vm.name).remove()]
            rec.detail = {"missed": run.missed, "removed": removed}


UNCAPPED_MIB_S = 8192


def _lift_cap(sc: Scenario, vm: VM) -> None:
    """The cap only kept the job in flight until the fault landed; a job that may now complete must be able
    to converge (the guest workload dirties RAM faster than SLOW_MIB_S)."""
    with sc.steps.step(f"lift the bandwidth cap to {UNCAPPED_MIB_S} MiB/s: the job may complete") as rec:
        try:
            vm.dom.migrateSetMaxSpeed(UNCAPPED_MIB_S, 0)
        except libvirt.libvirtError as exc:  # a daemon the fault stopped or killed: the job's fate is the fault's
            rec.detail = {"not lifted": exc.get_error_message()}


def expectation(fault: Fault) -> LegExpectation | None:
    """The fault's expected outcome, as the leg under it checks it (None: by the job's result)."""
    out = fault.outcome
    if out.runs_on == "either":
        return None
    return LegExpectation(out.runs_on, out.source_events, out.destination_events, fault.leaves_defined_on)
