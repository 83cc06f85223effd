"""Device probes in scenarios: write fresh register values before a move, read them back after it.

Where a probe exists for the device's model (labs.probes) and the hypervisor
passes monitor commands, `mark` writes distinctive values into the device the
running VM holds and remembers them on the Scenario; every later readback of
that domain reads them on the side that runs it (readback.read_back(marks=)).
A fresh mark before each migration means a value can only match on the
destination if this migration carried it: mtty keeps its UART registers across
close and reset, so a stale copy on the other host would otherwise pass.
"""

from __future__ import annotations

from labs.inventory import LabDevice
from labs.probes import ProbeMark, probe_for
from labs.scenarios.context import Scenario
from labs.virt.capabilities import VirtCapability
from labs.virt.domain import VM
from labs.virt.xml import hostdev_for, hostdevs_of


def mark(sc: Scenario, vm: VM, *devices: LabDevice) -> list[ProbeMark]:
    """Write fresh values through `vm`'s monitor into each device it holds that has a probe; they replace
    the VM's earlier marks."""
    if vm.hv.is_test_driver or not vm.hv.can(sc.run_id, VirtCapability.QEMU_MONITOR):
        return []
    written: list[ProbeMark] = []
    for device in devices:
        probe = probe_for(device)
        if probe is None:
            continue
        with sc.steps.step(f"probe {probe.name}: write registers of {device.id} through the monitor of {vm}") as rec:
            held = hostdevs_of(vm.xml())
            hostdev = held[0].address if len(held) == 1 else hostdev_for(device).address
            one = probe.mark(vm.dom, device, hostdev)
            one.written_on = vm.hv.name
            rec.detail = {k: f"{v:#04x}" for k, v in one.values.items()}
        written.append(one)
    if written:
        sc.marks[vm.name] = written
    return written


def marks(sc: Scenario, vm: VM) -> list[ProbeMark]:
    return sc.marks.get(vm.name, [])
