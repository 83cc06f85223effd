"""`lab nested up | down | status`: two nested hosts, their mtty mdevs and the inventory.

up:   base image (cached by recipe hash) -> fresh keys -> seed disks + overlays
      -> two QEMU VMs -> wait for sshd -> mtty mdev + libvirtd check + migration
      flags probe on each -> inventories/nested.yaml
down: kill exactly the VMs up started, drop overlays and seeds, keep logs and the image.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from filelock import FileLock
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from labs.errors import InfraError
from labs.nested.image import BaseImage, ensure_image
from labs.nested.recipe import Recipe, cache_root
from labs.nested.vm import LINK_PREFIX, Vm, VmSpec
from labs.paths import INVENTORIES
from labs.simlab.keys import keygen, public_key, write_known_hosts

NESTED_INVENTORY = INVENTORIES / "nested.yaml"
HOST_NAMES = ("nested-a", "nested-b")
MTTY_PARENT = "mtty"
MTTY_TYPE = "mtty-2"
# One UUID on both hosts: libvirt names an mdev hostdev by UUID and expects the
# destination to hold the same one (spec 4.3), so migration needs no XML rewrite.
MTTY_UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
DEFAULT_BASE_PORT = 22300
BOOT_TIMEOUT = 300.0

# Reads VFIO_DEVICE_FEATURE(MIGRATION) from the mdev through the legacy container
# path, stdlib only; runs on the nested host as root. Numbers per spec 1.1/3.1.
MIGRATION_PROBE = r"""
import fcntl, os, struct, sys, json
uuid = sys.argv[1]
def io(n): return 0x3B64 + n                                     # _IO(';', VFIO_BASE + n)
group = os.path.basename(os.readlink("/sys/bus/mdev/devices/%s/iommu_group" % uuid))
container = os.open("/dev/vfio/vfio", os.O_RDWR)
gfd = os.open("/dev/vfio/%s" % group, os.O_RDWR)
fcntl.ioctl(gfd, io(4), struct.pack("i", container))            # GROUP_SET_CONTAINER
fcntl.ioctl(container, io(2), 3)                                 # SET_IOMMU VFIO_TYPE1v2_IOMMU
dev = fcntl.ioctl(gfd, io(6), bytearray(uuid.encode() + b"\0"), True)  # GROUP_GET_DEVICE_FD
def feature(fid, fmt):
    buf = bytearray(struct.pack("=II", 8 + struct.calcsize(fmt), (1 << 16) | fid) + bytes(struct.calcsize(fmt)))
    fcntl.ioctl(dev, io(17), buf, True)                          # DEVICE_FEATURE GET
    return struct.unpack_from(fmt, buf, 8)
info = bytearray(struct.pack("=IIII", 16, 0, 0, 0))
fcntl.ioctl(dev, io(7), info, True)                              # DEVICE_GET_INFO
print(json.dumps({
    "group": group,
    "device_info_flags": struct.unpack_from("=I", info, 4)[0],
    "num_regions": struct.unpack_from("=I", info, 8)[0],
    "migration_flags": feature(1, "=Q")[0],                      # MIGRATION
    "device_state": feature(2, "=Ii")[0],                        # MIG_DEVICE_STATE
    "stop_copy_length": feature(9, "=Q")[0],                     # MIG_DATA_SIZE
}))
"""
MIGRATION_FLAG_NAMES = {1: "stop_copy", 2: "p2p", 4: "pre_copy"}


def run_dir() -> Path:
    env = os.environ.get("LABS_NESTED_RUN_DIR")
    return Path(env) if env else cache_root() / "run"


def base_port() -> int:
    return int(os.environ.get("LABS_NESTED_BASE_PORT", DEFAULT_BASE_PORT))


def accel() -> str:
    """TCG unless asked: a stock kernel hangs early under this machine's KVM (docs/nested-findings.md)."""
    return os.environ.get("LABS_NESTED_ACCEL", "tcg")


def specs(port: int | None = None, memory_mb: int = 3072, cpus: int = 2) -> list[VmSpec]:
    base = base_port() if port is None else port
    return [
        VmSpec(
            name=name,
            index=i,
            ssh_port=base + i,
            link_port=base + 10 + i,
            peer_link_port=base + 10 + (3 - i),
            memory_mb=memory_mb,
            cpus=cpus,
            accel=accel(),
        )
        for i, name in enumerate(HOST_NAMES, start=1)
    ]


@dataclass(frozen=True)
class Keys:
    dir: Path

    @property
    def client(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def peer(self) -> Path:
        return self.dir / "peer_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    def host(self, name: str) -> Path:
        return self.dir / f"{name}_host_ed25519"

    def regenerate(self, names: list[str]) -> None:
        """Fresh keys at every `up`: a lab's keys live as long as its VMs."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.dir.chmod(0o700)
        keygen(self.client, "labs-nested-controller")
        keygen(self.peer, "labs-nested-peer")
        for name in names:
            keygen(self.host(name), f"labs-nested-{name}")


def write_seed(vm: Vm, all_specs: list[VmSpec], keys: Keys) -> None:
    """The files the guest's labs-seed script installs (see image.SEED_SCRIPT)."""
    spec = vm.spec
    d = vm.paths.seed_dir
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "hostname").write_text(spec.name + "\n")
    hosts = ["127.0.0.1 localhost", *(f"{s.link_ip} {s.name}" for s in all_specs)]
    (d / "hosts").write_text("\n".join(hosts) + "\n")
    shutil.copy(keys.host(spec.name), d / "ssh_host_ed25519_key")
    shutil.copy(str(keys.host(spec.name)) + ".pub", d / "ssh_host_ed25519_key.pub")
    (d / "authorized_keys").write_text(public_key(keys.client) + "\n" + public_key(keys.peer) + "\n")
    # hosts reach each other (libvirt peer-to-peer migration) with the peer key
    shutil.copy(keys.peer, d / "id_ed25519")
    shutil.copy(str(keys.peer) + ".pub", d / "id_ed25519.pub")
    pinned = []
    for s in all_specs:
        kind, b64 = public_key(keys.host(s.name)).split()[:2]
        pinned.append(f"{s.name},{s.link_ip} {kind} {b64}")
    (d / "known_hosts").write_text("\n".join(pinned) + "\n")
    (d / "net.env").write_text(
        f"MGMT_MAC={spec.mgmt_mac}\nLINK_MAC={spec.link_mac}\nLINK_CIDR={spec.link_ip}/{LINK_PREFIX}\n"
    )


def ssh_argv(spec: VmSpec, keys: Keys, command: str, connect_timeout: int = 10) -> list[str]:
    return [
        "ssh",
        "-p", str(spec.ssh_port),
        "-i", str(keys.client),
        "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={keys.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"ConnectTimeout={connect_timeout}",
        "-o", "LogLevel=ERROR",
        "root@127.0.0.1",
        command,
    ]  # fmt: skip


def ssh(spec: VmSpec, keys: Keys, command: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ssh_argv(spec, keys, command), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise InfraError(f"{spec.name}: ssh command timed out after {timeout:g}s: {command}") from None


def ssh_ok(spec: VmSpec, keys: Keys, command: str, timeout: float = 120.0) -> str:
    res = ssh(spec, keys, command, timeout)
    if res.returncode != 0:
        raise InfraError(f"{spec.name}: `{command}` failed ({res.returncode}): {(res.stderr or res.stdout).strip()}")
    return res.stdout


def libvirt_uri(spec: VmSpec, keys: Keys) -> str:
    """libssh transport: the only one whose URI can name our own known_hosts file (plain ssh cannot)."""
    q = "&".join(
        [
            f"keyfile={quote(str(keys.client))}",
            f"known_hosts={quote(str(keys.known_hosts))}",
            "known_hosts_verify=normal",
            "sshauth=privkey",
        ]
    )
    return f"qemu+libssh://root@127.0.0.1:{spec.ssh_port}/system?{q}"


def inventory_doc(all_specs: list[VmSpec], keys: Keys, caps: dict[str, list[str]]) -> dict[str, Any]:
    hosts: dict[str, Any] = {}
    for s in all_specs:
        hosts[s.name] = {
            "address": "127.0.0.1",
            "port": s.ssh_port,
            "user": "root",
            "identity_file": str(keys.client),
            "known_hosts": str(keys.known_hosts),
            "host_key_policy": "strict",
            "libvirt_uri": libvirt_uri(s, keys),
            "migration_address": s.link_ip,
            "python": "python3",
            "devices": [
                {
                    "kind": "mdev",
                    "name": MTTY_TYPE,
                    "model": MTTY_TYPE,
                    "parent": MTTY_PARENT,
                    "type": MTTY_TYPE,
                    "uuid": MTTY_UUID,
                    "protocol": "v2",
                    "capabilities": caps.get(s.name, ["stop_copy", "p2p", "pre_copy"]),
                    "reset": "ioctl",
                }
            ],
        }
    return {
        "lab": {
            "name": "nested",
            # nested QEMU runs under TCG inside TCG: everything is slow
            "timeouts": {"connect": 30, "command": 300, "agent_op": 120, "migration": 1800, "test": 3600},
        },
        "hosts": hosts,
    }


def write_inventory(path: Path, doc: dict[str, Any]) -> None:
    header = (
        "# Generated by `lab nested up`; rewritten at every up. Keys and known_hosts live in the run dir\n"
        f"# ({run_dir()}) and are regenerated with the VMs.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)


# -- progress -------------------------------------------------------------------


class RichReporter:
    """Adapts image.Reporter to a rich Progress: one bar per stage."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None

    def stage(self, name: str, total: float | None = None) -> None:
        self._close()
        self.task = self.progress.add_task(name, total=total, note="")

    def update(self, completed: float | None = None, note: str | None = None) -> None:
        if self.task is None:
            return
        kwargs: dict[str, Any] = {}
        if completed is not None:
            kwargs["completed"] = completed
        if note is not None:
            kwargs["note"] = note
        self.progress.update(self.task, **kwargs)

    def _close(self) -> None:
        if self.task is not None:
            t = self.progress.tasks[self.task] if self.task < len(self.progress.tasks) else None
            self.progress.update(self.task, total=t.total or 1 if t else 1, completed=t.total or 1 if t else 1)
            self.progress.stop_task(self.task)
        self.task = None

    def done(self) -> None:
        self._close()


def make_progress(console: Console | None = None) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}", style="dim"),
        console=console or Console(stderr=True),
    )


@contextmanager
def _progress(progress: Progress | None) -> Iterator[Progress]:
    if progress is not None:
        yield progress
        return
    with make_progress() as own:
        yield own


# -- up / down / status -----------------------------------------------------------


@dataclass
class UpResult:
    inventory: Path
    image: BaseImage
    seconds: dict[str, float]


def _lock() -> FileLock:
    run_dir().mkdir(parents=True, exist_ok=True)
    return FileLock(str(run_dir() / "lab.lock"))


def up(
    progress: Progress | None = None,
    *,
    recipe: Recipe | None = None,
    inventory: Path = NESTED_INVENTORY,
    boot_timeout: float = BOOT_TIMEOUT,
) -> UpResult:
    """Build (or reuse) the image, boot both hosts, create their mdevs, write the inventory."""
    t0 = time.monotonic()
    seconds: dict[str, float] = {}
    with _progress(progress) as prog, _lock():
        rep = RichReporter(prog)
        image = ensure_image(recipe or Recipe(), rep)
        seconds["image"] = round(time.monotonic() - t0, 1)
        rd = run_dir()
        keys = Keys(rd / "keys")
        all_specs = specs()
        vms = [Vm(s, rd) for s in all_specs]
        if any(vm.pid() for vm in vms):
            raise InfraError("the nested lab is already up; run `lab nested down` first")
        rep.stage("keys, overlays and seed disks", total=None)
        keys.regenerate([s.name for s in all_specs])
        write_known_hosts(keys.known_hosts, [("127.0.0.1", s.ssh_port, keys.host(s.name)) for s in all_specs])
        for vm in vms:
            write_seed(vm, all_specs, keys)
        t_boot = time.monotonic()
        try:
            for vm in vms:
                vm.start(image)
            rep.stage(f"boot {' + '.join(s.name for s in all_specs)} (TCG)", total=len(vms))
            _wait_for_ssh(vms, keys, rep, boot_timeout)
            seconds["boot_to_ssh"] = round(time.monotonic() - t_boot, 1)
            caps: dict[str, list[str]] = {}
            for vm in vms:
                rep.stage(f"{vm.spec.name}: mtty mdev, libvirtd", total=None)
                caps[vm.spec.name] = _prepare_host(vm.spec, keys)
            seconds["host_setup"] = round(time.monotonic() - t_boot - seconds["boot_to_ssh"], 1)
        except BaseException:
            for vm in vms:
                vm.stop()
            raise
        write_inventory(inventory, inventory_doc(all_specs, keys, caps))
        rep.done()
        seconds["total"] = round(time.monotonic() - t0, 1)
        (rd / "up.json").write_text(json.dumps({"seconds": seconds, "inventory": str(inventory)}, indent=2))
        return UpResult(inventory, image, seconds)


def _wait_for_ssh(vms: list[Vm], keys: Keys, rep: RichReporter, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(vms)
    while pending:
        for vm in list(pending):
            if vm.pid() is None:
                raise InfraError(f"{vm.spec.name} died while booting; console:\n{vm.console_tail()}")
            if vm.ssh_banner() and ssh(vm.spec, keys, "true", timeout=30).returncode == 0:
                pending.remove(vm)
                rep.update(completed=len(vms) - len(pending), note=f"{vm.spec.name} up")
        if pending and time.monotonic() > deadline:
            names = ", ".join(vm.spec.name for vm in pending)
            raise InfraError(f"{names}: no SSH after {timeout:g}s; console:\n{pending[0].console_tail()}")
        if pending:
            time.sleep(1.0)


def _prepare_host(spec: VmSpec, keys: Keys) -> list[str]:
    """Create the mtty mdev, check libvirtd answers, and read the device's migration flags."""
    create = f"/sys/class/mdev_bus/{MTTY_PARENT}/mdev_supported_types/{MTTY_TYPE}/create"
    ssh_ok(
        spec,
        keys,
        f"lsmod | grep -q '^mtty ' || modprobe mtty; "
        f"test -e /sys/bus/mdev/devices/{MTTY_UUID} || echo {MTTY_UUID} > {create}",
    )
    # The first connection makes libvirtd probe QEMU's capabilities: slow under TCG, so pay it here.
    ssh_ok(spec, keys, "virsh -c qemu:///system version", timeout=300)
    out = ssh_ok(spec, keys, f"python3 -c {shlex.quote(MIGRATION_PROBE)} {MTTY_UUID}")
    probe = json.loads(out.strip().splitlines()[-1])
    (run_dir() / f"{spec.name}.probe.json").write_text(json.dumps(probe, indent=2) + "\n")
    flags = int(probe["migration_flags"])
    return [name for bit, name in sorted(MIGRATION_FLAG_NAMES.items()) if flags & bit]


def down() -> list[str]:
    """Stop every VM `up` started; returns the names of those that were running."""
    stopped = []
    with _lock():
        for s in specs():
            vm = Vm(s, run_dir())
            if vm.stop():
                stopped.append(s.name)
    return stopped


@dataclass(frozen=True)
class VmStatus:
    name: str
    pid: int | None
    ssh_port: int
    ssh: bool
    uptime: float | None
    console: Path

    @property
    def alive(self) -> bool:
        return self.pid is not None


def status(check: Callable[[Vm], bool] | None = None) -> list[VmStatus]:
    """Each VM: pid (None when dead), sshd answering on its forward, uptime in seconds."""
    probe = check or (lambda vm: vm.ssh_banner())
    out = []
    for s in specs():
        vm = Vm(s, run_dir())
        pid = vm.pid()
        out.append(
            VmStatus(s.name, pid, s.ssh_port, bool(pid) and probe(vm), vm.uptime() if pid else None, vm.paths.console)
        )
    return out


def is_up(inventory: Path = NESTED_INVENTORY) -> bool:
    return inventory.is_file() and all(st.alive and st.ssh for st in status())
