"""Device-level save on one host, resume on the other: the stream crosses the controller.

The agent on the source host reads the stream, the framework carries it, the
agent on the destination host writes it. Source and destination are filled with
different patterns first, so the destination's readback proves the content
arrived; a real device, which cannot be filled or read back, is saved again
after the resume and its stream compared with the source's.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from labs.conformance.checks import apart, differs_before, verify_resumed
from labs.inventory import LabPair
from labs.scenarios.steps import StepLog
from labs.session import LabSession
from labs.vfio.device import DeviceHandle
from suites.conformance.conftest import LabCheckContext, open_dut

pytestmark = [pytest.mark.conformance, pytest.mark.save_resume]

# saved-stream: the controller holds the whole stream; live: pre-copy then stop-copy, chunk by chunk
MODES = ["saved-stream", "live"]


def _across(lab: LabSession, pair: LabPair, steps: StepLog, mode: str, config: pytest.Config) -> None:
    src_id, dst_id = pair.source.id, pair.destination.id
    with ExitStack() as stack:
        ctx = LabCheckContext(lab, pair.destination, steps, stack, config)
        with steps.step(f"open {src_id} and {dst_id}"):
            src: DeviceHandle = open_dut(stack, lab, pair.source)
            dst: DeviceHandle = open_dut(stack, lab, pair.destination)
        want = apart(ctx, src, dst, f"{pair.id}/{mode}", f"{pair.id}/{mode}/destination")
        saved = None
        if mode == "saved-stream":
            with steps.step(f"save {src_id}: its agent reads the whole stream to the controller"):
                saved = src.save()
                assert src.state() == "STOP"
            differs_before(ctx, dst, saved)
            with steps.step(f"resume {dst_id} from the {saved.bytes}-byte stream ({saved.nchunks} chunks)"):
                result = dst.resume(saved)
                assert result.bytes == saved.bytes and result.sha256 == saved.sha256
        else:
            if not src.is_sim:
                # a real source cannot be read back: its state, saved first, is what the destination must save
                with steps.step(f"save {src_id} first: the state {dst_id} must hold after the migration"):
                    saved = src.save(live=True)
                    src.set_state("RUNNING")
                differs_before(ctx, dst, saved)
            with steps.step(f"live migrate {src_id} -> {dst_id} chunk by chunk"):
                results = src.migrate_to(dst, live=True)
                assert sum(r.bytes for r in results) > 0
                assert src.state() == "STOP"
        with steps.step(f"read back {dst_id}: RUNNING with the content of {src_id}"):
            assert dst.state() == "RUNNING"
        verify_resumed(ctx, dst, want, saved)


@pytest.mark.protocol("v1")
@pytest.mark.rule("V1-R16", "V1-R18")
@pytest.mark.parametrize("mode", MODES)
def test_v1_save_resume_across_hosts(
    lab: LabSession, pair: LabPair, steps: StepLog, mode: str, request: pytest.FixtureRequest
) -> None:
    _across(lab, pair, steps, mode, request.config)


@pytest.mark.protocol("v2")
@pytest.mark.rule("V2-R13")
@pytest.mark.parametrize("mode", MODES)
def test_v2_save_resume_across_hosts(
    lab: LabSession, pair: LabPair, steps: StepLog, mode: str, request: pytest.FixtureRequest
) -> None:
    _across(lab, pair, steps, mode, request.config)
