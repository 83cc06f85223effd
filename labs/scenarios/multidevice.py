"""VMs with several devices, and what QEMU's trace says it did to them.

A VM holds every device of one inventory `vm:` group. With two or more VFIO
devices QEMU moves them through the P2P states (RUNNING_P2P, PRE_COPY_P2P), so
no device is running while another is already stopped; the trace events of
the domain's QEMU (labs.virt.trace) show which states were set on which device.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from labs.errors import InfraError, LabError
from labs.inventory import LabDevice, LabPair
from labs.inventory.models import Capability
from labs.scenarios import probing
from labs.scenarios.context import Scenario
from labs.scenarios.held import despite_held_device
from labs.scenarios.readback import QEMU_LOG_DIR, ensure_idle
from labs.virt.domain import VM
from labs.virt.trace import P2P_STATES, SET_STATE_EVENT, StateChange, set_states
from labs.virt.xml import VFIO_TRACE_EVENTS, spec_for


def start_vm(sc: Scenario, devices: Sequence[LabDevice], label: str, managed: bool | None = None) -> VM:
    """Define and start one VM holding all `devices` (one host), traced for VFIO state changes, probes marked.

    `managed`: the PCI hostdevs' managed mode (None: libvirt's managed='yes'; False needs labs.scenarios.managed).
    """
    hv = sc.hv(devices[0].host)
    name = sc.vm_name(label)
    sc.track_domain(name)
    trace = () if hv.is_test_driver else (VFIO_TRACE_EVENTS if sc.trace_vfio else (SET_STATE_EVENT,))
    with sc.steps.step(f"define {name} on {hv.name} with {', '.join(d.id for d in devices)}"):
        boot = sc.guest_boot(hv, devices[0])
        vm = hv.define(spec_for(name, list(devices), hv.virt_type, trace_events=trace, managed=managed, **boot))
    for device in devices:
        ensure_idle(sc.session, device, sc.steps)
    with sc.steps.step(f"start {vm}"):
        despite_held_device(sc, vm.hv, vm.start)
        if vm.state() != "running":
            raise InfraError(f"{vm}: {vm.state()} after start")
    probing.mark(sc, vm, *devices)
    return vm


def wanted_p2p_states(group: Sequence[LabPair]) -> tuple[str, ...]:
    """The P2P states QEMU must use on every device: PRE_COPY_P2P only where all devices do pre-copy."""
    pre_copy = all(Capability.PRE_COPY in p.source.capabilities for p in group)
    return P2P_STATES if pre_copy else ("RUNNING_P2P",)


def traced_states(sc: Scenario, host: str, domain: str) -> list[StateChange]:
    """Every VFIO state change QEMU traced for `domain` on `host` (all its QEMUs there: outgoing and incoming)."""
    log = shlex.quote(f"{QEMU_LOG_DIR}/{domain}.log")
    cmd = f"grep -a {SET_STATE_EVENT} {log} || test -e {log}"
    try:
        res = sc.session.ssh(host).run(cmd, timeout=60, sudo=True, idempotent=True, check=True)
    except LabError as exc:
        raise InfraError(f"{host}: the QEMU log of {domain} was not read: {exc}") from exc
    return set_states(res.stdout.splitlines())
