"""The bootblock workload: a multiboot kernel that dirties RAM and loops bytes through the sample UART mdev's FIFO.

Its mailbox is read with HMP `xp` through the monitor of the QEMU that runs
the domain (libvirt_qemu), on whichever host that is.
"""

from __future__ import annotations

import time

import libvirt

from labs.errors import InfraError
from labs.virt.monitor import qmp
from labs.workloads import KernelBoot
from labs.workloads.build import build
from labs.workloads.mailbox import MAILBOX_ADDR, SIZE, STATUS_RUNNING, Mailbox, parse_xp

BOOT_WAIT = 180.0  # seconds for firmware + bootblock to reach its loop (nested TCG is slow)


class Bootblock:
    name = "bootblock"

    def __init__(self, dirty_mib: int = 16, rate_mib: int = 8, depth: int = 8) -> None:
        self.cmdline = f"dirty_mib={dirty_mib} rate_mib={rate_mib} depth={depth}"

    def boot(self) -> KernelBoot:
        return KernelBoot(build(), self.cmdline)

    def _read_once(self, dom: libvirt.virDomain) -> Mailbox:
        out = qmp(dom, "human-monitor-command", {"command-line": f"xp /{SIZE // 4}wx {MAILBOX_ADDR:#x}"})
        data = parse_xp(str(out or ""))
        if len(data) < SIZE:
            raise InfraError(f"{dom.name()}: HMP xp of the mailbox answered {str(out)[:200]!r}")
        return Mailbox.parse(data)

    def read(self, dom: libvirt.virDomain, wait: float = 0.0) -> Mailbox:
        deadline = time.monotonic() + wait
        while True:
            box = self._read_once(dom)
            if (box.valid and box.status == STATUS_RUNNING) or time.monotonic() > deadline:
                return box
            time.sleep(0.5)
