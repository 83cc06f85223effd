"""The nested lab, live: each host runs mtty, holds its mdev, runs libvirtd, reaches its peer.

Skips (with the reason) unless `lab nested up` has written inventories/nested.yaml
and both VMs are alive with sshd answering.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from labs.nested import lifecycle


def _nested_hosts() -> dict[str, Any]:
    if os.environ.get("LABS_NESTED_LIVE") == "0":
        # tox's tests environment beside the nested stage: these run there, against the lab it owns
        pytest.skip("the nested lab is the nested stage's (LABS_NESTED_LIVE=0): its live tests run there")
    if not lifecycle.NESTED_INVENTORY.is_file():
        pytest.skip(f"nested lab not up: no {lifecycle.NESTED_INVENTORY} (run `lab nested up`)")
    # a host just booted under TCG may take seconds to send its banner: not being up is what skips
    dead = [st.name for st in lifecycle.status(check=lambda vm: vm.ssh_banner(timeout=30)) if not (st.alive and st.ssh)]
    if dead:
        pytest.skip(f"nested lab not up: {', '.join(dead)} not running or sshd not answering (`lab nested status`)")
    hosts: dict[str, Any] = yaml.safe_load(lifecycle.NESTED_INVENTORY.read_text())["hosts"]
    return hosts


@pytest.fixture(scope="module")
def nested_hosts() -> dict[str, Any]:
    return _nested_hosts()


def run(host: dict[str, Any], command: str, timeout: float = 120) -> str:
    argv = [
        "ssh",
        "-p", str(host["port"]),
        "-i", str(host["identity_file"]),
        "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={host['known_hosts']}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        f"{host['user']}@{host['address']}",
        command,
    ]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"`{command}` exited {res.returncode}: {res.stderr.strip() or res.stdout.strip()}"
    return res.stdout


HOSTS = list(lifecycle.HOST_NAMES)


@pytest.mark.parametrize("name", HOSTS)
def test_mtty_module_loaded(nested_hosts: dict[str, Any], name: str) -> None:
    out = run(nested_hosts[name], "lsmod")
    assert any(line.split()[0] == "mtty" for line in out.splitlines()[1:] if line.strip())


@pytest.mark.parametrize("name", HOSTS)
def test_mdev_exists(nested_hosts: dict[str, Any], name: str) -> None:
    dev = nested_hosts[name]["devices"][0]
    out = run(nested_hosts[name], f"cat /sys/bus/mdev/devices/{dev['uuid']}/mdev_type/name")
    assert out.strip() == "Dual port serial"  # mtty-2; mtty-1 is "Single port serial"
    run(nested_hosts[name], f"test -L /sys/bus/mdev/devices/{dev['uuid']}/iommu_group")


@pytest.mark.parametrize("name", HOSTS)
def test_libvirtd_answers(nested_hosts: dict[str, Any], name: str) -> None:
    out = run(nested_hosts[name], "virsh -c qemu:///system version", timeout=300)
    assert "Running hypervisor: QEMU" in out


@pytest.mark.parametrize("name", HOSTS)
def test_libvirt_uri_from_controller(nested_hosts: dict[str, Any], name: str) -> None:
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open(nested_hosts[name]["libvirt_uri"])
    try:
        assert conn.getHostname() == name
    finally:
        conn.close()


@pytest.mark.parametrize(("name", "peer"), [(HOSTS[0], HOSTS[1]), (HOSTS[1], HOSTS[0])])
def test_private_link(nested_hosts: dict[str, Any], name: str, peer: str) -> None:
    address = nested_hosts[peer]["migration_address"]
    run(nested_hosts[name], f"ping -c 2 -W 5 {address}")
    # libvirt peer-to-peer migration needs host-to-host SSH with pinned keys
    assert run(nested_hosts[name], f"ssh -o BatchMode=yes {peer} hostname").strip() == peer


def test_inventory_is_valid(nested_hosts: dict[str, Any]) -> None:
    from labs.inventory.loader import load_inventory

    inv = load_inventory(Path(lifecycle.NESTED_INVENTORY))
    assert inv.pairs, "the two mtty devices should pair up by model"


# A domain started and destroyed the way every scenario does: each switch of the cpuset controller at
# the root would patch live kernel code (the cpusets_enabled static key).
CPUSET_AROUND_A_DOMAIN = """
ctl=/sys/fs/cgroup/cgroup.subtree_control
xml=$(mktemp); trap 'virsh -q -c qemu:///system destroy labs-cpuset-check >/dev/null 2>&1; rm -f $xml' EXIT
echo '<domain type="qemu"><name>labs-cpuset-check</name><memory unit="MiB">32</memory><vcpu>1</vcpu>
<os><type arch="x86_64">hvm</type></os></domain>' >$xml
echo "before: $(cat $ctl)"
virsh -q -c qemu:///system create $xml >/dev/null && echo "running: $(cat $ctl)"
virsh -q -c qemu:///system destroy labs-cpuset-check >/dev/null
echo "after: $(cat $ctl)"
"""


@pytest.mark.parametrize("name", HOSTS)
def test_domains_never_switch_the_cpuset_controller(nested_hosts: dict[str, Any], name: str) -> None:
    """A live patch's stale int3 under TCG killed nested hosts (docs/incidents.md): the cpuset controller stays on."""
    try:
        out = run(nested_hosts[name], CPUSET_AROUND_A_DOMAIN)
    except AssertionError as exc:
        pytest.fail(f"{exc}\n" + "\n".join(lifecycle.post_mortem()))
    seen = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert set(seen) == {"before", "running", "after"}, f"{name}: {out}"
    assert all("cpuset" in controllers.split() for controllers in seen.values()), f"{name}: {out}"
