"""Device probes in scenarios: write fresh register values before a move, read them back after it.

Where a probe exists for the device's model (labs.probes) and the hypervisor
passes monitor commands, `mark` writes distinctive values into the device the
running VM holds and remembers them on the Scenario; every later readback of
that domain reads them on the side that runs it (readback.read_back(marks=)).
A fresh mark before each migration means a value can only match on the
destination if this migration carried it: a device may keep its registers across
close and reset, so a stale copy on the other host would otherwise pass.
"""

from __future__ import annotations

from labs.inventory import LabDevice
from labs.models import probe_for
from labs.probes import ProbeMark
from labs.scenarios.context import Scenario
from labs.virt.capabilities import VirtCapability
from labs.virt.domain import VM
from labs.virt.xml import hostdev_for, hostdevs_of


def mark(sc: Scenario, vm: VM, device: LabDevice) -> ProbeMark | None:
    """Write fresh values through `vm`'s monitor into the device it holds; None where no probe applies."""
    probe = probe_for(device)
    if probe is None or vm.hv.is_test_driver or not vm.hv.can(sc.run_id, VirtCapability.QEMU_MONITOR):
        return None
    with sc.steps.step(f"probe {probe.name}: write registers of {device.id} through the monitor of {vm}") as rec:
        held = hostdevs_of(vm.xml())
        hostdev = held[0].address if len(held) == 1 else hostdev_for(device).address
        written = probe.mark(vm.dom, device, hostdev)
        written.written_on = vm.hv.name
        rec.detail = {k: f"{v:#04x}" for k, v in written.values.items()}
    sc.marks[vm.name] = [written]
    return written


def marks(sc: Scenario, vm: VM) -> list[ProbeMark]:
    return sc.marks.get(vm.name, [])
