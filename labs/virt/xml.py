"""Domain XML from one template: a minimal VM that owns the device under test.

The VM needs no disk: SeaBIOS finds nothing to boot and idles, or, with a
guest workload (labs.workloads), boots its kernel directly (`<os><kernel>`).
Small RAM keeps TCG migrations in the nested lab quick. The device is a PCI hostdev or an mdev hostdev (`type='mdev'
model='vfio-pci'`); a PCI hostdev names the VFIO variant driver its device
model binds (`<driver model='mlx5_vfio_pci'/>`); a simulated device becomes an mdev hostdev with a UUID
derived from host and device name, so the same device always gets the same
UUID (libvirt's test:/// driver accepts it without a real mdev behind it).
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from typing import Literal

from labs.inventory import LabDevice
from labs.inventory.models import MdevDevice, PciDevice, SimDevice
from labs.models import model_of

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# uuid5 namespace for simulated devices: any fixed UUID will do, it only has to never change
SIM_MDEV_NAMESPACE = uuid.UUID("6c1f0d1e-3b59-4f7e-9a51-2f1d0c6a9e10")
# the virtio port qemu-ga listens on, and libvirt's agent commands use
AGENT_CHANNEL = "org.qemu.guest_agent.0"
# QEMU trace events of the VFIO migration state machine (QEMU 8+ names); written to the domain's QEMU log
VFIO_TRACE_EVENTS = ("vfio_migration_set_state", "vfio_vmstate_change", "vfio_save_*", "vfio_load_*")


@dataclass(frozen=True)
class Hostdev:
    kind: Literal["pci", "mdev"]
    address: str  # PCI BDF (0000:65:00.0) or mdev UUID
    # QEMU properties of the vfio-pci frontend (inventory `qemu_properties`), set with <qemu:override>;
    # not part of the identity: a hostdev read back from a live XML compares equal without them
    properties: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    driver_model: str | None = field(default=None, compare=False)  # PCI: the variant driver libvirt binds
    managed: bool = field(default=True, compare=False)  # PCI: libvirt binds on start, gives back on stop

    def describe(self) -> str:
        return f"{self.kind} hostdev {self.address}"


@dataclass(frozen=True)
class DomainSpec:
    name: str
    hostdevs: tuple[Hostdev, ...] = ()
    virt_type: str = "kvm"  # 'test' on test:///, 'qemu' under TCG (the nested lab)
    arch: str = "x86_64"
    machine: str = "q35"
    memory_mib: int = 128
    vcpus: int = 1
    trace_events: tuple[str, ...] = field(default=())
    kernel: str | None = None  # direct kernel boot (a guest workload, labs.workloads): its path on the host
    cmdline: str = ""
    initrd: str | None = None  # with `kernel`: a Linux guest's initramfs (inventory `lab.guest`)
    disk: str | None = None  # a Linux guest's disk image on the host (shared storage: a migration does not copy it)
    agent: bool = False  # a virtio port for the QEMU guest agent (org.qemu.guest_agent.0)
    iommu: str | None = None  # a vIOMMU model (<iommu model='intel'/>): QEMU must refuse to migrate VFIO devices
    managed: bool | None = None  # PCI hostdevs' managed mode; None keeps the default (managed='yes')


def sim_mdev_uuid(host: str, device: str) -> str:
    return str(uuid.uuid5(SIM_MDEV_NAMESPACE, f"{host}:{device}"))


def hostdev_for(device: LabDevice) -> Hostdev:
    spec = device.spec
    model = model_of(device)
    props = tuple(sorted({**model.qemu_properties, **spec.qemu_properties}.items()))
    if isinstance(spec, PciDevice):
        return Hostdev("pci", spec.pci, props, model.hostdev_driver, model.managed)
    if isinstance(spec, MdevDevice):
        return Hostdev("mdev", spec.uuid, props)
    assert isinstance(spec, SimDevice)
    return Hostdev("mdev", sim_mdev_uuid(device.host.name, device.name), props)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def hostdev_alias(index: int) -> str:
    """The user alias of the index-th hostdev (libvirt wants the `ua-` prefix); <qemu:override> names it."""
    return f"ua-labs-hostdev{index}"


def _hostdev(devices: ET.Element, dev: Hostdev, alias: str | None = None) -> None:
    if dev.kind == "mdev":
        el = _sub(devices, "hostdev", mode="subsystem", type="mdev", model="vfio-pci")
        _sub(_sub(el, "source"), "address", uuid=dev.address)
        if alias:
            _sub(el, "alias", name=alias)
        return
    domain, bus, rest = dev.address.split(":")
    slot, function = rest.split(".")
    el = _sub(devices, "hostdev", mode="subsystem", type="pci", managed="yes" if dev.managed else "no")
    if dev.driver_model:
        _sub(el, "driver", model=dev.driver_model)
    _sub(
        _sub(el, "source"),
        "address",
        domain=f"0x{domain}",
        bus=f"0x{bus}",
        slot=f"0x{slot}",
        function=f"0x{function}",
    )
    if alias:
        _sub(el, "alias", name=alias)


def _overrides(root: ET.Element, hostdevs: tuple[Hostdev, ...]) -> None:
    """<qemu:override> frontend properties per hostdev alias (libvirt 8.2+); the domain is tainted custom-device."""
    wanted = [(hostdev_alias(i), dev.properties) for i, dev in enumerate(hostdevs) if dev.properties]
    if not wanted:
        return
    override = ET.SubElement(root, f"{{{QEMU_NS}}}override")
    for alias, props in wanted:
        frontend = ET.SubElement(ET.SubElement(override, f"{{{QEMU_NS}}}device", alias=alias), f"{{{QEMU_NS}}}frontend")
        for key, value in props:
            ET.SubElement(frontend, f"{{{QEMU_NS}}}property", name=key, type="string", value=value)


def domain_xml(spec: DomainSpec) -> str:
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.Element("domain", type=spec.virt_type)
    _sub(root, "name", spec.name)
    _sub(root, "memory", str(spec.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(spec.vcpus))
    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch=spec.arch, machine=spec.machine)
    if spec.kernel:
        _sub(os_el, "kernel", spec.kernel)
        if spec.initrd:
            _sub(os_el, "initrd", spec.initrd)
        _sub(os_el, "cmdline", spec.cmdline)
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    for i, dev in enumerate(spec.hostdevs):
        # an alias only where an override must name the device: test:/// and plain domains stay as they were
        _hostdev(devices, dev, hostdev_alias(i) if dev.properties and spec.virt_type != "test" else None)
    if spec.disk:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="qcow2" if spec.disk.endswith(".qcow2") else "raw", cache="none")
        _sub(disk, "source", file=spec.disk)
        _sub(disk, "target", dev="vda", bus="virtio")
    if spec.agent:
        _sub(_sub(devices, "channel", type="unix"), "target", type="virtio", name=AGENT_CHANNEL)
    if spec.virt_type != "test":
        # nothing the migration does not need: no balloon, no display, one serial console for debugging
        _sub(devices, "memballoon", model="none")
        _sub(_sub(devices, "video"), "model", type="none")
        _sub(_sub(devices, "serial", type="pty"), "target", port="0")
    if spec.virt_type != "test":
        _overrides(root, spec.hostdevs)
    if spec.managed is not None:
        set_managed(devices, spec.managed)
    if spec.iommu is not None:
        add_iommu(devices, spec.iommu)
    if spec.trace_events:
        cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
        for event in spec.trace_events:
            ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value="-trace")
            ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=event)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def set_managed(devices: ET.Element, managed: bool) -> None:
    """managed='no': the framework detaches the functions from their host drivers itself (labs.virt.nodedev)."""
    for el in devices.iter("hostdev"):
        if el.get("type") == "pci":
            el.set("managed", "yes" if managed else "no")


def add_iommu(devices: ET.Element, model: str) -> None:
    """A guest vIOMMU in front of the hostdevs (libvirt puts it on q35's root complex)."""
    _sub(devices, "iommu", model=model)


def managed_of(xml: str) -> list[bool]:
    """The managed mode of each PCI hostdev a domain XML names (an absent attribute is libvirt's 'no')."""
    return [el.get("managed", "no") == "yes" for el in ET.fromstring(xml).iter("hostdev") if el.get("type") == "pci"]


def hostdevs_of(xml: str) -> list[Hostdev]:
    """The hostdevs a live domain XML names (readback: which device a running copy owns)."""
    out: list[Hostdev] = []
    for el in ET.fromstring(xml).iter("hostdev"):
        addr = el.find("source/address")
        if addr is None:
            continue
        if el.get("type") == "mdev" and addr.get("uuid"):
            out.append(Hostdev("mdev", str(addr.get("uuid")).lower()))
        elif el.get("type") == "pci":
            parts = [int(str(addr.get(k, "0")), 16) for k in ("domain", "bus", "slot", "function")]
            out.append(Hostdev("pci", f"{parts[0]:04x}:{parts[1]:02x}:{parts[2]:02x}.{parts[3]:x}"))
    return out


def with_hostdevs(xml: str, hostdevs: tuple[Hostdev, ...]) -> str:
    """The same domain owning other host devices: the destination's device on migration or cross-host restore.

    Only the host side (`<source>`) changes; the guest side (PCI address, alias)
    stays, because libvirt refuses a destination XML whose guest ABI differs.
    """
    root = ET.fromstring(xml)
    devices = root.find("devices")
    existing = list(devices.findall("hostdev")) if devices is not None else []
    if devices is None or len(existing) != len(hostdevs):
        raise ValueError(f"domain has {len(existing)} hostdevs, {len(hostdevs)} given")
    for el, dev in zip(existing, hostdevs, strict=True):
        scratch = ET.Element("devices")
        _hostdev(scratch, dev)
        fresh = scratch[0]
        if el.get("managed") and fresh.get("type") == "pci":
            fresh.set("managed", str(el.get("managed")))  # the detach/reattach duty stays who it was
        for key in list(el.attrib):
            del el.attrib[key]
        el.attrib.update(fresh.attrib)
        old = el.find("source")
        index = list(el).index(old) if old is not None else 0
        if old is not None:
            el.remove(old)
        source = fresh.find("source")
        assert source is not None
        el.insert(index, source)
    return ET.tostring(root, encoding="unicode")


def spec_for(name: str, devices: list[LabDevice], virt_type: str, **overrides: object) -> DomainSpec:
    spec = DomainSpec(name=name, hostdevs=tuple(hostdev_for(d) for d in devices), virt_type=virt_type)
    return replace(spec, **overrides)  # type: ignore[arg-type]
