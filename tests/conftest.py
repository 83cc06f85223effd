"""Fixtures for the framework's own tests: a private sim lab per xdist worker."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from labs.inventory import Inventory
from labs.runtime import LabSession, open_inventory

pytest_plugins = ["pytester"]


def free_port(address: str = "127.0.0.2") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def sim_inventory_doc(sim_dir: Path, port: int, devices: bool = False) -> dict:
    """A two-host sim inventory of our own, so tests never disturb a user's `lab sim up`."""
    hosts = {}
    for name, address in (("hostA", "127.0.0.2"), ("hostB", "127.0.0.3")):
        hosts[name] = {
            "address": address,
            "port": port,
            "user": "${LABS_SIM_USER}",
            "identity_file": f"{sim_dir}/id_ed25519",
            "known_hosts": f"{sim_dir}/known_hosts",
            "python": "${LABS_PYTHON}",
            "libvirt_uri": f"test://{sim_dir}/hosts/{name}/libvirt-node.xml",
        }
        if devices:
            hosts[name]["devices"] = yaml.safe_load(
                (Path(__file__).parent.parent / "inventories" / "sim.yaml").read_text()
            )["hosts"][name]["devices"]
    return {"lab": {"name": "test-sim", "sim": {"dir": str(sim_dir)}, "timeouts": {"connect": 5}}, "hosts": hosts}


def write_sim_inventory(directory: Path, devices: bool = False) -> Path:
    sim_dir = directory / "sim"
    path = directory / "sim.yaml"
    path.write_text(yaml.safe_dump(sim_inventory_doc(sim_dir, free_port(), devices), sort_keys=False))
    return path


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
