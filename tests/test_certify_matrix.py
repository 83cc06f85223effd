"""`lab certify`'s source x destination matrix: a verdict per pair of the model, with each end's software."""

from __future__ import annotations

import textwrap
from pathlib import Path

from labs.certify.certification import build_document, digest, markdown
from labs.certify.matrix import markdown_lines
from labs.certify.results import TestResult as Result
from labs.inventory import load_inventory

INVENTORY = """
hosts:
  a:
    address: 10.0.0.1
    devices: [{kind: pci, pci: "0000:65:00.1", name: vf, model: nic, protocol: v2}]
  b:
    address: 10.0.0.2
    devices: [{kind: pci, pci: "0000:65:00.1", name: vf, model: nic, protocol: v2}]
  c:
    address: 10.0.0.3
    devices: [{kind: pci, pci: "0000:65:00.1", name: vf, model: nic, protocol: v2}]
"""
ENV = {"a.kernel": "6.12.1", "b.kernel": "6.13.0", "a.libvirt": "libvirt 10.10.0", "a.vf.driver": "pci"}


def _result(name: str, pair: str, status: str, message: str = "") -> Result:
    return Result(name, name, status, message, (), "Live migration", parameters={"pair": pair})


def test_each_pair_of_the_model_gets_a_verdict_and_both_ends_software(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(textwrap.dedent(INVENTORY))
    inv = load_inventory(path)
    device = inv.device("a:vf")
    results = [
        _result("test_migrate_and_back", "a->b:vf", "passed"),
        _result("test_parallel_connections", "a->b:vf", "passed"),
        _result("test_migrate_and_back", "a->c:vf", "failed", "boom"),
        _result("test_migrate_and_back", "b->a:vf", "skipped", "b: libvirt cannot live-migrate\nmore"),
        Result("test_x", "test_x", "failed", "", (), "Device conformance", parameters={"pair": "c->a:vf"}),
    ]
    doc = build_document(device, results, ENV, "run-1", inv.pairs)
    cells = {(c["source"], c["destination"]): c for c in doc["matrix"]}
    assert len(cells) == 6  # every ordered pair of the three hosts
    assert cells[("a:vf", "b:vf")]["verdict"] == "pass" and cells[("a:vf", "b:vf")]["tests"] == {"passed": 2}
    assert cells[("a:vf", "c:vf")]["verdict"] == "fail" and "test_migrate_and_back" in cells[("a:vf", "c:vf")]["reason"]
    assert cells[("b:vf", "a:vf")]["verdict"] == "not-run"
    assert cells[("b:vf", "a:vf")]["reason"] == "b: libvirt cannot live-migrate"
    assert cells[("c:vf", "a:vf")]["verdict"] == "untested"  # a conformance result is no migration
    assert cells[("a:vf", "b:vf")]["source_software"] == {"kernel": "6.12.1", "libvirt": "libvirt 10.10.0",
                                                          "driver": "pci"}  # fmt: skip
    assert cells[("a:vf", "b:vf")]["destination_software"]["kernel"] == "6.13.0"
    assert doc["digest"] == digest(doc)  # the matrix is part of what the digest covers
    md = markdown(doc)
    assert "| a:vf | — | pass | fail |" in md and "## Source x destination" in md


def test_no_pair_of_the_model() -> None:
    assert markdown_lines([]) == ["no migration pair of this model in the inventory"]
