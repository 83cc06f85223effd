"""Hypervisors (one libvirt connection per host per process) and the VMs on them.

One connection per host matters beyond thrift: a `test:///<file>` connection
holds its own private copy of the node, so a second connection to the same URI
would not see the domains the first one created.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import libvirt

from labs.errors import InfraError
from labs.inventory import LabHost
from labs.session import LabSession
from labs.virt.capabilities import Capabilities, VirtCapability, probe_capabilities
from labs.virt.connection import open_connection
from labs.virt.events import EventLog, ensure_event_loop
from labs.virt.xml import DomainSpec, domain_xml

# Where save images go. On a remote host libvirtd (root) writes them, and the
# SSH user must be able to fetch and remove them: a sticky world-writable dir.
REMOTE_IMAGE_DIR = "/var/tmp/labs-images"
MANAGED_SAVE_DIR = "/var/lib/libvirt/qemu/save"  # the system daemon's (virQEMUDriverConfig saveDir)


def local_image_dir() -> Path:
    """Where test:/// and local URIs write save images: on the controller, shared by its runs.

    LABS_IMAGE_DIR gives a run (or a test worker) its own, read at each use.
    """
    return Path(os.environ.get("LABS_IMAGE_DIR") or Path(tempfile.gettempdir()) / f"labs-images-{os.getuid()}")


STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


def libvirt_error(what: str, exc: libvirt.libvirtError) -> InfraError:
    err = InfraError(f"{what}: {exc.get_error_message()}")
    err.code = exc.get_error_code()  # type: ignore[attr-defined]
    return err


class Hypervisor:
    """libvirt on one lab host: its connection, what it can do, its events."""

    def __init__(self, host: LabHost) -> None:
        if not host.spec.libvirt_uri:
            raise InfraError(f"{host.name}: no libvirt_uri in the inventory")
        self.host = host
        self.uri = host.spec.libvirt_uri
        self.events = EventLog(host.name)
        self._conn: libvirt.virConnect | None = None
        self._caps: Capabilities | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Hypervisor({self.host.name} {self.uri.split('?')[0]})"

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def conn(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is None or not self._conn.isAlive():
                ensure_event_loop()
                self._conn = open_connection(self.uri, self.host.name)
                if self._conn.getType() != "TEST":
                    # keepalives notice a dead remote daemon instead of blocking forever
                    self._conn.setKeepAlive(5, 3)
                self.events.attach(self._conn)
            return self._conn

    @property
    def is_test_driver(self) -> bool:
        return self.uri.startswith("test:")

    @property
    def files_local(self) -> bool:
        """Does libvirt read and write files on the controller (test:///, qemu:///)?"""
        return urlparse(self.uri).hostname is None

    @property
    def image_dir(self) -> str:
        return str(local_image_dir()) if self.files_local else REMOTE_IMAGE_DIR

    @property
    def virt_type(self) -> str:
        """The best domain type the host offers for x86_64: kvm, else qemu (TCG), else test."""
        caps = self.conn.getCapabilities()
        types = set(re.findall(r"<domain type='(\w+)'", caps))
        for t in ("kvm", "qemu", "test"):
            if t in types:
                return t
        raise InfraError(f"{self.name}: libvirt offers no usable domain type ({', '.join(sorted(types)) or 'none'})")

    def capabilities(self, run_id: str) -> Capabilities:
        with self._lock:
            if self._caps is None:
                name = f"{run_id}-probe-{uuid.uuid4().hex[:6]}"
                spec = DomainSpec(name=name, virt_type=self.virt_type, memory_mib=16)
                try:
                    dom = self.conn.defineXML(domain_xml(spec))
                except libvirt.libvirtError as exc:
                    raise libvirt_error(f"{self.name}: cannot define the probe domain {name}", exc) from None
                try:
                    scratch = f"{self.image_dir}/{name}.never-written"
                    self._caps = probe_capabilities(self.conn, dom, scratch)
                finally:
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
            return self._caps

    def can(self, run_id: str, cap: VirtCapability) -> bool:
        return self.capabilities(run_id).has(cap)

    # -- domains -------------------------------------------------------------
    def define(self, spec: DomainSpec) -> VM:
        try:
            self.conn.defineXML(domain_xml(spec))
        except libvirt.libvirtError as exc:
            raise libvirt_error(f"{self.name}: define {spec.name}", exc) from None
        return VM(self, spec.name)

    def vm(self, name: str) -> VM:
        return VM(self, name)

    def exists(self, name: str) -> bool:
        """Is `name` defined or running here? A lookup failing for another reason than "no such domain" raises."""
        return self.lookup(name) is not None

    def lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            error = exc
        if error.get_error_domain() == libvirt.VIR_FROM_RPC:
            self.close()  # a restarted daemon left this connection dead before keepalive noticed: a new one
            try:
                return self.conn.lookupByName(name)
            except libvirt.libvirtError as exc:
                error = exc
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise libvirt_error(f"{self.name}: look up {name}", error) from None

    def domains(self, prefix: str = "") -> list[libvirt.virDomain]:
        return [d for d in self.conn.listAllDomains(0) if d.name().startswith(prefix)]

    def restore(self, path: str, name: str, dxml: str | None = None, paused: bool = False) -> VM:
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0
        try:
            self.conn.restoreFlags(path, dxml, flags)
        except libvirt.libvirtError as exc:
            raise libvirt_error(f"{self.name}: restore {path}", exc) from None
        return VM(self, name)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self.events.detach(self._conn)
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None
                self._caps = None


@dataclass
class VM:
    """A domain by name: the libvirt object is looked up per call, so it survives restore and migration."""

    hv: Hypervisor
    name: str

    def __str__(self) -> str:
        return f"{self.hv.name}/{self.name}"

    @property
    def dom(self) -> libvirt.virDomain:
        try:
            return self.hv.conn.lookupByName(self.name)
        except libvirt.libvirtError as exc:
            raise libvirt_error(f"{self}: no such domain", exc) from None

    def exists(self) -> bool:
        return self.hv.exists(self.name)

    def state(self) -> str:
        """running, paused, shutoff, ... or `absent`."""
        dom = self.hv.lookup(self.name)
        if dom is None:
            return "absent"
        try:
            st, _reason = dom.state()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return "absent"  # gone since the lookup
            raise libvirt_error(f"{self.hv.name}: state of {self.name}", exc) from None
        return STATE_NAMES.get(st, str(st))

    def _do(self, what: str, call: object) -> None:
        try:
            call()  # type: ignore[operator]
        except libvirt.libvirtError as exc:
            raise libvirt_error(f"{self}: {what}", exc) from None

    def start(self) -> None:
        self._do("start", self.dom.create)

    def destroy(self) -> None:
        self._do("destroy", self.dom.destroy)

    def save(self, path: str) -> None:
        self._do(f"save to {path}", lambda: self.dom.save(path))

    def managed_save(self) -> None:
        self._do("managed save", lambda: self.dom.managedSave(0))

    def has_managed_save(self) -> bool:
        return bool(self.dom.hasManagedSaveImage(0))

    def managed_save_path(self) -> str | None:
        """Where libvirt keeps this domain's managed save image: known for the system daemon (None: another)."""
        return f"{MANAGED_SAVE_DIR}/{self.name}.save" if urlparse(self.hv.uri).path == "/system" else None

    def xml(self) -> str:
        return str(self.dom.XMLDesc(0))

    def remove(self) -> list[str]:
        """Destroy and undefine, whatever state it is in; what was done, for the cleanup log."""
        done: list[str] = []
        dom = self.hv.lookup(self.name)
        if dom is None:
            return done
        try:
            if dom.isActive():
                dom.destroy()
                done.append(f"destroyed {self}")
        except libvirt.libvirtError as exc:
            done.append(f"destroy {self} failed: {exc.get_error_message()}")
        try:
            if dom.isPersistent():
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                done.append(f"undefined {self}")
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                done.append(f"undefine {self} failed: {exc.get_error_message()}")
        return done


# -- one Hypervisor per host per process ------------------------------------
_hypervisors: dict[tuple[str, str], Hypervisor] = {}
_registry_lock = threading.Lock()


def hypervisor(session: LabSession, host: str | LabHost) -> Hypervisor:
    lab_host = session.inventory.host(host) if isinstance(host, str) else host
    key = (lab_host.name, lab_host.spec.libvirt_uri or "")
    with _registry_lock:
        hv = _hypervisors.get(key)
        if hv is None:
            hv = _hypervisors[key] = Hypervisor(lab_host)
        return hv


def known_hypervisors() -> list[Hypervisor]:
    with _registry_lock:
        return list(_hypervisors.values())


def close_all() -> None:
    with _registry_lock:
        for hv in _hypervisors.values():
            hv.close()
        _hypervisors.clear()
