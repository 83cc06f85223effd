"""Recovery suite: a cleaned-up Scenario; pair tests share the migration suite's capability gate."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labs.scenarios.context import Scenario
from labs.scenarios.support import scenario_for
from labs.session import LabSession

# the same gate (skip before the pair is reserved, naming the capability) and fixture as the migration suite
from suites.migration.conftest import migratable, pytest_runtest_setup

__all__ = ["migratable", "pytest_runtest_setup", "scenario"]


@pytest.fixture
def scenario(lab: LabSession) -> Iterator[Scenario]:
    yield from scenario_for(lab, "rec")
