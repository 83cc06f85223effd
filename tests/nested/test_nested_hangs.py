"""A libvirt daemon that stops answering ends our calls to it; a hung host command is killed.

On a real nested host: libvirt's daemon is stopped (SIGSTOP, like a daemon stuck in
the kernel) while the controller holds a connection; the next call must fail with
an infrastructure error within the keepalive budget (5 s x 3), not hang the run.
Once the daemon runs again the framework reconnects on the next call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from labs.errors import InfraError
from labs.hostwatch import infra_error
from labs.nested import lifecycle
from labs.session import LabSession, open_inventory
from labs.virt.domain import hypervisor
from tests.nested.test_nested_smoke import _nested_hosts

DAEMONS = "virtqemud libvirtd"
KEEPALIVE_BUDGET_S = 5 * 3


@pytest.fixture(scope="module")
def session() -> Iterator[LabSession]:
    _nested_hosts()  # skips, saying why, unless the lab is up
    with LabSession(open_inventory(lifecycle.NESTED_INVENTORY)) as s:
        yield s


def test_stopped_libvirt_daemon_ends_the_call_within_keepalive(session: LabSession) -> None:
    host = session.inventory.hosts[-1].name
    hv = hypervisor(session, host)
    hv.conn.listAllDomains()  # connected, keepalive armed
    ssh = session.ssh(host)
    stopped = ssh.run(f"pkill -STOP -x -e '{DAEMONS.replace(' ', '|')}'", timeout=30).stdout
    assert stopped.strip(), f"{host}: no libvirt daemon ({DAEMONS}) to stop"
    try:
        start = time.monotonic()
        with pytest.raises(Exception) as caught:
            hv.conn.listAllDomains()
        took = time.monotonic() - start
        print(f"{host}: call to a stopped daemon ended after {took:.1f}s: {caught.value!r}")
        assert infra_error(caught.value) is not None, f"not an infrastructure error: {caught.value!r}"
        assert took < KEEPALIVE_BUDGET_S + 15, f"the call returned only after {took:.0f}s"
    finally:
        ssh.run(f"pkill -CONT -x '{DAEMONS.replace(' ', '|')}'", timeout=30)
    hv.close()
    assert isinstance(hypervisor(session, host).conn.listAllDomains(), list)  # a fresh connection works


def test_hung_host_command_is_killed_on_the_host(session: LabSession) -> None:
    ssh = session.ssh(session.inventory.hosts[0].name)
    with pytest.raises(InfraError, match="timed out after 2s"):
        ssh.run("sleep 300 # labs-hang-probe", timeout=2)
    time.sleep(1)
    left = ssh.run("pgrep -af 'labs-hang-probe' | grep -v pgrep || true", timeout=30).stdout
    assert not left.strip(), f"the timed-out command still runs on the host: {left}"
