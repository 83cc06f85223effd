"""After a suite run nothing is left: the janitor, run in the same process (which still holds the
test:/// nodes), finds no domain, image or rule of the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from labs.paths import SUITES
from labs.runtime import LabSession, open_inventory
from labs.virt.janitor import janitor
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
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 8 and not outcomes.get("failed") and not outcomes.get("errors"), outcomes
    with LabSession(open_inventory(inventory)) as session:
        assert janitor(session, keep_own=False) == []
