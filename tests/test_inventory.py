"""Inventories: good files load into typed objects; every bad one fails in one line."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labs.errors import ConfigError
from labs.inventory import InventoryError, load_inventory
from labs.inventory.models import Capability, HostKeyPolicy
from labs.paths import INVENTORIES

GOOD = """
lab: {name: l1, timeouts: {connect: 3}}
hosts:
  a:
    address: 10.0.0.1
    devices:
      - {kind: pci, pci: "0000:65:00.0", model: nic, protocol: v2}
      - {kind: mdev, name: mtty-2, parent: mtty, type: mtty-2, uuid: 7e8b6c2a-1f1c-4b4e-9a56-2f4f6f1d0a01,
         protocol: v2, capabilities: [stop_copy, pre_copy]}
  b:
    address: 10.0.0.2
    port: 2200
    jump: a
    devices:
      - {kind: pci, pci: "0000:65:00.0", model: nic, protocol: v2}
      - {kind: mdev, name: mtty-2, parent: mtty, type: mtty-2, uuid: 7e8b6c2a-1f1c-4b4e-9a56-2f4f6f1d0a02,
         protocol: v2, capabilities: [stop_copy, pre_copy]}
"""


def write(tmp_path: Path, text: str, name: str = "inv.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_inventory_loads_with_ids_and_derived_pairs(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path, GOOD))
    assert [h.name for h in inv.hosts] == ["a", "b"]
    assert [d.id for d in inv.devices] == ["a:0000:65:00.0", "a:mtty-2", "b:0000:65:00.0", "b:mtty-2"]
    assert [p.id for p in inv.pairs] == ["a->b:0000:65:00.0", "a->b:mtty-2", "b->a:0000:65:00.0", "b->a:mtty-2"]
    assert inv.device("a:mtty-2").capabilities == {Capability.STOP_COPY, Capability.PRE_COPY}
    assert inv.host("b").spec.port == 2200 and inv.host("b").spec.jump == "a"
    assert inv.settings.timeouts.connect == 3 and inv.settings.timeouts.command == 120
    assert inv.host("a").spec.host_key_policy == HostKeyPolicy.STRICT


def test_explicit_pairs_replace_derived_ones(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path, GOOD + "pairs:\n  - {source: 'a:mtty-2', destination: 'b:mtty-2'}\n"))
    assert [p.id for p in inv.pairs] == ["a->b:mtty-2"]


def test_environment_references_are_substituted(tmp_path: Path) -> None:
    text = GOOD.replace("10.0.0.1", "${LAB_A_ADDR}").replace("address: 10.0.0.2", "address: ${LAB_B:-10.9.9.9}")
    inv = load_inventory(write(tmp_path, text), environ={"LAB_A_ADDR": "192.0.2.7"})
    assert inv.host("a").spec.address == "192.0.2.7"
    assert inv.host("b").spec.address == "10.9.9.9"


@pytest.mark.parametrize("name", ["sim.yaml", "example-pci.yaml", "example-ansible.yaml"])
def test_shipped_inventories_are_valid(name: str) -> None:
    inv = load_inventory(INVENTORIES / name, check_files=False)
    assert inv.devices and inv.pairs


def test_ansible_shape(tmp_path: Path) -> None:
    inv = load_inventory(INVENTORIES / "example-ansible.yaml")
    assert inv.shape == "ansible"
    a = inv.host("hostA").spec
    assert (a.address, a.user, a.sudo, a.python) == ("10.20.0.21", "labops", True, "/usr/bin/python3")
    assert inv.settings.name == "mdev-lab" and inv.settings.timeouts.migration == 600
    assert [p.id for p in inv.pairs] == ["hostA->hostB:mtty-2", "hostB->hostA:mtty-2"]


def in_host_b(old: str, new: str) -> str:
    head, tail = GOOD.split("\n  b:\n")
    return head + "\n  b:\n" + tail.replace(old, new, 1)


def with_guest(guest: str) -> str:
    return GOOD.replace("timeouts: {connect: 3}}", f"timeouts: {{connect: 3}}, guest: {guest}}}", 1)


BAD = {
    "missing key": (
        in_host_b('pci: "0000:65:00.0", ', ""),
        r"inv\.yaml:\d+: hosts\.b\.devices\[0\]\.pci: required key is missing",
    ),
    "wrong type": (GOOD.replace("port: 2200", "port: many"), r"hosts\.b\.port: .*integer"),
    "unknown kind": (
        GOOD.replace("{kind: pci, pci", "{kind: usb, pci", 1),
        r"hosts\.a\.devices\[0\]\.kind: .*'usb'.*pci.*mdev.*sim",
    ),
    "duplicate host": (GOOD + "  a:\n    address: 10.0.0.3\n", r"hosts\.a: duplicate key"),
    "unknown key": (GOOD.replace("port: 2200", "prot: 2200"), r"hosts\.b\.prot: unknown key"),
    "bad pci address": (
        GOOD.replace('"0000:65:00.0"', '"65:00.0"', 1),
        r"hosts\.a\.devices\[0\]\.pci: .*not a PCI address",
    ),
    "incompatible pair": (
        GOOD + "pairs:\n  - {source: 'a:mtty-2', destination: 'b:0000:65:00.0'}\n",
        r"pairs\[0\]: incompatible pair a:mtty-2 -> b:0000:65:00.0: kind mdev vs pci",
    ),
    "pair to unknown device": (
        GOOD + "pairs:\n  - {source: 'a:mtty-2', destination: 'b:nope'}\n",
        r"pairs\[0\]\.destination: no device 'b:nope'",
    ),
    "unreadable key file": (
        GOOD.replace("port: 2200", "identity_file: /nonexistent/id_ed25519"),
        r"hosts\.b\.identity_file: file /nonexistent/id_ed25519 does not exist",
    ),
    "secret in file": (GOOD.replace("port: 2200", "password: hunter2"), r"hosts\.b\.password: .*secret"),
    "undefined variable": (
        GOOD.replace("10.0.0.1", "${LABS_TEST_UNSET_VAR}"),
        r"hosts\.a\.address: .*LABS_TEST_UNSET_VAR",
    ),
    "jump loop": (
        GOOD.replace("address: 10.0.0.1", "address: 10.0.0.1\n    jump: b"),
        r"hosts\.\w\.jump: jump hosts form a loop",
    ),
    "jump to nowhere": (GOOD.replace("jump: a", "jump: z"), r"hosts\.b\.jump: jump host 'z' is not a host"),
    "duplicate device name": (
        GOOD.replace("name: mtty-2", 'name: "0000:65:00.0"', 1),
        r"hosts\.a\.devices\[1\]\.name: ",
    ),
    "no hosts": ("hosts: {}\n", r"hosts: .*at least one host"),
    "not yaml": ("hosts: [a, b\n", r"inv\.yaml:\d+: .*YAML"),
    "guest with kernel and disk": (
        with_guest("{kernel: /k, disk: /d.qcow2, workload: w}"),
        r"lab\.guest: .*either a kernel \(with initrd\) or a disk",
    ),
    "guest without workload": (with_guest("{kernel: /k}"), r"lab\.guest\.workload: required key is missing"),
    "guest driver ids": (
        with_guest("{kernel: /k, workload: w, drivers: {'4348-3253': serial}}"),
        r"lab\.guest: .*'4348-3253' is not a PCI vendor:device",
    ),
    "v2 without stop_copy": (
        GOOD.replace("capabilities: [stop_copy, pre_copy]}", "capabilities: [pre_copy]}", 1),
        r"hosts\.a\.devices\[1\].*stop_copy",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inventory_fails_in_one_line_naming_file_key_and_problem(tmp_path: Path, case: str) -> None:
    text, pattern = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert re.search(pattern, message), message


def test_unreadable_key_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file: permission bits cannot make a file unreadable")
    key = tmp_path / "key"
    key.write_text("x")
    key.chmod(0)
    with pytest.raises(InventoryError, match="is not readable"):
        load_inventory(write(tmp_path, GOOD.replace("port: 2200", f"identity_file: {key}")))


def test_ansible_error_names_the_file_key_path(tmp_path: Path) -> None:
    text = (INVENTORIES / "example-ansible.yaml").read_text().replace("parent: mtty, type", "type", 1)
    with pytest.raises(InventoryError) as info:
        load_inventory(write(tmp_path, text))
    assert "all.children.migration_hosts.hosts.hostA.labs.devices[0].parent: required key is missing" in str(info.value)


def test_duplicate_host_across_ansible_groups(tmp_path: Path) -> None:
    doc = yaml.safe_load((INVENTORIES / "example-ansible.yaml").read_text())
    doc["all"]["children"]["other"] = {"hosts": {"hostA": {"ansible_host": "10.0.0.9"}}}
    with pytest.raises(InventoryError, match=r"all\.children\.other\.hosts\.hostA: duplicate host"):
        load_inventory(write(tmp_path, yaml.safe_dump(doc)))


# -- fuzzing: whatever the bytes, a ConfigError or an Inventory, never a traceback --------
KEYS = [
    "lab", "hosts", "pairs", "a", "b", "address", "port", "devices", "kind", "pci", "protocol", "all",
    "children", "vars", "labs", "jump", "capabilities", "uuid", "parent", "type", "driver", "sim", "dir",
]  # fmt: skip
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12), st.floats(allow_nan=False))
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=5),
    ),
    max_leaves=20,
)


def _mutations(base: dict) -> st.SearchStrategy:
    def mutate(path_and_value: tuple[list[str], object]) -> dict:
        import copy

        doc = copy.deepcopy(base)
        keys, value = path_and_value
        node = doc
        for k in keys[:-1]:
            if isinstance(node, dict) and isinstance(node.get(k), dict):
                node = node[k]
        if isinstance(node, dict) and keys:
            node[keys[-1]] = value
        return doc

    return st.tuples(st.lists(st.sampled_from(KEYS), min_size=1, max_size=4), trees).map(mutate)


BASE = yaml.safe_load(GOOD)


def test_a_key_with_a_line_break_is_named_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump({"lab": {"\n": None}, "hosts": {}}))
    with pytest.raises(ConfigError) as exc:
        load_inventory(path, environ={})
    assert "\n" not in str(exc.value) and "lab.'\\n'" in str(exc.value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(trees, _mutations(BASE)))
def test_fuzzed_documents_never_traceback(tmp_path: Path, doc: object) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_inventory(path, environ={})
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | st.text(alphabet=":-{}[]&*!|>'\"%@`#,? \n\tab01", max_size=120))
def test_fuzzed_bytes_never_traceback(tmp_path: Path, raw: bytes | str) -> None:
    path = tmp_path / "raw.yaml"
    path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    try:
        load_inventory(path, environ={})
    except ConfigError as exc:
        assert "\n" not in str(exc)
