"""mtty, the kernel's sample mdev: its model, and its probe (UART registers, through the QEMU monitor).

mtty (samples/vfio-mdev/mtty.c) emulates a 16550-like UART per port, one
8-byte I/O BAR each (BAR0, and BAR1 for mtty-2). Its migration stream carries
each port's `uart_reg[8]` (spec 5.2), and it keeps the last value written to
the scratch register (offset 7) and the line-control register (offset 3)
there, returning them on read. So: QMP `query-pci` finds the hostdev's I/O
BARs (by the qdev id libvirt gives it, the hostdev's alias), HMP `o /b` writes
a fresh value to each, and after a migration or restore HMP `i /b` on the
host that runs the domain then must read the same values.

LCR bit 7 (DLAB) is never set: it switches offsets 0/1 to the divisor latch.
The probe never touches the FIFO (spec 5.4: its indices are not validated on resume).
Its stream header (mtty_data) is magic @0, major_ver @8, nr_ports @16: the
header damage recipes change those. The one payload recipe inverts the content
of each port's FIFO that holds bytes in flight (fifo[16] @8 of each 36-byte port
from @24, count @26), never its indices (a corrupted index writes past the FIFO
in host kernel memory): the resume accepts it, the registers stay intact, and
only the guest reading its bytes back can notice.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import time
import xml.etree.ElementTree as ET
from typing import Any

import libvirt

from labs.errors import InfraError
from labs.inventory import LabDevice
from labs.inventory.models import Capability, Device, MdevDevice
from labs.models import DeviceModel, KnownIssue, StreamLayout
from labs.probes import ProbeMark
from labs.vfio.device import DeviceHandle
from labs.virt.monitor import qmp
from labs.workloads.bootblock import Bootblock

UART_LCR = 3
BAR_WAIT = 120.0  # seconds for the firmware to assign the BARs after start
UART_SCR = 7
MTTY_PCI_ID = (0x4348, 0x3253)  # vendor, device as mtty's config space reports them
STREAM_MAGIC = (0x7E9D09898C3E2C4E).to_bytes(8, "little")  # mtty_data.magic, host-endian (x86: little)
_IN_RE = re.compile(r"=\s*(0x[0-9a-fA-F]+)\s*$")


def is_mtty(spec: Device) -> bool:
    return isinstance(spec, MdevDevice) and (spec.parent == "mtty" or spec.type.startswith("mtty-"))


def hostdev_alias(dom: libvirt.virDomain, hostdev: str) -> str | None:
    """The alias (QEMU's qdev id) of the hostdev with this mdev UUID or PCI address in the live XML."""
    root = ET.fromstring(dom.XMLDesc(0))
    for el in root.iter("hostdev"):
        addr = el.find("source/address")
        alias = el.find("alias")
        if addr is None or alias is None:
            continue
        if (addr.get("uuid") or "").lower() == hostdev.lower():
            return alias.get("name")
    return None


def _walk(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for dev in devices:
        out.append(dev)
        bridge = dev.get("pci_bridge") or {}
        out += _walk(bridge.get("devices") or [])  # q35: libvirt puts the hostdev behind a pcie-root-port
    return out


def _find_bars(dom: libvirt.virDomain, alias: str | None, hostdev: str) -> list[int] | None:
    buses = qmp(dom, "query-pci") or []
    devices = [d for bus in buses for d in _walk(bus.get("devices") or [])]
    found = [d for d in devices if alias and d.get("qdev_id") == alias]
    if not found:  # no alias in the XML: the only mtty on the bus
        found = [d for d in devices if (d.get("id", {}).get("vendor"), d.get("id", {}).get("device")) == MTTY_PCI_ID]
    if len(found) > 1:
        raise InfraError(f"{dom.name()}: mtty {hostdev} (qdev id {alias}) found {len(found)} times in query-pci")
    if not found:
        return None  # behind a root port the firmware has not numbered yet
    bars = sorted((r for r in found[0].get("regions", []) if r.get("type") == "io"), key=lambda r: r.get("bar", 0))
    addrs = [int(r["address"]) for r in bars]
    if not addrs or any(a <= 0 or a >= 0xFFFF for a in addrs):
        return None  # not mapped yet (-1)
    return addrs


def io_bars(dom: libvirt.virDomain, hostdev: str, wait: float = BAR_WAIT) -> list[int]:
    """The I/O base addresses of the hostdev's BARs, in BAR order (one per UART port).

    Right after start the firmware (SeaBIOS) has not yet numbered the bridges
    nor assigned the BARs (query-pci shows them at -1); under TCG that takes
    seconds, so this polls for up to `wait` seconds.
    """
    alias = hostdev_alias(dom, hostdev)
    deadline = time.monotonic() + wait
    while True:
        addrs = _find_bars(dom, alias, hostdev)
        if addrs:
            return addrs
        if time.monotonic() > deadline:
            raise InfraError(f"{dom.name()}: mtty {hostdev} (qdev id {alias}): no I/O BAR assigned after {wait:g}s")
        time.sleep(0.5)


def _hmp(dom: libvirt.virDomain, command: str) -> str:
    return str(qmp(dom, "human-monitor-command", {"command-line": command}) or "")


def inb(dom: libvirt.virDomain, port: int) -> int:
    out = _hmp(dom, f"i /b {port:#x}").strip()
    match = _IN_RE.search(out)
    if not match:
        raise InfraError(f"{dom.name()}: HMP `i /b {port:#x}` answered {out!r}")
    return int(match.group(1), 16)


def outb(dom: libvirt.virDomain, port: int, value: int) -> None:
    out = _hmp(dom, f"o /b {port:#x} {value:#x}").strip()
    if out:
        raise InfraError(f"{dom.name()}: HMP `o /b {port:#x} {value:#x}` answered {out!r}")


def _registers(bars: list[int]) -> dict[str, int]:
    regs: dict[str, int] = {}
    for i, base in enumerate(bars):
        regs[f"port{i}.scr"] = base + UART_SCR
        regs[f"port{i}.lcr"] = base + UART_LCR
    return regs


class MttyProbe:
    name = "mtty-uart"
    stream_magic: bytes | None = STREAM_MAGIC

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.SystemRandom()

    def _fresh(self, reg: str, old: int | None) -> int:
        while True:
            value = self.rng.randrange(0x01, 0xFF) if reg.endswith(".scr") else self.rng.randrange(0x01, 0x80)
            if value != old:  # a new value each time: a stale copy left on the other host cannot pass
                return value

    def mark(self, dom: libvirt.virDomain, device: LabDevice, hostdev: str) -> ProbeMark:
        regs = _registers(io_bars(dom, hostdev))
        mark = ProbeMark(self.name, device.id, hostdev)
        for reg, port in regs.items():
            value = self._fresh(reg, inb(dom, port))
            outb(dom, port, value)
            mark.values[reg] = value
        return mark

    def read(self, dom: libvirt.virDomain, hostdev: str, mark: ProbeMark) -> dict[str, int]:
        regs = _registers(io_bars(dom, hostdev))
        return {reg: inb(dom, regs[reg]) for reg in mark.values if reg in regs}


PORTS_AT, PORT_SIZE, FIFO_AT, FIFO_SIZE, COUNT_AT = 24, 36, 8, 16, 26  # mtty_data.ports[], serial_port, rxtx
PORT0_SCR_AT = PORTS_AT + UART_SCR  # serial_port.uart_reg[8] comes first: port 0's scratch register in the stream
PORT0_COUNT_AT = PORTS_AT + COUNT_AT  # port 0's rxtx.count: how many FIFO bytes the guest may still read


def stream_size(spec: Device) -> int | None:
    """The header and every port's serial_port, all at STOP_COPY or the header at PRE_COPY and the ports after it."""
    ports = spec.type.rsplit("-", 1)[-1] if isinstance(spec, MdevDevice) else ""
    return PORTS_AT + int(ports) * PORT_SIZE if ports.isdigit() else None


def fifo_in_flight(stream: bytes) -> list[tuple[int, int]]:
    """The FIFO of each port with bytes in flight (rxtx.count > 0), as (offset, length) from the magic."""
    ports = int.from_bytes(stream[16:20], "little") if len(stream) >= 20 else 0
    spans = []
    for i in range(min(ports, 2)):  # mtty has at most 2 ports; a damaged nr_ports must not widen the spans
        port = PORTS_AT + i * PORT_SIZE
        if len(stream) > port + COUNT_AT and stream[port + COUNT_AT]:
            spans.append((port + FIFO_AT, FIFO_SIZE))
    return spans


def seed_registers(dev: DeviceHandle, value: str) -> None:
    """A distinctive state for the device-level round trips: each port's scratch and line-control
    registers (in the stream's uart_reg) written through the BAR regions of the agent's open device."""
    digest = hashlib.sha256(value.encode()).digest()
    for port in range(2):
        if not dev.region_info(port).get("size"):
            continue  # mtty-1 has one port
        for i, (reg, top) in enumerate(((UART_SCR, 0x100), (UART_LCR, 0x80))):
            byte = 1 + digest[2 * port + i] % (top - 1)  # LCR below 0x80: DLAB stays clear
            dev.call("region_write", index=port, offset=reg, data=base64.b64encode(bytes([byte])).decode())


MTTY = DeviceModel(
    name="mtty",
    kind="mdev",
    description="the kernel's sample mdev (samples/vfio-mdev/mtty.c): a 16550-like UART per port",
    modules=("vfio", "mdev", "mtty"),
    # its DMA-logging REPORT fails without CONFIG_IOMMUFD_DRIVER: QEMU migrates it with that off and migration forced
    qemu_properties={"enable-migration": "on", "x-device-dirty-page-tracking": "off"},
    migration_flags=frozenset({Capability.STOP_COPY, Capability.P2P, Capability.PRE_COPY}),
    optional_flags=frozenset({Capability.DIRTY_LOGGING}),  # its log_ops; REPORT needs CONFIG_IOMMUFD_DRIVER
    pci_ids=(MTTY_PCI_ID,),
    matches=is_mtty,
    probe=MttyProbe(),
    workload=Bootblock(),
    seeder=seed_registers,
    stream=StreamLayout(
        STREAM_MAGIC,
        {
            "bad-version": (8, (2).to_bytes(4, "little")),  # mtty_data.major_ver
            "bad-ports": (16, (0xFF).to_bytes(4, "little")),  # mtty_data.nr_ports: no device has 255 ports
        },
        payload_damage={"fifo-content": fifo_in_flight},
        size=stream_size,
    ),
    incompatible={"mtty-1": "mtty-2", "mtty-2": "mtty-1"},
    kernel_log_allow=(r"^BAR\d addr 0x[0-9a-f]+$", r"^PCI config write @0x[0-9a-f]+ of \d+ bytes not handled$"),
    known_issues=(
        KnownIssue(
            "failed-operation",
            "RESUMING",
            "a failed incoming migration or restore leaves the destination mdev RESUMING: mtty neither resets on "
            "close nor advertises VFIO_DEVICE_FLAGS_RESET, so QEMU cannot reset it",
            "docs/nested-findings.md: Surprises 4; VM-level suites, what the real software did 1",
        ),
        *(
            KnownIssue(
                "failed-operation",
                state,
                f"a source QEMU killed while it migrated leaves the source mdev {state}: mtty does not reset its "
                "migration state when its user closes the device",
                "docs/nested-findings.md: a killed source QEMU",
            )
            for state in ("PRE_COPY", "STOP_COPY")
        ),
        KnownIssue(
            "failed-operation",
            "RUNNING_P2P",
            "an incoming domain destroyed while its QEMU resumed (STOP -> RUNNING_P2P -> RUNNING) leaves the "
            "destination mdev RUNNING_P2P: mtty does not reset its migration state when its user closes the device",
            "docs/nested-findings.md: destroy during finish, 2026-12-05",
        ),
        KnownIssue(
            "guest",
            "late-echo",
            "mtty raises no interrupt when it loads a state with bytes in its receive FIFO (mtty_load_state copies "
            "the ports only): a guest whose receive interrupt was in flight at the stop gets the byte only once "
            "its next write raises one (the Linux guest's line comes back after its 5-s wait, in order)",
            "docs/nested-findings.md: a Linux guest on mtty",
        ),
    ),
)
