"""Migration suite: options, a cleaned-up Scenario, and the capability gate on both hosts of the pair."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labs.inventory import LabPair
from labs.plugin.state import STATE
from labs.scenarios.context import Scenario
from labs.scenarios.support import require, scenario_for
from labs.session import LabSession
from labs.virt.capabilities import VirtCapability


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Gate on the capability before the pair fixture reserves devices: a skip then costs no SSH round trip."""
    callspec = getattr(item, "callspec", None)
    pair = callspec.params.get("pair") if callspec is not None else None
    if isinstance(pair, LabPair):
        session = item.config.stash[STATE].session
        require(session, [pair.source.host, pair.destination.host], VirtCapability.LIVE_MIGRATION)


@pytest.fixture
def migratable(lab: LabSession, pair: LabPair) -> LabPair:
    """The pair, if both hosts' libvirt can live-migrate (else skipped, naming the capability)."""
    require(lab, [pair.source.host, pair.destination.host], VirtCapability.LIVE_MIGRATION)
    return pair


@pytest.fixture
def scenario(lab: LabSession, migratable: LabPair) -> Iterator[Scenario]:
    yield from scenario_for(lab, "mig")
