"""Keys for the embedded sim lab: one client key, one host key per host, known_hosts.

Generated with OpenSSH's own ssh-keygen so the files are exactly what sshd and
a lab engineer's tools expect.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from labs.errors import InfraError
from labs.transport.hostkeys import host_key_name


def keygen(path: Path, comment: str) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            capture_output=True,
        )
    except FileNotFoundError:
        raise InfraError("ssh-keygen not found: install openssh-client (./lab installs it as root)") from None
    except subprocess.CalledProcessError as exc:
        raise InfraError(f"ssh-keygen {path} failed: {exc.stderr.decode().strip()}") from None


def public_key(private: Path) -> str:
    return Path(str(private) + ".pub").read_text().strip()


def write_known_hosts(path: Path, entries: list[tuple[str, int, Path]]) -> None:
    """Pin each (address, port) to its host key; rewritten whole so stale keys go."""
    lines = []
    for address, port, host_key in entries:
        kind, b64 = public_key(host_key).split()[:2]
        lines.append(f"{host_key_name(address, port)} {kind} {b64}\n")
    replace_text(path, "".join(lines))


def replace_text(path: Path, text: str) -> None:
    """Write `path` whole, and only when it changes: sshd and other runs read these files without our lock."""
    try:
        if path.read_text() == text:
            return
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
