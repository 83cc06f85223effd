"""PCI hostdevs with managed='no': the framework, not libvirt, detaches and gives back the functions.

Every function the VM may use (the source's and, for a migration, the
destination's) is detached before the VM or the incoming migration needs it,
and reattached at the scenario's cleanup once no domain holds it; the cleanup
checks it went back to the driver it was found on.
"""

from __future__ import annotations

from collections.abc import Sequence

from labs.inventory import LabDevice
from labs.inventory.models import PciDevice
from labs.scenarios.context import Scenario
from labs.virt.nodedev import detach


def not_pci(devices: Sequence[LabDevice]) -> str | None:
    """Why managed mode does not apply to these devices (None: all are PCI functions)."""
    others = [f"{d.id} ({d.spec.kind})" for d in devices if not isinstance(d.spec, PciDevice)]
    return f"managed mode is a PCI hostdev's; not PCI: {', '.join(others)}" if others else None


def detach_all(sc: Scenario, devices: Sequence[LabDevice]) -> None:
    """Detach each function on its host (virNodeDeviceDetachFlags); reattached at cleanup (ReAttach)."""
    for device in devices:
        spec = device.spec
        assert isinstance(spec, PciDevice), not_pci([device])
        hv = sc.hv(device.host)
        with sc.steps.step(f"detach {device.id} from its host driver (managed='no')") as rec:
            done = detach(hv.conn, spec.pci)
            rec.detail = {"host_driver": done.host_driver, "bound_now": done.vfio_driver}
        sc.on_cleanup(f"reattached {device.id} to {done.host_driver or 'no driver'}", done.reattach)
