"""Live migration with job monitoring: the libvirt mechanics, no assertions.

The client drives both sides (`virDomainMigrate3` with both connections, not
peer-to-peer), so hosts need no credentials for each other; the migration data
still flows QEMU to QEMU over the destination's `migration_address`. The
blocking call runs in a thread while this one samples job statistics, lets a
fault hook act mid-flight, and aborts the job at the deadline, so a hang is a
bounded failure, never a stuck test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import libvirt

from labs.errors import InfraError
from labs.virt.domain import VM, Hypervisor
from labs.virt.phase import Phase, phase_of

DEFAULT_FLAGS = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
ABORT_GRACE = 30.0  # after an abort, how long the migrate call may take to return


class MigrationHung(InfraError):
    """A migration made no end by its deadline and was aborted."""


@dataclass(frozen=True)
class MigrationOptions:
    timeout: float
    parallel: int | None = None  # parallel connections (VIR_MIGRATE_PARALLEL)
    postcopy: bool = False
    bandwidth_mib: int | None = None  # MiB/s; a low cap keeps a migration in flight long enough to hurt it
    dest_xml: str | None = None  # the destination's own device in the domain XML
    max_downtime_ms: int | None = None  # virDomainMigrateSetMaxDowntime before the job (TCG needs seconds)
    poll: float = 0.2


@dataclass(frozen=True)
class JobSample:
    elapsed: float  # seconds since the migrate call
    stats: dict[str, Any]
    source_paused: bool = False  # the source domain was paused by the migration (read only for a progress hook)

    @property
    def completing(self) -> bool:
        """QEMU is done sending; libvirt still finishes the job (the destination loads and resumes)."""
        return int(self.stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)) == libvirt.VIR_DOMAIN_JOB_COMPLETED

    @property
    def phase(self) -> Phase:
        if self.completing:
            return "finish"
        return phase_of(self.processed, self.remaining, self.source_paused)

    @property
    def active(self) -> bool:
        return int(self.stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)) not in (
            libvirt.VIR_DOMAIN_JOB_NONE,
            libvirt.VIR_DOMAIN_JOB_COMPLETED,
            libvirt.VIR_DOMAIN_JOB_FAILED,
            libvirt.VIR_DOMAIN_JOB_CANCELLED,
        )

    @property
    def processed(self) -> int:
        return int(self.stats.get("data_processed", 0))

    @property
    def remaining(self) -> int:
        return int(self.stats.get("data_remaining", 0))


@dataclass
class MigrationResult:
    source: str
    destination: str
    domain: str
    ok: bool = False
    error: str | None = None
    error_code: int | None = None  # libvirt's virErrorNumber of the failure
    error_domain: int | None = None  # libvirt's virErrorDomain (VIR_FROM_QEMU: QEMU's own error)
    duration: float = 0.0
    timed_out: bool = False
    aborted: bool = False  # we aborted it (deadline); a fault's own abort is the fault's record
    samples: list[JobSample] = field(default_factory=list)
    completed: dict[str, Any] = field(default_factory=dict)  # libvirt's completed-job statistics
    hook_error: str | None = None  # the progress hook (a fault) raised this; the migration went on

    def metric(self, key: str) -> int | None:
        value = self.completed.get(key)
        if value is None and self.samples:
            value = self.samples[-1].stats.get(key)
        return int(value) if value is not None else None

    @property
    def device_data_bytes(self) -> int | None:
        """What libvirt reports for the VFIO device (libvirt 10.x names it vfio_data_transferred)."""
        return vfio_bytes(self.completed, *(s.stats for s in reversed(self.samples)))

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "error": self.error,
            "error_code": self.error_code,
            "error_domain": self.error_domain,
            "duration_s": round(self.duration, 3),
            "timed_out": self.timed_out,
            "downtime_ms": self.metric("downtime"),
            "total_ms": self.metric("time_elapsed"),
            "data_total": self.metric("data_total"),
            "data_processed": self.metric("data_processed"),
            "device_data_bytes": self.device_data_bytes,
            "samples": len(self.samples),
            "hook_error": self.hook_error,
        }


def vfio_bytes(*stats: dict[str, Any]) -> int | None:
    """The VFIO device bytes the first job statistics that report them give (None: none reports them)."""
    for source in stats:
        for key, value in source.items():
            if "vfio" in key and isinstance(value, int):
                return value
    return None


ProgressHook = Callable[[JobSample], None]


def _params(dst: Hypervisor, opts: MigrationOptions) -> tuple[dict[str, Any], int]:
    flags = DEFAULT_FLAGS
    params: dict[str, Any] = {}
    if dst.host.spec.migration_address:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{dst.host.spec.migration_address}"
    if opts.dest_xml:
        params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = opts.dest_xml
    if opts.bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = opts.bandwidth_mib
    if opts.parallel:
        flags |= libvirt.VIR_MIGRATE_PARALLEL
        params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = opts.parallel
    if opts.postcopy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    return params, flags


def _sample(dom: libvirt.virDomain, start: float, read_state: bool = False) -> JobSample | None:
    try:
        stats = dict(dom.jobStats(0))
        paused = False
        if read_state:
            state, reason = dom.state()
            paused = state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION
        return JobSample(time.monotonic() - start, stats, paused)
    except libvirt.libvirtError:
        return None  # the domain left the source (success) or the driver has no job stats


def migrate(
    vm: VM, dst: Hypervisor, opts: MigrationOptions, on_progress: ProgressHook | None = None
) -> MigrationResult:
    """Migrate `vm` to `dst`; never raises for a failed migration, the result says what happened."""
    result = MigrationResult(vm.hv.name, dst.name, vm.name)
    params, flags = _params(dst, opts)
    dom = vm.dom
    dconn = dst.conn
    outcome: dict[str, Any] = {}
    if opts.max_downtime_ms:
        try:
            dom.migrateSetMaxDowntime(opts.max_downtime_ms, 0)
        except libvirt.libvirtError as exc:
            result.error = f"set max downtime {opts.max_downtime_ms} ms: {exc.get_error_message()}"
            result.error_code = exc.get_error_code()
            result.error_domain = exc.get_error_domain()
            return result

    def run() -> None:
        try:
            dom.migrate3(dconn, params, flags)
            outcome["ok"] = True
        except libvirt.libvirtError as exc:
            outcome["error"] = exc.get_error_message()
            outcome["code"] = exc.get_error_code()
            outcome["domain"] = exc.get_error_domain()

    start = time.monotonic()
    worker = threading.Thread(target=run, name=f"migrate-{vm.name}", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(opts.poll)
        sample = _sample(dom, start, read_state=on_progress is not None)
        if sample is not None and (sample.active or (sample.completing and worker.is_alive())):
            result.samples.append(sample)
            if on_progress is not None and result.hook_error is None:
                try:
                    on_progress(sample)
                except Exception as exc:  # a fault that failed to inject must not orphan the job
                    result.hook_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() - start > opts.timeout and worker.is_alive():
            result.timed_out = True
            try:
                dom.abortJob()
                result.aborted = True
            except libvirt.libvirtError:
                pass
            worker.join(ABORT_GRACE)
            break
    result.duration = time.monotonic() - start
    if worker.is_alive():
        result.error = f"migration did not return within {opts.timeout:g}s, nor {ABORT_GRACE:g}s after an abort"
        return result
    result.ok = bool(outcome.get("ok"))
    result.error = outcome.get("error")
    result.error_code = outcome.get("code")
    result.error_domain = outcome.get("domain")
    result.completed = completed_stats(dst, vm.hv, name=vm.name)
    return result


def completed_stats(*hvs: Hypervisor, name: str) -> dict[str, Any]:
    """libvirt keeps the finished job's statistics on the domain that holds them (destination, else source)."""
    for hv in hvs:
        try:
            stats = hv.conn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except (libvirt.libvirtError, InfraError):  # InfraError: a host gone (rebooted under the job)
            continue
        if stats:
            return dict(stats)
    return {}
