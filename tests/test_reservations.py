"""Device reservations on the host: exclusive, visible, released when the owner dies."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from labs.inventory import LabDevice
from labs.inventory.models import SimDevice
from labs.inventory.resolved import LabHost
from labs.reservations import ReservationBusy, clear_reservations, list_reservations, reserve
from labs.session import LabSession
from labs.transport import HostConnection


def fake_device(session: LabSession, host: str, name: str) -> LabDevice:
    spec = SimDevice(kind="sim", name=name, protocol="v2", driver="labs.sim.v2:V2Driver")
    return LabDevice(LabHost(host, session.inventory.host(host).spec), 0, spec)


def test_second_claim_waits_then_names_the_owner(sim_session: LabSession) -> None:
    ssh = sim_session.ssh("hostA")
    dev = fake_device(sim_session, "hostA", "resv1")
    first = reserve(ssh, dev, "run-one", wait=1, expires_in=60)
    try:
        other = fresh(sim_session, "hostA")
        start = time.monotonic()
        with pytest.raises(ReservationBusy, match=r"hostA:resv1 is reserved by .* \(run run-one"):
            reserve(other, dev, "run-two", wait=1, expires_in=60)
        assert time.monotonic() - start >= 1
        names = [n for n, _ in list_reservations(ssh)]
        assert "hostA_resv1" in names
    finally:
        first.release()
    again = reserve(fresh(sim_session, "hostA"), dev, "run-two", wait=1, expires_in=60)
    again.release()
    assert "hostA_resv1" not in [n for n, _ in list_reservations(ssh)]


def test_same_name_on_two_hosts_is_two_locks(sim_session: LabSession) -> None:
    a = reserve(sim_session.ssh("hostA"), fake_device(sim_session, "hostA", "resv2"), "r", wait=1, expires_in=60)
    b = reserve(sim_session.ssh("hostB"), fake_device(sim_session, "hostB", "resv2"), "r", wait=1, expires_in=60)
    a.release()
    b.release()


def test_expired_owner_is_taken_over(sim_session: LabSession) -> None:
    dev = fake_device(sim_session, "hostB", "resv3")
    stale = reserve(fresh(sim_session, "hostB"), dev, "hung-run", wait=1, expires_in=-1)
    taken = reserve(sim_session.ssh("hostB"), dev, "new-run", wait=5, expires_in=60)
    taken.release()
    stale.release()


def test_dead_controller_leaves_no_lock(sim_session: LabSession, sim_inventory_file: Path) -> None:
    code = f"""
import os, sys
from labs.session import LabSession, open_inventory
from labs.reservations import reserve
from tests.test_reservations import fake_device
s = LabSession(open_inventory({str(sim_inventory_file)!r}))
reserve(s.ssh("hostA"), fake_device(s, "hostA", "resv4"), "doomed", wait=1, expires_in=600)
print("held", flush=True)
os._exit(9)  # no cleanup at all: like a controller killed by SIGKILL
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "held" in proc.stdout, proc.stderr
    got = reserve(sim_session.ssh("hostA"), fake_device(sim_session, "hostA", "resv4"), "next", wait=10, expires_in=60)
    got.release()


def test_clear(sim_session: LabSession) -> None:
    dev = fake_device(sim_session, "hostA", "resv5")
    held = reserve(fresh(sim_session, "hostA"), dev, "forgotten", wait=10, expires_in=600)
    assert "hostA_resv5" in clear_reservations(sim_session.ssh("hostA"))
    # generous: on a loaded machine the killed holder takes its lock with it only when it is reaped
    reserve(sim_session.ssh("hostA"), dev, "next", wait=30, expires_in=60).release()
    held.release()


def fresh(session: LabSession, host: str) -> HostConnection:
    """A second controller: its own connection."""
    return HostConnection(host, session.inventory.host(host).spec, connect_timeout=5)
