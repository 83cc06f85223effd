"""Conformance suite fixtures: the device under test through a pooled agent, steps, arc selection.

Every test here is parametrized over devices (or pairs) by the labs plugin. Rule
tests are generated per protocol (a v1 rule never meets a v2 device); tests over
the arcs of the v2 FSM are generated for the union of arcs and the arcs a
device does not have (by its listed capabilities) are deselected, not skipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import pytest

from labs.agentpool import open_device
from labs.conformance import model
from labs.inventory import Inventory, LabDevice, LabPair
from labs.reservations import ReservationBusy, reserve
from labs.scenarios.steps import StepLog
from labs.session import LabSession
from labs.vfio.device import DeviceHandle


@pytest.fixture
def steps() -> Iterator[StepLog]:
    """Report steps (titles carry host and device); attached as a list at the end."""
    log = StepLog()
    yield log
    log.attach()


def open_dut(stack: ExitStack, lab: LabSession, device: LabDevice) -> DeviceHandle:
    """Open the device; a real device is put back in RUNNING when the test is done (mtty keeps its
    state across opens, and one closed in RESUMING oopses the host kernel at the next
    RESUMING -> STOP: nested findings), so the next test opens it as this one left it. One found
    elsewhere than RUNNING (left by someone else) is reset now and that is recorded in
    `dev.open_info["found_in"]`: V1-R5/V2-R3 skip naming it rather than judge a device we reset.
    A sim driver starts in RUNNING on every open and is never reset."""
    dev = stack.enter_context(open_device(lab, device))
    if not dev.is_sim:
        stack.callback(_idle, dev)
        found = _idle(dev)
        if found is not None:
            dev.open_info["found_in"] = found
            warnings.warn(f"{device.id} was found in {found} at open and reset", stacklevel=2)
    return dev


def _idle(dev: DeviceHandle) -> str | None:
    """Reset a device that is not in RUNNING; returns the state it was in (None: it was RUNNING)."""
    state = dev.state()
    if state == "RUNNING":
        return None
    dev.reset()
    return state


def peer_of(inventory: Inventory, device: LabDevice) -> LabDevice | None:
    """A second device to round-trip with: the device's pair partner (either end: a pair's devices go to one
    run, so the peer is not held by a run beside it), else another device of its model."""
    for p in inventory.pairs:
        if p.source.id == device.id:
            return p.destination
        if p.destination.id == device.id:
            return p.source
    for d in inventory.devices:
        if d.id != device.id and (d.spec.kind, d.spec.protocol, d.spec.model_key) == (
            device.spec.kind,
            device.spec.protocol,
            device.spec.model_key,
        ):
            return d
    return None


def reserve_peer(stack: ExitStack, config: pytest.Config, lab: LabSession, peer: LabDevice) -> None:
    """Hold the peer like the plugin holds the device under test (a busy peer skips, naming it)."""
    if config.getoption("--lab-no-reserve"):
        return
    t = lab.inventory.settings.timeouts
    wait = float(config.getoption("--lab-reserve-wait"))
    try:
        held = reserve(lab.ssh(peer.host.name), peer, lab.run_id, wait=wait, expires_in=2 * t.test)
    except ReservationBusy as exc:
        pytest.skip(f"peer {peer.id} is busy: {exc}")
    stack.callback(held.release)


class LabCheckContext:
    """labs.conformance.checks.CheckContext on a lab device; the peer is another device of its model."""

    def __init__(
        self, lab: LabSession, device: LabDevice, steps: StepLog, stack: ExitStack, config: pytest.Config
    ) -> None:
        self.lab, self.device, self.steps, self.stack, self.config = lab, device, steps, stack, config
        self.model = device.spec.model_key
        self.handle: DeviceHandle | None = None
        self.peer_handle: DeviceHandle | None = None

    def open(self) -> DeviceHandle:
        if self.handle is None:
            self.handle = open_dut(self.stack, self.lab, self.device)
        elif self.handle.state() != "RUNNING":
            self.handle.reset()
        return self.handle

    def peer(self) -> DeviceHandle:
        if self.peer_handle is None:
            other = peer_of(self.lab.inventory, self.device)
            if other is None:
                pytest.skip(f"{self.device.id} has no peer: no pair partner and no other {self.model} device")
            reserve_peer(self.stack, self.config, self.lab, other)
            with self.steps.step(f"open the peer {other.id}"):
                self.peer_handle = open_dut(self.stack, self.lab, other)
        elif self.peer_handle.state() != "RUNNING":
            self.peer_handle.reset()
        return self.peer_handle

    def step(self, title: str) -> AbstractContextManager[Any]:
        return self.steps.step(f"{self.device.id}: {title}")


@pytest.fixture
def ctx(
    lab: LabSession, device: LabDevice, steps: StepLog, request: pytest.FixtureRequest
) -> Iterator[LabCheckContext]:
    with ExitStack() as stack:
        yield LabCheckContext(lab, device, steps, stack, request.config)


@pytest.fixture
def dut(lab: LabSession, device: LabDevice) -> Iterator[DeviceHandle]:
    """The device under test, open and in RUNNING."""
    with ExitStack() as stack:
        yield open_dut(stack, lab, device)


def _device_arcs(device: LabDevice) -> set[tuple[str, str]]:
    if device.spec.protocol == "v1":
        return set(model.v1_arcs())
    return set(model.v2_arcs(model.flags_of(c.value for c in device.capabilities)))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    here = Path(__file__).parent
    for item in items:
        if here not in Path(str(item.path)).parents:
            kept.append(item)  # a conftest hook sees the whole session: only this suite's items are ours
            continue
        callspec = getattr(item, "callspec", None)
        params: dict[str, Any] = callspec.params if callspec else {}
        device, pair = params.get("device"), params.get("pair")
        arc = params.get("arc")
        if isinstance(device, LabDevice) and arc is not None and tuple(arc) not in _device_arcs(device):
            dropped.append(item)
            continue
        # which devices a result is about (the catalogue runner reads these back from junit)
        if isinstance(device, LabDevice):
            item.user_properties.append(("device", device.id))
        if isinstance(pair, LabPair):
            item.user_properties += [("device", pair.source.id), ("device", pair.destination.id)]
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
