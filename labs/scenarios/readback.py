"""Readback after every scenario and every failure, on every side.

Three views, each recorded even when an earlier one already failed:
1. libvirt: the domain's state on each host of the scenario; exactly one
   running copy, nothing left on the losing side.
2. QEMU (where the connection has a monitor): the vfio part of query-migrate.
3. the device, through the device layer, once no VM holds it: its migration
   state (RUNNING / 001) and pending data size.

The device is reached through `DeviceAccess` (labs/vfio/access.py), opened by
`labs.agentpool.open_device(session, device)` on the host's pooled agent.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from labs.agentpool import open_device
from labs.attachments import attach, step
from labs.errors import LabError
from labs.inventory import LabDevice
from labs.models import probe_named, workload_named
from labs.probes import ProbeMark, ProbeReading
from labs.scenarios.known import known_issue
from labs.scenarios.steps import StepLog
from labs.session import LabSession
from labs.vfio.access import IDLE_STATES, RUNNING_STATES
from labs.vfio.client import AgentOSError
from labs.virt.capabilities import VirtCapability
from labs.virt.domain import Hypervisor
from labs.virt.monitor import query_migrate, vfio_view
from labs.virt.xml import Hostdev, hostdevs_of
from labs.workloads import WorkloadMark, WorkloadReading


@dataclass
class SideView:
    host: str
    domain_state: str  # running, paused, shutoff, absent, ...
    hostdevs: list[Hostdev] = field(default_factory=list)
    qemu: dict[str, Any] | None = None  # vfio part of query-migrate
    trace: list[str] = field(default_factory=list)  # vfio trace lines of the domain's QEMU log (where enabled)
    notes: list[str] = field(default_factory=list)
    registers: list[ProbeReading] = field(default_factory=list)  # device probes read through the monitor
    guest: list[WorkloadReading] = field(default_factory=list)  # guest workloads' mailboxes read through the monitor


@dataclass
class DeviceView:
    device: str
    state: str | None = None
    data_size: int | None = None
    skipped: str | None = None  # why the device was not read
    error: str | None = None  # the device layer failed to read it
    accepted: tuple[str, ...] = RUNNING_STATES  # the states it may be found in (IDLE_STATES for real devices)
    recovered_from: str | None = None  # found in this state after a failed operation, then reset (recover_devices)
    known: str | None = None  # that state is a documented issue of the device's model (labs.scenarios.known)


@dataclass
class Readback:
    domain: str
    sides: list[SideView] = field(default_factory=list)
    devices: list[DeviceView] = field(default_factory=list)

    @property
    def running_on(self) -> list[str]:
        return [s.host for s in self.sides if s.domain_state in ("running", "paused")]

    def state_on(self, host: str) -> str:
        for s in self.sides:
            if s.host == host:
                return s.domain_state
        raise KeyError(host)

    def problems(
        self, expect_on: str | None, expect_device_running: bool = True, defined_on: str | None = None
    ) -> list[str]:
        """What is wrong, given where the one running copy should be (None: nowhere) and the host where a
        shut-off definition is the expected outcome (`defined_on`)."""
        out: list[str] = []
        running = self.running_on
        if expect_on is None and running:
            out.append(f"{self.domain} should run nowhere, runs on {', '.join(running)}")
        if expect_on is not None and running != [expect_on]:
            out.append(f"{self.domain} should run exactly once, on {expect_on}; runs on {running or 'no host'}")
        for s in self.sides:
            expected_definition = (s.host, s.domain_state) == (defined_on, "shutoff")
            if s.host != expect_on and s.domain_state != "absent" and not expected_definition:
                out.append(f"{s.host} keeps a leftover {self.domain} ({s.domain_state})")
        if expect_device_running:
            out += self.device_problems()
        for s in self.sides:
            for r in s.registers:
                if r.error is not None:
                    out.append(f"{r.probe} on {s.host}: registers not read: {r.error}")
                elif r.mismatches:
                    out.append(f"{r.probe} on {s.host}: device state lost: {'; '.join(r.mismatches)}")
            for g in s.guest:
                if g.error is not None:
                    out.append(f"guest {g.workload} on {s.host}: mailbox not read: {g.error}")
                out += [f"guest {g.workload} on {s.host}: {p}" for p in g.problems]
        return out

    def device_problems(self) -> list[str]:
        """What is wrong with the devices as read (before any recovery reset: `recovered_from`)."""
        out: list[str] = []
        for d in self.devices:
            if d.error is not None:
                out.append(f"device {d.device} could not be read: {d.error}")
            elif d.skipped is None and d.state not in d.accepted:
                want = "RUNNING" if d.accepted == RUNNING_STATES else "RUNNING or STOP"
                out.append(f"device {d.device} is {d.state}, not {want}")
            elif d.recovered_from is not None and d.known is None:
                # judged as the failed operation left it: the recovery reset does not make it right
                out.append(f"device {d.device} was left {d.recovered_from} by the failed operation (then reset)")
        return out

    @property
    def known_issues(self) -> list[str]:
        """The documented issues of the devices' models this readback found (not problems, not a pass)."""
        return [d.known for d in self.devices if d.known]

    def as_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "sides": [
                {
                    "host": s.host,
                    "state": s.domain_state,
                    "hostdevs": [h.describe() for h in s.hostdevs],
                    "qemu": s.qemu,
                    "trace": s.trace,
                    "notes": s.notes,
                    "registers": [r.as_dict() for r in s.registers],
                    "guest": [g.as_dict() for g in s.guest],
                }
                for s in self.sides
            ],
            "devices": [vars(d) for d in self.devices],
        }


def domain_side(hv: Hypervisor, name: str, run_id: str, marks: Sequence[ProbeMark | WorkloadMark] = ()) -> SideView:
    from labs.virt.domain import VM

    vm = VM(hv, name)
    view = SideView(hv.name, vm.state())
    if view.domain_state == "absent":
        return view
    try:
        view.hostdevs = hostdevs_of(vm.xml())
    except LabError as exc:
        view.notes.append(f"xml: {exc}")
    if view.domain_state in ("running", "paused"):
        if hv.can(run_id, VirtCapability.QEMU_MONITOR):
            try:
                view.qemu = vfio_view(query_migrate(vm.dom))
            except LabError as exc:
                view.notes.append(f"query-migrate: {exc}")
            view.registers = [read_probe(vm.dom, hv.name, view.hostdevs, m) for m in marks if isinstance(m, ProbeMark)]
            guests = [m for m in marks if isinstance(m, WorkloadMark)]
            view.notes += [f"no guest workload for {m.device}: its model has none" for m in guests if not m.workload]
            view.guest = [read_workload(vm.dom, hv.name, m) for m in guests if m.workload is not None]
        else:
            view.notes.append(hv.capabilities(run_id).missing_reason(VirtCapability.QEMU_MONITOR))
    return view


def read_probe(dom: Any, host: str, hostdevs: list[Hostdev], mark: ProbeMark) -> ProbeReading:
    """The marked registers as the device this side's domain holds reads them (its own hostdev, not the mark's)."""
    reading = ProbeReading(mark.probe, host, dict(mark.values))
    probe = probe_named(mark.probe)
    target = hostdevs[0].address if len(hostdevs) == 1 else mark.hostdev
    try:
        assert probe is not None, f"no probe named {mark.probe}"
        reading.found = probe.read(dom, target, mark)
    except Exception as exc:  # a monitor error is a finding of the readback, not a crash of it
        reading.error = f"{type(exc).__name__}: {exc}"
    return reading


GUEST_RUN_WAIT = 30.0  # seconds for the heartbeat to move after a resume (nested TCG under load)


def read_workload(dom: Any, host: str, mark: WorkloadMark) -> WorkloadReading:
    """The workload's mailbox twice on this side (the guest must run on), judged against the mark."""
    reading = WorkloadReading(str(mark.workload), host, mark.before)
    # no downtime from libvirt (a save, a failed move): the guest cannot have stood longer than since the mark
    reading.allowed_stall_s = mark.downtime_s if mark.downtime_s is not None else time.time() - mark.taken_at
    workload = workload_named(str(mark.workload))
    try:
        assert workload is not None, f"no workload named {mark.workload}"
        reading.after = workload.read(dom)
        deadline = time.monotonic() + GUEST_RUN_WAIT
        while True:
            time.sleep(0.5)
            reading.later = workload.read(dom)
            if reading.later.heartbeat != reading.after.heartbeat or time.monotonic() > deadline:
                break
    except Exception as exc:  # a monitor error is a finding of the readback, not a crash of it
        reading.error = f"{type(exc).__name__}: {exc}"
    reading.judge()
    return reading


QEMU_LOG_DIR = "/var/log/libvirt/qemu"
TRACE_PATTERN = "vfio_(migration|vmstate|save|load)"


def qemu_trace(session: LabSession, host: str, name: str, lines: int = 40) -> list[str]:
    """The last vfio migration trace lines QEMU wrote to the domain's log (VMs defined with trace events)."""
    cmd = f"grep -a -E '{TRACE_PATTERN}' {QEMU_LOG_DIR}/{name}.log 2>/dev/null | tail -n {lines}"
    try:
        res = session.ssh(host).run(cmd, timeout=30, sudo=True)
    except LabError as exc:
        return [f"(log not read: {exc})"]
    return res.stdout.splitlines()


def device_view(session: LabSession, device: LabDevice, held_by_vm: bool) -> DeviceView:
    """The device's migration state through the device layer; only when no VM holds it."""
    view = DeviceView(device.id, accepted=RUNNING_STATES if device.spec.kind == "sim" else IDLE_STATES)
    if held_by_vm and device.spec.kind != "sim":
        # a real device belongs to QEMU while the VM runs; opening it would fail (EBUSY) or disturb it
        view.skipped = "held by a running VM (read after the VM is gone)"
        return view
    try:
        with open_device(session, device) as dev:
            view.state = dev.state()
            view.data_size = dev.data_size() if device.spec.protocol == "v2" else None
    except AgentOSError as exc:  # an errno from the device is a finding; a framework error propagates (broken)
        if exc.errname == "ENOENT" and device.spec.kind == "mdev":
            view.skipped = "absent: the mdev does not exist on its host (removed, e.g. by a fault)"
        else:
            view.error = f"{type(exc).__name__}: {exc}"
    return view


def recover_devices(session: LabSession, rb: Readback, devices: list[LabDevice], steps: StepLog | None = None) -> None:
    """Reset the devices this readback found out of their accepted states; record where they were.

    What a failed incoming migration or restore leaves: the destination QEMU
    entered RESUMING (load_setup) and died or was stopped by libvirt without a
    reset; a driver that neither resets on close nor advertises
    VFIO_DEVICE_FLAGS_RESET keeps RESUMING, and the next QEMU's SET
    RESUMING is then a no-op without a data fd (nested findings 4). A user
    recovers with VFIO_DEVICE_RESET (spec 3.5: RESUMING is left only by reset),
    and so does this, through the device layer. The view keeps `recovered_from`,
    judged as found (a problem, or a known issue of the model: labs.scenarios.known);
    a device the reset did not bring back stays a problem too.
    """
    by_id = {d.id: d for d in devices}
    for view in rb.devices:
        device = by_id.get(view.device)
        if device is None or view.skipped or view.error or view.state in view.accepted:
            continue
        issue = known_issue(device, "failed-operation", view.state)
        view.known = issue.describe(device.id) if issue else None
        title = f"reset {device.id} through the agent: a failed operation left it {view.state}"
        with steps.step(title) if steps is not None else step(title):
            try:
                with open_device(session, device) as dev:
                    dev.reset()
                    view.recovered_from, view.state = view.state, dev.state()
            except AgentOSError as exc:  # the device refusing the reset is a finding: the view keeps the bad state
                view.error = f"reset after {view.state}: {type(exc).__name__}: {exc}"


def ensure_idle(session: LabSession, device: LabDevice, steps: StepLog | None = None) -> str | None:
    """Before a VM takes a real device (start, incoming migration, restore): reset it if it is not idle.

    A device a previous user left RESUMING is worse than unusable on the sample mdev: the
    next RESUMING -> STOP arc dereferences the resuming file the close already
    dropped, and the host kernel oopses in its set_state (nested findings).
    Returns the state it was found in when a reset was needed (None: it was
    idle, or a simulated device).
    """
    if device.spec.kind == "sim":
        return None
    with ExitStack() as stack:
        try:
            dev = stack.enter_context(open_device(session, device))
        except AgentOSError as exc:
            if exc.errname == "ENOENT":
                return None  # not there (a fault removed it): nothing a VM could take
            raise
        state = dev.state()
        if state in IDLE_STATES:
            return None
        title = f"reset {device.id} through the agent before a VM takes it: it was left {state}"
        with steps.step(title) if steps is not None else step(title):
            dev.reset()
        return state


def read_back(
    session: LabSession,
    hvs: list[Hypervisor],
    name: str,
    devices: list[LabDevice],
    *,
    title: str = "readback",
    steps: StepLog | None = None,
    marks: Sequence[ProbeMark | WorkloadMark] = (),
) -> Readback:
    """Record every side's view of domain `name` and its devices (never raises for what it finds).

    `marks`: values a device probe wrote (labs.probes) and a guest workload's
    mailbox (labs.workloads); every side running the domain reads them back
    through the monitor, and they must match (the guest's counters go on).
    """
    rb = Readback(name)
    heading = f"{title}: {name} on {', '.join(hv.name for hv in hvs)}"
    with steps.step(heading) if steps is not None else step(heading):
        for hv in hvs:
            side = domain_side(hv, name, session.run_id, marks)
            if not hv.files_local:
                side.trace = qemu_trace(session, hv.name, name)
            rb.sides.append(side)
            for g in side.guest:
                attach(f"{title}: guest {g.workload} mailbox on {side.host} (before/after)", g.as_dict(), "json")
        for device in devices:
            held = any(s.host == device.host.name and s.domain_state in ("running", "paused") for s in rb.sides)
            rb.devices.append(device_view(session, device, held))
        attach(title, rb.as_dict(), "json")
    return rb
