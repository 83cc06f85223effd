"""Round trips resume into another device: the peer rule of suites/conformance, end to end.

A resume that writes nothing passed V2-R13 while the peer was the device under test
itself (it already held the content); with a distinct peer, seeded apart, it fails.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from labs.conformance.catalogue import Outcome, correct_peers, device_spec, read_junit
from labs.paths import REPO_ROOT, SUITES
from labs.reservations import reserve
from labs.session import LabSession, open_inventory
from labs.sim.defects import CATALOGUE, CORRECT
from labs.simlab import generate
from labs.simlab.lifecycle import SimLab
from suites.conformance.conftest import peer_of
from tests.conftest import free_port


def _inventory(tmp_path: Path, lonely: bool = False) -> Path:
    """hostA: a resume that writes nothing and the correct driver (hostB: correct copies of both);
    with `lonely`, hostA also has a device of a model no other device has."""
    specs = [device_spec(CORRECT["v2"]), device_spec(CATALOGUE["V2ResumeWritesNothing"])]
    path = correct_peers(
        generate.write_sim_inventory(tmp_path / "inv.yaml", tmp_path / "sim", free_port(), device_specs=specs)
    )
    if lonely:
        doc = yaml.safe_load(path.read_text())
        alone = {**device_spec(CORRECT["v2"]), "name": "lonely", "model": "nobody-else"}
        doc["hosts"]["hostA"]["devices"] = [*doc["hosts"]["hostA"]["devices"], alone]
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_catalogue_peers_run_the_correct_driver(tmp_path: Path) -> None:
    inv = open_inventory(_inventory(tmp_path))
    variant = inv.device("hostA:V2ResumeWritesNothing")
    assert variant.spec.driver == CATALOGUE["V2ResumeWritesNothing"].driver  # type: ignore[union-attr]
    peer = peer_of(inv, variant)
    assert peer is not None and peer.id == "hostB:V2ResumeWritesNothing"
    assert peer.spec.driver == CORRECT["v2"].driver  # type: ignore[union-attr]


def test_peer_is_the_pair_partner_else_another_device_of_the_model_else_none(tmp_path: Path) -> None:
    inv = open_inventory(_inventory(tmp_path, lonely=True))
    # explicit pairs may leave a device unpaired: then another device of its model, on any host
    unpaired = type(inv)(inv.file, inv.settings, inv.hosts, inv.devices, (), inv.shape)
    dev = inv.device("hostA:V2Driver")
    assert (p := peer_of(inv, dev)) is not None and p.id == "hostB:V2Driver"
    assert (p := peer_of(unpaired, dev)) is not None and p.id == "hostB:V2Driver" and p.id != dev.id
    assert peer_of(inv, inv.device("hostA:lonely")) is None


def _run_v2_r13(
    tmp_path: Path, inventory: Path, *options: str, stop: bool = True
) -> tuple[dict[str, Outcome], list[str], str]:
    """suites/conformance V2-R13 on hostA's devices: outcomes by device, skip reasons, pytest's output."""
    junit = tmp_path / "junit.xml"
    cmd = [
        sys.executable, "-m", "pytest", str(SUITES / "conformance" / "test_rules.py"), f"--inventory={inventory}",
        f"--junitxml={junit}", "-p", "no:cacheprovider", "-p", "no:randomly", "-q", "--lab-no-doctor",
        "-k", "test_v2_rule and hostA and V2-R13", *options,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    finally:
        if stop:
            SimLab(open_inventory(inventory)).stop(force=True)
    reasons = [s.get("message", "") for s in ET.parse(junit).getroot().iter("skipped")]
    return {o.devices[0]: o for o in read_junit(junit)}, reasons, proc.stdout[-3000:]


def test_a_resume_that_writes_nothing_fails_v2_r13_through_the_suite(tmp_path: Path) -> None:
    outcomes, reasons, out = _run_v2_r13(tmp_path, _inventory(tmp_path, lonely=True), "--lab-no-reserve")
    assert set(outcomes) == {"hostA:V2Driver", "hostA:V2ResumeWritesNothing", "hostA:lonely"}, out
    assert outcomes["hostA:V2ResumeWritesNothing"].failed
    assert "resumed content differs" in outcomes["hostA:V2ResumeWritesNothing"].message
    assert not outcomes["hostA:V2Driver"].failed and not outcomes["hostA:V2Driver"].skipped
    assert outcomes["hostA:lonely"].skipped
    assert reasons == ["hostA:lonely has no peer: no pair partner and no other nobody-else device"], reasons


def test_the_peer_is_reserved_like_the_device_under_test(tmp_path: Path) -> None:
    inventory = _inventory(tmp_path)
    inv = open_inventory(inventory)
    peer = inv.device("hostB:V2ResumeWritesNothing")
    try:
        with LabSession(inv) as session:
            held = reserve(session.ssh(peer.host.name), peer, session.run_id, wait=0, expires_in=300)
            try:
                outcomes, reasons, out = _run_v2_r13(tmp_path, inventory, "--lab-reserve-wait=0", stop=False)
            finally:
                held.release()
    finally:
        SimLab(inv).stop(force=True)
    assert not outcomes["hostA:V2Driver"].failed and not outcomes["hostA:V2Driver"].skipped, out
    busy = outcomes["hostA:V2ResumeWritesNothing"]
    assert busy.skipped and not busy.failed, out
    assert len(reasons) == 1 and reasons[0].startswith(f"peer {peer.id} is busy"), reasons
