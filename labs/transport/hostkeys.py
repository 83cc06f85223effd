"""Host-key policies: strict by default, accept-new only when a host opts in.

paramiko's AutoAddPolicy would silently trust any key; we never use it. A
mismatched key is refused by paramiko itself (BadHostKeyException) under every
policy, so accept-new only ever adds keys for hosts that have none yet.
"""

from __future__ import annotations

import logging
from pathlib import Path

import paramiko
from filelock import FileLock

from labs.inventory.models import HostKeyPolicy

log = logging.getLogger(__name__)

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")


def known_hosts_path(configured: Path | None) -> Path:
    return (configured or DEFAULT_KNOWN_HOSTS).expanduser()


def host_key_name(address: str, port: int) -> str:
    """The name OpenSSH writes in known_hosts for this endpoint."""
    return address if port == 22 else f"[{address}]:{port}"


class AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """OpenSSH's StrictHostKeyChecking=accept-new: pin a first-seen key to the file."""

    def __init__(self, known_hosts: Path) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        # Several xdist workers may meet the same new host at once.
        with FileLock(str(self.known_hosts) + ".lock"):
            keys = paramiko.HostKeys()
            if self.known_hosts.exists():
                keys.load(str(self.known_hosts))
            if keys.lookup(hostname) is None:
                with self.known_hosts.open("a") as f:
                    f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
                log.warning("accepted new host key for %s (%s) into %s", hostname, key.get_name(), self.known_hosts)
        client.get_host_keys().add(hostname, key.get_name(), key)


def configure(client: paramiko.SSHClient, policy: HostKeyPolicy, known_hosts: Path | None) -> None:
    path = known_hosts_path(known_hosts)
    if path.exists():
        client.load_host_keys(str(path))
    if policy == HostKeyPolicy.ACCEPT_NEW:
        client.set_missing_host_key_policy(AcceptNewPolicy(path))
    else:
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
