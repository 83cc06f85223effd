"""Device probes: a device's own registers, written and read back through the QEMU monitor.

A probe exists per device model. It writes distinctive values into registers
the device keeps in its migration state while the VM runs (`mark`), and reads
them back later, wherever the VM runs then (`read`): after a migration or a
restore they must be the values last written. The VM needs no guest OS for
this; the monitor does the I/O.

A device model (labs.models) carries its probe: `labs.models.probe_for(device)`
finds the one for a device, or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import libvirt

from labs.inventory import LabDevice


@dataclass
class ProbeMark:
    """Values a probe wrote into one device of one domain, by register name."""

    probe: str
    device: str  # LabDevice.id of the device that held the values when they were written
    hostdev: str  # the mdev UUID or PCI address, as the domain XML names it
    values: dict[str, int] = field(default_factory=dict)
    written_on: str = ""  # host


@dataclass
class ProbeReading:
    """What a probe read back on one host, against the mark."""

    probe: str
    host: str
    expected: dict[str, int]
    found: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def mismatches(self) -> list[str]:
        return [
            f"{reg} = {self.found.get(reg, -1):#04x}, wrote {want:#04x}"
            for reg, want in self.expected.items()
            if self.found.get(reg) != want
        ]

    def as_dict(self) -> dict[str, object]:
        return {
            "probe": self.probe,
            "host": self.host,
            "expected": {k: f"{v:#04x}" for k, v in self.expected.items()},
            "found": {k: f"{v:#04x}" for k, v in self.found.items()},
            "error": self.error,
        }


class DeviceProbe(Protocol):
    name: str
    # the bytes the device's migration stream starts with (faults find the stream in a save image by them)
    stream_magic: bytes | None

    def mark(self, dom: libvirt.virDomain, device: LabDevice, hostdev: str) -> ProbeMark:
        """Write fresh distinctive values; returns what was written."""
        ...

    def read(self, dom: libvirt.virDomain, hostdev: str, mark: ProbeMark) -> dict[str, int]:
        """The registers of `mark`, read from the device `hostdev` that the domain holds now."""
        ...

