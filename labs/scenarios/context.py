"""One test's scenario: its hypervisors, steps and faults, and everything it must clean up.

Whatever a scenario creates (a domain on some host, a save image, a fault) is
registered here the moment it exists, so `cleanup()` removes it after a pass,
a failure or a timeout alike. Domains are searched on every hypervisor the
scenario touched: after a migration, or a failed one, a copy may be on either.
"""

from __future__ import annotations

import itertools
import shlex
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from labs.errors import LabError
from labs.faults.base import F, FaultLedger
from labs.inventory import LabDevice, LabHost
from labs.inventory.models import LinuxGuest
from labs.models import workload_for
from labs.probes import ProbeMark
from labs.scenarios.evidence import attach_domains
from labs.scenarios.steps import StepLog
from labs.session import LabSession
from labs.virt.domain import REMOTE_IMAGE_DIR, VM, Hypervisor, hypervisor, local_image_dir
from labs.virt.xml import VFIO_TRACE_EVENTS, spec_for
from labs.workloads import WorkloadMark

_counter = itertools.count(1)


class Scenario:
    def __init__(self, session: LabSession, label: str = "vm", trace_vfio: bool = False) -> None:
        self.session = session
        self.label = label
        # QEMU -trace for the VFIO migration events (readback shows them); only where QEMU has a log backend
        self.trace_vfio = trace_vfio
        self.steps = StepLog()
        self.faults = FaultLedger()
        self.timeouts = session.inventory.settings.timeouts
        self._hvs: dict[str, Hypervisor] = {}
        self._domains: set[str] = set()
        self._images: list[tuple[str | None, str]] = []  # (host or None for the controller, path)
        self.cleanup_log: list[str] = []
        self.started = time.time()
        # per domain: device-probe values and guest-workload mailboxes to read back (labs.probes, labs.workloads)
        self.marks: dict[str, list[ProbeMark | WorkloadMark]] = {}
        self._undo: list[tuple[str, Callable[[], None]]] = []  # host changes undone once the domains are gone
        # the inventory's Linux guest instead of the model's workload (labs.scenarios.guest; the guest suite)
        self.linux_guest: LinuxGuest | None = None

    @property
    def run_id(self) -> str:
        return self.session.run_id

    def hv(self, host: str | LabHost) -> Hypervisor:
        hv = hypervisor(self.session, host)
        self._hvs[hv.name] = hv
        return hv

    @property
    def hypervisors(self) -> list[Hypervisor]:
        return list(self._hvs.values())

    def vm_name(self, label: str) -> str:
        # run id first (the janitor's key); a random part, since xdist workers share the run id
        return f"{self.run_id}-{next(_counter)}{uuid.uuid4().hex[:4]}-{label}"

    def define_vm(self, device: LabDevice, label: str | None = None, memory_mib: int | None = None) -> VM:
        hv = self.hv(device.host)
        name = self.vm_name(label or f"{self.label}-{device.name}")
        self._domains.add(name)
        memory_mib = memory_mib or (self.linux_guest.memory_mib if self.linux_guest else None)
        memory = f", {memory_mib} MiB" if memory_mib else ""
        with self.steps.step(f"define {name} on {hv.name} with {device.id}{memory}"):
            trace = VFIO_TRACE_EVENTS if self.trace_vfio and not hv.is_test_driver else ()
            extra: dict[str, object] = {"memory_mib": memory_mib} if memory_mib else {}
            extra |= self.guest_boot(hv, device)
            return hv.define(spec_for(name, [device], hv.virt_type, trace_events=trace, **extra))

    def guest_boot(self, hv: Hypervisor, device: LabDevice) -> dict[str, object]:
        """The domain spec's kernel and cmdline for `device`'s guest workload; none on test:/// or without one.

        One guest per VM: in a VM with several devices the first device's workload drives every device it finds.
        """
        if self.linux_guest is not None:
            g = self.linux_guest
            return {"kernel": g.kernel, "initrd": g.initrd, "cmdline": g.cmdline, "disk": g.disk, "agent": True}
        workload = None if hv.is_test_driver else workload_for(device)
        if workload is None:
            return {}
        boot = workload.boot()
        return {"kernel": self.place_kernel(hv, boot.kernel), "cmdline": boot.cmdline}

    def place_kernel(self, hv: Hypervisor, kernel: Path) -> str:
        """The workload kernel where `hv`'s libvirt reads it, on every lab host at the same path.

        Every host: an incoming migration or a restore elsewhere starts a QEMU that loads it too.
        Content-addressed, so concurrent runs share it.
        """
        if hv.files_local:
            return str(kernel)
        path = f"{REMOTE_IMAGE_DIR}/{kernel.name}"
        for host in self.session.inventory.hosts:
            if not host.spec.libvirt_uri or urlparse(host.spec.libvirt_uri).hostname is None:
                continue
            ssh = self.session.ssh(host.name)
            if ssh.run(f"test -s {path}", timeout=30).ok:
                continue
            self.prepare_image_dir(host.name)
            scratch = f"{path}.{uuid.uuid4().hex[:6]}"
            ssh.put(kernel, scratch, mode=0o644)
            ssh.run(f"mv -f {scratch} {path}", timeout=30, check=True)  # atomic for a concurrent reader
        return path

    def track_domain(self, name: str) -> None:
        self._domains.add(name)

    def on_cleanup(self, what: str, undo: Callable[[], None]) -> None:
        """Undo a host change (e.g. a detached PCI function) at cleanup, after the domains that used it are gone."""
        self._undo.append((what, undo))

    def inject(self, fault: F) -> F:
        return self.faults.inject(fault)

    # -- save images --------------------------------------------------------
    def image_path(self, hv: Hypervisor, name: str) -> str:
        """A fresh image path on `hv`'s side (the controller for test:///), registered for removal."""
        path = f"{hv.image_dir}/{name}.{next(_counter)}.save"
        if hv.files_local:
            local_image_dir().mkdir(parents=True, exist_ok=True)
            self._images.append((None, path))
        else:
            self.prepare_image_dir(hv.name)
            self._images.append((hv.name, path))
        return path

    def prepare_image_dir(self, host: str) -> None:
        """REMOTE_IMAGE_DIR on `host`: libvirtd (root) writes there, the SSH user fetches and removes."""
        prep = f"mkdir -p {REMOTE_IMAGE_DIR} && chmod 1777 {REMOTE_IMAGE_DIR}"
        self.session.ssh(host).run(prep, timeout=30, sudo=True, idempotent=True, check=True)

    def transfer_image(self, src: Hypervisor, path: str, dst: Hypervisor) -> str:
        """Make the image at `path` on src readable by dst's libvirt: through the controller, over SFTP."""
        if src.files_local and dst.files_local:
            return path
        local = path
        if not src.files_local:
            ssh = self.session.ssh(src.name)
            ssh.run(f"chmod 0644 {shlex.quote(path)}", timeout=30, sudo=True, check=True)
            local_image_dir().mkdir(parents=True, exist_ok=True)
            local = str(local_image_dir() / Path(path).name)
            self._images.append((None, local))
            ssh.get(path, local)
        if dst.files_local:
            return local
        remote = self.image_path(dst, Path(path).name.removesuffix(".save") + ".moved")
        self.session.ssh(dst.name).put(local, remote)
        return remote

    # -- teardown -----------------------------------------------------------
    def cleanup(self) -> list[str]:
        """Undo faults, remove domains and images; return what went wrong (empty when all is clean)."""
        errors = self.faults.undo_all()
        # the domains' XML and logs go into the report before the domains go away
        attach_domains(self.session, self.hypervisors, sorted(self._domains), self.started)
        for name in sorted(self._domains):
            for hv in self.hypervisors:
                try:
                    self.cleanup_log += VM(hv, name).remove()
                except LabError as exc:
                    errors.append(f"{hv.name}/{name}: {exc}")
        for what, undo in reversed(self._undo):
            try:
                undo()
                self.cleanup_log.append(what)
            except LabError as exc:
                errors.append(f"{what}: {exc}")
        self._undo.clear()
        for host, path in self._images:
            try:
                if host is None:
                    Path(path).unlink(missing_ok=True)
                else:
                    self.session.ssh(host).run(f"rm -f {shlex.quote(path)}", timeout=30, sudo=True, check=True)
                self.cleanup_log.append(f"removed {host or 'controller'}:{path}")
            except (LabError, OSError) as exc:
                errors.append(f"{host or 'controller'}:{path}: {exc}")
        self.cleanup_log += [f"error: {e}" for e in errors]
        self.steps.attach()
        return errors

    def leftovers(self) -> list[str]:
        """What of this scenario still exists (after cleanup: must be empty)."""
        out = [f"{hv.name}/{n}" for n in self._domains for hv in self.hypervisors if hv.exists(n)]
        out += [p for h, p in self._images if h is None and Path(p).exists()]
        return out
