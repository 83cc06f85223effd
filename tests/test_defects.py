"""Every seeded defect is caught by a direct check of the rule it breaks; the correct drivers pass them all.

The checks live in labs.conformance.checks, shared with suites/conformance
(which runs them on lab devices with full reporting). Here they run on local sim
devices: the device under test is the variant, its peer the correct driver, so
a resume rule judges the resuming side only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from labs.conformance.checks import CHECKS
from labs.sim.defects import CATALOGUE, CORRECT, Defect
from labs.vfio import rules
from labs.vfio.client import AgentClient, AgentOSError
from labs.vfio.device import DeviceHandle

SMALL = {"content_size": 96 << 10, "record_size": 16 << 10, "window": 8 << 10}
CAPS = {"v1": {"stop_copy", "pre_copy"}, "v2": {"stop_copy", "p2p", "pre_copy", "dirty_logging"}}  # the sim drivers'



def applicable(protocol: str) -> list[str]:
    return sorted(r for r, c in CHECKS.items() if c.protocol == protocol and set(c.requires) <= CAPS[protocol])


@dataclass
class Ctx:
    """A CheckContext on a local agent: the variant under test, the correct driver as its peer."""

    client: AgentClient
    tmp: Path
    defect: Defect
    model: str = "labs-sim"
    opened: list[DeviceHandle] = field(default_factory=list)
    count: itertools.count[int] = field(default_factory=itertools.count)

    def _open(self, variant: Defect) -> DeviceHandle:
        n = next(self.count)
        opts = {**SMALL, **dict(variant.options)}
        dev = DeviceHandle.open_sim(
            self.client, variant.driver, str(self.tmp / f"d{n}"), opts, name=f"d{n}", protocol=variant.protocol
        )
        self.opened.append(dev)
        return dev

    def open(self) -> DeviceHandle:
        return self._open(self.defect)

    def peer(self) -> DeviceHandle:
        """A fresh correct driver (never the device under test), as a lab's pair partner would be."""
        return self._open(CORRECT[self.defect.protocol])

    def step(self, title: str) -> Any:
        return nullcontext()


# -- the tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentClient]:
    with AgentClient.local("defects", timeout=20) as client:
        yield client


def run_check(agent: AgentClient, tmp_path: Path, defect: Defect, rule: str) -> None:
    ctx = Ctx(agent, tmp_path, defect)
    try:
        CHECKS[rule](ctx)
    finally:
        for dev in ctx.opened:
            dev.close()


def test_catalogue_shape() -> None:
    assert len(CATALOGUE) >= 15
    for defect in CATALOGUE.values():
        assert defect.rule in rules.RULES, defect
        assert defect.rule in applicable(defect.protocol), f"no applicable check for {defect.rule}"
        assert defect.rule.startswith(defect.protocol.upper())


@pytest.mark.parametrize("rule", applicable("v1"))
def test_correct_v1_driver_passes(agent: AgentClient, tmp_path: Path, rule: str) -> None:
    run_check(agent, tmp_path, CORRECT["v1"], rule)


@pytest.mark.parametrize("rule", applicable("v2"))
def test_correct_v2_driver_passes(agent: AgentClient, tmp_path: Path, rule: str) -> None:
    driver = CORRECT["v2-dirty" if "dirty_logging" in CHECKS[rule].requires else "v2"]  # the option it needs
    run_check(agent, tmp_path, driver, rule)


def _flag_set_cases() -> list[tuple[str, str]]:
    """(correct driver setup, rule) for the setups other than each protocol's full one."""
    out = []
    for name, setup in CORRECT.items():
        if name in ("v1", "v2"):
            continue
        options = dict(setup.options)
        caps = {"stop_copy"} | {c for c in ("p2p", "pre_copy") if options.get(c, setup.protocol == "v1")}
        out += [(name, r) for r in applicable(setup.protocol) if set(CHECKS[r].requires) <= caps]
    return out


@pytest.mark.parametrize("setup,rule", _flag_set_cases())
def test_correct_driver_of_every_flag_set_passes(agent: AgentClient, tmp_path: Path, setup: str, rule: str) -> None:
    run_check(agent, tmp_path, CORRECT[setup], rule)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_defect_is_caught_by_its_rule(agent: AgentClient, tmp_path: Path, name: str) -> None:
    defect = CATALOGUE[name]
    with pytest.raises((AssertionError, AgentOSError)):
        run_check(agent, tmp_path, defect, defect.rule)


# -- the real-device path: no fill, no digest; round trips compared by re-saving -------------------------

# the checks whose verdict on a real device rests on stream comparison
REAL_PATH = {"v1": ["V1-R10", "V1-R16", "V1-R17"], "v2": ["V2-R6", "V2-R8", "V2-R13", "V2-R14"]}
# what that path still catches (a stale save needs content that changes between saves, a corrupted body a
# checksum, a foreign stream a sim to make it: sim only)
REAL_PATH_CATCHES = [
    "V1ResumeWritesNothing", "V2ResumeWritesNothing", "V2StopRunClobbers", "V2P2PRunClobbers", "V1PauseClobbers",
    "V2EarlyStopLosesTail", "V1EarlyStopLosesTail", "V2AcceptsEmpty", "V1AcceptsUnfinished",
    "V1AcceptsTruncated",
]  # fmt: skip


@dataclass
class RealCtx(Ctx):
    """As Ctx, but every device passes for a real one: filled apart when opened, then neither
    filled nor read back by the checks."""

    def _open(self, variant: Defect) -> DeviceHandle:
        dev = super()._open(variant)
        dev.fill(f"real/{len(self.opened)}")
        dev.is_sim = False
        return dev


def run_real(agent: AgentClient, tmp_path: Path, defect: Defect, rule: str) -> None:
    ctx = RealCtx(agent, tmp_path, defect)
    try:
        CHECKS[rule](ctx)
    except pytest.skip.Exception as exc:  # a skip here would hide the comparison this test is about
        raise AssertionError(f"{rule} skipped on the real-device path: {exc}") from None
    finally:
        for dev in ctx.opened:
            dev.close()


@pytest.mark.parametrize("protocol,rule", [(p, r) for p, rs in REAL_PATH.items() for r in rs])
def test_correct_drivers_pass_the_real_device_path(
    agent: AgentClient, tmp_path: Path, protocol: str, rule: str
) -> None:
    run_real(agent, tmp_path, CORRECT[protocol], rule)


@pytest.mark.parametrize("name", REAL_PATH_CATCHES)
def test_real_device_path_catches(agent: AgentClient, tmp_path: Path, name: str) -> None:
    defect = CATALOGUE[name]
    assert defect.rule in REAL_PATH[defect.protocol]
    with pytest.raises((AssertionError, AgentOSError)):
        run_real(agent, tmp_path, defect, defect.rule)
