"""Migrations under induced faults of the job, its QEMUs and its devices: each fails cleanly (or completes, as
its outcome says), the source keeps its device, the next one succeeds. Faults that disturb a whole host (its
libvirt daemon, its migration link) are in test_host_faults.py."""

from __future__ import annotations

import pytest

from labs.faults import (
    AbortJob,
    AbortOnDestination,
    DestinationLacksDevice,
    DestroyDuringFinish,
    IncompatibleDestinationMdev,
    KillDestinationQemu,
    KillSourceQemu,
    MigrationDeadline,
)
from labs.faults.base import Fault
from labs.inventory import LabPair
from labs.inventory.models import MdevDevice
from labs.models import model_of
from labs.scenarios import save_resume as sr
from labs.scenarios.context import Scenario
from labs.scenarios.faulted import Trigger, check_faulted, land_fault, migrate_under_fault
from labs.scenarios.support import require
from labs.virt.capabilities import VirtCapability
from labs.virt.domain import VM
from labs.virt.xml import Hostdev

pytestmark = [pytest.mark.live_migration, pytest.mark.fault]


def test_abort_mid_flight(migratable: LabPair, scenario: Scenario) -> None:
    require(scenario.session, [migratable.source.host], VirtCapability.ABORT_JOB)
    _vm, run = land_fault(scenario, migratable, "abort", AbortJob, "mid-flight")
    check_faulted(run)


@pytest.mark.parametrize("trigger", ["mid-flight", "started"])
def test_kill_destination_qemu(migratable: LabPair, scenario: Scenario, trigger: Trigger) -> None:
    """mid-flight: the incoming QEMU receives data, the job fails with QEMU's error; started: as soon as the
    job runs, in whichever preparation step libvirt is (each has its own error, KillDestinationQemu)."""
    ssh = scenario.session.ssh(migratable.destination.host.name)
    _vm, run = land_fault(scenario, migratable, "killdst", lambda v: KillDestinationQemu(ssh, v.name), trigger)
    check_faulted(run)


def test_kill_source_qemu(migratable: LabPair, scenario: Scenario) -> None:
    """The source's QEMU killed while data moves: the VM is lost, nothing runs on either side, the source keeps
    its definition shut off, the devices are judged, and the VM started again migrates."""
    ssh = scenario.session.ssh(migratable.source.host.name)
    _vm, run = land_fault(scenario, migratable, "killsrc", lambda v: KillSourceQemu(ssh, v.name), "mid-flight")
    check_faulted(run)


def test_abort_on_destination(migratable: LabPair, scenario: Scenario) -> None:
    dst = scenario.hv(migratable.destination.host)
    _vm, run = land_fault(scenario, migratable, "abortdst", lambda v: AbortOnDestination(dst, v.name), "mid-flight")
    check_faulted(run)


def test_deadline_suspends_the_source(migratable: LabPair, scenario: Scenario) -> None:
    """virsh migrate --timeout-suspend: at the deadline (here: while data moves) the source is paused and the
    job completes offline; then it migrates back (the `postcopy` action: post-copy refused, test_live_migration)."""
    dst = scenario.hv(migratable.destination.host)
    _vm, run = land_fault(scenario, migratable, "deadline", lambda v: MigrationDeadline(v, dst), "mid-flight")
    check_faulted(run)


def test_destroy_during_finish(migratable: LabPair, scenario: Scenario) -> None:
    dst = scenario.hv(migratable.destination.host)
    _vm, run = land_fault(scenario, migratable, "finish", lambda v: DestroyDuringFinish(dst, v.name), "finish")
    check_faulted(run)


def test_destination_lacks_device(migratable: LabPair, scenario: Scenario) -> None:
    ssh = scenario.session.ssh(migratable.destination.host.name)
    vm = sr.start_vm(scenario, migratable.source, "nodev")

    def lacking(_vm: VM) -> Fault:
        return DestinationLacksDevice(ssh, migratable.destination)

    def hostdev(f: Fault) -> Hostdev | None:
        # an mdev is really removed from the host; PCI and sim devices are replaced by an absent one in the XML
        assert isinstance(f, DestinationLacksDevice)
        return None if isinstance(migratable.destination.spec, MdevDevice) else f.hostdev

    _vm, run = migrate_under_fault(scenario, vm, migratable, lacking, "before", dest_hostdev=hostdev)
    check_faulted(run)


def test_incompatible_destination_device(
    migratable: LabPair, scenario: Scenario, request: pytest.FixtureRequest
) -> None:
    dst = migratable.destination
    if not isinstance(dst.spec, MdevDevice):
        pytest.skip(f"{dst.id}: an incompatible device is made as an mdev of another type")
    model = model_of(dst)
    other = model.incompatible.get(dst.spec.type)
    if other is None:
        pytest.skip(f"{dst.id}: its device model ({model.name}) names no type incompatible with {dst.spec.type}")
    ssh = scenario.session.ssh(dst.host.name)
    vm = sr.start_vm(scenario, migratable.source, "incompat")

    def hostdev(f: Fault) -> Hostdev | None:
        assert isinstance(f, IncompatibleDestinationMdev)
        return f.hostdev

    _vm, run = migrate_under_fault(
        scenario,
        vm,
        migratable,
        lambda _v: IncompatibleDestinationMdev(ssh, dst, other, run_id=scenario.session.run_id),
        "before",
        dest_hostdev=hostdev,
    )
    check_faulted(run)
