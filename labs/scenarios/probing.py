"""Device probes and guest workloads in scenarios: a mark before a move, read back after it.

Where a probe exists for the device's model (labs.probes) and the hypervisor
passes monitor commands, `mark` writes distinctive values into the device the
running VM holds and remembers them on the Scenario; every later readback of
that domain reads them on the side that runs it (readback.read_back(marks=)).
A fresh mark before each migration means a value can only match on the
destination if this migration carried it: a device may keep its registers across
close and reset, so a stale copy on the other host would otherwise pass.

Where the VM boots a guest workload (labs.workloads), `mark` also reads its
mailbox: the readback after the move judges the guest's counters against it.
A model without a workload gets a mark that says so.
"""

from __future__ import annotations

import time

from labs.inventory import LabDevice
from labs.models import probe_for, workload_for
from labs.probes import ProbeMark
from labs.scenarios.context import Scenario
from labs.virt.capabilities import VirtCapability
from labs.virt.domain import VM
from labs.virt.xml import hostdev_for, hostdevs_of
from labs.workloads import WorkloadMark
from labs.workloads.bootblock import BOOT_WAIT


def mark(sc: Scenario, vm: VM, *devices: LabDevice) -> list[ProbeMark]:
    """Write fresh values through `vm`'s monitor into each device it holds that has a probe, and read the
    guest workload's mailbox; they replace the VM's earlier marks."""
    if vm.hv.is_test_driver or not vm.hv.can(sc.run_id, VirtCapability.QEMU_MONITOR):
        return []
    guest = mark_workload(sc, vm, devices[0])  # one guest per VM: it drives every device it finds
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
    sc.marks[vm.name] = [*written, guest]
    return written


def mark_workload(sc: Scenario, vm: VM, device: LabDevice) -> WorkloadMark:
    """The guest workload's mailbox before a move (waits for the guest to reach its loop after a boot)."""
    workload = workload_for(device)
    out = WorkloadMark(workload.name if workload else None, device.id, vm.hv.name)
    if workload is None:
        return out
    with sc.steps.step(f"guest {workload.name}: read its mailbox through the monitor of {vm}") as rec:
        t = time.monotonic()
        out.before = workload.read(vm.dom, wait=BOOT_WAIT)
        out.taken_at = time.time()
        # after a start this is the guest's boot time (firmware + bootblock to its loop)
        rec.detail = {"waited_s": round(time.monotonic() - t, 3), **out.before.as_dict()}
    return out


def set_downtime(sc: Scenario, vm: VM, downtime_ms: float | None) -> None:
    """The move's downtime as libvirt measured it: the longest pause the guest may see."""
    for m in marks(sc, vm):
        if isinstance(m, WorkloadMark):
            m.downtime_s = downtime_ms / 1000 if downtime_ms is not None else None


def marks(sc: Scenario, vm: VM) -> list[ProbeMark | WorkloadMark]:
    return sc.marks.get(vm.name, [])
