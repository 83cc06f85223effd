"""ERROR recovery: drive a device into ERROR (or a state it refuses to leave), check it holds
there, VFIO_DEVICE_RESET, read RUNNING back, then prove the device works: a full save/resume.

Two ways in, both through the fault injectors (labs.faults), so teardown undoes them:
- `knob`: a simulated driver's transition fault armed to land in ERROR (DeviceTransitionFailure).
  v2 fails the last arc of a save (STOP_COPY -> STOP) while the saving data_fd is open, and
  that fd must be dead after the reset (V2-R16; the sim drivers already end the session on
  entering ERROR, so a driver whose fd survives a reset from a live session is the
  conformance suite's to catch); v1 fails 001 -> 010 into 110.
- a corrupted resume stream (CorruptResumeStream, spec 5.4 recipes, in the saved chunks): works
  on real devices. A driver may answer it with ERROR (then the same checks as above) or stay in
  RESUMING (the sample mdev, and the sim drivers by default). If it took the data and stays RESUMING,
  leaving RESUMING must stay refused and never read RUNNING (V2-R14, V1-R17); if it refused the
  data at the write, that is the refusal (V1-R17) and the exit is not tried.

Every phase is one step whose title names the device and its host; the outcome is attached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from labs.attachments import attach
from labs.faults import CorruptResumeStream, DeviceTransitionFailure, Fault
from labs.faults.device import StreamDamage
from labs.inventory import LabDevice
from labs.scenarios import roundtrip
from labs.scenarios.context import Scenario
from labs.scenarios.roundtrip import ContentCheck
from labs.vfio.access import RUNNING_STATES, DeviceAccess
from labs.vfio.client import AgentOSError

Entry = Literal["knob", "truncate", "bad-magic"]
# every state a SET / device_state write can name, per protocol (ERROR itself is no transition)
TARGETS = {
    "v1": ("RUNNING", "STOP", "STOP_COPY", "PRE_COPY", "RESUMING"),
    "v2": ("RUNNING", "STOP", "STOP_COPY", "RESUMING", "RUNNING_P2P", "PRE_COPY", "PRE_COPY_P2P"),
}
OPTIONAL = {"RUNNING_P2P": "p2p", "PRE_COPY": "pre_copy", "PRE_COPY_P2P": "pre_copy"}
STREAM_OPS = ("data_write", "v1_resume")  # the agent ops that carry a resume stream's data


def where(device: LabDevice) -> str:
    """'simv2 on hostA': the device and its host, for step titles."""
    return f"{device.name} on {device.host.name}"


@dataclass
class Recovery:
    device: str
    entry: str
    entered: str | None = None  # the state the fault left
    entry_error: str | None = None  # how the device refused what drove it there
    refusals: dict[str, str] = field(default_factory=dict)  # target -> errname, or "ACCEPTED"
    states_seen: dict[str, str] = field(default_factory=dict)  # target -> state read back after the attempt
    after_reset: str | None = None
    old_fd: str | None = None  # I/O on the data_fd of the session the reset ended (v2)
    cycle: list[ContentCheck] = field(default_factory=list)  # the round trips after the recovery
    state_after_cycle: str | None = None

    @property
    def undecided(self) -> str | None:
        """Why the cycle's content verdict could not be made (no seeder for the model), if so."""
        return next((c.undecided for c in self.cycle if c.undecided), None)

    @property
    def problems(self) -> list[str]:
        out: list[str] = []
        if self.entered is None:
            return [f"{self.device}: the fault ({self.entry}) did not run"]
        if self.entry == "knob" and self.entered != "ERROR":
            out.append(f"{self.device}: a transition failure armed to land in ERROR left {self.entered}")
        if self.entry_error is None:
            out.append(f"{self.device}: the {self.entry} fault was accepted; the device is {self.entered}")
        if self.entered in RUNNING_STATES:
            out.append(f"{self.device}: RUNNING after a refused {self.entry} (V2-R14/V1-R17)")
        for target, outcome in self.refusals.items():
            if outcome == "ACCEPTED":
                out.append(f"{self.device}: {self.entered} -> {target} was accepted (V2-R15/V1-R9)")
            seen = self.states_seen.get(target)
            if seen != self.entered:
                out.append(f"{self.device}: {self.entered} -> {target} refused but the state is now {seen}")
        if self.after_reset not in RUNNING_STATES:
            out.append(f"{self.device}: {self.after_reset} after VFIO_DEVICE_RESET, not RUNNING (V2-R15/V1-R19)")
            return out  # no cycle was tried on a device that did not recover
        if self.old_fd == "ACCEPTED":
            out.append(f"{self.device}: the old data_fd still works after the reset (V2-R16)")
        if self.state_after_cycle not in RUNNING_STATES:
            out.append(f"{self.device}: {self.state_after_cycle} after the save/resume cycle")
        if not self.cycle:
            out.append(f"{self.device}: no save/resume cycle was made after the recovery")
        out += [f"{self.device}: save/resume cycle after recovery: {p}" for c in self.cycle for p in c.problems]
        return out


def _outcome(action: Callable[..., Any], *args: Any, **kw: Any) -> str:
    """The errname that refused `action(*args)`, or ACCEPTED."""
    try:
        action(*args, **kw)
    except AgentOSError as exc:  # only an errno from the device is a refusal; a framework error propagates
        return exc.errname
    return "ACCEPTED"


def _targets(dev: DeviceAccess, device: LabDevice) -> list[str]:
    supports = getattr(dev, "supports", None)
    out = []
    for target in TARGETS[device.spec.protocol]:
        cap = OPTIONAL.get(target)
        if device.spec.protocol == "v2" and cap and supports is not None and not supports(cap):
            continue  # an optional state the device does not advertise is refused anyway (V2-R4)
        out.append(target)
    return out


def enter_by_knob(sc: Scenario, dev: DeviceAccess, device: LabDevice, rec: Recovery) -> tuple[Fault, int | None]:
    """Fail a save into ERROR with the fault knob; returns the fault and the data_fd it orphaned (v2)."""
    v2 = device.spec.protocol == "v2"
    arc = "STOP_COPY->STOP" if v2 else "RUNNING->STOP_COPY"
    fault = sc.inject(DeviceTransitionFailure(dev, device, arc, errno="EIO", to_error=True))
    fd: int | None = None
    with sc.steps.step(f"drive {where(device)} into ERROR: save with {arc} failing (fault knob)"):
        if v2:
            opened = dev.set_state("STOP_COPY")
            fd = opened if isinstance(opened, int) else None
            rec.entry_error = _outcome(dev.set_state, "STOP")
        else:
            rec.entry_error = _outcome(dev.set_state, "STOP_COPY")
        rec.entered = dev.state()
        if rec.entry_error == "ACCEPTED":
            rec.entry_error = None
    return fault, fd


def enter_by_stream(sc: Scenario, dev: DeviceAccess, device: LabDevice, rec: Recovery, how: StreamDamage) -> Fault:
    """Resume a damaged copy of the device's own stream (spec 5.4): refused, into ERROR or RESUMING."""
    with sc.steps.step(f"save {where(device)} through the agent and resume it intact (the stream to damage)"):
        stream = dev.save()
        saved = getattr(stream, "chunks", None)  # the device layer's SavedStream keeps chunk boundaries
        data = list(saved()) if saved is not None else stream.data()
        dev.resume(stream)
    with sc.steps.step(f"drive {where(device)} into a refused state: resume a {how} stream"):
        fault = CorruptResumeStream(dev, device, data, how)
        sc.inject(fault)
        rec.entry_error = fault.refused
        rec.entered = fault.state_after
    return fault


def refused_at_write(refusal: str | None) -> bool:
    """Did the device refuse the stream's data itself (not the exit from RESUMING)? CorruptResumeStream
    records the refusal as 'AgentOSError: <op>: <errno>...'."""
    parts = (refusal or "").split(": ")
    return len(parts) > 1 and parts[1] in STREAM_OPS


def check_refusals(sc: Scenario, dev: DeviceAccess, device: LabDevice, rec: Recovery) -> None:
    """In ERROR every transition is refused and the state stays ERROR (V2-R15, V1-R9).
    In RESUMING after a bad stream the exit validated it, so leaving stays refused and never reads
    RUNNING (V2-R14, V1-R17). A device that refused the data at the write has already refused
    (V1-R17: a failed write or a failed exit); its exit is not tried: a driver that checks the
    header at that write only (the sample mdev, spec 5.4) would take the stored bytes."""
    if rec.entered == "ERROR":
        targets = _targets(dev, device)
    elif refused_at_write(rec.entry_error):
        with sc.steps.step(f"{where(device)} refused the stream at the write; it stays {rec.entered}"):
            return
    else:
        targets = ["STOP", "RUNNING"]
    with sc.steps.step(f"every transition of {where(device)} from {rec.entered} is refused: {', '.join(targets)}"):
        for target in targets:
            rec.refusals[target] = _outcome(dev.set_state, target)
            rec.states_seen[target] = dev.state()


def reset_and_read_back(
    sc: Scenario, dev: DeviceAccess, device: LabDevice, rec: Recovery, fault: Fault, fd: int | None
) -> None:
    """RESET, RUNNING read back, the old data_fd dead; then the fault is undone (knobs disarmed) while
    the device is still open: teardown may come after a VM took the device over."""
    with sc.steps.step(f"VFIO_DEVICE_RESET {where(device)}, read back RUNNING"):
        dev.reset()
        rec.after_reset = dev.state()
    client = getattr(dev, "client", None)
    if fd is not None and client is not None:
        with sc.steps.step(f"the data_fd {where(device)} had before the reset is dead (V2-R16)"):
            rec.old_fd = _outcome(client.call, "fd_read", fd=fd, length=16)
            client.call("close_fd", fd=fd)
    fault.undo()


def cycle(sc: Scenario, dev: DeviceAccess, device: LabDevice, rec: Recovery) -> None:
    """Round trips after the recovery into a device seeded apart (roundtrip.both_ways), content read back."""
    rec.cycle = roundtrip.both_ways(sc.steps, dev, device, f"save/resume cycle of {where(device)} after recovery")
    rec.state_after_cycle = dev.state()


def recover(sc: Scenario, dev: DeviceAccess, device: LabDevice, entry: Entry) -> Recovery:
    """The whole recovery on an open device: in, refusals, reset, readback, save/resume cycle."""
    rec = Recovery(device.id, entry)
    if dev.state() not in RUNNING_STATES:
        with sc.steps.step(f"reset {where(device)} first (left {dev.state()} by an earlier user)"):
            dev.reset()
    pending = len(sc.faults.faults)
    try:
        fd = None
        if entry == "knob":
            fault, fd = enter_by_knob(sc, dev, device, rec)
        else:
            fault = enter_by_stream(sc, dev, device, rec, entry)
        check_refusals(sc, dev, device, rec)
        reset_and_read_back(sc, dev, device, rec, fault, fd)
        if rec.after_reset in RUNNING_STATES:
            cycle(sc, dev, device, rec)
    finally:
        # a failure or a timeout on the way: undo now, while `dev` is open (the scenario's cleanup
        # comes after the caller has closed it, and a device fault is undone through the handle)
        for fault in sc.faults.faults[pending:]:
            try:
                fault.undo()
            except Exception:
                pass  # still pending: the scenario's cleanup tries again and reports it
        attach(f"recovery {device.id} ({entry})", asdict(rec), "json")
    return rec
