"""xdist workers get whole device groups: no device is used by two workers of one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from labs.inventory.loader import load_inventory
from labs.xdist_groups import device_groups, group_of, id_pattern
from tests.conftest import write_sim_inventory

PCI_LAB = """
lab: {name: groups}
hosts:
  a:
    address: 10.0.0.1
    devices:
      - {kind: pci, pci: "0000:65:00.0", model: nic, protocol: v2}
      - {kind: pci, pci: "0000:65:00.1", model: nic, protocol: v2}
  b:
    address: 10.0.0.2
    devices:
      - {kind: pci, pci: "0000:65:00.0", model: nic, protocol: v2}
pairs:
  - {source: "a:0000:65:00.0", destination: "b:0000:65:00.0"}
"""

PROBE = """
import json, os

def _log(*ids):
    with open(os.environ["PROBE_LOG"], "a") as f:
        f.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER"), "devices": ids}) + "\\n")

def test_device(device):
    _log(device.id)

def test_pair(pair):
    _log(pair.source.id, pair.destination.id)
"""


def test_groups_follow_pairs_and_ids_with_colons(tmp_path: Path) -> None:
    (tmp_path / "groups.yaml").write_text(PCI_LAB)
    inv = load_inventory(tmp_path / "groups.yaml", check_files=False)
    groups = device_groups(inv)
    assert groups["a:0000:65:00.0"] == groups["b:0000:65:00.0"] == groups["a->b:0000:65:00.0"]
    assert groups["a:0000:65:00.1"] != groups["a:0000:65:00.0"]
    pat = id_pattern(groups)
    assert group_of("s.py::t[a:0000:65:00.1-V2-R3]", pat, groups) == "lab-group a:0000:65:00.1"
    assert group_of("s.py::t[a->b:0000:65:00.0]", pat, groups) == group_of("s.py::t[b:0000:65:00.0]", pat, groups)
    assert group_of("s.py::t[a]", pat, groups) == "s.py::t[a]"  # host-level: its own unit
    assert group_of("s.py::t", pat, groups) == "s.py::t"


def test_xdist_workers_never_share_a_device(tmp_path: Path) -> None:
    inventory = write_sim_inventory(tmp_path, devices=True, pairs=2)
    probe = tmp_path / "probe" / "test_probe.py"
    probe.parent.mkdir()
    probe.write_text(PROBE)
    log = tmp_path / "log.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("LABS_RUN_ID", "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}
    env["PROBE_LOG"] = str(log)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", str(probe), "--inventory", str(inventory), "-n", "2",
             "-p", "no:cacheprovider"],
            cwd=probe.parent, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        down = [str(Path(sys.executable).with_name("lab")), "sim", "down", "--inventory", str(inventory)]
        subprocess.run(down, capture_output=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 8 + 8  # 8 devices; 8 pairs (both directions of 2 devices on 2 host pairs)
    workers_of: dict[str, set[str]] = {}
    for line in lines:
        for dev in line["devices"]:
            workers_of.setdefault(dev, set()).add(line["worker"])
    shared = {d: w for d, w in workers_of.items() if len(w) > 1}
    assert not shared, f"devices used by more than one worker: {shared}"
    assert {line["worker"] for line in lines} == {"gw0", "gw1"}
