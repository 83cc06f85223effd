"""A full filesystem for save images: a tiny tmpfs mounted at a run-named directory on the host.

A VM saved there meets ENOSPC part way through its image: the save must fail
with an error, and the VM must go on running with its device RUNNING. The
directory carries the run's tag (`/var/tmp/labs-full/<tag>`), so `lab janitor`
unmounts and removes a dead run's (labs.janitor).
"""

from __future__ import annotations

import shlex

import libvirt

from labs.errors import InfraError
from labs.faults.base import ExpectedError, Fault
from labs.transport import HostConnection

FULL_DIR = "/var/tmp/labs-full"
SIZE_KIB = 1024  # far smaller than any VM's RAM


class FullFilesystem(Fault):
    name = "full-filesystem"
    # the save job's write fails (libvirt's iohelper or QEMU's outgoing stream; not measured)
    expected_errors = (
        # measured on libvirt 11.3: its iohelper's "No space left on device"
        ExpectedError(libvirt.VIR_FROM_NONE, libvirt.VIR_ERR_OPERATION_FAILED),
        ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_OPERATION_FAILED),
        ExpectedError(libvirt.VIR_FROM_NONE, libvirt.VIR_ERR_SYSTEM_ERROR),
        ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_SYSTEM_ERROR),
    )

    def __init__(self, ssh: HostConnection, tag: str) -> None:
        self.path = f"{FULL_DIR}/{tag}"
        super().__init__(f"{ssh.name}:{self.path}")
        self.ssh = ssh

    def image(self, name: str) -> str:
        return f"{self.path}/{name}.save"

    def _inject(self) -> None:
        path = shlex.quote(self.path)
        script = f"mkdir -p {path} && mount -t tmpfs -o size={SIZE_KIB}k,mode=1777 labs-full {path}"
        res = self.ssh.run(script, timeout=30, sudo=True)
        if not res.ok:
            raise InfraError(f"{self.ssh.name}: tmpfs at {self.path}: {res.stderr.strip()}")
        self.note(f"mounted a {SIZE_KIB} KiB tmpfs at {self.path} on {self.ssh.name}")

    def _undo(self) -> None:
        self.ssh.run(remove_script(self.path), timeout=30, sudo=True, check=True)
        self.note(f"unmounted and removed {self.path}")


def remove_script(path: str) -> str:
    quoted = shlex.quote(path)
    return f"if mountpoint -q {quoted}; then umount {quoted}; fi; rm -rf {quoted}"
