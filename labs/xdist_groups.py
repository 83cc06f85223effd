"""xdist scheduling by device: the tests of one group of devices all run on one worker.

A group is a connected set of the inventory's devices, joined by its pairs
(hostA:simv2, hostB:simv2 and the pairs between them). Under plain load
distribution two workers often want the same device at once and one waits on
the other's reservation; with whole groups per worker they never meet, and a
lab of N independent host pairs keeps N workers busy. Reservations still guard
the devices (against other runs, and tests that name no device).

The controller sees only node ids, so a test's group is read from its
parameter id: the longest device or pair id of the inventory found in it.
Tests naming none (host-level tests, the framework's own tests) are each their
own unit, which is plain load distribution for them.
"""

from __future__ import annotations

import re
from typing import Any

from xdist.scheduler import LoadScopeScheduling

from labs.inventory import Inventory


def device_groups(inventory: Inventory) -> dict[str, str]:
    """Every device id and pair id -> the id of its group (the first device id of the group)."""
    parent = {d.id: d.id for d in inventory.devices}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in inventory.pairs:
        a, b = root(p.source.id), root(p.destination.id)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups = {d.id: root(d.id) for d in inventory.devices}
    groups.update({p.id: groups[p.source.id] for p in inventory.pairs})
    return groups


class DeviceScopeScheduling(LoadScopeScheduling):
    def __init__(self, config: Any, log: Any, groups: dict[str, str]) -> None:
        super().__init__(config, log)
        self._groups = groups
        self._pattern = id_pattern(groups)

    def _split_scope(self, nodeid: str) -> str:
        return group_of(nodeid, self._pattern, self._groups)


def id_pattern(groups: dict[str, str]) -> re.Pattern[str] | None:
    """Finds a device or pair id among a node id's parameters (joined by '-')."""
    # longest first: a pair id contains its host names, and one device id may prefix another
    ids = sorted(groups, key=len, reverse=True)
    return re.compile("(?:^|-)(" + "|".join(map(re.escape, ids)) + ")(?:-|$)") if ids else None


def group_of(nodeid: str, pattern: re.Pattern[str] | None, groups: dict[str, str]) -> str:
    params = nodeid[nodeid.find("[") + 1 : -1] if nodeid.endswith("]") and "[" in nodeid else ""
    found = pattern.search(params) if pattern is not None and params else None
    return f"lab-group {groups[found.group(1)]}" if found else nodeid
