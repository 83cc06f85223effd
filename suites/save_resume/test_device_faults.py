"""Device-level faults around save and resume, through the device layer (no VM involved).

On the sim lab libvirt's test:/// saves carry no device state, so these drive
the device explicitly through the agent; step titles say so. Each fault is
undone at teardown; afterwards the device must be RUNNING with its content and
a following save/resume must succeed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labs.agentpool import open_device
from labs.faults import CorruptResumeStream, DeviceTransitionFailure
from labs.inventory import LabDevice
from labs.scenarios import roundtrip
from labs.scenarios.context import Scenario
from labs.session import LabSession
from labs.vfio.access import DeviceAccess
from labs.vfio.client import AgentOSError

pytestmark = [pytest.mark.save_resume, pytest.mark.fault]


@pytest.fixture
def dev(lab: LabSession, device: LabDevice) -> Iterator[DeviceAccess]:
    with open_device(lab, device) as handle:
        if handle.state() != "RUNNING":
            handle.reset()  # a device left stopped by someone else (mtty keeps its state across opens)
        yield handle


def _following_round_trip(scenario: Scenario, dev: DeviceAccess, device: LabDevice) -> None:
    """Round trips into a device seeded apart (a sim peer; a real device into itself, reseeded): must carry content."""
    checks = roundtrip.both_ways(scenario.steps, dev, device, f"following save and resume of {device.id}")
    problems = [p for c in checks for p in c.problems]
    assert not problems, "; ".join(problems)
    assert dev.state() == "RUNNING", f"{device.id} is {dev.state()} after the following round trip"
    undecided = next((c.undecided for c in checks if c.undecided), None)
    if undecided:
        pytest.skip(f"the following round trip made no content verdict: {undecided}")


@pytest.mark.sim_only("transition fault knobs exist only in simulated drivers")
@pytest.mark.parametrize("to_error", [False, True], ids=["stays", "to-error"])
def test_transition_failure_during_save(
    lab: LabSession, device: LabDevice, dev: DeviceAccess, scenario: Scenario, to_error: bool
) -> None:
    # v2 saves RUNNING -> STOP -> STOP_COPY (the core walks the arcs); v1 writes 010 from 001 in one step
    arc = "STOP->STOP_COPY" if device.spec.protocol == "v2" else "RUNNING->STOP_COPY"
    before = dev.digest()
    fault = scenario.inject(DeviceTransitionFailure(dev, device, arc, errno="EIO", to_error=to_error))
    with scenario.steps.step(f"device save of {device.id} through the agent with {arc} failing (EIO)"):
        with pytest.raises(AgentOSError) as refused:
            dev.save()
        assert refused.value.errname == "EIO", refused.value
    with scenario.steps.step(f"recover {device.id} as QEMU does: back to RUNNING, reset if that is refused"):
        state = dev.state()
        if to_error:
            assert state == "ERROR", f"a failure armed to land in ERROR left {state}"
        try:
            dev.set_state("RUNNING")
        except AgentOSError:
            dev.reset()
    fault.undo()
    assert dev.state() == "RUNNING", f"{device.id} is {dev.state()} after the undo"
    assert dev.digest() == before, "a failed save changed the device content"
    _following_round_trip(scenario, dev, device)


@pytest.mark.parametrize("how", ["truncate", "bad-magic"])
def test_corrupt_resume_stream_refused(
    lab: LabSession, device: LabDevice, dev: DeviceAccess, scenario: Scenario, how: str
) -> None:
    with scenario.steps.step(f"device save of {device.id} through the agent, resumed intact"):
        stream = dev.save()
        data = list(stream.chunks())  # v1 keeps the chunk boundaries (one oversized chunk is refused for its size)
        dev.resume(stream)
    fault = CorruptResumeStream(dev, device, data, how)  # type: ignore[arg-type]
    scenario.inject(fault)
    assert fault.refused, f"a {how} stream was accepted; device left {fault.state_after}"
    assert fault.state_after != "RUNNING", f"a refused {how} stream left the device RUNNING"
    fault.undo()
    assert dev.state() == "RUNNING", f"{device.id} is {dev.state()} after the undo"
    _following_round_trip(scenario, dev, device)
