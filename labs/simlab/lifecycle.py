"""The embedded sim lab: keys, known_hosts and one sshd per host, shared by users.

Several processes may use one sim lab at once (pytest-xdist workers, a second
run, `lab sim up`). Each registers itself in a users file under a lock; the last
one to leave stops the sshds. A `lab sim up` registers as "cli" and keeps the
lab up until `lab sim down`.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from labs.errors import ConfigError
from labs.inventory import Inventory
from labs.simlab import keys
from labs.simlab.sshd import SimSshd

CLI_USER = "cli"


def _pid_alive(entry: str) -> bool:
    if entry == CLI_USER:
        return True
    try:
        os.kill(int(entry), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@dataclass
class SimLab:
    inventory: Inventory

    def __post_init__(self) -> None:
        if self.inventory.settings.sim is None:
            raise ConfigError(f"{self.inventory.file}: lab.sim: not a sim inventory")
        self.dir = self.inventory.settings.sim.dir.expanduser()

    @property
    def lock(self) -> FileLock:
        return FileLock(str(self.dir / "lab.lock"), timeout=60)

    @property
    def users_file(self) -> Path:
        return self.dir / "users"

    def host_dir(self, host: str) -> Path:
        return self.dir / "hosts" / host

    def device_dir(self, host: str, device: str) -> Path:
        """Where a simulated device keeps its state: it lives on its host, across sessions."""
        return self.host_dir(host) / "devices" / device

    def libvirt_node(self, host: str) -> Path:
        return self.host_dir(host) / "libvirt-node.xml"

    def sshds(self) -> list[SimSshd]:
        out = []
        for host in self.inventory.hosts:
            spec = host.spec
            out.append(
                SimSshd(
                    host=host.name,
                    address=spec.address,
                    port=spec.port,
                    home=self.host_dir(host.name),
                    user=spec.user if spec.user != "root" or os.geteuid() == 0 else getpass.getuser(),
                    authorized_keys=self.dir / "authorized_keys",
                    sim_dir=self.dir,
                )
            )
        return out

    # -- provisioning: files only, no process ------------------------------
    def provision(self, _inventory: Inventory | None = None) -> None:
        """Generate keys and known_hosts (idempotent); load_inventory calls it before its file checks."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self.lock:
            authorized = []
            for host in self.inventory.hosts:
                if host.spec.identity_file is not None:
                    client_key = host.spec.identity_file.expanduser()
                    keys.keygen(client_key, f"labs-sim-client@{self.inventory.name}")
                    authorized.append(keys.public_key(client_key))
            keys.replace_text(self.dir / "authorized_keys", "".join(f"{k}\n" for k in dict.fromkeys(authorized)))
            known: dict[Path, list[tuple[str, int, Path]]] = {}
            for sshd in self.sshds():
                sshd.home.mkdir(parents=True, exist_ok=True)
                keys.keygen(sshd.host_key, f"labs-sim-host-{sshd.host}")
                spec = self.inventory.host(sshd.host).spec
                if spec.known_hosts is not None:
                    known.setdefault(spec.known_hosts.expanduser(), []).append((sshd.address, sshd.port, sshd.host_key))
                node = self.libvirt_node(sshd.host)
                if not node.exists():
                    node.write_text("<node>\n</node>\n")
            for path, entries in known.items():
                keys.write_known_hosts(path, entries)

    # -- processes ---------------------------------------------------------
    def _users(self) -> list[str]:
        try:
            entries = self.users_file.read_text().split()
        except FileNotFoundError:
            return []
        return [e for e in entries if _pid_alive(e)]

    def _set_users(self, users: list[str]) -> None:
        self.users_file.write_text("".join(f"{u}\n" for u in dict.fromkeys(users)))

    def start(self, user: str | None = None) -> None:
        """Start every host's sshd that is not running, and register `user` (default: this pid)."""
        self.provision()
        with self.lock:
            for sshd in self.sshds():
                sshd.start()
            self._set_users([*self._users(), user or str(os.getpid())])

    def stop(self, user: str | None = None, force: bool = False) -> bool:
        """Unregister `user`; stop the sshds when nobody else uses them. True if they were stopped."""
        if not self.dir.exists():
            return False
        with self.lock:
            me = user or str(os.getpid())
            users = [] if force else [u for u in self._users() if u != me]
            self._set_users(users)
            if users:
                return False
            for sshd in self.sshds():
                sshd.stop()
            return True

    def status(self) -> dict[str, int | None]:
        return {sshd.host: sshd.pid() for sshd in self.sshds()}

    def users(self) -> list[str]:
        return self._users()
