"""An mdev libvirt keeps reserved for a domain it no longer has, and its release without a daemon restart.

libvirt records each mdev a running domain uses (driver and domain name) and drops the record when the
domain stops. A destroy racing an incoming migration's finish can take the domain away without that
stop (libvirt 11.3, docs/nested-findings.md): every later start with the mdev is refused, "mediated
device <path> is in use by driver QEMU, domain <gone>", until the daemon restarts. A start under the
gone domain's name with the same mdev is refused the same way, and the cleanup of that failed start
drops every record held under that name. Nothing else on the host is touched; a restart would end the
migration jobs of every other run on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import libvirt

from labs.virt.xml import DomainSpec, Hostdev, domain_xml

if TYPE_CHECKING:
    from labs.virt.domain import Hypervisor

IN_USE = re.compile(r"mediated device \S*?([0-9a-f]{8}-[0-9a-f-]{27}) is in use by driver QEMU, domain (\S+)")
HELD = re.compile(r"(?:mediated|PCI) device \S+ is in use by driver QEMU, domain (\S+)")


@dataclass(frozen=True)
class StaleRecord:
    host: str
    mdev: str  # the mdev's UUID
    domain: str  # the domain libvirt says holds it, which it no longer has

    def __str__(self) -> str:
        return f"{self.host}: libvirt keeps mdev {self.mdev} reserved for {self.domain}, a domain it no longer has"


def held(error: str | None) -> str | None:
    """The domain, if `error` is libvirt refusing a host device (mdev or PCI) it records as that domain's."""
    found = HELD.search(error or "")
    return found.group(1) if found else None


def stale_record(hv: Hypervisor, error: str | None) -> StaleRecord | None:
    """The stale record behind `error`, if it is libvirt refusing an mdev held by a domain `hv` does not have."""
    found = IN_USE.search(error or "")
    if found is None or hv.exists(found.group(2)):
        return None
    return StaleRecord(hv.name, found.group(1), found.group(2))


def release(hv: Hypervisor, record: StaleRecord) -> str:
    """Drop the record by a start under its domain's name; what libvirt answered, for the report."""
    # the smallest domain with the mdev; refused before its QEMU starts while the record is there
    spec = DomainSpec(record.domain, (Hostdev("mdev", record.mdev),), virt_type=hv.virt_type, memory_mib=16)
    try:
        dom = hv.conn.createXML(domain_xml(spec), libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as exc:
        return f"refused as expected: {exc.get_error_message()}"
    dom.destroy()  # the record was gone already: it started, and stops at once
    return "started: the mdev was not held any more (destroyed at once)"
