"""One real OpenSSH sshd serving one sim host on a loopback address."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from labs.errors import InfraError

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")


def find_sshd() -> str:
    for candidate in (*SSHD_CANDIDATES, shutil.which("sshd")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise InfraError("sshd not found: the sim lab needs openssh-server (./lab installs it when run as root)")


@dataclass(frozen=True)
class SimSshd:
    """Config, host key, pid and log of one sim host's sshd, all under `home`."""

    host: str
    address: str
    port: int
    home: Path
    user: str
    authorized_keys: Path
    sim_dir: Path

    @property
    def host_key(self) -> Path:
        return self.home / "ssh_host_ed25519_key"

    @property
    def config(self) -> Path:
        return self.home / "sshd_config"

    @property
    def pidfile(self) -> Path:
        return self.home / "sshd.pid"

    @property
    def log(self) -> Path:
        return self.home / "sshd.log"

    def write_config(self) -> None:
        # SetEnv tells the agent which sim host it serves; sessions see it as environment.
        self.config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.address}:{self.port}",
                    f"HostKey {self.host_key}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    f"AllowUsers {self.user}",
                    "PidFile none",
                    "StrictModes no",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    "AllowTcpForwarding yes",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "MaxSessions 64",
                    "MaxStartups 64:30:128",
                    "ClientAliveInterval 30",
                    "Subsystem sftp internal-sftp",
                    f"SetEnv LABS_SIM_HOST={self.host} LABS_SIM_DIR={self.sim_dir}",
                    "LogLevel INFO",
                    "",
                ]
            )
        )

    def pid(self) -> int | None:
        """The pid of our running sshd, or None (a stale pidfile is not trusted)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            # sshd rewrites its argv into one proctitle string, so search, don't split
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(self.config).encode() in cmdline else None

    def listening(self) -> bool:
        try:
            with socket.create_connection((self.address, self.port), timeout=0.5) as s:
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def start(self, timeout: float = 10.0) -> int:
        pid = self.pid()
        if pid is not None:
            return pid
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self.write_config()
        check = subprocess.run([find_sshd(), "-t", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise InfraError(f"sim host {self.host}: sshd rejects {self.config}: {check.stderr.strip()}")
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                [find_sshd(), "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C aimed at pytest must not kill it mid-teardown
            )
        self.pidfile.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pidfile.unlink(missing_ok=True)
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                raise InfraError(f"sim host {self.host}: sshd exited ({proc.returncode}): {' '.join(tail)}")
            if self.listening():
                return proc.pid
            time.sleep(0.05)
        self.stop()
        raise InfraError(f"sim host {self.host}: sshd did not listen on {self.address}:{self.port} in {timeout:g}s")

    def started(self) -> list[int]:
        """Every process running sshd with our config: a start killed between its fork and the pidfile leaves
        a listener no pidfile names."""
        try:
            sshd = os.path.realpath(find_sshd())
        except InfraError:
            return []
        needle = str(self.config).encode()
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                # an editor or a grep naming the file is not one: the program must be sshd
                if needle in (proc / "cmdline").read_bytes() and os.readlink(proc / "exe").startswith(sshd):
                    found.append(int(proc.name))
            except OSError:
                continue
        return found

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the listener and every session it spawned, like a host going down."""
        listeners = self.started()  # the pidfile's listener among them
        if not listeners:
            self.pidfile.unlink(missing_ok=True)
            return False
        # Session processes call setsid() and outlive their listener: collect them first.
        victims = list(dict.fromkeys([*listeners, *_descendants(listeners)]))
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
            for victim in victims:
                try:
                    os.kill(victim, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(_alive(v) for v in victims):
                time.sleep(0.05)
            victims = [v for v in victims if _alive(v)]
            if not victims:
                break
        self.pidfile.unlink(missing_ok=True)
        return True


def _descendants(roots: list[int]) -> list[int]:
    """Every process below `roots`, from one pass over /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # the command name may contain spaces: the ppid follows the last ')'
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        # reap it if it is our child, so it does not linger as a zombie
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
