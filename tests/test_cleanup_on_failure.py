"""A test that fails or times out still leaves nothing: its fixtures remove the VM and the save
image, undo its faults, close the device, give its agent back and release the reservation.

The suite below runs in this process (test:/// nodes live in the process that opened them),
then a janitor run and the hosts' reservation lists must find nothing of it.
"""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from labs.errors import InfraError
from labs.janitor import janitor
from labs.reservations import list_reservations
from labs.session import LabSession, open_inventory
from labs.virt.domain import hypervisor, local_image_dir
from tests.conftest import write_sim_inventory

RUN_ID = "labs-20260101-000000-c1ea11"

SUITE = """
import time

import pytest

from labs.faults import DeviceTransitionFailure
from labs.agentpool import open_device
from labs.scenarios import recovery as rc
from labs.scenarios import save_resume as sr
from labs.scenarios.support import scenario_for


@pytest.fixture
def dev(lab, device):
    with open_device(lab, device) as handle:
        yield handle


@pytest.fixture
def scenario(lab):
    yield from scenario_for(lab, "cl")


def _leave_things(scenario, device):
    vm = sr.start_vm(scenario, device, "left")
    vm.save(scenario.image_path(vm.hv, vm.name))


@pytest.mark.timeout(8, func_only=True)
def test_times_out(lab, device, dev, scenario):
    # the device is opened before the scenario: its faults are undone before the device closes
    _leave_things(scenario, device)
    scenario.inject(DeviceTransitionFailure(dev, device, "RUNNING->STOP", to_error=True))
    time.sleep(60)


@pytest.mark.timeout(8, func_only=True)
def test_recovery_times_out_halfway(lab, device, scenario, monkeypatch):
    _leave_things(scenario, device)
    monkeypatch.setattr(rc, "check_refusals", lambda *args: time.sleep(60))
    with open_device(lab, device) as handle:
        rc.recover(scenario, handle, device, "knob")


def test_fails(lab, device, scenario):
    _leave_things(scenario, device)
    assert False, "on purpose"
"""


def test_failed_and_timed_out_tests_leave_nothing(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inventory = write_sim_inventory(tmp_path, devices=True)
    pytester.makepyfile(test_leaves=SUITE)
    monkeypatch.setenv("LABS_RUN_ID", RUN_ID)
    result = pytester.runpytest_inprocess(
        "--inventory", str(inventory), "--lab-device", "hostA:simv2", "-p", "no:cacheprovider", "-q"
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 3 and not outcomes.get("errors"), result.stdout.lines[-30:]
    assert "Timeout" in result.stdout.str()
    monkeypatch.delenv("LABS_RUN_ID")
    assert not list(local_image_dir().glob(f"{RUN_ID}*")), "a save image outlived its test"
    with LabSession(open_inventory(inventory)) as session:
        assert janitor(session, keep_own=False) == []
        for host in ("hostA", "hostB"):
            assert list_reservations(session.ssh(host)) == []


class _LookupFails(libvirt.libvirtError):
    """A lookup that failed, with the code, domain and message libvirt would give."""

    def __init__(self, code: int, domain: int, message: str) -> None:
        Exception.__init__(self, message)
        self.err = (code, domain, message, 2, message, None, None, 0, 0)


@pytest.mark.parametrize(
    ("code", "domain", "failures", "absent"),
    [
        (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, 9, True),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, 9, False),  # the daemon stays unreachable
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, 1, True),  # a new connection answers
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, 9, False),
    ],
)
def test_a_domain_is_absent_only_when_libvirt_says_so(
    sim_session: LabSession, monkeypatch: pytest.MonkeyPatch, code: int, domain: int, failures: int, absent: bool
) -> None:
    """Cleanup and the post-migration checks took any failed lookup (a broken connection) for "gone"."""
    hv = hypervisor(sim_session, "hostA")
    real = libvirt.virConnect.lookupByName
    failing = [0]

    def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
        if failing[0] > 0:
            failing[0] -= 1
            raise _LookupFails(code, domain, f"lookup of {name} failed")
        return real(conn, name)

    monkeypatch.setattr(libvirt.virConnect, "lookupByName", lookup)
    vm = hv.vm("labs-anything")
    for ask in (lambda: hv.exists(vm.name), vm.state, vm.remove):
        failing[0] = failures
        if absent:
            assert ask() in (False, "absent", [])
        else:
            with pytest.raises(InfraError, match="hostA: look up labs-anything: lookup of labs-anything failed"):
                ask()
