"""Live-migration scenarios: A -> B, back, ping-pong, parallel, post-copy refused, and under faults.

Each migration is followed by a readback on both hosts. Success means one
running copy, on the destination, owning the destination's device, and nothing
left on the source. Failure (faults, post-copy) means the reverse: the source
keeps running with its device RUNNING and the destination keeps nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import libvirt

from labs.attachments import attach, record_metrics
from labs.faults.base import ExpectedError, Side, error_name
from labs.inventory import LabDevice, LabPair
from labs.models import stream_size
from labs.scenarios import probing
from labs.scenarios.context import Scenario
from labs.scenarios.held import retry_held
from labs.scenarios.readback import Readback, ensure_idle, read_back, recover_devices
from labs.virt.domain import VM, Hypervisor
from labs.virt.events import DomainEvent
from labs.virt.migrate import JobSample, MigrationHung, MigrationOptions, MigrationResult, migrate
from labs.virt.sequence import (
    FAILED_DESTINATION,
    FAILED_SOURCE,
    LOST_RESUME,
    MIGRATED_DESTINATION,
    MIGRATED_SOURCE,
    EventPattern,
    tokens,
)
from labs.virt.stale import StaleRecord
from labs.virt.xml import hostdev_for, with_hostdevs

EVENT_SETTLE = 5.0  # seconds for events libvirt queued before the migrate call returned to arrive
ROLES = ("source", "destination")


@dataclass(frozen=True)
class LegExpectation:
    """Where the VM must run after the job and the lifecycle events each side must deliver (None: by the
    job's result, a completed or a failed migration)."""

    runs_on: Side
    source_events: EventPattern
    destination_events: EventPattern
    defined_on: str | None = None  # the host left with a shut-off definition by the expected outcome

    @property
    def events(self) -> dict[str, EventPattern]:
        return {"source": self.source_events, "destination": self.destination_events}


MIGRATED = LegExpectation("destination", MIGRATED_SOURCE, MIGRATED_DESTINATION)
FAILED = LegExpectation("source", FAILED_SOURCE, FAILED_DESTINATION)


@dataclass
class Leg:
    """One migration and what was read back after it."""

    source: str
    destination: str
    result: MigrationResult
    readback: Readback
    expect: LegExpectation | None = None  # None: MIGRATED or FAILED, by the result
    events: dict[str, list[DomainEvent]] | None = None  # per role; None: not observed (test:///)
    downtime_budget_ms: int | None = None  # a completed job's downtime must keep to it (None: not judged)
    downtime_allowance_ms: int | None = 0  # what the fault under the job may add to the budget (None: not judged)
    state_bytes: int | None = None  # the moved devices' full state, where their models know its size
    multifd: bool = False  # parallel connections: QEMU counts multifd packets' framing with the device bytes
    released: StaleRecord | None = None  # a record libvirt kept for a gone domain, released before this job ran

    @property
    def stack_issues(self) -> list[str]:
        """Known issues of libvirt and QEMU this leg met: the record libvirt kept was this VM's own (left by this
        test's failed job); libvirt's resume of the failed job's source lost to QEMU's own."""
        out = []
        if self.released is not None and self.released.domain == self.result.domain:
            out.append(
                f"known issue of libvirt ({self.released}): a domain taken away without its stop keeps its mdev "
                "reserved (seen after a destroy racing the incoming finish); released by a start under its name "
                "[docs/nested-findings.md: destroy during finish, 2026-12-05]"
            )
        if not self.result.ok and self.events and LOST_RESUME in tokens(self.events.get("source", [])):
            out.append(
                f"known issue of libvirt with QEMU: {self.source}'s libvirt failed to resume the guest after the "
                f"failed job ({LOST_RESUME}), QEMU resumed it by itself [docs/nested-findings.md: a lost resume, "
                "2026-12-05]"
            )
        return out

    @property
    def expectation(self) -> LegExpectation:
        return self.expect or (MIGRATED if self.result.ok else FAILED)

    @property
    def device_bytes(self) -> int | None:
        """The device bytes moved, as libvirt's job statistics or QEMU's query-migrate report them (None: neither)."""
        found = self.result.device_data_bytes
        if found is None:
            reported = [s.qemu.get("vfio_transferred") for s in self.readback.sides if s.qemu]
            found = next((n for n in reported if isinstance(n, int)), None)
        return found

    @property
    def problems(self) -> list[str]:
        side = self.expectation.runs_on
        expect = {"source": self.source, "destination": self.destination}.get(side)
        out = self.readback.problems(expect_on=expect, defined_on=self.expectation.defined_on)
        if self.result.ok and self.device_bytes == 0:
            out.append("the migration moved no device bytes (QEMU reports 0 for the VFIO device)")
        else:
            out += self.state_bytes_problems
        return out + self.downtime_problems + self.event_problems

    @property
    def state_bytes_problems(self) -> list[str]:
        """A completed job must have moved the devices' whole state: a driver that sends part of it fails here, on
        the source's count, whatever the destination made of it."""
        moved, want = self.device_bytes, self.state_bytes
        if not self.result.ok or moved is None or want is None:
            return []
        if self.multifd and moved < want:
            return [f"the migration moved {moved} device bytes over multifd, less than the devices' state ({want})"]
        if not self.multifd and moved != want:
            return [f"the migration moved {moved} device bytes, not the devices' state of {want}"]
        return []

    @property
    def downtime_problems(self) -> list[str]:
        """A completed job's pause against the lab's budget: libvirt's downtime, and the guest's own stall, since
        libvirt counts from QEMU's STOP event to the destination's RESUME and the device's arcs on both sides
        run outside them (docs/nested-findings.md)."""
        if not self.result.ok or self.downtime_budget_ms is None or self.downtime_allowance_ms is None:
            return []
        budget = self.downtime_budget_ms + self.downtime_allowance_ms
        budget_is = f"{budget} ms"
        if self.downtime_allowance_ms:
            budget_is += f" ({self.downtime_budget_ms} ms and {self.downtime_allowance_ms} ms the fault may add)"
        out = []
        downtime = self.result.metric("downtime")
        if downtime is None:
            out.append(
                f"libvirt reported no downtime for the completed migration: its budget ({budget_is}) is unjudged"
            )
        elif downtime > budget:
            out.append(f"downtime {downtime} ms, over the lab's budget of {budget_is}")
        stalls = [g.stall_at_least_s for s in self.readback.sides for g in s.guest if g.stall_at_least_s is not None]
        if stalls and max(stalls) * 1000 > budget:
            out.append(
                f"the guest stood still at least {max(stalls)} s by its clock, over the lab's downtime budget of "
                f"{budget_is} (libvirt's downtime: {downtime} ms)"
            )
        return out

    @property
    def event_problems(self) -> list[str]:
        if self.events is None:
            return []
        out = []
        for role, host in zip(ROLES, (self.source, self.destination), strict=True):
            pattern, seen = self.expectation.events[role], self.events.get(role, [])
            if not pattern.matches(seen):
                got = " ".join(tokens(seen)) or "no events"
                out.append(f"{host} ({role}) delivered lifecycle events {got}, expected {pattern}")
        return out


@dataclass
class MigrationRun:
    legs: list[Leg] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [
            f"leg {i + 1} {leg.source}->{leg.destination}: {p}" for i, leg in enumerate(self.legs) for p in leg.problems
        ]


def _dest_xml(vm: VM, moves: Sequence[tuple[LabDevice, LabDevice]]) -> str | None:
    """The domain XML with the destination's devices, when they differ from the source's."""
    targets = tuple(hostdev_for(dst) for _src, dst in moves)
    if targets == tuple(hostdev_for(src) for src, _dst in moves):
        return None
    return with_hostdevs(str(vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)), targets)


def migrate_leg(
    sc: Scenario,
    vm: VM,
    src: LabDevice,
    dst: LabDevice,
    *,
    scenario: str,
    parallel: int | None = None,
    postcopy: bool = False,
    bandwidth_mib: int | None = None,
    dest_xml: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[JobSample], None] | None = None,
    hang_is_infra: bool = True,
    expect: LegExpectation | None = None,
    companions: Sequence[tuple[LabDevice, LabDevice]] = (),
    downtime_allowance_ms: int | None = 0,
    after_job: Callable[[], None] | None = None,
) -> tuple[VM, Leg]:
    """Migrate `vm` (on src's host) to dst's host, read back both sides; returns where the VM runs now.

    A migration that had to be aborted at its deadline raises MigrationHung once both sides are read
    back and the destination's device recovered: a nightly run counts it as the lab's, and goes on.
    Scenarios for which a hang is a possible answer (faults, post-copy) pass hang_is_infra=False.
    `expect`: where the VM must run and the lifecycle events each side must deliver (default: by the result).
    `companions`: the VM's other devices (source, destination), for a multi-device VM.
    `downtime_allowance_ms`: what a fault may add to the lab's downtime budget (None: the job is not judged).
    `after_job`: run once the job has ended, before the readback (a fault bringing a rebooted host back).
    """
    moves = [(src, dst), *companions]
    dst_hv: Hypervisor = sc.hv(dst.host)
    settings = sc.session.inventory.settings
    opts = MigrationOptions(
        timeout=timeout or sc.timeouts.migration,
        parallel=parallel,
        postcopy=postcopy,
        bandwidth_mib=bandwidth_mib,
        dest_xml=dest_xml if dest_xml is not None else _dest_xml(vm, moves),
        max_downtime_ms=settings.max_downtime_ms,
    )
    how = ", ".join(
        x
        for x in (
            f"{parallel} connections" if parallel else "",
            "post-copy" if postcopy else "",
            f"{bandwidth_mib} MiB/s" if bandwidth_mib else "",
        )
        if x
    )
    for _src, incoming in moves:
        ensure_idle(sc.session, incoming, sc.steps)  # a device left RESUMING must not meet an incoming QEMU
    if probing.marks(sc, vm):
        probing.mark(sc, vm, *(a for a, _b in moves))  # fresh values: only this migration can carry them to dst
    title = f"migrate {vm.name} {vm.hv.name} -> {dst_hv.name}{f' ({how})' if how else ''}"

    def job(step_title: str) -> tuple[MigrationResult, tuple[int, int]]:
        marks = (vm.hv.events.mark(), dst_hv.events.mark())
        with sc.steps.step(step_title) as rec:
            result = migrate(vm, dst_hv, opts, on_progress)
            rec.detail = result.summary()
            stats = {
                "summary": result.summary(),
                "completed": result.completed,
                "samples": [{"elapsed_s": round(x.elapsed, 3), **x.stats} for x in result.samples[-50:]],
            }
            attach(f"migration job statistics {vm.name} {vm.hv.name} -> {dst_hv.name}", stats, "json")
        return result, marks

    # a refusal for a device libvirt still records as another domain's: a wait, then the release of a record
    # kept for a gone domain (labs.scenarios.held)
    (result, marks), released = retry_held(
        sc, dst_hv, lambda suffix: job(f"{title}{suffix}"), lambda out: None if out[0].ok else out[0].error
    )
    if after_job is not None:
        after_job()
    probing.set_downtime(sc, vm, result.metric("downtime") if result.ok else None)
    rb = read_back(
        sc.session,
        [vm.hv, dst_hv],
        vm.name,
        [device for move in moves for device in move],
        title=f"readback after {scenario}",
        steps=sc.steps,
        marks=probing.marks(sc, vm),
    )
    if not result.ok:
        # the failed incoming side; and the source's too where the VM is lost (no QEMU holds its device any more)
        lost = expect is not None and expect.runs_on == "nowhere"
        recover_devices(sc.session, rb, [d for a, b in moves for d in ((a, b) if lost else (b,))], steps=sc.steps)
    if result.timed_out and hang_is_infra:
        raise MigrationHung(f"{vm.name} {vm.hv.name} -> {dst_hv.name}: {result.error or 'aborted'}; {result.summary()}")
    leg = Leg(
        vm.hv.name,
        dst_hv.name,
        result,
        rb,
        expect,
        downtime_budget_ms=settings.downtime_budget,
        downtime_allowance_ms=downtime_allowance_ms,
        state_bytes=_state_bytes([a for a, _b in moves]),
        multifd=bool(parallel),
        released=released,
    )
    leg.events = lifecycle_events(vm.hv, dst_hv, vm.name, marks, leg.expectation)
    subject = f"{vm.hv.name}->{dst_hv.name}:{src.name}"
    total_ms = result.metric("time_elapsed")
    processed = result.metric("data_processed")
    record_metrics(
        subject,
        scenario,
        ok=int(result.ok),
        downtime_ms=result.metric("downtime"),
        total_ms=total_ms,
        data_total=result.metric("data_total"),
        device_data_bytes=result.device_data_bytes,
        throughput_mbps=round(processed / 1e6 / (total_ms / 1000), 3) if processed and total_ms else None,
        **guest_stall(rb),
    )
    return (VM(dst_hv, vm.name) if result.ok else vm), leg


def _state_bytes(devices: Sequence[LabDevice]) -> int | None:
    sizes = [stream_size(d) for d in devices]
    return sum(n for n in sizes if n is not None) if None not in sizes else None


def lifecycle_events(
    src: Hypervisor, dst: Hypervisor, domain: str, marks: tuple[int, int], expect: LegExpectation
) -> dict[str, list[DomainEvent]] | None:
    """The domain's lifecycle events on each side since `marks`, once they match `expect` or EVENT_SETTLE
    has passed (None on test:///, which cannot migrate: its events would prove nothing)."""
    if src.is_test_driver or dst.is_test_driver:
        return None
    deadline = time.monotonic() + EVENT_SETTLE
    while True:
        seen = {role: hv.events.since(mark, domain) for role, hv, mark in zip(ROLES, (src, dst), marks, strict=True)}
        if all(expect.events[r].matches(seen[r]) for r in ROLES) or time.monotonic() > deadline:
            attach(f"lifecycle events of {domain}", {r: [str(e) for e in seen[r]] for r in ROLES}, "json")
            return seen
        time.sleep(0.2)


def guest_stall(rb: Readback) -> dict[str, float | None]:
    """The guest's longest pause across the leg, where a workload ran: wall (RTC) and the guest's own clock (TSC)."""
    readings = [g for s in rb.sides for g in s.guest if g.later is not None]
    if not readings:
        return {}
    wall = [g.stall_s for g in readings if g.stall_s is not None]
    own = [g.stall_guest_ms for g in readings if g.stall_guest_ms is not None]
    return {
        "guest_stall_ms": max(wall) * 1000 if wall else None,
        "guest_clock_stall_ms": max(own) if own else None,
    }


def there_and_back(
    sc: Scenario, vm: VM, pair: LabPair, rounds: int = 1, group: Sequence[LabPair] = (), **kw: object
) -> tuple[VM, MigrationRun]:
    """A -> B, B -> A, `rounds` times (ping-pong); stops at the first failed leg.

    `group`: the VM's other device pairs (a multi-device VM), moving with `pair`.
    """
    run = MigrationRun()
    for i in range(rounds):
        for forward in (True, False):
            src, dst = (pair.source, pair.destination) if forward else (pair.destination, pair.source)
            others = [(p.source, p.destination) if forward else (p.destination, p.source) for p in group]
            label = f"ping-pong {i + 1}" if rounds > 1 else "migrate"
            vm, leg = migrate_leg(sc, vm, src, dst, scenario=label, companions=others, **kw)  # type: ignore[arg-type]
            run.legs.append(leg)
            if not leg.result.ok:
                return vm, run
    return vm, run


# QEMU's VFIO migration blocker for post-copy ("VFIO migration is not supported with postcopy migration"),
# as libvirt reports a refused QMP `migrate`: measured on the nested lab (docs/nested-findings.md)
POSTCOPY_BLOCKER = (ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_INTERNAL_ERROR),)


def postcopy_problems(leg: Leg) -> list[str]:
    """A post-copy request for a VM holding a VFIO device must fail with the VFIO migration blocker."""
    r = leg.result
    if r.ok:
        return ["post-copy was accepted for a VM with a VFIO device"]
    if not any(e.domain == r.error_domain and e.code == r.error_code for e in POSTCOPY_BLOCKER):
        got, want = error_name(r.error_domain, r.error_code), " or ".join(map(str, POSTCOPY_BLOCKER))
        return [f"post-copy failed with {got}, not the VFIO migration blocker ({want}): {r.error}"]
    return []


def postcopy_refused(sc: Scenario, vm: VM, pair: LabPair) -> Leg:
    """Request post-copy for a VM with a VFIO device: QEMU must refuse it (spec 4.2 blockers), not hang.

    If QEMU accepted the post-copy flag, we ask for the switch to post-copy at
    the first progress sample; that request must be refused too.
    """
    switch_errors: list[str] = []

    def switch(sample: JobSample) -> None:
        if switch_errors:
            return
        try:
            vm.dom.migrateStartPostCopy(0)
            switch_errors.append("accepted")
        except libvirt.libvirtError as exc:
            code, domain = exc.get_error_code(), exc.get_error_domain()
            switch_errors.append(f"{exc.get_error_message() or 'refused'} (code {code}, domain {domain})")

    _vm, leg = migrate_leg(
        sc,
        vm,
        pair.source,
        pair.destination,
        scenario="post-copy refused",
        postcopy=True,
        timeout=min(sc.timeouts.migration, 120.0),
        on_progress=switch,
        hang_is_infra=False,  # hanging instead of refusing is the finding this scenario looks for
    )
    if switch_errors:
        leg.readback.sides[0].notes.append(f"migrateStartPostCopy: {switch_errors[0]}")
    return leg
