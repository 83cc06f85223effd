"""Quality gates from `lab.gates`: each one turns a run red and says so in one line; the defaults keep a
run with passes and no failures green."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rich.console import Console

from labs.certify.results import TestResult as Result
from labs.errors import ConfigError
from labs.inventory.models import Gates
from labs.reporting.gates import evaluate
from labs.reporting.suiterun import run_suites
from labs.session import open_inventory
from tests.conftest import write_sim_inventory


def _r(status: str, *rules: str, name: str = "test_x") -> Result:
    return Result(name, name, status, "", rules, "Device conformance")


def _gates(failures: list) -> list[str]:
    return [f.gate for f in failures]


def test_defaults_pass_a_run_with_passes_and_skips() -> None:
    assert evaluate(Gates(), [_r("passed"), _r("skipped")], 10.0) == []


def test_all_skipped_or_empty_is_red_by_default() -> None:
    (failure,) = evaluate(Gates(), [_r("skipped"), _r("skipped")], 1.0)
    assert failure.gate == "min_passed" and "0 passed of 2 (2 skipped)" in failure.line(), failure.line()
    assert _gates(evaluate(Gates(), [], 1.0)) == ["min_passed"]


def test_each_gate_names_itself() -> None:
    gates = Gates(min_tests=5, max_failures=1, max_duration_s=60)
    results = [_r("passed"), _r("failed", "V2-R16", name="test_reset"), _r("broken")]
    failures = evaluate(gates, results, 61.0)
    assert _gates(failures) == ["min_tests", "max_failures", "must_rules", "max_duration_s"], failures
    lines = "\n".join(f.line() for f in failures)
    assert "lab.gates.must_rules failed: MUST rule failing: V2-R16 (test_reset)" in lines, lines
    assert "3 tests, the lab expects at least 5" in lines and "the run took 61 s, at most 60 s" in lines, lines


def test_a_should_rule_failing_passes_the_must_gate_and_limits_relax() -> None:
    gates = Gates(max_failures=1)
    assert evaluate(gates, [_r("passed"), _r("failed", "V2-R5")], 1.0) == []  # V2-R5 is a SHOULD rule
    assert _gates(evaluate(gates, [_r("passed"), _r("failed", "V2-R6")], 1.0)) == ["must_rules"]
    assert evaluate(Gates(min_passed=0), [_r("skipped")], 1.0) == []


def test_bad_gates_are_one_line_errors(tmp_path: Path) -> None:
    path = write_sim_inventory(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["lab"]["gates"] = {"min_passed": -1}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"lab\.gates\.min_passed") as exc:
        open_inventory(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)
    doc["lab"]["gates"] = {"max_runtime": 5}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"max_runtime"):
        open_inventory(path)


def test_an_all_skipped_run_exits_non_zero_naming_the_gate(tmp_path: Path) -> None:
    suite = tmp_path / "suite" / "test_all_skip.py"
    suite.parent.mkdir()
    suite.write_text("import pytest\n\n@pytest.mark.skip(reason='lab is dead')\ndef test_one():\n    pass\n")
    console = Console(record=True, width=200)
    rc = run_suites(write_sim_inventory(tmp_path), str(suite), [], console, reports=tmp_path / "reports")
    text = console.export_text()
    assert rc == 1, text
    assert "gate lab.gates.min_passed failed: 0 passed of 1 (1 skipped), at least 1 required" in text, text
    assert (tmp_path / "reports" / "latest" / "gates.json").exists()
