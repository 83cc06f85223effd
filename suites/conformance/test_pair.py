"""Device-level save on one host, resume on the other: the stream crosses the controller.

The agent on the source host reads the stream, the framework carries it, the
agent on the destination host writes it. The source is filled with a pattern
named after the pair first, so the destination's readback proves the content
arrived (simulated devices; a real device is judged by the protocol alone).
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from labs.conformance.checks import digest, seed
from labs.inventory import LabPair
from labs.runtime import LabSession
from labs.scenarios.steps import StepLog
from labs.vfio.device import DeviceHandle
from suites.conformance.conftest import open_dut

pytestmark = [pytest.mark.conformance, pytest.mark.save_resume]

# saved-stream: the controller holds the whole stream; live: pre-copy then stop-copy, chunk by chunk
MODES = ["saved-stream", "live"]


def _across(lab: LabSession, pair: LabPair, steps: StepLog, mode: str) -> None:
    src_id, dst_id = pair.source.id, pair.destination.id
    with ExitStack() as stack:
        with steps.step(f"open {src_id} and {dst_id}, fill {src_id} with the pattern '{pair.id}/{mode}'"):
            src: DeviceHandle = open_dut(stack, lab, pair.source)
            dst: DeviceHandle = open_dut(stack, lab, pair.destination)
            want = seed(src, f"{pair.id}/{mode}")
            if want is not None:
                assert digest(dst) != want, "the destination already holds the pattern: the readback proves nothing"
        if mode == "saved-stream":
            with steps.step(f"save {src_id}: its agent reads the whole stream to the controller"):
                saved = src.save()
                assert src.state() == "STOP"
            with steps.step(f"resume {dst_id} from the {saved.bytes}-byte stream ({saved.nchunks} chunks)"):
                result = dst.resume(saved)
                assert result.bytes == saved.bytes and result.sha256 == saved.sha256
        else:
            live = mode == "live"
            with steps.step(f"{'live ' if live else ''}migrate {src_id} -> {dst_id} chunk by chunk"):
                results = src.migrate_to(dst, live=live)
                assert sum(r.bytes for r in results) > 0
                assert src.state() == "STOP"
        with steps.step(f"read back {dst_id}: RUNNING with the content of {src_id}"):
            assert dst.state() == "RUNNING"
            assert digest(dst) == want, f"{dst_id} does not hold the content saved on {src_id}"


@pytest.mark.protocol("v1")
@pytest.mark.rule("V1-R16", "V1-R18")
@pytest.mark.parametrize("mode", MODES)
def test_v1_save_resume_across_hosts(lab: LabSession, pair: LabPair, steps: StepLog, mode: str) -> None:
    _across(lab, pair, steps, mode)


@pytest.mark.protocol("v2")
@pytest.mark.rule("V2-R13")
@pytest.mark.parametrize("mode", MODES)
def test_v2_save_resume_across_hosts(lab: LabSession, pair: LabPair, steps: StepLog, mode: str) -> None:
    _across(lab, pair, steps, mode)
