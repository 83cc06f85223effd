"""VM-level save and resume through libvirt, with readback after every step.

On the sim lab these run on libvirt's test:/// driver, whose save images hold
the domain and no device state: they check the VM lifecycle and the readback,
then end as skips (the device was never touched), not passes. The device's own
save/resume is driven explicitly through the device layer in
test_device_content_round_trip (and the conformance suites).
"""

from __future__ import annotations

import pytest

from labs.inventory import LabDevice, LabPair
from labs.scenarios import save_resume as sr
from labs.scenarios.context import Scenario
from labs.scenarios.support import require, skip_where_no_device
from labs.session import LabSession
from labs.virt.capabilities import VirtCapability

pytestmark = [pytest.mark.save_resume]


def test_save_then_restore(lab: LabSession, device: LabDevice, scenario: Scenario) -> None:
    require(lab, [device.host], VirtCapability.SAVE_RESTORE)
    vm = sr.start_vm(scenario, device, "save")
    result = sr.save_restore(scenario, vm, device)
    after_save, after_restore = result.readbacks
    assert after_save.state_on(device.host.name) in ("shutoff", "absent"), "a saved VM must not keep running"
    assert result.image_bytes, f"no save image at {result.image}"
    problems = result.save_problems + after_restore.problems(expect_on=device.host.name)
    assert not problems, "; ".join(problems)
    skip_where_no_device(vm.hv)


def test_managed_save_then_start(lab: LabSession, device: LabDevice, scenario: Scenario) -> None:
    require(lab, [device.host], VirtCapability.MANAGED_SAVE)
    vm = sr.start_vm(scenario, device, "msave")
    result = sr.managed_save_start(scenario, vm, device)
    after_save, after_start = result.readbacks
    assert after_save.state_on(device.host.name) == "shutoff"
    problems = result.save_problems + after_start.problems(expect_on=device.host.name)
    assert not problems, "; ".join(problems)
    skip_where_no_device(vm.hv)


def test_restore_on_other_host(lab: LabSession, pair: LabPair, scenario: Scenario) -> None:
    require(lab, [pair.source.host, pair.destination.host], VirtCapability.SAVE_RESTORE)
    vm = sr.start_vm(scenario, pair.source, "move")
    result = sr.restore_on_other_host(scenario, vm, pair.source, pair.destination)
    problems = result.save_problems + result.final.problems(expect_on=pair.destination.host.name)
    assert not problems, "; ".join(problems)
    skip_where_no_device(vm.hv, result.vm.hv)


@pytest.mark.sim_only("test:/// carries no device state, so the sim lab drives the device explicitly")
def test_device_content_round_trip(lab: LabSession, pair: LabPair, scenario: Scenario) -> None:
    """Save on the source's device, resume into the destination's (seeded apart), through the device layer."""
    rt = sr.device_round_trip(scenario, pair.source, pair.destination, why="test:/// saves carry no device state")
    assert rt.stream_bytes > 0
    assert not rt.problems, "; ".join(rt.problems)
    assert rt.check is not None and rt.check.undecided is None, rt.check and rt.check.undecided
