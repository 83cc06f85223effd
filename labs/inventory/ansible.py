"""Accept an Ansible YAML inventory (all/children/hosts/vars) with our keys under `labs`.

Ansible's own connection variables (ansible_host, ansible_port, ansible_user,
ansible_ssh_private_key_file, ansible_python_interpreter, ansible_become) fill
the matching host fields; everything else of ours lives in a `labs:` mapping in
host or group vars. Group vars are inherited by the hosts below, nearer groups
winning, as Ansible does. Lab-wide settings and pairs go in `all.vars.labs`.
"""

from __future__ import annotations

from typing import Any

from labs.inventory.yamlsource import KeyPath, SourceDoc

NAMESPACE = "labs"
ANSIBLE_VARS = {
    "ansible_host": "address",
    "ansible_port": "port",
    "ansible_user": "user",
    "ansible_ssh_private_key_file": "identity_file",
    "ansible_python_interpreter": "python",
    "ansible_become": "sudo",
}
LAB_LEVEL_KEYS = ("lab", "pairs")


def is_ansible_shape(data: dict[str, Any]) -> bool:
    return "all" in data and "hosts" not in data


class Translated:
    """The native-shape document and a map from its key paths back to the file's."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"hosts": {}}
        self.origin: dict[KeyPath, KeyPath] = {}

    def source_path(self, path: KeyPath) -> KeyPath:
        for cut in range(len(path), -1, -1):
            base = self.origin.get(tuple(path[:cut]))
            if base is not None:
                return (*base, *path[cut:])
        return path


def translate(doc: SourceDoc) -> Translated:
    out = Translated()
    root = doc.data.get("all")
    if not isinstance(root, dict):
        raise doc.error(("all",), "the Ansible 'all' group must be a mapping")
    all_vars = root.get("vars") or {}
    if not isinstance(all_vars, dict):
        raise doc.error(("all", "vars"), "must be a mapping")
    ours = all_vars.get(NAMESPACE) or {}
    if not isinstance(ours, dict):
        raise doc.error(("all", "vars", NAMESPACE), "must be a mapping")
    for key in LAB_LEVEL_KEYS:
        if key in ours:
            out.data[key] = ours[key]
            out.origin[(key,)] = ("all", "vars", NAMESPACE, key)
    _walk_group(doc, root, ("all",), [(all_vars, ("all", "vars"))], out)
    return out


def _walk_group(
    doc: SourceDoc,
    group: dict[str, Any],
    path: KeyPath,
    inherited: list[tuple[dict[str, Any], KeyPath]],
    out: Translated,
) -> None:
    own_vars = group.get("vars") or {}
    if not isinstance(own_vars, dict):
        raise doc.error((*path, "vars"), "must be a mapping")
    scopes = inherited if path == ("all",) else [*inherited, (own_vars, (*path, "vars"))]
    hosts = group.get("hosts") or {}
    if not isinstance(hosts, dict):
        raise doc.error((*path, "hosts"), "must be a mapping of host names")
    for name, host_vars in hosts.items():
        host_vars = host_vars or {}
        if not isinstance(host_vars, dict):
            raise doc.error((*path, "hosts", name), "host vars must be a mapping")
        if name in out.data["hosts"]:
            # Ansible merges a host listed in two groups; we need one definition.
            raise doc.error((*path, "hosts", name), f"duplicate host '{name}' (already defined in another group)")
        out.data["hosts"][name] = _host_fields(doc, name, [*scopes, (host_vars, (*path, "hosts", name))], out)
    children = group.get("children") or {}
    if not isinstance(children, dict):
        raise doc.error((*path, "children"), "must be a mapping of groups")
    for child_name, child in children.items():
        if child is None:
            continue
        if not isinstance(child, dict):
            raise doc.error((*path, "children", child_name), "a group must be a mapping")
        _walk_group(doc, child, (*path, "children", child_name), scopes, out)


def _host_fields(
    doc: SourceDoc, name: str, scopes: list[tuple[dict[str, Any], KeyPath]], out: Translated
) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for scope_vars, scope_path in scopes:
        for ansible_key, our_key in ANSIBLE_VARS.items():
            if ansible_key in scope_vars:
                fields[our_key] = scope_vars[ansible_key]
                out.origin[("hosts", name, our_key)] = (*scope_path, ansible_key)
        ours = scope_vars.get(NAMESPACE)
        if ours is None:
            continue
        if not isinstance(ours, dict):
            raise doc.error((*scope_path, NAMESPACE), "must be a mapping")
        for key, value in ours.items():
            if key in LAB_LEVEL_KEYS:
                continue
            fields[key] = value
            out.origin[("hosts", name, key)] = (*scope_path, NAMESPACE, key)
    if "address" not in fields:
        fields["address"] = name  # Ansible connects to the inventory name itself
    out.origin.setdefault(("hosts", name), scopes[-1][1])
    return fields
