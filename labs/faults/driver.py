"""The device's own driver fails an arc while QEMU drives it: a real driver's fault knobs (the nested
lab builds one from a patch in labs/nested), armed through the host's agent by the device's
sysfs path, since QEMU holds the device. Undo disarms them; `lab janitor` disarms those a killed run
left armed (labs.janitor). The knobs are the driver module's: one armed arc per host at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from labs.errors import InfraError
from labs.faults.base import ExpectedError, Fault, Side
from labs.inventory import LabDevice
from labs.inventory.models import MdevDevice, PciDevice
from labs.models import has_fault_knobs
from labs.vfio.client import AgentClient
from labs.virt.sequence import MIGRATED_DESTINATION, MIGRATED_SOURCE, EventPattern


def knob_target(device: LabDevice) -> tuple[str, str]:
    """The agent's way to the device's driver without opening it: kind and address."""
    spec = device.spec
    if isinstance(spec, MdevDevice):
        return "mdev", spec.uuid
    if isinstance(spec, PciDevice):
        return "pci", spec.pci
    raise InfraError(f"{device.id}: a {spec.kind} device's knobs are the sim driver's (DeviceAccess.faults)")


def _arc(arc: str) -> tuple[str, str]:
    src, dst = (part.strip().upper() for part in arc.split("->"))
    return src, dst


class DriverKnobs(Fault):
    """Arm a real driver's knobs (`spec`, the agent's driver_faults), the next job or save meets them; undo
    reads what fired and disarms. The outcome (which side runs, the libvirt errors, each side's lifecycle
    events) is the caller's data: it depends on where in the job the driver misbehaves."""

    def __init__(
        self,
        agent: Callable[[], AbstractContextManager[AgentClient]],
        device: LabDevice,
        what: str,
        spec: dict[str, Any],
        *,
        runs_on: Side,
        errors: tuple[ExpectedError, ...],
        source_events: EventPattern | None = None,
        destination_events: EventPattern | None = None,
    ) -> None:
        if device.spec.kind == "sim" or not has_fault_knobs(device):
            raise InfraError(f"{device.id}: no real driver with fault knobs (a model that declares them)")
        self.runs_on = runs_on
        self.expected_errors = errors
        if source_events is not None:
            self.source_events = source_events
        if destination_events is not None:
            self.destination_events = destination_events
        super().__init__(f"{device.id} {what}")
        self.agent = agent  # the host's agent, borrowed for each call only (labs.agentpool.agent_for)
        self.device = device
        self.spec = spec
        self.fired: int | None = None  # how often an armed arc failed, read at undo
        self.left: dict[str, Any] = {}  # the knobs as undo found them (a one-shot knob that fired is back off)

    def _call(self, spec: dict[str, Any]) -> dict[str, Any]:
        kind, address = knob_target(self.device)
        with self.agent() as client:
            return dict(client.call("driver_faults", spec=spec, kind=kind, address=address))

    def _inject(self) -> None:
        self._call({"clear": True, **self.spec})
        self.note(f"armed {self.spec} in {self.device.id}'s driver on {self.device.host.name}")

    def _undo(self) -> None:
        self.left = self._call({})
        self.fired = int(self._call({"clear": True})["fired"])
        self.note(f"disarmed the driver's knobs (an arc failed {self.fired} times; found {self.left})")


class DriverArcFailure(DriverKnobs):
    """One arc of the device's migration FSM fails in its driver with `errno`, staying put or entering
    ERROR (`to_error`), the next time QEMU takes it ('*->STOP_COPY': from any state)."""

    name = "driver-arc-failure"

    def __init__(
        self,
        agent: Callable[[], AbstractContextManager[AgentClient]],
        device: LabDevice,
        arc: str,
        *,
        errno: str = "EIO",
        to_error: bool = True,
        **outcome: Any,
    ) -> None:
        src, dst = _arc(arc)
        knob = {"from": src, "to": dst, "errno": errno, "error": to_error, "times": 1}
        what = f"{src}->{dst} -> {errno}{' (ERROR)' if to_error else ''}"
        super().__init__(agent, device, what, {"transitions": [knob]}, **outcome)


class DriverSlowArc(DriverKnobs):
    """One arc of the device's migration FSM takes `stall_ms` longer in its driver, then succeeds (a driver
    slow to save or load its state): the job completes, with that much more downtime where the arc falls in
    the switchover."""

    name = "driver-slow-arc"

    def __init__(
        self, agent: Callable[[], AbstractContextManager[AgentClient]], device: LabDevice, arc: str, stall_ms: int
    ) -> None:
        src, dst = _arc(arc)
        knob = {"from": src, "to": dst, "errno": None, "stall_ms": stall_ms, "times": 1}
        super().__init__(
            agent,
            device,
            f"{src}->{dst} {stall_ms} ms slower",
            {"transitions": [knob]},
            runs_on="destination",
            errors=(),
            source_events=MIGRATED_SOURCE,
            destination_events=MIGRATED_DESTINATION,
        )


class DriverStreamKnob(DriverKnobs):
    """A one-shot knob on the driver's next saved stream, back at `off` once a save met it (`landed`)."""

    knob = ""
    off = ""
    what = ""

    def __init__(
        self, agent: Callable[[], AbstractContextManager[AgentClient]], device: LabDevice, value: int, **outcome: Any
    ) -> None:
        super().__init__(agent, device, self.what.format(value), {self.knob: value}, **outcome)

    @property
    def landed(self) -> bool:
        return str(self.left.get(self.knob, "")) == self.off


class DriverStreamCut(DriverStreamKnob):
    """The driver's next saved stream ends `value` bytes short (a source driver that loses the tail of its state)."""

    name = "driver-stream-cut"
    knob, off, what = "stream_cut", "0", "saved stream cut by {} bytes"


class DriverStreamFlip(DriverStreamKnob):
    """The driver's next saved stream has the byte at offset `value` inverted (a source driver that corrupts its
    state and sends it anyway)."""

    name = "driver-stream-flip"
    knob, off, what = "stream_flip", "-1", "saved stream byte {} inverted"
