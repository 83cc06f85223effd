"""One report over several labs' runs: split by Allure environment (one per lab), each lab's gates in the
report's quality-gate tab; and a single run's gates in that tab too."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from labs.errors import ConfigError
from labs.reporting.merge import merge

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="rendering needs Node.js (./lab installs it)")


def _run(run_dir: Path, lab: str | None, tests: dict[str, str], failed_gate: str | None = None) -> Path:
    results = run_dir / "allure-results"
    results.mkdir(parents=True)
    for name, status in tests.items():
        labels = [{"name": "lab", "value": lab}] if lab else []
        doc = {"uuid": str(uuid.uuid4()), "historyId": name, "testCaseId": name, "name": name, "fullName": name,
               "status": status, "labels": labels, "start": 1, "stop": 2}  # fmt: skip
        (results / f"{doc['uuid']}-result.json").write_text(json.dumps(doc))
    failed = [{"gate": "max_failures", "detail": failed_gate}] if failed_gate else []
    gates = {"min_passed": 1, "min_tests": 0, "max_failures": 0, "must_rules": True, "max_duration_s": None}
    (run_dir / "gates.json").write_text(json.dumps({"gates": gates, "failed": failed}))
    return run_dir


def test_runs_of_two_labs_make_one_report_split_by_lab(tmp_path: Path) -> None:
    alpha = _run(tmp_path / "a", "alpha", {"test_alpha_passes": "passed", "test_alpha_fails": "failed"}, "1 failed")
    beta = _run(tmp_path / "b", "beta", {"test_beta_passes": "passed"})
    rendered = merge([alpha, beta], tmp_path / "merged")
    widgets = rendered.html.parent / "widgets"
    envs = {e["name"] for e in json.loads((widgets / "environments.json").read_text())}
    assert {"alpha", "beta"} <= envs, envs
    assert "test_alpha_fails" in (widgets / "alpha" / "tree.json").read_text()
    assert "test_alpha_fails" not in (widgets / "beta" / "tree.json").read_text()
    assert "test_beta_passes" in (widgets / "beta" / "tree.json").read_text()
    gates = json.loads((widgets / "quality-gate.json").read_text())
    failed = {env: [g["rule"] for g in results if not g["success"]] for env, results in gates.items()}
    assert failed == {"alpha": ["lab.gates.max_failures"], "beta": []}, gates
    assert any(g["message"] == "1 failed" for g in gates["alpha"])
    config = (tmp_path / "merged" / "allurerc.mjs").read_text()
    assert "config.environments" in config and '"alpha"' in config and "matcher" in config


def test_a_run_whose_results_name_no_lab_is_a_one_line_error(tmp_path: Path) -> None:
    alpha = _run(tmp_path / "a", "alpha", {"test_x": "passed"})
    old = _run(tmp_path / "old", None, {"test_x": "passed"})
    with pytest.raises(ConfigError, match=r"old: its results name no lab"):
        merge([alpha, old], tmp_path / "merged")
    with pytest.raises(ConfigError, match=r"not a run directory"):
        merge([alpha, tmp_path / "nothing"], tmp_path / "merged")


def test_the_gates_are_on_the_reports_quality_gate_tab_in_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (./lab test installs it as root)")
    from labs.inventory.models import Gates
    from labs.reporting.gates import GateFailure, allure_results
    from labs.reporting.render import render
    from tests.test_report import _chromium_dom

    run_dir = _run(tmp_path / "run", "alpha", {"test_skipped": "skipped"})
    failures = [GateFailure("min_passed", "0 passed of 1 (1 skipped), at least 1 required")]
    rendered = render(run_dir, "labs gates test", quality_gate=allure_results(Gates(max_duration_s=60), failures))
    wanted = ("lab.gates.min_passed", "0 passed of 1 (1 skipped), at least 1 required", "lab.gates.max_duration_s")
    dom = _chromium_dom(chromium, rendered.single.as_uri() + "#/qualityGate", tmp_path / "chromium", until=wanted[:1])
    for text in wanted:
        assert text in dom, f"{text!r} not on the quality-gate tab: {dom[-2000:]}"
