"""What a scenario leaves in the report about its domains, gathered before teardown removes them.

For every domain the scenario created, on every hypervisor that holds a copy:
its live XML, the tail of QEMU's log for that domain and libvirt's own journal
lines written since the scenario began. On `test:///` there is no QEMU and no
daemon, so only the XML is there; the attachment says why the rest is missing.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from functools import partial

from labs.attachments import attach
from labs.errors import LabError
from labs.session import LabSession
from labs.virt.domain import VM, Hypervisor

QEMU_LOG_DIR = "/var/log/libvirt/qemu"
LOG_LINES = 120
# modular daemons (virtqemud) on new distributions, the monolithic libvirtd on old ones
LIBVIRT_UNITS = ("virtqemud", "libvirtd")


def qemu_log_tail(session: LabSession, host: str, name: str, lines: int = LOG_LINES) -> str:
    path = shlex.quote(f"{QEMU_LOG_DIR}/{name}.log")
    res = session.ssh(host).run(f"tail -n {lines} {path} 2>&1", timeout=30, sudo=True)
    return res.stdout


def libvirt_journal(session: LabSession, host: str, since: float, lines: int = LOG_LINES) -> str:
    """libvirt's journal lines of the last `now - since` seconds (rounded up), as the host's clock counts."""
    seconds = int(time.time() - since) + 2
    units = " ".join(f"-u {u}" for u in LIBVIRT_UNITS)
    cmd = f"journalctl {units} --since -{seconds}s --no-pager -q -o short-precise 2>&1 | tail -n {lines}"
    return session.ssh(host).run(cmd, timeout=30, sudo=True).stdout


def _attach_read(title: str, read: Callable[[], str]) -> None:
    try:
        attach(title, read())
    except LabError as exc:
        attach(title, f"(not read: {exc})")


def attach_domains(session: LabSession, hvs: list[Hypervisor], names: list[str], since: float) -> None:
    """Attach what each hypervisor knows of these domains (a hypervisor without any of them adds nothing)."""
    for hv in hvs:
        present = [n for n in names if hv.exists(n)]
        for name in present:
            where = f"{name} on {hv.name}"
            _attach_read(f"domain XML {where}", VM(hv, name).xml)
            if hv.is_test_driver:
                attach(f"QEMU log {where}", f"(no QEMU log: {hv.uri} runs no QEMU)")
            else:
                _attach_read(f"QEMU log {where}", partial(qemu_log_tail, session, hv.name, name))
        if present and not hv.is_test_driver:
            _attach_read(f"libvirt journal {hv.name}", partial(libvirt_journal, session, hv.name, since))
