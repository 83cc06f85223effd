"""A real device that cannot be filled gets a distinctive state through its model's seeder, so the
round trips compare streams instead of skipping (the mtty seeder writes UART registers this way)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from labs import models
from labs.conformance import checks
from labs.models import DeviceModel
from labs.sim.defects import CATALOGUE, CORRECT, Defect
from labs.vfio.client import AgentClient, AgentOSError
from labs.vfio.device import DeviceHandle
from tests.test_defects import Ctx

SIM_PCI_ID = (0x1B36, 0x1234)  # labs.sim.base.CONFIG_SPACE


@dataclass
class BlankRealCtx(Ctx):
    """Every device passes for a real one and starts with the same (all-zero) state."""

    def _open(self, variant: Defect) -> DeviceHandle:
        dev = super()._open(variant)
        dev.is_sim = False
        return dev


def write_regs(dev: DeviceHandle, value: str) -> None:
    data = hashlib.sha256(value.encode()).digest()
    dev.call("region_write", index=0, offset=0, data=base64.b64encode(data).decode())


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentClient]:
    with AgentClient.local("seeders", timeout=20) as client:
        yield client


@pytest.fixture
def sim_seeder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model for the sim's PCI id whose seeder writes its registers, as a real model's would."""
    model = DeviceModel("blank", "pci", pci_ids=(SIM_PCI_ID,), seeder=write_regs)
    monkeypatch.setattr(models, "available", lambda: [model])


def run(agent: AgentClient, tmp_path: Path, defect: Defect) -> None:
    ctx = BlankRealCtx(agent, tmp_path, defect)
    try:
        checks.CHECKS["V2-R13"](ctx)
    finally:
        for dev in ctx.opened:
            dev.close()


def test_without_a_seeder_two_blank_devices_skip_the_round_trip(agent: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(pytest.skip.Exception, match="already holds the source's state"):
        run(agent, tmp_path, CORRECT["v2"])


def test_a_seeder_makes_the_round_trip_run_and_pass(agent: AgentClient, tmp_path: Path, sim_seeder: None) -> None:
    run(agent, tmp_path, CORRECT["v2"])


def test_a_seeded_round_trip_catches_a_resume_that_writes_nothing(
    agent: AgentClient, tmp_path: Path, sim_seeder: None
) -> None:
    with pytest.raises((AssertionError, AgentOSError)):
        run(agent, tmp_path, CATALOGUE["V2ResumeWritesNothing"])


def test_pci_id_reads_config_space(agent: AgentClient, tmp_path: Path) -> None:
    ctx = BlankRealCtx(agent, tmp_path, CORRECT["v2"])
    try:
        assert checks.pci_id(ctx.open()) == SIM_PCI_ID
    finally:
        for dev in ctx.opened:
            dev.close()
