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
from labs.virt.stale import held, release, stale_record

RELEASE_WAIT = 5.0  # seconds libvirt may keep a failed incoming domain's device after it reports the failure

T = TypeVar("T")


def despite_held_device(sc: Scenario, hv: Hypervisor, call: Callable[[], T]) -> T:
    """`call()` (a domain start or restore on `hv`); once more after a wait when libvirt refused it for a
    device it records as another domain's, and a last time after releasing a record kept for a gone one."""
    try:
        return call()
    except InfraError as exc:
        if held(str(exc)) is None:
            raise
    with sc.steps.step(f"wait {RELEASE_WAIT:g}s for {hv.name}'s libvirt to release the device"):
        time.sleep(RELEASE_WAIT)
    try:
        return call()
    except InfraError as exc:
        record = stale_record(hv, str(exc))
        if record is None:
            raise
    with sc.steps.step(f"release {record.mdev} on {record.host}: kept for {record.domain}") as rec:
        rec.detail = {"record": str(record), "libvirt": release(hv, record)}
    return call()
