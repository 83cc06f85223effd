"""Known issues: a tracked bug's failures are known (terminal, Allure), fail no gate, and an issue whose
tests pass again is reported as fixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from labs.certify.results import TestResult as Result
from labs.errors import ConfigError
from labs.inventory.models import Gates
from labs.reporting import known
from labs.reporting.gates import evaluate
from labs.reporting.suiterun import run_suites
from labs.session import open_inventory
from tests.conftest import write_sim_inventory

ISSUES = """
issues:
  - id: LABS-7
    title: V2 driver keeps the fd open across reset
    link: https://bugs.example.com/show_bug.cgi?id=7
    models: [labs-sim-v2]
    rules: [V2-R16]
  - id: LABS-9
    title: the destination refuses the stream
    link: https://bugs.example.com/browse/LABS-9
    tests: ["test_known_failure*"]
"""


def _r(status: str, name: str, *rules: str, device: str = "hostA:simv2") -> Result:
    return Result(name, name, status, "", rules, "Device conformance", devices=(device,), test_case_id=name)


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    path = write_sim_inventory(tmp_path, devices=True)
    (tmp_path / "known-issues.yaml").write_text(ISSUES)
    doc = yaml.safe_load(path.read_text())
    doc["lab"]["known_issues"] = "known-issues.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_known_failures_fail_no_gate_and_fixed_issues_are_named(inventory: Path) -> None:
    inv = open_inventory(inventory)
    issues = known.for_inventory(inv)
    results = [_r("passed", "test_other"), _r("failed", "test_rule[V2-R16]", "V2-R16"),
               _r("failed", "test_rule[V1-R9]", "V2-R16", device="hostA:simv1"),  # another model: not covered
               _r("passed", "test_known_failure[a]")]  # fmt: skip
    seen = known.classify(issues, results, inv)
    assert [r.name for r in known.known_failures(seen)] == ["test_rule[V2-R16]"]
    gates = evaluate(Gates(), results, 1.0, known.known_failures(seen))
    assert [g.gate for g in gates] == ["max_failures", "must_rules"] and "V1-R9" in gates[1].line(), gates
    text = "\n".join(known.lines(seen))
    assert "known issue LABS-7 (https://bugs.example.com/show_bug.cgi?id=7): 1 failed" in text, text
    assert "known issue LABS-9 looks fixed: its 1 test(s) passed" in text, text
    resolutions = known.allure_resolutions(seen)
    assert resolutions is not None and resolutions["rules"][0]["testCaseId"] == ["test_rule[V2-R16]"]
    assert resolutions["links"]["known-0"]["urlTemplate"] == "https://bugs.example.com/show_bug.cgi?id=%s"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("issues:\n  - {id: A-1, title: t, link: https://x/1}\n", "issues[0]: an issue needs 'tests' or 'rules'"),
        ("issues:\n  - {id: A-1, title: t, link: ftp://x/1, rules: [V2-R1]}\n", "issues[0].link: String should match"),
        ("issues:\n  - {id: A-1, title: t, link: https://x/1, rules: [V2-R1], test: [x]}\n", "issues[0].test"),
    ],
)
def test_a_bad_known_issues_file_is_one_line(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "known.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        known.load(path)
    assert str(exc.value).startswith(f"{path}:2: {problem}") and "\n" not in str(exc.value), str(exc.value)


SUITE = """
def test_passes():
    pass

def test_known_failure():
    assert 1 == 2, "the destination refused the stream"
"""


def test_a_known_issue_turns_a_red_run_green(inventory: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite" / "test_known.py"
    suite.parent.mkdir()
    suite.write_text(SUITE)
    console = Console(record=True, width=200)
    rc = run_suites(inventory, str(suite), [], console, reports=tmp_path / "reports")
    text = console.export_text()
    assert rc == 0, text
    assert "known issue LABS-9 (https://bugs.example.com/browse/LABS-9): 1 failed" in text, text
    assert "(pytest exit 1)" in text and "gate " not in text, text
    run_dir = (tmp_path / "reports" / "latest").resolve()
    assert json.loads((run_dir / "gates.json").read_text())["known_issues"]["LABS-9"]["failed"] == [
        "test_known_failure"
    ]
    rc_config = (run_dir / "allurerc.mjs").read_text()  # the Allure config module labs writes
    assert '"resolution": "issue"' in rc_config and '"id": "LABS-9"' in rc_config, rc_config
    rendered = run_dir / "html" / "awesome" / "data" / "test-results"
    if rendered.is_dir():  # Allure shows the failure under its issue
        assert any('"resolution":"issue"' in p.read_text() for p in rendered.glob("*.json"))
