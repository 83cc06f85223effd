"""Helpers the suites' conftest files share: a cleaned-up Scenario, capability skips."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from labs.errors import LabError
from labs.inventory import LabHost
from labs.scenarios.context import Scenario
from labs.session import LabSession
from labs.virt.capabilities import VirtCapability
from labs.virt.domain import Hypervisor, hypervisor


def scenario_for(lab: LabSession, label: str) -> Iterator[Scenario]:
    """A Scenario whose VMs, images and faults are removed at teardown, also after a failure or timeout.

    LABS_QEMU_TRACE=1 starts the VMs with QEMU's VFIO migration trace events (needs a QEMU log backend).
    """
    sc = Scenario(lab, label, trace_vfio=os.environ.get("LABS_QEMU_TRACE") == "1")
    try:
        yield sc
    finally:
        errors = sc.cleanup()
        left = sc.leftovers()
        if errors or left:
            pytest.fail(f"cleanup incomplete: {'; '.join(errors + [f'left {x}' for x in left])}", pytrace=False)


def require(lab: LabSession, hosts: list[LabHost], *caps: VirtCapability) -> None:
    """Skip unless every host's libvirt has every capability; the reason names the capability."""
    for host in hosts:
        if not host.spec.libvirt_uri:
            pytest.skip(f"{host.name} has no libvirt_uri in the inventory")
        try:
            found = hypervisor(lab, host).capabilities(lab.run_id)
        except LabError as exc:
            pytest.skip(f"{host.name}: libvirt unavailable: {exc}")
        for cap in caps:
            if not found.has(cap):
                pytest.skip(found.missing_reason(cap))


def skip_where_no_device(*hvs: Hypervisor) -> None:
    """Call after a VM test's checks: on libvirt's test:/// (no QEMU) the VM never touched its device, so
    the test ends as a skip with that reason, not a pass (its VM-level checks have run and stand)."""
    for hv in hvs:
        if hv.is_test_driver:
            pytest.skip(
                f"{hv.name}: libvirt test:/// runs no QEMU, so the VM never touched its device "
                "(the VM lifecycle was checked; the device's save and resume were not)"
            )
