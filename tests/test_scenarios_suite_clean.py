"""After a suite run nothing is left: the janitor, run in the same process (which still holds the
test:/// nodes), finds no domain, image or rule of the run. The same run's Allure results carry
each scenario's evidence: steps naming host and device, domain XML, logs (or why there are none),
the agent transcript."""

from __future__ import annotations

from pathlib import Path

import pytest

from labs.janitor import janitor
from labs.paths import SUITES
from labs.session import LabSession, open_inventory
from tests.allure_results import evidence
from tests.conftest import write_sim_inventory


def test_janitor_finds_nothing_after_the_save_resume_suite(pytester: pytest.Pytester, tmp_path: Path) -> None:
    inventory = write_sim_inventory(tmp_path, devices=True)
    result = pytester.runpytest_inprocess(
        str(SUITES / "save_resume"),
        "--inventory",
        str(inventory),
        "--lab-device",
        "*:simv2",
        "-p",
        "no:cacheprovider",
        "-q",
        f"--alluredir={tmp_path / 'results'}",
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 8 and not outcomes.get("failed") and not outcomes.get("errors"), outcomes
    with LabSession(open_inventory(inventory)) as session:
        assert janitor(session, keep_own=False) == []
    _evidence_is_attached(tmp_path / "results")


def _evidence_is_attached(results: Path) -> None:
    tests = evidence(results, phases=("afters",))
    steps, attachments = next(v for k, v in tests.items() if k.startswith("test_save_then_restore[hostA"))
    assert any("hostA" in s and "simv2" in s for s in steps), steps
    for prefix in ("domain XML ", "QEMU log ", "scenario steps"):
        assert any(a.startswith(prefix) for a in attachments), (prefix, attachments)
    steps, attachments = next(v for k, v in tests.items() if k.startswith("test_corrupt_resume_stream_refused"))
    assert any(
        a.startswith("agent transcript hostA:simv2") or a.startswith("agent transcript hostB:simv2")
        for a in attachments
    ), attachments
    assert any(a == "faults" for a in attachments), attachments
