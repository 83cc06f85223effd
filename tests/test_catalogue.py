"""The seeded-defect catalogue runner: verdicts from results, and one small real run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from rich.console import Console

from labs.conformance.catalogue import Outcome, device_spec, judge, run_catalogue, variants
from labs.runtime import open_inventory
from labs.sim.defects import CATALOGUE, CORRECT
from labs.simlab.generate import sim_inventory_doc
from labs.simlab.lab import SimLab


def _out(device: str, rules: list[str], failed: bool = True) -> Outcome:
    return Outcome(nodeid=f"suites/x.py::test[{device}]", failed=failed, skipped=False, devices=[device], rules=rules)


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
