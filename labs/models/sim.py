"""The simulated drivers (labs.sim): content by digest, seeded by a fill; no host module, no probe."""

from __future__ import annotations

from labs.inventory.models import Capability, Device
from labs.models import DeviceModel
from labs.vfio.device import DeviceHandle


def _fill(dev: DeviceHandle, value: str) -> None:
    dev.fill(value)


def _is_sim(spec: Device) -> bool:
    return spec.kind == "sim"


SIM = DeviceModel(
    name="sim",
    kind="sim",
    description="a labs.sim driver model (inventory `driver:`), served by the host agent",
    migration_flags=frozenset({Capability.STOP_COPY}),
    # the sim drivers advertise what their options say
    optional_flags=frozenset(Capability),
    matches=_is_sim,
    seeder=_fill,
)
