"""Load an inventory file into a resolved Inventory, or fail with one line.

Everything here runs before any host is touched: parse, substitute environment
references, validate types, resolve cross-references (jump hosts, pairs) and
check that every key file can be read.
"""

from __future__ import annotations

import getpass
import importlib.machinery
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from labs.inventory import ansible
from labs.inventory.models import HostKeyPolicy, InventoryDoc, JumpHost
from labs.inventory.resolved import Inventory, LabDevice, LabHost, LabPair
from labs.inventory.yamlsource import InventoryError, KeyPath, read_yaml

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SECRET_KEYS = re.compile(r"^(password|passwd|passphrase|secret|token|private_key|api_key)$", re.I)
PATH_FIELDS = ("identity_file", "known_hosts")

# Called with the validated inventory before file checks; the sim lab uses it to
# generate its keys (it touches no host).
Provisioner = Callable[[Inventory], None]


def sim_defaults() -> dict[str, str]:
    """Values a sim inventory may reference without the user setting them."""
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return {
        "LABS_SIM_DIR": str(Path(base) / f"labs-sim-{uid}"),
        "LABS_SIM_USER": getpass.getuser(),
        "LABS_PYTHON": sys.executable,
    }


def load_inventory(
    file: str | Path,
    *,
    check_files: bool = True,
    provision: Provisioner | None = None,
    environ: dict[str, str] | None = None,
) -> Inventory:
    path = Path(file)
    doc = read_yaml(path)
    env = dict(os.environ if environ is None else environ)
    shape = "native"
    to_source: Callable[[KeyPath], KeyPath] = lambda p: p  # noqa: E731
    data = doc.data
    if ansible.is_ansible_shape(data):
        translated = ansible.translate(doc)
        data, to_source, shape = translated.data, translated.source_path, "ansible"

    def fail(p: KeyPath, problem: str) -> InventoryError:
        return doc.error(to_source(p), problem)

    _reject_secrets(data, (), fail)
    lab_section = data.get("lab")
    if isinstance(lab_section, dict) and lab_section.get("sim") is not None:
        for key, value in sim_defaults().items():
            env.setdefault(key, value)
    data = _substitute(data, (), env, fail)

    try:
        model = InventoryDoc.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _clean_loc(data, err["loc"])
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*loc, "kind")
        raise fail(loc, _problem(err)) from None

    inventory = _resolve(path, model, shape, fail)
    object.__setattr__(inventory, "env", {k: env[k] for k in sim_defaults() if k in env})
    if provision is not None:
        provision(inventory)
    if check_files:
        _check_files(inventory, fail)
    return inventory


def _reject_secrets(node: Any, path: KeyPath, fail: Callable[[KeyPath, str], InventoryError]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and SECRET_KEYS.match(key):
                raise fail(
                    (*path, key),
                    "secrets never go in an inventory; name an environment variable instead "
                    "(e.g. identity_passphrase_env) or a key file",
                )
            _reject_secrets(value, (*path, key), fail)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _reject_secrets(item, (*path, i), fail)


def _substitute(node: Any, path: KeyPath, env: dict[str, str], fail: Callable[[KeyPath, str], InventoryError]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, (*path, k), env, fail) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, (*path, i), env, fail) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def one(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise fail(path, f"environment variable {name} is not set (referenced as ${{{name}}})")

        return ENV_REF.sub(one, node)
    return node


def _clean_loc(data: Any, loc: tuple[str | int, ...]) -> KeyPath:
    """Drop the discriminator tags pydantic inserts into union locations."""
    out: list[str | int] = []
    node = data
    tag_skipped_at: object = None
    for part in loc:
        # the tag sits right after a list index; a field may share its name (kind pci, field pci)
        after_index = bool(out) and isinstance(out[-1], int)
        if isinstance(node, dict) and after_index and tag_skipped_at is not node and part == node.get("kind"):
            tag_skipped_at = node
            continue
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def _problem(err: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"unknown device kind {ctx.get('tag')!r} (expected one of {ctx.get('expected_tags')})"
    if kind == "union_tag_not_found":
        return "required key 'kind' is missing (pci, mdev or sim)"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def _resolve(file: Path, model: InventoryDoc, shape: str, fail: Callable[[KeyPath, str], InventoryError]) -> Inventory:
    hosts = tuple(LabHost(name, spec) for name, spec in model.hosts.items())
    devices: list[LabDevice] = []
    for host in hosts:
        seen: dict[str, int] = {}
        for i, dev in enumerate(host.spec.devices):
            if dev.label in seen:
                raise fail(
                    ("hosts", host.name, "devices", i, "name"),
                    f"duplicate device name '{dev.label}' on host {host.name} (also devices[{seen[dev.label]}])",
                )
            seen[dev.label] = i
            devices.append(LabDevice(host, i, dev))
        _check_jump(model, host.name, fail)
    by_id = {d.id: d for d in devices}
    pairs: list[LabPair] = []
    if model.pairs is not None:
        for i, spec in enumerate(model.pairs):
            ends = []
            for key in ("source", "destination"):
                ref = getattr(spec, key)
                if ref not in by_id:
                    raise fail(("pairs", i, key), f"no device '{ref}' (expected host:device, one of {sorted(by_id)})")
                ends.append(by_id[ref])
            problem = incompatibility(ends[0], ends[1])
            if problem:
                raise fail(("pairs", i), f"incompatible pair {ends[0].id} -> {ends[1].id}: {problem}")
            pairs.append(LabPair(ends[0], ends[1]))
    else:
        pairs = derive_pairs(devices)
    return Inventory(file, model.lab, hosts, tuple(devices), tuple(pairs), shape)


def incompatibility(a: LabDevice, b: LabDevice) -> str | None:
    if a.host.name == b.host.name:
        return "both devices are on the same host"
    if a.spec.protocol != b.spec.protocol:
        return f"protocol {a.spec.protocol} vs {b.spec.protocol}"
    if a.spec.kind != b.spec.kind:
        return f"kind {a.spec.kind} vs {b.spec.kind}"
    if a.spec.model_key != b.spec.model_key:
        return f"model {a.spec.model_key} vs {b.spec.model_key}"
    return None


def derive_pairs(devices: list[LabDevice]) -> list[LabPair]:
    """Each device of a model pairs with the same model's devices on the other hosts."""
    pairs = []
    for a in devices:
        for b in devices:
            if incompatibility(a, b) is None and a.name == b.name:
                pairs.append(LabPair(a, b))
    return pairs


def _check_jump(model: InventoryDoc, name: str, fail: Callable[[KeyPath, str], InventoryError]) -> None:
    seen = [name]
    current = model.hosts[name].jump
    while isinstance(current, str):
        if current not in model.hosts:
            raise fail(("hosts", name, "jump"), f"jump host '{current}' is not a host of this inventory")
        if current in seen:
            raise fail(("hosts", name, "jump"), f"jump hosts form a loop: {' -> '.join([*seen, current])}")
        seen.append(current)
        current = model.hosts[current].jump


def _check_files(inventory: Inventory, fail: Callable[[KeyPath, str], InventoryError]) -> None:
    for host in inventory.hosts:
        _check_host_files(host.spec, ("hosts", host.name), fail)
        if isinstance(host.spec.jump, JumpHost):
            _check_host_files(host.spec.jump, ("hosts", host.name, "jump"), fail)
        for i, dev in enumerate(host.spec.devices):
            if dev.kind == "sim":
                module = dev.driver.split(":", 1)[0]
                if not _module_found(module, host.spec.python_path):
                    where = " nor in the host's python_path" if host.spec.python_path else ""
                    raise fail(
                        ("hosts", host.name, "devices", i, "driver"),
                        f"module '{module}' cannot be imported (not on the controller's sys.path{where})",
                    )


def _module_found(module: str, python_path: tuple[str, ...]) -> bool:
    """On the controller's sys.path, or (its top-level package) in a python_path directory: sim hosts share
    the controller's files; `lab doctor` imports it on the host for certain."""
    try:
        if importlib.util.find_spec(module) is not None:
            return True
    except (ImportError, ValueError):
        pass
    top = module.split(".", 1)[0]
    return bool(python_path) and importlib.machinery.PathFinder.find_spec(top, list(python_path)) is not None


def _check_host_files(spec: Any, path: KeyPath, fail: Callable[[KeyPath, str], InventoryError]) -> None:
    for key in PATH_FIELDS:
        value: Path | None = getattr(spec, key)
        if value is None:
            if key == "known_hosts" and spec.host_key_policy == HostKeyPolicy.STRICT:
                continue  # strict checking then uses ~/.ssh/known_hosts
            continue
        p = value.expanduser()
        if key == "known_hosts" and not p.exists() and spec.host_key_policy == HostKeyPolicy.ACCEPT_NEW:
            continue  # accept-new creates it
        if not p.is_file():
            raise fail((*path, key), f"file {p} does not exist")
        if not os.access(p, os.R_OK):
            raise fail((*path, key), f"file {p} is not readable")
