"""The nested lab, live: each host runs mtty, holds its mdev, runs libvirtd, reaches its peer.

Skips (with the reason) unless `lab nested up` has written inventories/nested.yaml
and both VMs are alive with sshd answering.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from labs.nested import lifecycle


def _nested_hosts() -> dict[str, Any]:
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


FLIP_SECONDS = 20
# Each flip of the cpuset controller patches live kernel code (the cpusets_enabled static key),
# as libvirt does when a domain starts or stops, while two shells allocate pages on the other vCPU.
FLIP_CPUSET = f"""
ctl=/sys/fs/cgroup/cgroup.subtree_control; before=$(cat $ctl)
allocate() {{ while [ $(date +%s) -lt $end ]; do cat /proc/[0-9]*/cmdline >/dev/null 2>&1; done; }}
end=$(( $(date +%s) + {FLIP_SECONDS} )); allocate & allocate &
n=0
while [ $(date +%s) -lt $end ]; do
  echo +cpuset >$ctl 2>/dev/null && echo -cpuset >$ctl 2>/dev/null && n=$((n+1))
done
wait
case " $before " in *" cpuset "*) echo +cpuset >$ctl;; esac
echo $n
"""


def test_live_kernel_patching_keeps_the_host_up(nested_hosts: dict[str, Any]) -> None:
    """Multi-threaded TCG let a vCPU run a live patch's stale int3 ("Oops: int3", host gone) within 20 s of this."""
    name = HOSTS[0]
    try:
        flips = int(run(nested_hosts[name], FLIP_CPUSET, timeout=FLIP_SECONDS + 120).strip())
    except AssertionError as exc:
        pytest.fail(f"{exc}\n" + "\n".join(lifecycle.post_mortem()))
    assert flips > 10, f"only {flips} cpuset flips in {FLIP_SECONDS}s"
    (vm,) = [v for v in lifecycle.status() if v.name == name]
    assert vm.alive and vm.ssh, f"{name} died: " + "\n".join(lifecycle.post_mortem())
