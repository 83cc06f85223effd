"""Saved nested hosts: each host's RAM and device state, its disk and the lab's keys, keyed by what they depend on.

Migrate-to-file, not savevm: savevm writes the RAM into the qcow2 the VM runs on
and -loadvm wants the snapshot in the top image, so every `up` would copy the
whole image RAM included. Here a paused host's state is streamed to a file
(`migrate exec:cat > file`) beside a copy of its disk overlay; an `up` makes a
thin overlay on that read-only disk and starts QEMU with `-incoming`, so one
snapshot serves every `up` and both nested-slot run dirs at once.

Not in the state, so not in the key: the run directory and the ports (the ssh
hostfwd and the link's UDP ends are QEMU options; slirp saves no listening
socket). In the key: the base image file itself (a rebuilt image of the same
recipe is different bytes under the saved disk), QEMU's version, the command
line with ports and run dir blanked (memory, cpus, devices, kernel command
line) and the host setup `up` ran before saving.

Layout: <cache>/snapshots/<key>/{manifest.json (with what each host's device
probe read before the save), <host>.state, <host>.qcow2, <host>.seed.img,
keys/}; built in a temporary sibling and renamed into place
after manifest.json, so a half-written snapshot is never found.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labs.errors import InfraError
from labs.nested import outer
from labs.nested.image import BaseImage
from labs.nested.qmp import Qmp
from labs.nested.recipe import cache_root
from labs.nested.vm import LINK_NET, Vm, VmPaths, VmSpec, qemu_argv

# Bumped by hand when what a snapshot holds, or how it is restored, changes.
SNAPSHOT_FORMAT = 2
MANIFEST = "manifest.json"
# QEMU 7.2 caps migration at 128 MiB/s by default; a file needs no cap
MAX_BANDWIDTH = 1 << 40


@dataclass(frozen=True)
class Saved:
    dir: Path

    def state(self, name: str) -> Path:
        return self.dir / f"{name}.state"

    def disk(self, name: str) -> Path:
        return self.dir / f"{name}.qcow2"

    def seed(self, name: str) -> Path:
        return self.dir / f"{name}.seed.img"

    @property
    def keys(self) -> Path:
        return self.dir / "keys"

    @property
    def probes(self) -> dict[str, dict[str, Any]]:
        """What each host's device probe read before the save: the RAM restored holds the same devices."""
        probes: dict[str, dict[str, Any]] = self.manifest["probes"]
        return probes

    @property
    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.dir / MANIFEST).read_text())
        return data


def snapshots_root() -> Path:
    return cache_root() / "snapshots"


def enabled() -> bool:
    """LABS_NESTED_SNAPSHOT=0 always boots (and saves nothing)."""
    return os.environ.get("LABS_NESTED_SNAPSHOT", "1").strip() != "0"


@functools.cache
def qemu_version(qemu: tuple[str, ...]) -> str:
    try:
        out = subprocess.run([*qemu, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise InfraError(f"{' '.join(qemu)} --version failed: {exc}") from None
    return out.splitlines()[0] if out else ""


def key_inputs(image: BaseImage, specs: list[VmSpec], setup: str) -> dict[str, Any]:
    """Everything a saved host depends on; the ports and the run dir are blanked (see the module doc)."""
    stat = image.disk.stat()
    portless = [dataclasses.replace(s, ssh_port=0, link_port=0, peer_link_port=0) for s in specs]
    return {
        "format": SNAPSHOT_FORMAT,
        "image": image.dir.name,
        "image_manifest": hashlib.sha256((image.dir / "manifest.json").read_bytes()).hexdigest(),
        "image_disk": [str(image.disk), stat.st_size, stat.st_mtime_ns],
        "qemu": qemu_version(tuple(outer.command(image.dir))),
        "argv": [qemu_argv(s, image, VmPaths(Path("/run") / s.name)) for s in portless],
        "link_net": LINK_NET,
        "setup": setup,
    }


def snapshot_key(image: BaseImage, specs: list[VmSpec], setup: str) -> str:
    doc = json.dumps(key_inputs(image, specs, setup), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def find(key: str, names: list[str]) -> Saved | None:
    """The complete snapshot for `key`, or None (missing, half-written or for another key)."""
    saved = Saved(snapshots_root() / key)
    try:
        manifest = saved.manifest
        if manifest.get("key") != key or any(n not in manifest.get("probes", {}) for n in names):
            return None
    except (OSError, ValueError):
        return None
    files = [p for n in names for p in (saved.state(n), saved.disk(n), saved.seed(n))]
    return saved if all(p.is_file() for p in files) and saved.keys.is_dir() else None


def save(
    vms: list[Vm],
    key: str,
    keys_dir: Path,
    inputs: dict[str, Any],
    probes: dict[str, dict[str, Any]],
    timeout: float = 300.0,
) -> Saved:
    """Pause each running host, stream its state to a file, copy its disk, let it run on; then publish with
    what the hosts' device probes read."""
    root = snapshots_root()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # the snapshot holds the lab's private keys
    found = find(key, [vm.spec.name for vm in vms])
    if found:
        return found
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        with ThreadPoolExecutor(len(vms)) as pool:
            sizes = dict(pool.map(lambda vm: _save_vm(vm, Saved(tmp), timeout), vms))
        shutil.copytree(keys_dir, tmp / "keys", ignore=lambda _d, names: [n for n in names if not _is_key(n)])
        manifest = {
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "save_seconds": round(time.monotonic() - start, 1),
            "state_bytes": sizes,
            "inputs": inputs,
            "probes": probes,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            tmp.rename(root / key)
        except OSError:
            pass  # another `up` published the same key first: its snapshot is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune(keep=key)
    saved = find(key, [vm.spec.name for vm in vms])
    if saved is None:
        raise InfraError(f"snapshot {root / key} was not published")
    return saved


def _is_key(name: str) -> bool:
    # the key pairs only: the ssh wrapper and known_hosts name one run dir and one port range
    return name.endswith("_ed25519") or name.endswith("_ed25519.pub")


def _save_vm(vm: Vm, out: Saved, timeout: float) -> tuple[str, int]:
    name = vm.spec.name
    with Qmp(vm.paths.qmp) as q:
        q.command("stop")
        try:
            q.command("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
            q.command("migrate", uri=f"exec:cat > {shlex.quote(str(out.state(name)))}")
            q.wait_migration(timeout)
            # paused, and the completed migration flushed and released its disks: the overlay matches the RAM
            for src, dst in ((vm.paths.overlay, out.disk(name)), (vm.paths.seed, out.seed(name))):
                subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True, capture_output=True)
        finally:
            q.command("cont")
    return name, out.state(name).stat().st_size


def resume(vm: Vm, timeout: float = 60.0) -> None:
    """Run a host QEMU started with -incoming once its state is in: it was saved paused, so it arrives paused."""
    deadline = time.monotonic() + timeout
    with Qmp(vm.paths.qmp) as q:
        while True:
            status = q.command("query-status")["status"]
            if status == "running":
                return
            if status in ("paused", "postmigrate", "prelaunch"):
                q.command("cont")
                return
            if status != "inmigrate" or time.monotonic() > deadline:
                raise InfraError(f"{vm.spec.name}: QEMU is {status} after the restore (see {vm.paths.qemu_log})")
            time.sleep(0.1)


def discard(saved: Saved) -> None:
    """Unpublish a snapshot (renamed away first, so no `find` sees it half deleted)."""
    gone = saved.dir.with_name(f".{saved.dir.name}.discarded-{os.getpid()}")
    try:
        saved.dir.rename(gone)
    except OSError:
        return  # already discarded by another `up`
    shutil.rmtree(gone, ignore_errors=True)


def prune(keep: str) -> list[Path]:
    """Delete snapshots whose base image is gone or rebuilt (nothing can restore them) and failed saves' leftovers."""
    removed = []
    for d in sorted(snapshots_root().iterdir()):
        if d.name == keep or not d.is_dir():
            continue
        if d.name.startswith(".") and time.time() - d.stat().st_mtime < 3600:
            continue  # maybe another `up` saving right now
        usable = False
        if re.fullmatch(r"[0-9a-f]{16}", d.name):
            try:
                path, size, mtime_ns = Saved(d).manifest["inputs"]["image_disk"]
                stat = Path(path).stat()
                usable = (stat.st_size, stat.st_mtime_ns) == (size, mtime_ns)
            except (OSError, ValueError, KeyError, TypeError):
                usable = False
        if not usable:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
