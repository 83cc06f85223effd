"""Known issues of a device model: one documented wrong outcome, shown as "known" (xfail), never as a pass.

Each model (labs.models) lists its own: the situation and the state the device
is found in, with the reason and where it is documented. Anything else the
device does wrong stays a failure; a known issue only applies when nothing else
is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from labs import models
from labs.inventory import LabDevice


@dataclass(frozen=True)
class FoundIssue:
    model: str
    issue: models.KnownIssue

    def describe(self, device: str) -> str:
        i = self.issue
        return f"known issue of {self.model} ({device} left {i.state}): {i.reason} [{i.link}]"


def known_issue(device: LabDevice, after: str, state: str | None) -> FoundIssue | None:
    issue = models.known_issue(device, after, state)
    return FoundIssue(models.model_of(device).name, issue) if issue else None


def xfail_known(known: list[str]) -> None:
    """End a test whose only findings are known issues as xfailed, naming them (call after every assert)."""
    if known:
        pytest.xfail("; ".join(known))
