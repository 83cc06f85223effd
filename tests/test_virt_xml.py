"""Domain XML templates: PCI, mdev and simulated devices; hostdev readback and swap."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from labs.inventory import LabDevice, LabHost
from labs.inventory.models import Host, MdevDevice, PciDevice, SimDevice
from labs.virt.connection import silence_libvirt_stderr
from labs.virt.xml import (
    DomainSpec,
    Hostdev,
    domain_xml,
    hostdev_for,
    hostdevs_of,
    sim_mdev_uuid,
    spec_for,
    with_hostdevs,
)

UUID = "0b0c5a3e-7c1d-4c8e-9a57-6d1f0e2b3c4d"


def _device(kind: str, host: str = "hostA") -> LabDevice:
    spec: PciDevice | MdevDevice | SimDevice
    if kind == "pci":
        spec = PciDevice(kind="pci", pci="0000:65:00.1", protocol="v2")
    elif kind == "mdev":
        spec = MdevDevice(kind="mdev", parent="mtty", type="mtty-2", uuid=UUID, protocol="v2")
    else:
        spec = SimDevice(kind="sim", name="simv2", driver="labs.sim.v2:V2Driver", protocol="v2")
    return LabDevice(LabHost(host, Host(address="127.0.0.2", devices=(spec,))), 0, spec)


def test_pci_hostdev() -> None:
    xml = domain_xml(spec_for("labs-x-1", [_device("pci")], "kvm"))
    root = ET.fromstring(xml)
    assert root.get("type") == "kvm" and root.findtext("name") == "labs-x-1"
    assert root.find("os/type").get("machine") == "q35"  # type: ignore[union-attr]
    assert root.find("disk") is None and root.find("devices/disk") is None
    hd = root.find("devices/hostdev")
    assert hd is not None and hd.get("type") == "pci" and hd.get("managed") == "yes"
    addr = hd.find("source/address")
    assert addr is not None and (addr.get("bus"), addr.get("slot"), addr.get("function")) == ("0x65", "0x00", "0x1")
    assert hostdevs_of(xml) == [Hostdev("pci", "0000:65:00.1")]


def test_mdev_hostdev() -> None:
    xml = domain_xml(spec_for("labs-x-2", [_device("mdev")], "qemu"))
    hd = ET.fromstring(xml).find("devices/hostdev")
    assert hd is not None and (hd.get("type"), hd.get("model"), hd.get("mode")) == ("mdev", "vfio-pci", "subsystem")
    assert hostdevs_of(xml) == [Hostdev("mdev", UUID)]


def test_sim_device_uuid_is_deterministic_per_host_and_device() -> None:
    a, a_again, b = (
        hostdev_for(_device("sim", "hostA")),
        hostdev_for(_device("sim", "hostA")),
        hostdev_for(_device("sim", "hostB")),
    )
    assert a == a_again == Hostdev("mdev", sim_mdev_uuid("hostA", "simv2"))
    assert a != b


def test_small_vm_and_trace_events() -> None:
    xml = domain_xml(DomainSpec("labs-x-3", virt_type="qemu", memory_mib=96, trace_events=("vfio_migration_*",)))
    assert '<memory unit="MiB">96</memory>' in xml
    assert 'value="-trace"' in xml and 'value="vfio_migration_*"' in xml
    assert "xmlns:qemu=" in xml


def test_with_hostdevs_swaps_the_host_side_only() -> None:
    live = (
        "<domain type='kvm'><name>x</name><devices>"
        "<hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci'>"
        f"<source><address uuid='{UUID}'/></source><alias name='hostdev0'/>"
        "<address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></hostdev></devices></domain>"
    )
    other = "11111111-2222-3333-4444-555555555555"
    out = with_hostdevs(live, (Hostdev("mdev", other),))
    assert hostdevs_of(out) == [Hostdev("mdev", other)]
    hd = ET.fromstring(out).find("devices/hostdev")
    assert hd is not None and hd.find("alias") is not None
    assert hd.find("address") is not None and hd.find("address").get("bus") == "0x01"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        with_hostdevs(live, ())


def test_test_driver_accepts_the_template(tmp_path: Path) -> None:
    silence_libvirt_stderr()
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    conn = libvirt.open(f"test://{node}")
    try:
        dom = conn.defineXML(domain_xml(spec_for("labs-x-4", [_device("sim")], "test")))
        dom.create()
        assert hostdevs_of(dom.XMLDesc(0)) == [hostdev_for(_device("sim"))]
    finally:
        conn.close()


def test_linux_guest_boot_and_agent_channel() -> None:
    spec = DomainSpec(name="g", virt_type="qemu", kernel="/k", initrd="/i", cmdline="console=ttyS0", agent=True)
    root = ET.fromstring(domain_xml(spec))
    assert [root.findtext(f"os/{t}") for t in ("kernel", "initrd", "cmdline")] == ["/k", "/i", "console=ttyS0"]
    channel = root.find("devices/channel/target")
    assert channel is not None and channel.get("name") == "org.qemu.guest_agent.0" and channel.get("type") == "virtio"
    assert root.find("devices/disk") is None


def test_linux_guest_disk() -> None:
    root = ET.fromstring(domain_xml(DomainSpec(name="g", virt_type="qemu", disk="/img/guest.qcow2", agent=True)))
    disk = root.find("devices/disk")
    assert disk is not None and root.find("os/kernel") is None
    assert disk.find("source").get("file") == "/img/guest.qcow2"  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "qcow2" and disk.find("driver").get("cache") == "none"  # type: ignore[union-attr]
