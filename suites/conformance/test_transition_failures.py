"""Read-back after every induced transition failure: each arc of the FSM fails once.

For every arc the device has (v1: every transition between the five valid
states; v2: the single arcs of spec 3.3 for its flags) the simulated driver's
fault knob fails the arc twice: once leaving the prior state, once going to ERROR. The state
read back must obey V1-R8 / V2-R17 (and show what the driver did); a reset
recovers the device and its content is intact.
"""

from __future__ import annotations

import pytest

from labs.conformance import model
from labs.conformance.checks import FAULT_KNOBS, fails
from labs.inventory import LabDevice
from labs.scenarios.steps import StepLog
from labs.vfio import uapi
from labs.vfio.device import DeviceHandle

pytestmark = [pytest.mark.conformance, pytest.mark.fault, pytest.mark.sim_only(FAULT_KNOBS)]

OUTCOMES = (False, True)  # the driver stays in the prior state; the driver goes to ERROR


def _arc_id(arc: tuple[str, str]) -> str:
    return f"{arc[0]}->{arc[1]}"


def _fail_arc(dev: DeviceHandle, device: LabDevice, steps: StepLog, arc: tuple[str, str], to_error: bool) -> None:
    src, dst = arc
    before = dev.fill(f"{device.id}/{src}->{dst}/{to_error}")
    fds: list[int] = []
    with steps.step(f"{device.id}: bring the device to {src}"):
        fd = dev.set_state(src)
        if fd is not None:
            fds.append(fd)
        assert dev.state() == src
    dev.faults(transitions=[{"from": src, "to": dst, "errno": "EIO", "error": to_error, "times": 1}])
    with steps.step(f"{device.id}: request {src} -> {dst}, failed by the driver ({'to ERROR' if to_error else 'EIO'})"):
        exc = fails(lambda: dev.set_state(dst))
        assert exc.errname == "EIO", exc
    with steps.step(f"{device.id}: read the state back"):
        state = dev.state()
        if device.spec.protocol == "v2":
            assert exc.detail.get("buffer", {}).get("data_fd") == -1, exc.detail  # V2-R17
        assert state in (src, "ERROR"), f"after a failed {src} -> {dst} the device reads {state}"  # V1-R8, 3.8
        assert state == ("ERROR" if to_error else src), f"the driver failed the arc {arc} but reads {state}"
    with steps.step(f"{device.id}: recover with VFIO_DEVICE_RESET and read the content back"):
        for fd in fds:
            dev.close_fd(fd)
        dev.reset()
        assert dev.state() == "RUNNING"
        assert dev.digest() == before, "the content changed across the failed transition and the reset"


@pytest.mark.protocol("v1")
@pytest.mark.rule("V1-R8")
@pytest.mark.parametrize("arc", model.v1_arcs(), ids=_arc_id)
def test_v1_failed_transition_readback(
    dut: DeviceHandle, device: LabDevice, steps: StepLog, arc: tuple[str, str]
) -> None:
    for to_error in OUTCOMES:
        _fail_arc(dut, device, steps, arc, to_error)


@pytest.mark.protocol("v2")
@pytest.mark.rule("V2-R17")
@pytest.mark.parametrize("arc", model.v2_all_arcs(), ids=_arc_id)
def test_v2_failed_transition_readback(
    dut: DeviceHandle, device: LabDevice, steps: StepLog, arc: tuple[str, str]
) -> None:
    assert uapi.path_names(arc[0], arc[1], dut.mig_flags) == list(arc), f"{arc} is not a single arc of this device"
    for to_error in OUTCOMES:
        _fail_arc(dut, device, steps, arc, to_error)
