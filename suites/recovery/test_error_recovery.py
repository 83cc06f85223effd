"""ERROR recovery: into ERROR (or a refused state), every transition refused there, VFIO_DEVICE_RESET,
RUNNING read back, then a device save/resume cycle, a VM save/restore and a live migration succeed.

The device is driven through the device layer (the agent); the VM steps run through libvirt once
the agent has let go of the device. ERROR by a fault knob runs on simulated drivers and on a real
kernel driver built with knobs (mtty_faults, in the nested lab); other devices enter by a stream.
On the sim lab VM save/restore runs on libvirt's test:/// driver, which never touches the device:
after its checks that test ends as a skip saying so; the live migration is skipped there with the
missing capability as the reason.
"""

from __future__ import annotations

import pytest

from labs.agentpool import open_device
from labs.inventory import LabDevice, LabPair
from labs.models import has_fault_knobs
from labs.scenarios import migration as mig
from labs.scenarios import recovery as rc
from labs.scenarios import save_resume as sr
from labs.scenarios.context import Scenario
from labs.scenarios.support import require, skip_where_no_device
from labs.session import LabSession
from labs.virt.capabilities import VirtCapability

pytestmark = [pytest.mark.recovery, pytest.mark.fault]


def _recover(lab: LabSession, scenario: Scenario, device: LabDevice, entry: rc.Entry) -> rc.Recovery:
    with open_device(lab, device) as dev:
        return rc.recover(scenario, dev, device, entry)


def _entry(device: LabDevice) -> rc.Entry:
    """ERROR by the fault knob where there is one; a corrupted stream works on every device."""
    return "knob" if has_fault_knobs(device) else "truncate"


@pytest.mark.fault_knobs
@pytest.mark.rule("V1-R9", "V1-R19", "V2-R15", "V2-R16")
def test_error_by_fault_knob(lab: LabSession, device: LabDevice, scenario: Scenario) -> None:
    rec = _recover(lab, scenario, device, "knob")
    assert rec.entered == "ERROR", f"a transition failure armed to land in ERROR left {rec.entered}"
    assert rec.refusals and all(v != "ACCEPTED" for v in rec.refusals.values()), rec.refusals
    assert not rec.problems, "; ".join(rec.problems)
    assert rec.undecided is None, rec.undecided


@pytest.mark.rule("V1-R17", "V2-R14", "V1-R9", "V1-R19", "V2-R15")
@pytest.mark.parametrize("how", ["truncate", "bad-magic"])
def test_refused_stream_then_reset(lab: LabSession, device: LabDevice, scenario: Scenario, how: rc.Entry) -> None:
    rec = _recover(lab, scenario, device, how)
    assert rec.entered in ("ERROR", "RESUMING"), f"a refused {how} stream left {rec.entered}"
    assert not rec.problems, "; ".join(rec.problems)
    if rec.undecided:
        pytest.skip(f"the save/resume cycle after recovery made no content verdict: {rec.undecided}")


@pytest.mark.save_resume
@pytest.mark.rule("V1-R19", "V2-R15")
def test_vm_save_restore_after_recovery(lab: LabSession, device: LabDevice, scenario: Scenario) -> None:
    require(lab, [device.host], VirtCapability.SAVE_RESTORE)
    rec = _recover(lab, scenario, device, _entry(device))
    assert not rec.problems, "; ".join(rec.problems)
    vm = sr.start_vm(scenario, device, "recovered")
    result = sr.save_restore(scenario, vm, device)
    problems = result.save_problems + result.final.problems(expect_on=device.host.name)
    assert not problems, "; ".join(problems)
    skip_where_no_device(vm.hv)


@pytest.mark.live_migration
@pytest.mark.requires("stop_copy")
@pytest.mark.rule("V1-R19", "V2-R15")
def test_live_migration_after_recovery(lab: LabSession, migratable: LabPair, scenario: Scenario) -> None:
    for device in (migratable.source, migratable.destination):
        rec = _recover(lab, scenario, device, _entry(device))
        assert not rec.problems, "; ".join(rec.problems)
    vm = sr.start_vm(scenario, migratable.source, "recovered-mig")
    _vm, run = mig.there_and_back(scenario, vm, migratable, rounds=1)
    assert [leg.result.ok for leg in run.legs] == [True, True], [leg.result.error for leg in run.legs]
    assert not run.problems, "; ".join(run.problems)
