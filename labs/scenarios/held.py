"""A start or restore refused because libvirt records its host device as another domain's.

libvirt reports a failed incoming job before it releases the destination's device, so the next domain
with it can be refused for a moment; and a destroy racing a migration's finish can leave an mdev
recorded for a domain the host no longer has, until the daemon restarts (labs.virt.stale). Either
would fail the next test on that device as infrastructure, and every test after it. So a refusal for
a held device waits, tries again, releases a record kept for a gone domain, and tries a last time;
each step is in the report. The device under test plays no part in libvirt's records.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from labs.errors import InfraError
from labs.scenarios.context import Scenario
from labs.virt.domain import Hypervisor
from labs.virt.stale import StaleRecord, held, release, stale_record

RELEASE_WAIT = 5.0  # seconds libvirt may keep a failed incoming domain's device after it reports the failure

R = TypeVar("R")
T = TypeVar("T")


def retry_held(
    sc: Scenario, hv: Hypervisor, attempt: Callable[[str], R], error: Callable[[R], str | None]
) -> tuple[R, StaleRecord | None]:
    """`attempt("")`; when `error` of it says libvirt refused a device it records as another domain's, a wait
    and `attempt(" (again)")`; when that is refused for a domain `hv` no longer has, the record's release and
    `attempt(" (released)")`. The last attempt, and the record released (None: none was)."""
    out = attempt("")
    if held(error(out)) is None:
        return out, None
    with sc.steps.step(f"wait {RELEASE_WAIT:g}s for {hv.name}'s libvirt to release the device"):
        time.sleep(RELEASE_WAIT)
    out = attempt(" (again)")
    record = stale_record(hv, error(out))
    if record is None:
        return out, None
    with sc.steps.step(f"release {record.mdev} on {record.host}: kept for {record.domain}") as rec:
        rec.detail = {"record": str(record), "libvirt": release(hv, record)}
    return attempt(" (released)"), record


def despite_held_device(sc: Scenario, hv: Hypervisor, call: Callable[[], T]) -> T:
    """`call()` (a domain start or restore on `hv`) through `retry_held`: its InfraError is the refusal."""

    got: list[T] = []

    def attempt(_suffix: str) -> InfraError | None:
        try:
            got.append(call())
        except InfraError as exc:
            return exc
        return None

    refused, _record = retry_held(sc, hv, attempt, lambda exc: str(exc) if exc else None)
    if refused is not None:
        raise refused
    return got[-1]
