"""The seeded-defect catalogue runner: verdicts from results, and one small real run end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import yaml
from rich.console import Console

from labs.conformance.catalogue import (
    Outcome,
    OutsideDriver,
    device_spec,
    judge,
    plain_lists,
    read_junit,
    run_catalogue,
    variants,
    why_bad,
)
from labs.session import open_inventory
from labs.sim.defects import CATALOGUE, CORRECT
from labs.simlab.generate import sim_inventory_doc
from labs.simlab.lifecycle import SimLab


def _out(device: str, rules: list[str], failed: bool = True) -> Outcome:
    return Outcome(
        nodeid=f"suites/x.py::test[{device}]",
        failed=failed,
        skipped=False,
        devices=[device],
        rules=rules,
        message="boom\nmore" if failed else "",
    )


def test_verdicts() -> None:
    garbage, ignored = CATALOGUE["V2PrecopyGarbage"], CATALOGUE["V2PrecopyIgnored"]
    defects = [CORRECT["v2"], CORRECT["v1"], garbage, ignored, CATALOGUE["V1ReservedJunk"]]
    outcomes = [
        _out("hostA:V2Driver", ["V2-R9"], failed=False),
        _out("hostA:V1Driver", ["V1-R3"]),  # a correct driver failing: DIRTY
        _out("hostA:V2PrecopyGarbage", ["V2-R10"]),
        _out("hostA:V2PrecopyGarbage", ["V2-R8"]),  # its documented knock-on
        _out("hostA:V2PrecopyGarbage", []),  # the model test: no rule label
        _out("hostA:V2PrecopyIgnored", ["V2-R8", "V2-R10"]),  # only knock-ons: its own rule V2-R7 held
        _out("hostA:V1ReservedJunk", ["V1-R3"], failed=False),
    ]
    got = {v.variant: v for v in judge(defects, outcomes)}
    assert got["V2Driver"].status == "CLEAN" and got["V2Driver"].tests == 1
    assert got["V1Driver"].status == "DIRTY" and got["V1Driver"].failed_rules == ["V1-R3"]
    g = got["V2PrecopyGarbage"]
    assert (g.status, g.failed_rules, g.expected, g.other) == (
        "CAUGHT",
        ["V2-R8", "V2-R10", "model"],
        ["V2-R8"],
        ["model"],
    )
    assert got["V2PrecopyIgnored"].status == "MISSED"
    assert got["V1ReservedJunk"].status == "MISSED"  # its rule's test passed
    # old behaviour: a DIRTY correct driver's report named no test and no message (CI of 2026-12-05: "model")
    assert why_bad([got["V1Driver"]]) == ["V1Driver DIRTY: test[hostA:V1Driver]: boom"]


def test_catalogue_inventory_pairs_every_variant(tmp_path: Path) -> None:
    defects = variants(["V1UnalignedDataOffset", "V2StopCopyNoEof"])
    assert [d.name for d in defects] == ["V1Driver", "V2Driver", "V1UnalignedDataOffset", "V2StopCopyNoEof"]
    doc = sim_inventory_doc(tmp_path / "sim", 2222, device_specs=[device_spec(d) for d in defects])
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(doc))
    inv = open_inventory(path)
    assert {p.id for p in inv.pairs} >= {"hostA->hostB:V2StopCopyNoEof", "hostB->hostA:V1Driver"}
    dev = inv.device("hostA:V1UnalignedDataOffset")
    assert dev.spec.options["mmap"] is True and dev.spec.protocol == "v1"  # type: ignore[union-attr]
    assert {c.value for c in inv.device("hostB:V2StopCopyNoEof").capabilities} == {"stop_copy", "p2p", "pre_copy"}


def test_small_catalogue_run(tmp_path: Path) -> None:
    """Two variants and the correct drivers through the real suite: caught, clean, table and files."""
    console = Console(record=True, width=200)
    rc = run_catalogue(
        console, ["V2StopCopyNoEof", "V1ReservedJunk"], report_dir=tmp_path / "reports", workdir=tmp_path / "work"
    )
    text = console.export_text()
    assert rc == 0, text
    data = json.loads((tmp_path / "reports" / "defect-catalogue.json").read_text())
    status = {v["variant"]: v["status"] for v in data["variants"]}
    assert status == {"V1Driver": "CLEAN", "V2Driver": "CLEAN", "V2StopCopyNoEof": "CAUGHT", "V1ReservedJunk": "CAUGHT"}
    caught = {v["variant"]: v for v in data["variants"]}["V2StopCopyNoEof"]
    assert "V2-R9" in caught["failed_rules"] and any("V2-R9" in t for t in caught["caught_by"])
    assert data["summary"]["counts"] == {"CAUGHT": 2, "CLEAN": 2} and data["summary"]["tests"] > 100
    md = (tmp_path / "reports" / "defect-catalogue.md").read_text()
    assert "| V2StopCopyNoEof | v2 | V2-R9 | V2-R9*" in md and "CAUGHT" in md
    assert "V1ReservedJunk" in text and "CAUGHT" in text and "CLEAN" in text
    # nothing outlives the run
    lab = SimLab(open_inventory(tmp_path / "work" / "defects.yaml"))
    assert all(pid is None for pid in lab.status().values())


def test_cli_names_unknown_variants() -> None:
    from click.testing import CliRunner

    from labs.cli import main

    result = CliRunner().invoke(main, ["defects", "V9Nonsense"])
    assert result.exit_code == 2
    assert "V9Nonsense" in result.output and "V2StopCopyNoEof" in result.output


def test_broken_is_never_caught() -> None:
    """An agent that died, or tests that only met infrastructure errors, judge nothing: BROKEN, even where
    a failing test carries the variant's rule; an infrastructure error alone never catches."""
    died, infra_only, lost = CATALOGUE["V2StopCopyNoEof"], CATALOGUE["V2FdSurvivesReset"], CATALOGUE["V1ReservedJunk"]
    timed_out, silent = CATALOGUE["V2CorruptsOnResume"], CATALOGUE["V2AcceptsTruncated"]
    outcomes = [
        _out("hostA:V2StopCopyNoEof", ["V2-R9"]),  # its rule failed ...
        replace(_out("hostA:V2StopCopyNoEof", ["V2-R3"]), infra=True, agent_died=True, message="agent exited (EOF)"),
        replace(_out("hostA:V2FdSurvivesReset", ["V2-R16"]), infra=True, message="SSHError: lost"),
        replace(_out("hostA:V2FdSurvivesReset", ["V2-R3"]), skipped=True, failed=False),
        replace(_out("hostA:V2CorruptsOnResume", ["V2-R13"]), infra=True, message="TestTimeout: past 300s"),
        _out("hostA:V2CorruptsOnResume", ["V2-R3"], failed=False),
        replace(_out("hostA:V2AcceptsTruncated", ["V2-R14"]), skipped=True, failed=False),
    ]
    got = {v.variant: v for v in judge([died, infra_only, lost, timed_out, silent], outcomes)}
    assert got["V2StopCopyNoEof"].status == "BROKEN"
    assert got["V2StopCopyNoEof"].reason == "its agent died in 1 of 2 tests, first: agent exited (EOF)"
    assert got["V2FdSurvivesReset"].status == "BROKEN"
    assert got["V2FdSurvivesReset"].reason.startswith("every test ended in an infrastructure error")
    assert (got["V1ReservedJunk"].status, got["V1ReservedJunk"].reason) == ("BROKEN", "no test ran on it")
    t = got["V2CorruptsOnResume"]  # one test passed, its rule's test timed out: not caught
    assert (t.status, t.failed_rules, t.infra, t.passed_rules) == (
        "MISSED",
        [],
        ["test[hostA:V2CorruptsOnResume]"],
        ["V2-R3"],
    )
    assert got["V2AcceptsTruncated"].reason == "no test ran on it (1 skipped)"


def test_outside_driver_without_a_rule_gets_a_plain_verdict() -> None:
    plain = OutsideDriver("Acme", "", "v2", "acme:Acme", "acme's model")
    clean = OutsideDriver("Tidy", "", "v2", "acme:Tidy", "acme's other model")
    outcomes = [
        _out("hostA:Acme", ["V2-R9"]),
        _out("hostA:Acme", ["V2-R3"], failed=False),
        _out("hostA:Acme", ["V2-R16"], failed=False),
        _out("hostA:Tidy", ["V2-R3"], failed=False),
    ]
    verdicts = judge([plain, clean], outcomes)
    assert [(v.status, v.failed_rules, v.passed_rules) for v in verdicts] == [
        ("FAILED", ["V2-R9"], ["V2-R3", "V2-R16"]),
        ("PASSED", [], ["V2-R3"]),
    ]
    assert plain_lists(verdicts)[0] == "Acme (acme:Acme): rules failed: V2-R9; rules passed: V2-R3, V2-R16"


def test_junit_infrastructure_errors_and_agent_deaths(tmp_path: Path) -> None:
    props = '<properties><property name="device" value="hostA:X"/><property name="rule" value="V2-R3"/></properties>'
    died = "labs.vfio.client.AgentInfraError: hostA: agent exited (EOF)\nagent stderr:\nTraceback (most recent call)"
    trace = "E   AgentInfraError: hostA: agent exited (EOF)\nE   agent stderr:\nE   ZeroDivisionError: oops"
    setup = 'failed on setup with "labs.errors.SSHError: hostA: gone"'
    # the traceback shows the client's source, which spells out what an agent death says
    source = (
        '        if not data:\n            raise self._fail("agent exited (EOF)")\nE   AgentOSError: v1_write: EBUSY'
    )
    (tmp_path / "j.xml").write_text(
        "<testsuites><testsuite>"
        f'<testcase classname="s" name="dies">{props}'
        f'<failure message="{escape(died, {chr(10): "&#10;"})}">{escape(trace)}</failure></testcase>'
        f'<testcase classname="s" name="setup"><error message={quoteattr(setup)}/></testcase>'
        '<testcase classname="s" name="finding"><failure message="AssertionError: ended with error"/></testcase>'
        '<testcase classname="s" name="refused"><failure message="labs.vfio.client.AgentOSError: EBUSY">'
        f"{escape(source)}</failure></testcase>"
        "</testsuite></testsuites>"
    )
    dies, setup_error, finding, refused = read_junit(tmp_path / "j.xml")
    assert (dies.infra, dies.agent_died, dies.rules) == (True, True, ["V2-R3"])
    assert dies.message == "labs.vfio.client.AgentInfraError: hostA: agent exited (EOF) (ZeroDivisionError: oops)"
    assert (setup_error.infra, setup_error.agent_died) == (True, False)
    assert (finding.infra, finding.agent_died) == (False, False)
    assert (refused.infra, refused.agent_died) == (False, False)
