"""A Linux guest that uses the device while it moves: its own driver bound to the device, a workload through
it, and after every move the guest's view judged through the QEMU guest agent (same boot, no new Oops/WARN,
the driver still bound, the workload's verdict ok and its progress carried on). Slow under nested TCG: the
guest boots once per device (minutes) and each test restores that boot (labs.scenarios.guest).
"""

from __future__ import annotations

from functools import partial

import pytest

from labs.agentpool import agent_for
from labs.faults import KillDestinationQemu
from labs.faults.driver import DriverStreamFlip
from labs.inventory import LabPair
from labs.inventory.models import LinuxGuest
from labs.models import model_of
from labs.models.mtty import PORT0_COUNT_AT
from labs.scenarios import guest as g
from labs.scenarios import migration as mig
from labs.scenarios import save_resume as sr
from labs.scenarios.context import Scenario
from labs.scenarios.faulted import check_faulted, migrate_under_fault
from labs.scenarios.guest import GuestImages
from labs.scenarios.known import xfail_known
from labs.virt.sequence import MIGRATED_DESTINATION, MIGRATED_SOURCE

pytestmark = [pytest.mark.linux_guest, pytest.mark.requires("stop_copy")]


@pytest.mark.live_migration
def test_migrate_and_back(
    migratable: LabPair, scenario: Scenario, linux_guest: LinuxGuest, guest_images: GuestImages
) -> None:
    vm = guest_images.running(scenario, migratable.source)
    before = g.mark(scenario, vm, linux_guest)
    known: list[str] = []
    for src, dst in ((migratable.source, migratable.destination), (migratable.destination, migratable.source)):
        vm, leg = mig.migrate_leg(scenario, vm, src, dst, scenario="migrate with a Linux guest")
        assert leg.result.ok, leg.result.error
        assert not leg.problems, "; ".join(leg.problems)
        check = g.check(scenario, vm, linux_guest, dst, before, f"after {src.id} -> {dst.id}")
        assert not check.problems, "; ".join(check.problems)
        assert check.later is not None
        known += check.known
        before = check.later
    xfail_known(known)


def test_save_restore(
    migratable: LabPair, scenario: Scenario, linux_guest: LinuxGuest, guest_images: GuestImages
) -> None:
    vm = guest_images.running(scenario, migratable.source)
    before = g.mark(scenario, vm, linux_guest)
    result = sr.save_restore(scenario, vm, migratable.source)
    problems = result.save_problems + result.final.problems(expect_on=migratable.source.host.name)
    assert not problems, "; ".join(problems)
    check = g.check(scenario, vm, linux_guest, migratable.source, before, "after save and restore")
    assert not check.problems, "; ".join(check.problems)
    xfail_known(check.known)


@pytest.mark.live_migration
@pytest.mark.fault
def test_destination_qemu_killed(
    migratable: LabPair, scenario: Scenario, linux_guest: LinuxGuest, guest_images: GuestImages
) -> None:
    """The incoming QEMU killed while RAM moves: the source guest runs on without losing a byte, and migrates."""
    ssh = scenario.session.ssh(migratable.destination.host.name)
    vm = guest_images.running(scenario, migratable.source)
    before = g.mark(scenario, vm, linux_guest)
    vm, run = migrate_under_fault(scenario, vm, migratable, lambda v: KillDestinationQemu(ssh, v.name), "mid-flight")
    if run.missed:  # no verdict on the fault, unless the migration it missed failed by itself
        check_faulted(run)
    where = migratable.destination if vm.hv.name == migratable.destination.host.name else migratable.source
    check = g.check(scenario, vm, linux_guest, where, before, f"after {run.fault.name} and the migration after it")
    # the guest's verdict before the run's: a known driver issue (an xfail) must not hide what the guest saw
    assert not check.problems, "; ".join(check.problems)
    check_faulted(run)
    xfail_known(check.known)


@pytest.mark.live_migration
@pytest.mark.fault
@pytest.mark.fault_knobs
def test_source_corrupts_the_fifo_count(
    migratable: LabPair, scenario: Scenario, linux_guest: LinuxGuest, guest_images: GuestImages
) -> None:
    """The source's driver inverts port 0's FIFO count in the state it sends (mtty_faults' stream_flip): the
    job completes and neither QEMU nor libvirt notices, a register probe would read every register right, and
    the guest reads bytes no one wrote. Its check must fail: what only a guest using the device can see."""
    src, dst = migratable.source, migratable.destination
    if model_of(src).name != "mtty_faults":
        pytest.skip(f"{src.id}: the byte to corrupt is mtty's FIFO count, flipped by mtty_faults' knob")
    vm = guest_images.running(scenario, src)
    before = g.mark(scenario, vm, linux_guest)
    agent = partial(agent_for, scenario.session, src.host.name)
    flip = DriverStreamFlip(
        agent,
        src,
        PORT0_COUNT_AT,
        runs_on="destination",
        errors=(),
        source_events=MIGRATED_SOURCE,
        destination_events=MIGRATED_DESTINATION,
    )
    fault = scenario.inject(flip)
    vm, leg = mig.migrate_leg(scenario, vm, src, dst, scenario="migrate, FIFO count corrupted", expect=mig.MIGRATED)
    fault.undo()
    assert fault.landed, f"the source's stream was never corrupted: {fault.left}"
    assert leg.result.ok, f"the job failed, not the outcome this test is about: {leg.result.error}"
    check = g.check(scenario, vm, linux_guest, dst, before, "after a migration with the FIFO count corrupted")
    workload = check.later.workload if check.later else None
    assert any("verdict is not ok" in p for p in check.problems), (
        f"the guest saw nothing wrong: {check.problems or 'no problem'}; its workload: {workload}"
    )
