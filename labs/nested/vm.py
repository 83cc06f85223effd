"""One nested host as a QEMU process: command line, seed disk, start, stop, status.

Every file a VM needs or leaves lives in its own run directory (overlay, seed
disk, pidfile, QMP socket, console log), so `stop` can kill exactly the process
`start` made: the pid comes from QEMU's own pidfile and is only signalled when
its command line still names that run directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from labs.errors import InfraError
from labs.nested import outer
from labs.nested.image import BaseImage

LINK_NET = "192.168.123"
LINK_PREFIX = 24
# user-mode networking: the guest's fixed address; sshd is reached via hostfwd
MGMT_ADDRESS = "10.0.2.15"
# where a guest kernel says it is going down (an oops precedes the panic that ends QEMU)
CRASH_MARKER = re.compile(r"\] (Oops:|BUG:|Kernel panic|general protection fault)")
# what a crash report's one-line summary keeps, each from its first line on or after the marker
CRASH_FACTS = (
    re.compile(r"\] ((?:Oops:|BUG:|general protection fault).*)"),
    re.compile(r"\] (RIP: 0010:\S+)"),
    re.compile(r"\] CPU: \d+ .*?(PID: \d+ Comm: \S+)"),
    re.compile(r"\] (Kernel panic - not syncing: .*)"),
)


@dataclass(frozen=True)
class VmSpec:
    """What makes one nested host different from the other."""

    name: str  # inventory host name and guest hostname
    index: int  # 1-based: link address .index, MAC suffix
    ssh_port: int  # 127.0.0.1:ssh_port -> guest :22
    link_port: int  # this VM's UDP end of the private link
    peer_link_port: int  # the other VM's UDP end
    memory_mb: int = 3072
    cpus: int = 2
    accel: str = "tcg"

    @property
    def link_ip(self) -> str:
        return f"{LINK_NET}.{self.index}"

    @property
    def mgmt_mac(self) -> str:
        return f"52:54:00:00:00:{self.index:02x}"

    @property
    def link_mac(self) -> str:
        return f"52:54:00:7b:00:{self.index:02x}"


@dataclass(frozen=True)
class Restore:
    """A saved host to resume: its RAM and device state, the disk it had then, its seed disk."""

    state: Path
    disk: Path
    seed: Path


@dataclass(frozen=True)
class VmPaths:
    dir: Path

    @property
    def overlay(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def seed(self) -> Path:
        return self.dir / "seed.img"

    @property
    def seed_dir(self) -> Path:
        return self.dir / "seed"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def started(self) -> Path:
        return self.dir / "started.json"


def kernel_cmdline(spec: VmSpec) -> str:
    # panic=-1 with -no-reboot: a guest panic ends the QEMU process, so `status` sees it dead.
    # mitigations=off: speculative-execution workarounds only slow TCG down.
    return f"root=/dev/vda rw console=ttyS0,115200 panic=-1 mitigations=off labs.host={spec.name}"


def qemu_argv(spec: VmSpec, image: BaseImage, paths: VmPaths) -> list[str]:
    # one TCG thread for all vCPUs: multi-threaded TCG races the guest's live code patching (docs/incidents.md)
    accel = "kvm" if spec.accel == "kvm" else "tcg,thread=single,tb-size=256"
    # no CMPXCHG16B under TCG: the controller's QEMU 7.2 left garbage EFLAGS (TF set) after the guest kernel's SLUB
    # fast path used it, a double fault twice (docs/incidents.md); without it the kernel takes SLUB's locked path
    cpu = "host" if spec.accel == "kvm" else "max,cx16=off"
    return [
        *outer.command(image.dir),
        "-name", f"{spec.name},process=labs-{spec.name}",
        "-machine", "q35",
        "-accel", accel,
        "-cpu", cpu,
        "-smp", str(spec.cpus),
        "-m", str(spec.memory_mb),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", kernel_cmdline(spec),
        # cache=unsafe: the overlay is thrown away at `down`, host crashes don't matter
        "-drive", f"file={paths.overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        "-drive", f"file={paths.seed},if=virtio,format=raw,readonly=on",
        "-netdev", f"user,id=mgmt,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
        "-device", f"virtio-net-pci,netdev=mgmt,mac={spec.mgmt_mac}",
        # the private link: a point-to-point UDP tunnel on loopback, no start order needed
        "-netdev", f"socket,id=link,udp=127.0.0.1:{spec.peer_link_port},localaddr=127.0.0.1:{spec.link_port}",
        "-device", f"virtio-net-pci,netdev=link,mac={spec.link_mac}",
        # sshd and the kernel want entropy early; TCG boots are slow enough already
        "-device", "virtio-rng-pci",
        "-serial", f"file:{paths.console}",
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-pidfile", str(paths.pidfile),
        "-daemonize",
    ]  # fmt: skip


def make_overlay(backing: Path, overlay: Path) -> None:
    overlay.unlink(missing_ok=True)
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(overlay)])


def make_seed(seed_dir: Path, seed: Path) -> None:
    """A small read-only ext4 disk holding the files the guest's labs-seed script applies."""
    seed.unlink(missing_ok=True)
    _run(["mkfs.ext4", "-q", "-F", "-L", "labsseed", "-d", str(seed_dir), str(seed), "8M"])


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise InfraError(f"{argv[0]} not found: install the nested lab's host packages") from None
    except subprocess.CalledProcessError as exc:
        raise InfraError(f"{' '.join(argv[:3])}... failed: {exc.stderr.strip()}") from None


def port_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        # QEMU's hostfwd sets SO_REUSEADDR too: TIME_WAIT leftovers of the last run don't block it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Vm:
    def __init__(self, spec: VmSpec, run_dir: Path) -> None:
        self.spec = spec
        self.paths = VmPaths(run_dir / spec.name)

    # -- lifecycle ------------------------------------------------------------

    def start(self, image: BaseImage, restore: Restore | None = None) -> int:
        """Boot from the image, or with `restore` resume a saved host (its disk under a fresh overlay)."""
        if self.pid() is not None:
            raise InfraError(f"{self.spec.name} is already running (pid {self.pid()}); run `lab nested down` first")
        if not port_free(self.spec.ssh_port):
            raise InfraError(f"127.0.0.1:{self.spec.ssh_port} is busy: set LABS_NESTED_BASE_PORT to another range")
        if not port_free(self.spec.link_port, socket.SOCK_DGRAM):
            raise InfraError(f"udp 127.0.0.1:{self.spec.link_port} is busy: set LABS_NESTED_BASE_PORT")
        p = self.paths
        p.dir.mkdir(parents=True, exist_ok=True)
        for stale in (p.pidfile, p.qmp, p.console, p.started):
            stale.unlink(missing_ok=True)
        if restore is None:
            make_overlay(image.disk, p.overlay)
            make_seed(p.seed_dir, p.seed)
        else:
            make_overlay(restore.disk, p.overlay)
            # the guest read its seed at boot; the disk only has to be there, as it was when saved
            shutil.copyfile(restore.seed, p.seed)
        argv = qemu_argv(self.spec, image, p)
        if restore is not None:
            argv += ["-incoming", f"exec:cat {shlex.quote(str(restore.state))}"]
        return self._launch(argv)

    def _launch(self, argv: list[str]) -> int:
        p = self.paths
        with p.qemu_log.open("w") as log:
            log.write(" ".join(argv) + "\n")
            log.flush()
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        pid = self.pid()
        if proc.returncode != 0 or pid is None:
            raise InfraError(f"{self.spec.name}: QEMU did not start; see {p.qemu_log}: {p.qemu_log.read_text()[-500:]}")
        p.started.write_text(json.dumps({"pid": pid, "time": time.time(), "argv": argv}))
        return pid

    def power_on(self) -> int:
        """Start the host again as it was last started, on its own disk: a reboot (-no-reboot ended QEMU).

        A restored host boots fresh from the disk it was restored with; the console log of the run before
        is kept as console.prev.log."""
        p = self.paths
        if self.pid() is not None:
            raise InfraError(f"{self.spec.name} is running (pid {self.pid()}): nothing to power on")
        try:
            argv: list[str] = json.loads(p.started.read_text())["argv"]
        except (OSError, ValueError, KeyError):
            raise InfraError(f"{self.spec.name}: never started here ({p.started} missing): `lab nested up`") from None
        if "-incoming" in argv:
            at = argv.index("-incoming")
            argv = argv[:at] + argv[at + 2 :]
        if p.console.exists():
            p.console.replace(p.dir / "console.prev.log")
        for stale in (p.pidfile, p.qmp):
            stale.unlink(missing_ok=True)
        return self._launch(argv)

    def pid(self) -> int | None:
        """The running QEMU's pid, only if it is still the process we started."""
        try:
            pid = int(self.paths.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return None
        # a reused pid will not name our run directory
        return pid if str(self.paths.dir) in cmdline else None

    def stop(self, timeout: float = 10.0) -> bool:
        """Kill our QEMU (SIGTERM, then SIGKILL) and remove the disposable files. True if it was running."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._alive(pid):
                time.sleep(0.1)
            if self._alive(pid):
                os.kill(pid, signal.SIGKILL)
                while self._alive(pid):
                    time.sleep(0.05)
        p = self.paths
        for f in (p.pidfile, p.qmp, p.overlay, p.seed, p.started):
            f.unlink(missing_ok=True)
        shutil.rmtree(p.seed_dir, ignore_errors=True)
        return pid is not None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"

    # -- observation ------------------------------------------------------------

    def uptime(self) -> float | None:
        try:
            started = json.loads(self.paths.started.read_text())["time"]
        except (OSError, ValueError, KeyError):
            return None
        return time.time() - float(started)

    def ssh_banner(self, timeout: float = 2.0) -> bool:
        """sshd answered on the forward (slirp accepts the TCP connection even before sshd listens)."""
        try:
            with socket.create_connection(("127.0.0.1", self.spec.ssh_port), timeout=timeout) as s:
                s.settimeout(timeout)
                return s.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def console_tail(self, lines: int = 15) -> str:
        return "\n".join(self._console_lines()[-lines:])

    def crash_report(self, lines: int = 40) -> str:
        """The console from the guest kernel's first oops or panic on (its last lines if it has none)."""
        text = self._console_lines()
        first = _crash_start(text)
        return "\n".join(text[first : first + lines] if first is not None else text[-lines:])

    def crash_headline(self) -> str:
        """What ended the guest kernel in one line: the oops, where (RIP), in which task, the panic ("" if none).

        It stays whole where a long report is cut, e.g. in the middle of a CI log."""
        text = self._console_lines()
        first = _crash_start(text)
        if first is None:
            return ""
        facts = []
        for fact in CRASH_FACTS:
            found = next((m.group(1).strip() for line in text[first:] if (m := fact.search(line))), None)
            facts += [found] if found else []
        return " | ".join(facts)

    def _console_lines(self) -> list[str]:
        try:
            return self.paths.console.read_text(errors="replace").splitlines()
        except OSError:
            return []


def _crash_start(console: list[str]) -> int | None:
    return next((i for i, line in enumerate(console) if CRASH_MARKER.search(line)), None)
