"""PCI functions detached from their host driver and given back, through libvirt's node devices.

A hostdev with managed='no' leaves that duty to whoever defines the domain:
virNodeDeviceDetachFlags binds the function to VFIO before the VM starts (or
before an incoming migration), virNodeDeviceReAttach gives it back to its
host driver once no VM holds it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import libvirt

from labs.errors import InfraError


class NodeDevUnsupported(InfraError):
    """This libvirt connection cannot detach node devices (test:///, a remote driver without nodedev)."""


def nodedev_name(bdf: str) -> str:
    """libvirt's node device name of a PCI function: 0000:65:00.1 -> pci_0000_65_00_1."""
    return "pci_" + bdf.replace(":", "_").replace(".", "_")


def bound_driver(conn: Any, bdf: str) -> str | None:
    """The host driver the function is bound to now, as libvirt's node device XML says (None: unbound)."""
    try:
        xml = conn.nodeDeviceLookupByName(nodedev_name(bdf)).XMLDesc(0)
    except libvirt.libvirtError as exc:
        raise InfraError(f"{bdf}: no node device {nodedev_name(bdf)}: {exc.get_error_message()}") from None
    name = ET.fromstring(xml).findtext("driver/name")
    return name.strip() if name else None


@dataclass
class Detached:
    """One function the framework detached; `reattach` gives it back and checks it went home."""

    conn: Any
    bdf: str
    host_driver: str | None  # bound before the detach
    vfio_driver: str | None  # bound after it

    def reattach(self) -> None:
        if self.host_driver is not None and "vfio" in self.host_driver:
            return  # VFIO's before the detach: left as found
        try:
            self.conn.nodeDeviceLookupByName(nodedev_name(self.bdf)).reAttach()
        except libvirt.libvirtError as exc:
            raise InfraError(f"{self.bdf}: reattach failed: {exc.get_error_message()}") from None
        now = bound_driver(self.conn, self.bdf)
        if self.host_driver is not None and now != self.host_driver:
            raise InfraError(f"{self.bdf}: bound to {now or 'no driver'} after reattach, not {self.host_driver}")


def detach(conn: Any, bdf: str, driver: str | None = None) -> Detached:
    """Bind the function to VFIO (`driver`: libvirt's backend name, None for its default)."""
    before = bound_driver(conn, bdf)
    try:
        conn.nodeDeviceLookupByName(nodedev_name(bdf)).detachFlags(driver, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            missing = "libvirt cannot detach node devices here (virNodeDeviceDetachFlags)"
            raise NodeDevUnsupported(f"{bdf}: {missing}") from None
        raise InfraError(f"{bdf}: detach failed: {exc.get_error_message()}") from None
    after = bound_driver(conn, bdf)
    if after is None or "vfio" not in after:
        raise InfraError(f"{bdf}: bound to {after or 'no driver'} after detach, not a vfio driver")
    return Detached(conn, bdf, before, after)
