"""mtty_faults: the kernel's mtty sample with fault knobs, built in the nested image from
labs/nested/mtty_faults.patch. The same UART, stream and guest workload as mtty (labs.models.mtty),
under its own module, parent and type names, so plain mtty stays the reference; its driver fails
an arc on command (staying put or entering ERROR), stalls one, or cuts or corrupts a saved stream.
"""

from __future__ import annotations

from dataclasses import replace

from labs.inventory.models import Device, MdevDevice
from labs.models import mtty  # the module, not its MTTY: each model file registers only its own

NAME = "mtty_faults"


def is_mtty_faults(spec: Device) -> bool:
    return isinstance(spec, MdevDevice) and (spec.parent == NAME or spec.type.startswith(f"{NAME}-"))


MTTY_FAULTS = replace(
    mtty.MTTY,
    name=NAME,
    description="mtty with fault knobs (labs/nested/mtty_faults.patch): a real kernel driver that fails on command",
    modules=("vfio", "mdev", NAME),
    matches=is_mtty_faults,
    incompatible={f"{NAME}-1": f"{NAME}-2", f"{NAME}-2": f"{NAME}-1"},
    fault_knobs=True,
)
