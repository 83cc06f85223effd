"""ERROR -> VFIO_DEVICE_RESET -> RUNNING, then a full save/resume cycle with readback (V1-R9, V2-R15).

The simulated driver's fault knob sends the device to ERROR from the middle of
a save; in ERROR every state request must fail; a reset must bring it back to
RUNNING with its content, and the device must then save and resume as new.
"""

from __future__ import annotations

import pytest

from labs.conformance import model
from labs.conformance.checks import FAULT_KNOBS, fails
from labs.inventory import LabDevice
from labs.scenarios.steps import StepLog
from labs.vfio import uapi
from labs.vfio.device import DeviceHandle

pytestmark = [pytest.mark.conformance, pytest.mark.recovery, pytest.mark.sim_only(FAULT_KNOBS)]

# where the save goes wrong: the arc into stop-and-copy
FAILING_ARC = {"v1": ("RUNNING", "STOP_COPY"), "v2": ("STOP", "STOP_COPY")}


def _recover(dev: DeviceHandle, device: LabDevice, steps: StepLog) -> None:
    protocol = device.spec.protocol
    src, dst = FAILING_ARC[protocol]
    want = dev.fill(f"{device.id}/recovery")
    dev.faults(transitions=[{"from": src, "to": dst, "errno": "EIO", "error": True, "times": 1}])
    with steps.step(f"{device.id}: save, with {src} -> {dst} failing into ERROR"):
        fails(lambda: dev.save())
        assert dev.state() == "ERROR"
    with steps.step(f"{device.id}: every state request fails in ERROR"):
        targets = model.V1_VALID if protocol == "v1" else map(uapi.v2_state_name, range(1, 8))
        for target in targets:
            if protocol == "v2" and not uapi.mig_state_supported(uapi.v2_state(target), dev.mig_flags):
                continue
            fails(lambda target=target: dev.set_state(target))  # type: ignore[misc]
            assert dev.state() == "ERROR", f"a request for {target} left ERROR"
    with steps.step(f"{device.id}: VFIO_DEVICE_RESET, then RUNNING with the content intact"):
        dev.reset()
        assert dev.state() == "RUNNING"
        assert dev.digest() == want
    with steps.step(f"{device.id}: a full save and resume after the recovery, then the readback"):
        saved = dev.save()
        assert dev.state() == "STOP"
        dev.fill(f"{device.id}/overwritten")  # the resume must bring the saved content back
        dev.resume(saved)
        assert dev.state() == "RUNNING"
        assert dev.digest() == want, "the resume did not restore the saved content"


@pytest.mark.protocol("v1")
@pytest.mark.rule("V1-R9")
def test_v1_error_reset_then_save_resume(dut: DeviceHandle, device: LabDevice, steps: StepLog) -> None:
    _recover(dut, device, steps)


@pytest.mark.protocol("v2")
@pytest.mark.rule("V2-R15")
def test_v2_error_reset_then_save_resume(dut: DeviceHandle, device: LabDevice, steps: StepLog) -> None:
    _recover(dut, device, steps)
