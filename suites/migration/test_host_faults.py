"""Migrations under faults that disturb a whole host: its libvirt daemon stopped or killed, its migration link
cut or degraded, the host rebooted. Each lands at its job phase, its outcome and event sequences asserted,
the next migration must pass. The nested stage runs this file alone (labs/nested/ci.py HOST_WIDE): a test
beside it would lose its daemon, its link or its host too."""

from __future__ import annotations

import os

import pytest

from labs.faults import CutMigrationLink, DegradedLink, KillDaemon, RebootHost, StopDaemon
from labs.faults.base import Fault
from labs.faults.network import rule_tag
from labs.inventory import LabPair
from labs.scenarios import save_resume as sr
from labs.scenarios.context import Scenario
from labs.scenarios.faulted import IN_FLIGHT_MEMORY_MIB, Trigger, check_faulted, land_fault, migrate_under_fault
from labs.virt.domain import VM

pytestmark = [pytest.mark.live_migration, pytest.mark.fault]
STALL_TIMEOUT = 30.0  # a cut link stalls the job; our deadline then aborts it
# the job phases a daemon fault lands in: while the destination is prepared (its QEMU starting) and while RAM
# moves. Not finish: a kill over SSH reached the daemon after the job had completed (docs/nested-findings.md)
DAEMON_PHASES: tuple[Trigger, ...] = ("started", "mid-flight")
DEGRADED_TIMEOUT = 60.0  # a degraded link's job: complete within this, or be aborted cleanly at it


def _daemon_fault(
    migratable: LabPair, scenario: Scenario, side: str, trigger: Trigger, fault: type[StopDaemon | KillDaemon]
) -> None:
    host = migratable.source.host if side == "source" else migratable.destination.host
    ssh = scenario.session.ssh(host.name)
    label = f"{'stop' if fault is StopDaemon else 'kill'}{side[:3]}{trigger[:3]}"
    _vm, run = land_fault(scenario, migratable, label, lambda _v: fault(ssh), trigger)
    check_faulted(run)


@pytest.mark.parametrize("trigger", DAEMON_PHASES)
@pytest.mark.parametrize("side", ["source", "destination"])
def test_stop_libvirt_daemon(migratable: LabPair, scenario: Scenario, side: str, trigger: Trigger) -> None:
    _daemon_fault(migratable, scenario, side, trigger, StopDaemon)


@pytest.mark.parametrize("trigger", DAEMON_PHASES)
@pytest.mark.parametrize("side", ["source", "destination"])
def test_kill_libvirt_daemon(migratable: LabPair, scenario: Scenario, side: str, trigger: Trigger) -> None:
    _daemon_fault(migratable, scenario, side, trigger, KillDaemon)


def test_degraded_link(migratable: LabPair, scenario: Scenario) -> None:
    src, dst = migratable.source.host, migratable.destination.host
    if not dst.spec.migration_address:
        pytest.skip(f"{dst.name} has no migration_address: shaping its link would slow the lab's own connections")
    ssh = scenario.session.ssh(src.name)

    def degrade(_vm: VM) -> Fault:
        tag = rule_tag(scenario.run_id, f"netem_{_vm.name[-12:]}")
        return DegradedLink(ssh, str(dst.spec.migration_address), tag)

    vm = sr.start_vm(scenario, migratable.source, "netem")
    _vm, run = migrate_under_fault(scenario, vm, migratable, degrade, "before", timeout=DEGRADED_TIMEOUT)
    check_faulted(run)


def test_cut_migration_link(migratable: LabPair, scenario: Scenario) -> None:
    src, dst = migratable.source.host, migratable.destination.host
    if not dst.spec.migration_address:
        pytest.skip(f"{dst.name} has no migration_address: cutting its link could cut the lab's own connections")
    ssh = scenario.session.ssh(dst.name)
    source_address = src.spec.migration_address or src.spec.address

    def cut(_vm: VM) -> Fault:
        return CutMigrationLink(ssh, source_address, rule_tag(scenario.run_id, f"cut_{_vm.name[-12:]}"))

    # While data moves by default: the guest workload and the bandwidth cap keep the job in flight for longer
    # than the firewall rule's round trip. LABS_CUT_BEFORE_JOB=1 cuts before (QEMU's connect then waits ~150 s
    # on the dropped SYNs before our deadline ends it).
    trigger: Trigger = "before" if os.environ.get("LABS_CUT_BEFORE_JOB") == "1" else "mid-flight"
    memory = IN_FLIGHT_MEMORY_MIB if trigger != "before" else None
    _vm, run = land_fault(scenario, migratable, "cut", cut, trigger, memory_mib=memory, timeout=STALL_TIMEOUT)
    check_faulted(run)
    assert run.failed.result.timed_out or run.failed.result.error


@pytest.mark.destructive
def test_destination_host_reboots(migratable: LabPair, scenario: Scenario) -> None:
    """The destination host rebooted at once while RAM moves: the source keeps the VM with its device, the
    host comes back (its power-on), the readback finds nothing of the job there, and the next migration
    to it passes."""
    dst = migratable.destination.host
    reboot = dst.spec.reboot
    if reboot is None:
        pytest.skip(f"{dst.name} has no `reboot:` in the inventory: destructive tests may not reboot it")
    ssh = scenario.session.ssh(dst.name)

    def make(_vm: VM) -> Fault:
        return RebootHost(ssh, reboot)

    # a rebooted host sends nothing more: the job stalls until our deadline (or fails once the host is back)
    _vm, run = land_fault(scenario, migratable, "reboot", make, "mid-flight", timeout=STALL_TIMEOUT)
    check_faulted(run)
