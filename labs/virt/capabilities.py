"""What a libvirt connection can do, found by asking it, not by its driver name.

Each capability is probed by calling the API on a defined but never started
probe domain. A driver that lacks the API answers VIR_ERR_NO_SUPPORT (or, for
migration, VIR_ERR_ARGUMENT_UNSUPPORTED: "... migration is not supported by the
source host"); a driver that has it refuses because the domain is not running
(VIR_ERR_OPERATION_INVALID), which is the answer we want. Nothing is started,
so probing is safe on a production host.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import libvirt

MISSING = (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED)


class VirtCapability(StrEnum):
    SAVE_RESTORE = "save/restore"
    MANAGED_SAVE = "managed save"
    LIVE_MIGRATION = "live migration"
    ABORT_JOB = "job abort"
    JOB_STATS = "job stats"
    POST_COPY = "post-copy"
    PARALLEL_MIGRATION = "parallel migration"
    QEMU_MONITOR = "QEMU monitor"


# what a suite cannot do without the capability, for skip reasons
VERBS = {
    VirtCapability.SAVE_RESTORE: "save a domain to a file",
    VirtCapability.MANAGED_SAVE: "managed-save a domain",
    VirtCapability.LIVE_MIGRATION: "migrate",
    VirtCapability.ABORT_JOB: "abort a job",
    VirtCapability.JOB_STATS: "report job statistics",
    VirtCapability.POST_COPY: "switch a migration to post-copy",
    VirtCapability.PARALLEL_MIGRATION: "migrate over parallel connections",
    VirtCapability.QEMU_MONITOR: "pass commands to the QEMU monitor",
}


@dataclass(frozen=True)
class Capabilities:
    uri: str
    driver: str
    supported: frozenset[VirtCapability]
    evidence: dict[str, str] = field(default_factory=dict)  # capability -> what the probe answered

    def has(self, cap: VirtCapability) -> bool:
        return cap in self.supported

    @property
    def label(self) -> str:
        """`test:///` for the test driver, else the URI without its query."""
        return "test:///" if self.uri.startswith("test:") else self.uri.split("?")[0]

    def missing_reason(self, cap: VirtCapability) -> str:
        return f"libvirt {self.label} cannot {VERBS[cap]} ({cap.value} capability missing)"


def _answer(call: Callable[[], object]) -> tuple[bool, str]:
    try:
        call()
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        message = exc.get_error_message() or ""
        return code not in MISSING, f"{code}: {message}"
    return True, "ok"


def _caps_live_migration(conn: libvirt.virConnect) -> bool:
    """The host capabilities list migration features (with <live/>) only where migration exists."""
    try:
        caps = conn.getCapabilities()
    except libvirt.libvirtError:
        return False
    block = re.search(r"<migration_features>(.*?)</migration_features>", caps, re.S)
    return bool(block and "<live/>" in block.group(1))


def probe_capabilities(conn: libvirt.virConnect, probe_dom: libvirt.virDomain, scratch_path: str) -> Capabilities:
    """Probe `conn` with `probe_dom` (defined, inactive); `scratch_path` is never written."""
    import libvirt_qemu

    uri = conn.getURI()
    checks: dict[VirtCapability, Callable[[], object]] = {
        VirtCapability.SAVE_RESTORE: lambda: probe_dom.save(scratch_path),
        VirtCapability.MANAGED_SAVE: lambda: probe_dom.managedSave(0),
        VirtCapability.ABORT_JOB: probe_dom.abortJob,
        VirtCapability.JOB_STATS: lambda: probe_dom.jobStats(0),
        VirtCapability.POST_COPY: lambda: probe_dom.migrateStartPostCopy(0),
        VirtCapability.QEMU_MONITOR: lambda: libvirt_qemu.qemuMonitorCommand(
            probe_dom, '{"execute":"query-status"}', 0
        ),
        # peer-to-peer to an unreachable URI: a driver without migration refuses before it looks at the URI
        VirtCapability.LIVE_MIGRATION: lambda: probe_dom.migrateToURI3(
            "test:///nonexistent", {}, libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
        ),
    }
    supported: set[VirtCapability] = set()
    evidence: dict[str, str] = {}
    for cap, call in checks.items():
        ok, said = _answer(call)
        evidence[cap.value] = said
        if ok:
            supported.add(cap)
    if VirtCapability.LIVE_MIGRATION in supported and not _caps_live_migration(conn):
        supported.discard(VirtCapability.LIVE_MIGRATION)
        evidence[VirtCapability.LIVE_MIGRATION.value] += "; host capabilities list no <live/> migration feature"
    # parallel connections are a flag of the same migration API (libvirt 5.2+); the migration itself proves it
    if VirtCapability.LIVE_MIGRATION in supported and hasattr(libvirt, "VIR_MIGRATE_PARALLEL"):
        supported.add(VirtCapability.PARALLEL_MIGRATION)
        evidence[VirtCapability.PARALLEL_MIGRATION.value] = "implied by live migration (VIR_MIGRATE_PARALLEL)"
    else:
        evidence[VirtCapability.PARALLEL_MIGRATION.value] = "needs live migration"
    return Capabilities(uri=uri, driver=conn.getType(), supported=frozenset(supported), evidence=evidence)
