"""PCI configurations around the device under test: several devices in one VM, a vIOMMU.

Skipped where libvirt cannot migrate (the sim lab's test:///). In the nested
lab each host has a second mtty mdev in the first one's VM (`vm: multi`); the
VM's guest workload drives both. The managed modes need PCI functions (a real lab).
"""

from __future__ import annotations

import pytest

from labs.inventory import LabPair
from labs.models import probe_for
from labs.scenarios import managed as mgd
from labs.scenarios import migration as mig
from labs.scenarios import multidevice as md
from labs.scenarios import viommu
from labs.scenarios.context import Scenario
from labs.scenarios.support import skip_where_no_device
from labs.virt.nodedev import NodeDevUnsupported
from labs.virt.trace import missing_p2p, states_by_device
from labs.virt.xml import managed_of

pytestmark = [pytest.mark.live_migration, pytest.mark.requires("stop_copy")]


def test_two_devices_migrate_through_p2p_states(migratable: LabPair, scenario: Scenario) -> None:
    """A VM with every device of the pair's `vm:` group migrates A -> B -> A; each device reads back on
    the side that runs the VM, and QEMU's trace shows every device went through the P2P states."""
    group = scenario.session.inventory.group_pairs(migratable)
    if len(group) < 2:
        pytest.skip(f"{migratable.id}: no multi-device VM (no other device shares the pair's `vm:` on both hosts)")
    lacking = [p.source.id for p in group if "p2p" not in p.source.capabilities]
    if lacking:
        pytest.skip(f"{', '.join(lacking)} lack the p2p capability: QEMU migrates several VFIO devices only with P2P")
    vm = md.start_vm(scenario, [p.source for p in group], "multi")
    _vm, run = mig.there_and_back(scenario, vm, migratable, group=group[1:])
    assert [leg.result.ok for leg in run.legs] == [True, True], [leg.result.error for leg in run.legs]
    assert not run.problems, "; ".join(run.problems)
    probed = sum(1 for p in group if probe_for(p.source) is not None)
    for leg in run.legs:
        side = next(s for s in leg.readback.sides if s.host == leg.destination)
        assert len(side.hostdevs) == len(group), f"{leg.destination} runs the VM with {side.hostdevs}"
        assert len(side.registers) == probed, f"{leg.destination}: {len(side.registers)} of {probed} devices read"
    skip_where_no_device(*scenario.hypervisors)
    wanted = md.wanted_p2p_states(group)
    for host in (migratable.source.host.name, migratable.destination.host.name):
        changes = md.traced_states(scenario, host, vm.name)
        problems = missing_p2p(changes, len(group), wanted)
        assert not problems, f"{host}: {'; '.join(problems)}; traced: {states_by_device(changes)}"


def test_viommu_domain_refused(migratable: LabPair, scenario: Scenario) -> None:
    """A VFIO device behind a guest vIOMMU: QEMU refuses the domain's migration (or, with the device forced
    migratable, its start), with the expected libvirt error domain and code; the source keeps the VM."""
    refusal = viommu.try_migrate(scenario, migratable)
    skip_where_no_device(*scenario.hypervisors)
    problems = viommu.refusal_problems(refusal)
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("managed", [True, False], ids=["managed", "unmanaged"])
def test_pci_hostdev_managed_modes(migratable: LabPair, scenario: Scenario, managed: bool) -> None:
    """managed='yes': libvirt detaches and gives back the functions; managed='no': the framework does
    (node-device detach before, reattach at cleanup, checked). The VM migrates A -> B -> A either way."""
    reason = mgd.not_pci([migratable.source, migratable.destination])
    if reason:
        pytest.skip(reason)
    if not managed:
        try:
            mgd.detach_all(scenario, [migratable.source, migratable.destination])
        except NodeDevUnsupported as exc:
            pytest.skip(str(exc))
    vm = md.start_vm(scenario, [migratable.source], "managed" if managed else "unmanaged", managed=managed)
    vm, run = mig.there_and_back(scenario, vm, migratable)
    assert [leg.result.ok for leg in run.legs] == [True, True], [leg.result.error for leg in run.legs]
    assert not run.problems, "; ".join(run.problems)
    assert managed_of(vm.xml()) == [managed], "the managed mode changed on the way"
    skip_where_no_device(*scenario.hypervisors)
