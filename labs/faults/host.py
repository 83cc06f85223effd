"""A host rebooted at once (sysrq `b`: no sync, no shutdown, as a crash or a power cut leaves it), and brought back.

Only hosts whose inventory entry has `reboot:` are rebooted. Bringing one back:
wait until it stops answering, run its `reboot.power_on` command on the
controller (if any), wait until SSH answers with a new boot id. The job under
it ends before the host is back (or at the scenario's deadline), so the fault
brings the host back as soon as the job has ended (`after_job`), before the
readback reads it; `lab janitor` powers on a host left down.
"""

from __future__ import annotations

import shlex
import subprocess
import time

import libvirt

from labs.attachments import step
from labs.errors import InfraError, LabError
from labs.faults.base import ExpectedError, Fault
from labs.inventory.models import Reboot
from labs.transport import HostConnection
from labs.virt.sequence import ev, opt, seq

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
# detached and a moment late: the SSH command returns before the kernel goes
REBOOT_NOW = "setsid -f sh -c 'sleep 1; echo b > /proc/sysrq-trigger' </dev/null >/dev/null 2>&1"
DOWN_WAIT = 60.0  # a host still answering with its old boot id this long after the sysrq did not reboot


def boot_id(ssh: HostConnection) -> str | None:
    """The host's boot id over a fresh connection, None when it does not answer."""
    ssh.close()
    try:
        res = ssh.run(BOOT_ID, timeout=15)
    except LabError:
        return None
    return res.stdout.strip() if res.ok else None


def power_on(name: str, reboot: Reboot) -> str:
    """Run the host's power-on command on the controller; what it printed last."""
    assert reboot.power_on
    try:
        proc = subprocess.run(
            shlex.split(reboot.power_on), capture_output=True, text=True, timeout=reboot.timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InfraError(f"{name}: reboot.power_on `{reboot.power_on}` failed: {exc}") from None
    out = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    last = out[-1] if out else ""
    if proc.returncode != 0:
        raise InfraError(f"{name}: reboot.power_on `{reboot.power_on}` exited {proc.returncode}: {last}")
    return last


class RebootHost(Fault):
    """Reboot the destination host during an incoming migration: its QEMU, libvirt daemon and device go with it.
    The source keeps the VM. A vanished host sends nothing, so the job stalls until the scenario's deadline
    aborts it (measured on libvirt 11.3, nested lab: no error of its own in 60 s, the source never paused);
    a host back before that resets the source's migration socket, QEMU's error."""

    name = "reboot-host"
    runs_on = "source"
    stalls = True
    expected_errors = (ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_OPERATION_FAILED),)
    # the destination's later events are lost with the host
    destination_events = seq(opt(ev("started/migrated")))

    def __init__(self, ssh: HostConnection, reboot: Reboot) -> None:
        super().__init__(ssh.name)
        self.ssh = ssh
        self.reboot = reboot
        self.old_boot: str | None = None
        self.back = True

    def _inject(self) -> None:
        res = self.ssh.run(f"{BOOT_ID} && {REBOOT_NOW}", timeout=30, sudo=True)
        if not res.ok or not res.stdout.strip():
            raise InfraError(f"{self.ssh.name}: not rebooted: {res.stderr.strip() or 'no boot id'}")
        self.old_boot, self.back = res.stdout.strip(), False
        self.note(f"echo b > /proc/sysrq-trigger on {self.ssh.name} (boot id {self.old_boot[:8]})")

    def after_job(self) -> None:
        if not self.back:
            with step(f"fault {self.name}: bring {self.ssh.name} back"):
                self.bring_back()

    def _undo(self) -> None:
        self.bring_back()

    def bring_back(self) -> None:
        """Wait until the host has gone down, power it on, wait until it answers with a new boot id."""
        if self.back:
            return
        name, t0 = self.ssh.name, time.monotonic()
        now = boot_id(self.ssh)
        while now == self.old_boot and time.monotonic() - t0 < DOWN_WAIT:
            time.sleep(1.0)
            now = boot_id(self.ssh)
        if now == self.old_boot:
            raise InfraError(f"{name}: still up {DOWN_WAIT:g}s after the sysrq reboot (boot id {now})")
        self.note(f"{name} down, {self._since():.1f}s after the sysrq" if now is None else f"{name} back by itself")
        if now is None and self.reboot.power_on:
            t1 = time.monotonic()
            said = power_on(name, self.reboot)
            self.note(f"{self.reboot.power_on}: {said or 'done'} ({time.monotonic() - t1:.1f}s)")
        deadline = t0 + self.reboot.timeout
        while now in (None, self.old_boot):
            if time.monotonic() > deadline:
                raise InfraError(f"{name}: no SSH with a new boot id {self.reboot.timeout:g}s after its reboot")
            time.sleep(2.0)
            now = boot_id(self.ssh)
        assert now is not None
        self.back = True
        self.note(f"{name} answers SSH again, boot id {now[:8]}, {self._since():.1f}s after the sysrq")

    def _since(self) -> float:
        return time.time() - (self.record.injected_at or time.time())
