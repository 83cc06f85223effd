"""`lab certify`: a sim device (which cannot migrate) is INCOMPLETE, naming live migration; a seeded defect
fails, naming its rule; a results set where every MUST rule and required scenario passed is PASS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from labs.certify.certification import build_document, certify, verify
from labs.certify.policy import SCENARIOS, policy_for
from labs.certify.results import TestResult as Result
from labs.inventory import LabDevice
from labs.paths import SUITES
from labs.plugin.allure_hooks import FEATURES
from labs.session import open_inventory
from tests.conftest import write_sim_inventory

DEFECT = "labs.sim.defects:V2FdSurvivesReset"  # breaks V2-R16 (a MUST rule), nothing else


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_sim_inventory(tmp_path_factory.mktemp("certify"), devices=True)
    doc = yaml.safe_load(path.read_text())
    for host in doc["hosts"].values():
        good = next(d for d in host["devices"] if d["name"] == "simv2")
        # a new list per host: the generated document may share one between hosts
        host["devices"] = [*host["devices"], {**good, "name": "bad", "model": "labs-sim-v2-bad", "driver": DEFECT}]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _certify(inventory: Path, device: str, out: Path, *args: str) -> tuple[int, dict, str]:
    console = Console(record=True, width=160)
    rc = certify(inventory, device, ["-n", "2", *args], console, reports=out)
    (run_dir,) = out.glob("certify-*")
    assert verify(run_dir / "certification.json"), "the digest does not match the document"
    md = (run_dir / "certification.md").read_text()
    return rc, json.loads((run_dir / "certification.json").read_text()), md + console.export_text()


def test_sim_device_is_incomplete_naming_live_migration(inventory: Path, tmp_path: Path) -> None:
    rc, doc, text = _certify(inventory, "hostA:simv2", tmp_path)
    assert rc == 3 and doc["verdict"] == "incomplete", text
    verdicts = {r["rule"]: r["verdict"] for r in doc["rules"]}
    assert verdicts["V2-R16"] == "pass" and verdicts["V2-R20"] == "not-applicable", verdicts
    scenarios = {r["scenario"]: r for r in doc["required_scenarios"]}
    live = scenarios["live migration both ways"]
    assert live["verdict"] == "not-run" and "cannot migrate" in live["reason"], live
    # test:/// runs no QEMU: a VM save/restore never touches the device, so it did not run as a scenario
    save = scenarios["save/restore"]
    assert save["verdict"] == "not-run" and "test:///" in save["reason"], save
    assert scenarios["ERROR recovery by reset"]["verdict"] == "pass", scenarios["ERROR recovery by reset"]
    assert "not run: live migration both ways" in text and "certification INCOMPLETE" in text, text
    assert doc["identity"]["driver"] == "labs.sim.v2:V2Driver"


def test_defect_driver_fails_naming_the_rule(inventory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the conformance suite is enough to show the broken rule; the scenarios would only repeat the pass above
    monkeypatch.setenv("LABS_MODEL_SHRINK", "0")  # the state machine's failing walk, unshrunk: faster, still a fail
    rc, doc, text = _certify(inventory, "hostA:bad", tmp_path, "-m", "conformance")
    assert rc == 1 and doc["verdict"] == "fail", text
    assert doc["blocking_rules"] == ["V2-R16"], doc["blocking_rules"]
    assert "V2-R16" in text


def _device(inventory: Path) -> LabDevice:
    return open_inventory(inventory).device("hostA:simv2")


def _passing(device: LabDevice) -> list[Result]:
    """One passed test per rule and per required scenario: what a device that did everything leaves."""
    about = (device.id,)
    rules = [Result(f"test_{p.rule}", p.rule, "passed", "", (p.rule,), "Device conformance", devices=about)
             for p in policy_for("v2")]  # fmt: skip
    scenarios = [Result(f"test_{s.story}", s.story, "passed", "", (), s.feature, story=s.story, devices=about)
                 for s in SCENARIOS]  # fmt: skip
    return rules + scenarios


def test_everything_passed_is_pass(inventory: Path) -> None:
    device = _device(inventory)
    doc = build_document(device, _passing(device), {}, "run-1")
    assert doc["verdict"] == "pass" and not doc["not_run"], doc["not_run"]


def test_a_must_rule_failing_is_fail(inventory: Path) -> None:
    device = _device(inventory)
    results = [r if r.full_name != "V2-R16" else Result(r.name, r.full_name, "failed", "boom", r.rules, r.feature,
               devices=r.devices) for r in _passing(device)]  # fmt: skip
    doc = build_document(device, results, {}, "run-1")
    assert doc["verdict"] == "fail" and doc["blocking_rules"] == ["V2-R16"], doc


def test_a_skipped_must_rule_or_scenario_is_incomplete_with_its_reason(inventory: Path) -> None:
    device = _device(inventory)
    skipped = {"V2-R3", "managed save then start"}
    results = [
        Result(r.name, r.full_name, "skipped", "Skipped: no disk here", r.rules, r.feature, story=r.story,
                   devices=r.devices) if r.full_name in skipped else r
        for r in _passing(device)
    ]  # fmt: skip
    doc = build_document(device, results, {}, "run-1")
    assert doc["verdict"] == "incomplete", doc
    assert {n["what"]: n["reason"] for n in doc["not_run"]} == {
        "V2-R3": "1 skipped: no disk here",
        "managed save": "1 skipped: no disk here",
    }
    # a scenario nobody ran at all is missing as well, not passed by omission
    doc = build_document(device, [r for r in _passing(device) if r.story != "migrate and back"], {}, "run-1")
    assert doc["verdict"] == "incomplete" and doc["not_run"][0]["what"] == "live migration both ways", doc["not_run"]


def test_policy_scenarios_name_real_tests() -> None:
    """A renamed test would leave its scenario 'not tested' forever: each story must be a test of its suite."""
    suite_of = {feature: suite for suite, feature in FEATURES.items()}
    for s in SCENARIOS:
        suite = SUITES / suite_of[s.feature]
        name = "def test_" + s.story.replace(" ", "_") + "("
        assert any(name in p.read_text() for p in suite.glob("test_*.py")), f"{s.scenario}: no {name} in {suite}"
