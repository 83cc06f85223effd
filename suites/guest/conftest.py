"""Guest suite: the inventory's Linux guest (`lab.guest`), booted once per device and restored for each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labs.inventory import LabPair
from labs.inventory.models import LinuxGuest
from labs.scenarios.context import Scenario
from labs.scenarios.guest import GuestImages
from labs.scenarios.support import require, scenario_for
from labs.session import LabSession
from labs.virt.capabilities import VirtCapability


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
def migratable(lab: LabSession, pair: LabPair) -> LabPair:
    """The pair, if both hosts' libvirt can live-migrate (else skipped, naming the capability)."""
    require(lab, [pair.source.host, pair.destination.host], VirtCapability.LIVE_MIGRATION)
    return pair


@pytest.fixture
def scenario(lab: LabSession, linux_guest: LinuxGuest) -> Iterator[Scenario]:
    for sc in scenario_for(lab, "guest"):
        sc.linux_guest = linux_guest
        yield sc
