"""`lab certify` on the sim lab: the correct v2 driver passes; a seeded defect fails, naming its rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from labs.certify.run import certify, verify
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


def test_correct_driver_is_certified(inventory: Path, tmp_path: Path) -> None:
    rc, doc, text = _certify(inventory, "hostA:simv2", tmp_path)
    assert rc == 0 and doc["verdict"] == "pass", text
    verdicts = {r["rule"]: r["verdict"] for r in doc["rules"]}
    assert verdicts["V2-R16"] == "pass" and verdicts["V2-R20"] == "not-applicable", verdicts
    assert doc["identity"]["driver"] == "labs.sim.v2:V2Driver"
    assert doc["scenarios"], "no VM-level scenario results in the certification"


def test_defect_driver_fails_naming_the_rule(inventory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the conformance suite is enough to show the broken rule; the scenarios would only repeat the pass above
    monkeypatch.setenv("LABS_MODEL_SHRINK", "0")  # the state machine's failing walk, unshrunk: faster, still a fail
    rc, doc, text = _certify(inventory, "hostA:bad", tmp_path, "-m", "conformance")
    assert rc == 1 and doc["verdict"] == "fail", text
    assert doc["blocking_rules"] == ["V2-R16"], doc["blocking_rules"]
    assert "V2-R16" in text
