"""Faults on the migration job and the processes behind it."""

from __future__ import annotations

import shlex

import libvirt

from labs.errors import InfraError
from labs.faults.base import Fault
from labs.transport import HostConnection
from labs.virt.domain import VM

QEMU_PID_DIR = "/run/libvirt/qemu"  # libvirtd writes <domain>.pid here for each QEMU it runs


class AbortJob(Fault):
    """Abort the running migration job (virDomainAbortJob) from the source."""

    name = "abort-job"

    def __init__(self, vm: VM) -> None:
        super().__init__(str(vm))
        self.vm = vm

    def _inject(self) -> None:
        try:
            self.vm.dom.abortJob()
        except libvirt.libvirtError as exc:
            raise InfraError(f"{self.vm}: abort job: {exc.get_error_message()}") from None
        self.note(f"virDomainAbortJob({self.vm.name}) on {self.vm.hv.name}")

    def _undo(self) -> None:
        self.note("nothing to restore: an aborted job leaves no state behind")


class KillDestinationQemu(Fault):
    """SIGKILL the destination's incoming QEMU, found by the pid file libvirt keeps for the domain."""

    name = "kill-destination-qemu"

    def __init__(self, ssh: HostConnection, domain: str, pid_dir: str = QEMU_PID_DIR) -> None:
        super().__init__(f"{ssh.name}/{domain}")
        self.ssh = ssh
        self.domain = domain
        self.pid_dir = pid_dir
        self.pid: int | None = None

    def _inject(self) -> None:
        pidfile = shlex.quote(f"{self.pid_dir}/{self.domain}.pid")
        res = self.ssh.run(f"cat {pidfile}", timeout=15, sudo=True)
        if not res.ok or not res.stdout.strip().isdigit():
            raise InfraError(f"{self.ssh.name}: no QEMU pid for {self.domain} ({res.stderr.strip() or 'empty'})")
        self.pid = int(res.stdout.strip())
        self.ssh.run(f"kill -9 {self.pid}", timeout=15, sudo=True, check=True)
        self.note(f"kill -9 {self.pid} (QEMU of {self.domain}) on {self.ssh.name}")

    def _undo(self) -> None:
        # a killed QEMU stays dead; libvirt reaps the domain, and the scenario's readback checks it did
        self.note("nothing to restore: libvirt reaps the killed domain")
