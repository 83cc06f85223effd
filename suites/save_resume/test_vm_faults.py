"""VM-level device faults on restore: the device stream inside a saved image is damaged, restore must fail.

On a real device this is how a device transition is made to fail (spec 5.4):
QEMU writes the damaged stream into the destination's RESUMING data fd, the
driver refuses it, and the restore fails. Then: no domain runs, the device is
judged as the failure left it (a state out of RUNNING/STOP fails, or is shown as
a known issue of the model), recovered (VFIO_DEVICE_RESET), the image is
repaired, and a restore from it brings the VM back with the register values the
device probe wrote before the save.

Needs a device model that knows its stream's layout (labs.models: mtty's) and a
libvirt that saves real device state (not test:///).
"""

from __future__ import annotations

import pytest

from labs.attachments import attach
from labs.faults.device import ImageDamage
from labs.inventory import LabDevice
from labs.models import model_of
from labs.scenarios import save_resume as sr
from labs.scenarios.context import Scenario
from labs.scenarios.full_save import save_to_full_filesystem
from labs.scenarios.known import xfail_known
from labs.scenarios.support import require
from labs.session import LabSession
from labs.virt.capabilities import VirtCapability

pytestmark = [pytest.mark.save_resume, pytest.mark.fault]


@pytest.mark.parametrize("how", ["bad-magic", "bad-version", "bad-ports"])
def test_restore_with_damaged_device_stream(
    lab: LabSession, device: LabDevice, scenario: Scenario, how: ImageDamage
) -> None:
    model = model_of(device)
    if model.stream is None or (how != "bad-magic" and how not in model.stream.header_damage):
        pytest.skip(f"{device.id}: its model ({model.name}) has no stream layout for {how} in a save image")
    require(lab, [device.host], VirtCapability.SAVE_RESTORE, VirtCapability.QEMU_MONITOR)
    vm = sr.start_vm(scenario, device, f"dmg-{how}")
    out = sr.restore_corrupted(scenario, vm, device, how)
    assert out.refused, f"restore from an image with a {how} device stream was accepted"
    assert out.after_refusal is not None
    assert out.after_refusal.running_on == [], f"a refused restore left {vm.name} running"
    # the device is judged as the failed restore left it (read before the recovery reset)
    problems = out.after_refusal.device_problems()
    assert out.following is not None
    problems += out.following.problems(expect_on=device.host.name)
    assert not problems, "; ".join(problems)
    xfail_known(out.after_refusal.known_issues)


@pytest.mark.parametrize("how", ["fifo-content"])
def test_guest_notices_altered_device_content(lab: LabSession, device: LabDevice, scenario: Scenario, how: str) -> None:
    """Content the driver accepts unchecked (mtty: the bytes in flight in its FIFOs, inverted in the save image)
    passes the register probe and must fail the guest's check: the guest readback catches what the probe cannot."""
    model = model_of(device)
    if model.stream is None or how not in model.stream.payload_damage:
        pytest.skip(f"{device.id}: its model ({model.name}) names no {how} payload in its stream")
    if model.workload is None:
        pytest.skip(f"{device.id}: its model ({model.name}) has no guest workload to read the content back")
    require(lab, [device.host], VirtCapability.SAVE_RESTORE, VirtCapability.QEMU_MONITOR)
    vm = sr.start_vm(scenario, device, f"alt-{how}")
    out = sr.restore_altered(scenario, vm, device, how)
    assert out.readback is not None
    problems = out.readback.problems(expect_on=device.host.name)
    if out.nothing:  # nothing was altered: a plain save and restore, judged as one before the skip
        plain = [f"the restore refused an unaltered image: {out.refused}"] if out.refused else []
        assert not plain + problems, "; ".join(plain + problems)
        pytest.skip(f"no verdict possible: {out.nothing}")
    assert out.refused is None, f"the restore refused content its driver does not validate: {out.refused}"
    guest = [p for p in problems if p.startswith("guest ")]
    probe = [p for p in problems if p not in guest]
    attach("verdicts: register probe and guest", {"probe": probe, "guest": guest}, "json")
    assert not probe, f"the register probe saw more than the altered content: {'; '.join(probe)}"
    assert any("came back wrong" in p for p in guest), f"the guest did not notice the altered {how}: {guest}"


def test_save_to_a_full_filesystem(lab: LabSession, device: LabDevice, scenario: Scenario) -> None:
    """The save fails with its error, the VM runs on with its device, the fault is undone, and a save and
    restore after it succeed."""
    require(lab, [device.host], VirtCapability.SAVE_RESTORE)
    hv = scenario.hv(device.host)
    if hv.files_local:
        pytest.skip(
            f"{hv.name}: libvirt writes saves on the controller (test:///, qemu:///): no host filesystem to fill"
        )
    vm = sr.start_vm(scenario, device, "full")
    out = save_to_full_filesystem(scenario, vm, device)
    assert not out.problems, "; ".join(out.problems)
    xfail_known(out.known_issues)
