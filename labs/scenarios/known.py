"""Known issues of a device model: one documented wrong outcome, shown as "known" (xfail), never as a pass.

Each entry names the model, the situation and the state the device is found in,
with the reason and where it is documented. Anything else the device does wrong
stays a failure; a known issue only applies when nothing else is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from labs.inventory import LabDevice
from labs.probes.mtty import is_mtty

FINDINGS = "docs/nested-findings.md"


@dataclass(frozen=True)
class KnownIssue:
    model: str
    applies: Callable[[LabDevice], bool]
    after: str  # the situation: "failed-incoming" (a failed incoming migration or restore)
    state: str  # the state the device is found in
    reason: str
    link: str

    def describe(self, device: str) -> str:
        return f"known issue of {self.model} ({device} left {self.state}): {self.reason} [{self.link}]"


KNOWN_ISSUES: tuple[KnownIssue, ...] = (
    KnownIssue(
        "mtty",
        is_mtty,
        "failed-incoming",
        "RESUMING",
        "a failed incoming migration or restore leaves the destination mdev RESUMING: mtty neither resets on "
        "close nor advertises VFIO_DEVICE_FLAGS_RESET, so QEMU cannot reset it",
        f"{FINDINGS}: Surprises 4; VM-level suites, what the real software did 1",
    ),
)


def known_issue(device: LabDevice, after: str, state: str | None) -> KnownIssue | None:
    return next((k for k in KNOWN_ISSUES if k.after == after and k.state == state and k.applies(device)), None)


def xfail_known(known: list[str]) -> None:
    """End a test whose only findings are known issues as xfailed, naming them (call after every assert)."""
    if known:
        pytest.xfail("; ".join(known))
