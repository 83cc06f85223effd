"""Remove what killed runs left behind, found by the run-id prefix (`labs-`).

What a run creates is named after its run id: domains `labs-<date>-<time>-<hex>-...`,
save images in the known image dirs, nft tables / iptables comments
`labs_<date>_<time>_<hex>_...`. The janitor removes all of them except the
current session's own, and returns one line per thing removed.

A `test:///` node lives inside the process that opened it, so from a fresh
process only image files can be left over there; within one process (the
framework's tests) the shared connections are searched too.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from labs.errors import LabError
from labs.faults.network import NFT_PREFIX, rule_tag
from labs.runtime import LabSession
from labs.virt.domain import LOCAL_IMAGE_DIR, REMOTE_IMAGE_DIR, VM, hypervisor

RUN_PREFIX = "labs-"


def _mine(name: str, session: LabSession, keep_own: bool) -> bool:
    return keep_own and (name.startswith(session.run_id) or name.startswith(rule_tag(session.run_id, "")))


def janitor(session: LabSession, *, keep_own: bool = True) -> list[str]:
    """Remove leftovers of other (killed) runs on every host of the inventory; what was removed."""
    removed: list[str] = []
    for host in session.inventory.hosts:
        if host.spec.libvirt_uri:
            hv = hypervisor(session, host)
            try:
                names = [d.name() for d in hv.domains(RUN_PREFIX)]
            except LabError as exc:
                removed.append(f"{host.name}: libvirt unreachable, domains not checked: {exc}")
                names = []
            for name in names:
                if not _mine(name, session, keep_own):
                    removed += VM(hv, name).remove()
        removed += _remote_leftovers(session, host.name, keep_own)
    for image in sorted(LOCAL_IMAGE_DIR.glob(f"{RUN_PREFIX}*")) if LOCAL_IMAGE_DIR.exists() else []:
        if not _mine(image.name, session, keep_own):
            image.unlink(missing_ok=True)
            removed.append(f"controller: removed {image}")
    return removed


def _remote_leftovers(session: LabSession, host: str, keep_own: bool) -> list[str]:
    removed: list[str] = []
    try:
        ssh = session.ssh(host)
        images = ssh.run(f"ls -1 {REMOTE_IMAGE_DIR} 2>/dev/null", timeout=30, idempotent=True).stdout.split()
        for name in images:
            if name.startswith(RUN_PREFIX) and not _mine(name, session, keep_own):
                path = f"{REMOTE_IMAGE_DIR}/{name}"
                ssh.run(f"rm -f {shlex.quote(path)}", timeout=30, sudo=True, check=True)
                removed.append(f"{host}: removed {path}")
        if ssh.run("command -v nft", timeout=15, sudo=True).ok:
            tables = ssh.run("nft list tables", timeout=30, sudo=True).stdout.splitlines()
            for line in tables:  # "table inet labs_..."
                parts = line.split()
                if len(parts) == 3 and parts[2].startswith(NFT_PREFIX) and not _mine(parts[2], session, keep_own):
                    ssh.run(f"nft delete table {parts[1]} {parts[2]}", timeout=15, sudo=True, check=True)
                    removed.append(f"{host}: removed nft table {parts[1]} {parts[2]}")
        removed += _iptables_leftovers(session, host, keep_own)
    except LabError as exc:
        removed.append(f"{host}: not checked: {exc}")
    return removed


def _iptables_leftovers(session: LabSession, host: str, keep_own: bool) -> list[str]:
    ssh = session.ssh(host)
    removed: list[str] = []
    for tool in ("iptables", "ip6tables"):
        res = ssh.run(f"command -v {tool} >/dev/null && {tool} -S INPUT", timeout=15, sudo=True)
        if not res.ok:
            continue
        for rule in res.stdout.splitlines():
            tag = next((w for w in rule.split() if w.startswith(NFT_PREFIX)), None)
            if rule.startswith("-A INPUT") and tag and not _mine(tag, session, keep_own):
                ssh.run(f"{tool} -D {rule[3:]}", timeout=15, sudo=True, check=True)
                removed.append(f"{host}: removed {tool} rule {rule}")
    return removed


def leftovers_dirs() -> list[Path]:
    return [LOCAL_IMAGE_DIR]
