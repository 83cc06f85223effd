"""Live migration between the hosts of a pair, with job monitoring and readback on both sides.

Skipped where libvirt cannot migrate (the sim lab's test:///); these run for
real in the nested lab (libvirt 11, QEMU 10, the kernel's mtty mdev).
"""

from __future__ import annotations

import pytest

from labs.inventory import LabPair
from labs.scenarios import migration as mig
from labs.scenarios import save_resume as sr
from labs.scenarios.context import Scenario
from labs.scenarios.known import xfail_known
from labs.scenarios.support import require
from labs.virt.capabilities import VirtCapability

pytestmark = [pytest.mark.live_migration, pytest.mark.requires("stop_copy")]


def test_migrate_and_back(migratable: LabPair, scenario: Scenario) -> None:
    vm = sr.start_vm(scenario, migratable.source, "mig")
    _vm, run = mig.there_and_back(scenario, vm, migratable, rounds=1)
    assert [leg.result.ok for leg in run.legs] == [True, True], [leg.result.error for leg in run.legs]
    assert not run.problems, "; ".join(run.problems)
    first = run.legs[0].result
    assert first.samples or first.completed, "no job statistics were seen"


@pytest.mark.slow
def test_ping_pong(migratable: LabPair, scenario: Scenario, pingpong: int) -> None:
    vm = sr.start_vm(scenario, migratable.source, "pingpong")
    _vm, run = mig.there_and_back(scenario, vm, migratable, rounds=pingpong)
    assert len(run.legs) == 2 * pingpong and all(leg.result.ok for leg in run.legs), [
        leg.result.error for leg in run.legs if not leg.result.ok
    ]
    assert not run.problems, "; ".join(run.problems)


def test_parallel_connections(migratable: LabPair, scenario: Scenario) -> None:
    require(scenario.session, [migratable.source.host], VirtCapability.PARALLEL_MIGRATION)
    vm = sr.start_vm(scenario, migratable.source, "parallel")
    _vm, leg = mig.migrate_leg(scenario, vm, migratable.source, migratable.destination, scenario="parallel", parallel=4)
    assert leg.result.ok, leg.result.error
    assert not leg.problems, "; ".join(leg.problems)


def test_postcopy_refused(migratable: LabPair, scenario: Scenario) -> None:
    """QEMU blocks post-copy for VFIO devices: the request fails quickly and the source keeps running."""
    vm = sr.start_vm(scenario, migratable.source, "postcopy")
    leg = mig.postcopy_refused(scenario, vm, migratable)
    assert not leg.result.ok, "post-copy was accepted for a VM with a VFIO device"
    assert not leg.result.timed_out, f"post-copy request hung for {leg.result.duration:.0f}s instead of a refusal"
    problems = mig.postcopy_problems(leg) + leg.problems
    assert not problems, "; ".join(problems)
    xfail_known(leg.readback.known_issues)
