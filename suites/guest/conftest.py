"""Guest suite: the inventory's Linux guest (`lab.guest`), booted once per device and restored for each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labs.inventory.models import LinuxGuest
from labs.scenarios.context import Scenario
from labs.scenarios.guest import GuestImages
from labs.scenarios.support import scenario_for
from labs.session import LabSession

# the same gate (skip before the pair is reserved, naming the capability) and fixture as the migration suite
from suites.migration.conftest import migratable, pytest_runtest_setup

__all__ = ["guest_images", "linux_guest", "migratable", "pytest_runtest_setup", "scenario"]


@pytest.fixture(scope="session")
def linux_guest(lab: LabSession) -> LinuxGuest:
    guest = lab.inventory.settings.guest
    if guest is None:
        pytest.skip(f"{lab.inventory.file}: no lab.guest (a Linux guest with a workload): the guest suite needs one")
    return guest


@pytest.fixture(scope="session")
def guest_images(linux_guest: LinuxGuest) -> Iterator[GuestImages]:
    images = GuestImages(linux_guest)
    yield images
    errors = images.close()
    if errors:
        pytest.fail(f"saved guest images not removed: {'; '.join(errors)}", pytrace=False)


@pytest.fixture
def scenario(lab: LabSession, linux_guest: LinuxGuest) -> Iterator[Scenario]:
    for sc in scenario_for(lab, "guest"):
        sc.linux_guest = linux_guest
        yield sc
