"""QEMU monitor passthrough (libvirt_qemu): QEMU's own view of a migration.

Only where the connection allows it (qemu driver; never test:///). libvirt
taints a domain that received monitor commands; that is fine for lab VMs. A
monitor command waits behind libvirt's migration job, so scenarios query it
before or after a migration, not during one (job stats cover the middle).
"""

from __future__ import annotations

import json
from typing import Any

import libvirt

from labs.errors import InfraError


class MonitorUnavailable(InfraError):
    """This connection has no QEMU monitor passthrough."""


def qmp(dom: libvirt.virDomain, command: str, arguments: dict[str, Any] | None = None) -> Any:
    import libvirt_qemu

    request: dict[str, Any] = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    try:
        reply = libvirt_qemu.qemuMonitorCommand(dom, json.dumps(request), 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            raise MonitorUnavailable(f"{dom.name()}: no QEMU monitor on this connection") from None
        raise InfraError(f"{dom.name()}: QMP {command}: {exc.get_error_message()}") from None
    data = json.loads(reply)
    if "error" in data:
        raise InfraError(f"{dom.name()}: QMP {command}: {data['error'].get('desc', data['error'])}")
    return data.get("return")


def query_migrate(dom: libvirt.virDomain) -> dict[str, Any]:
    """QEMU's query-migrate: status, RAM totals and, with a VFIO device (QEMU 8.1+), `vfio.transferred`."""
    result = qmp(dom, "query-migrate")
    return result if isinstance(result, dict) else {}


def vfio_view(query: dict[str, Any]) -> dict[str, Any]:
    """The part of query-migrate that concerns the VFIO device (empty if QEMU reported none)."""
    out: dict[str, Any] = {"status": query.get("status")}
    if isinstance(query.get("vfio"), dict):
        out["vfio_transferred"] = query["vfio"].get("transferred")
    if query.get("error-desc"):
        out["error"] = query["error-desc"]
    return out
