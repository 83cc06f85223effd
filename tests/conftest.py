"""Fixtures for the framework's own tests: a private sim lab per xdist worker."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from labs.inventory import Inventory
from labs.session import LabSession, open_inventory
from labs.simlab import generate

pytest_plugins = ["pytester"]

# a hang guard, never a speed: at nice 19 beside the nested lab's boot (`./lab test`) a run gets almost no CPU
# for minutes; a child that must outlive the guard when the behaviour under test is missing sleeps FOREVER_S
HANG_S = 600.0
FOREVER_S = 3600


@pytest.fixture(scope="session", autouse=True)
def _own_image_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Save images of this worker's runs in a directory of its own: a janitor in another worker
    (or a user's `lab janitor`) rightly removes a dead run's images from the shared one."""
    before = os.environ.get("LABS_IMAGE_DIR")
    os.environ["LABS_IMAGE_DIR"] = str(tmp_path_factory.mktemp("images"))
    yield
    if before is None:
        os.environ.pop("LABS_IMAGE_DIR", None)
    else:
        os.environ["LABS_IMAGE_DIR"] = before


@pytest.fixture(autouse=True)
def _pytester_runs_in_order(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner pytest runs judge their own output in collection order: pytest-randomly stays out of them."""
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")  # it clears PYTEST_ADDOPTS when it starts
        monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:randomly")


def free_port(address: str = "127.0.0.2") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def write_sim_inventory(directory: Path, devices: bool = False, pairs: int = 1) -> Path:
    """A sim inventory of our own (own dir, own port), so tests never disturb a user's `lab sim up`."""
    return generate.write_sim_inventory(directory / "sim.yaml", directory / "sim", free_port(), pairs, devices)


@pytest.fixture(scope="session")
def sim_inventory_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sim_inventory(tmp_path_factory.mktemp("simlab"))


@pytest.fixture(scope="session")
def sim_inventory(sim_inventory_file: Path) -> Inventory:
    return open_inventory(sim_inventory_file)


@pytest.fixture(scope="session")
def sim_session(sim_inventory: Inventory) -> Iterator[LabSession]:
    with LabSession(sim_inventory) as session:
        yield session
    assert session.sim is not None
    assert all(pid is None for pid in session.sim.status().values()), "sim sshd left running"
