"""Save/resume suite fixtures: a Scenario cleaned up after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labs.scenarios.context import Scenario
from labs.scenarios.support import scenario_for
from labs.session import LabSession


@pytest.fixture
def scenario(lab: LabSession, request: pytest.FixtureRequest) -> Iterator[Scenario]:
    yield from scenario_for(lab, "sr")
