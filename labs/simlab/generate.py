"""Sim inventories of any size: N host pairs on consecutive loopback addresses.

Benchmarks (xdist scaling over 1, 2, 4 pairs) and the framework's tests use
them; every host gets the devices both hosts of the embedded sim lab have, and
with `flag_sets` the first host of each pair also gets hostA's small devices of
the other flag sets (v2 STOP_COPY, +P2P, +PRE_COPY; v1 without pre-copy data),
unless a list of device specs is given (the seeded-defect catalogue puts one
device per driver variant on every host, so same-named devices pair up across
hosts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from labs.paths import SIM_INVENTORY


def sim_inventory_doc(
    sim_dir: Path,
    port: int,
    pairs: int = 1,
    devices: bool = True,
    name: str = "sim-generated",
    device_specs: list[dict[str, Any]] | None = None,
    flag_sets: bool = False,
) -> dict[str, Any]:
    """`device_specs`: inventory device entries for every host instead of the embedded lab's."""
    base = yaml.safe_load(SIM_INVENTORY.read_text())
    template = base["hosts"]["hostA"]
    side_b = {d["name"] for d in base["hosts"]["hostB"]["devices"]}
    both = [d for d in base["hosts"]["hostA"]["devices"] if d["name"] in side_b]
    per_side = [base["hosts"]["hostA"]["devices"] if flag_sets else both, both]
    if device_specs is not None:
        both = [dict(d) for d in device_specs]
        per_side = [both, both]
    hosts: dict[str, Any] = {}
    for i in range(2 * pairs):
        # hostA/hostB for one pair, like the embedded lab; p<k>a/p<k>b beyond
        host = ("hostA", "hostB")[i] if pairs == 1 else f"p{i // 2 + 1}{'ab'[i % 2]}"
        spec = {
            "address": f"127.0.0.{2 + i}",
            "port": port,
            "user": template["user"],
            "identity_file": f"{sim_dir}/id_ed25519",
            "known_hosts": f"{sim_dir}/known_hosts",
            "python": template["python"],
            "libvirt_uri": f"test://{sim_dir}/hosts/{host}/libvirt-node.xml",
        }
        if devices:
            spec["devices"] = per_side[i % 2]
        hosts[host] = spec
    lab = {"name": name, "sim": {"dir": str(sim_dir)}, "timeouts": base["lab"]["timeouts"]}
    doc: dict[str, Any] = {"lab": lab, "hosts": hosts}
    if pairs > 1:
        # pair hosts within their pair only, so pairs are independent units of work
        names = list(hosts)
        doc["pairs"] = [
            {"source": f"{src}:{d['name']}", "destination": f"{dst}:{d['name']}"}
            for k in range(pairs)
            for src, dst in ((names[2 * k], names[2 * k + 1]), (names[2 * k + 1], names[2 * k]))
            for d in (both if devices else [])
        ]
    return doc


def write_sim_inventory(
    path: Path,
    sim_dir: Path,
    port: int,
    pairs: int = 1,
    devices: bool = True,
    device_specs: list[dict[str, Any]] | None = None,
    name: str = "sim-generated",
    flag_sets: bool = False,
) -> Path:
    doc = sim_inventory_doc(sim_dir, port, pairs, devices, name=name, device_specs=device_specs, flag_sets=flag_sets)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
