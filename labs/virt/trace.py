"""QEMU's VFIO trace events, read back: which migration states QEMU set on which device.

A domain defined with `-trace vfio_migration_set_state` (DomainSpec.trace_events)
has QEMU's log backend write one line per state change to the domain's log on
its host (/var/log/libvirt/qemu/<name>.log). QEMU 9+ names the states
(" (0000:00:02.0) new state RUNNING_P2P, recover state ERROR"); QEMU 8 numbers
them (" (0000:00:02.0) state 5"), in the v2 uAPI's numbering (spec 3.1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

SET_STATE_EVENT = "vfio_migration_set_state"
V2_STATE_NAMES = ("ERROR", "STOP", "RUNNING", "STOP_COPY", "RESUMING", "RUNNING_P2P", "PRE_COPY", "PRE_COPY_P2P")
P2P_STATES = ("RUNNING_P2P", "PRE_COPY_P2P")
_SET_STATE_RE = re.compile(
    rf"{SET_STATE_EVENT}\s*\((?P<device>[^)]*)\)\s*(?:new state (?P<name>[A-Z_0-9]+)|state (?P<number>\d+))"
)


@dataclass(frozen=True)
class StateChange:
    device: str  # QEMU's name of the VFIO device (its host address or mdev UUID)
    state: str


def set_states(lines: Iterable[str]) -> list[StateChange]:
    """The state changes the lines record, in order; other lines are ignored."""
    out: list[StateChange] = []
    for line in lines:
        m = _SET_STATE_RE.search(line)
        if m is None:
            continue
        if m.group("name"):
            state = m.group("name")
        else:
            n = int(m.group("number"))
            state = V2_STATE_NAMES[n] if n < len(V2_STATE_NAMES) else f"state {n}"
        out.append(StateChange(m.group("device").strip(), state))
    return out


def states_by_device(changes: Iterable[StateChange]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in changes:
        out.setdefault(c.device, []).append(c.state)
    return out


def missing_p2p(changes: list[StateChange], devices: int, wanted: tuple[str, ...] = P2P_STATES) -> list[str]:
    """What the trace lacks for `devices` VFIO devices each having gone through every `wanted` state."""
    seen = states_by_device(changes)
    if len(seen) < devices:
        return [f"the trace names {len(seen)} VFIO device(s) ({', '.join(sorted(seen)) or 'none'}), not {devices}"]
    return [
        f"device {dev} never entered {state} (states set: {' '.join(states)})"
        for dev, states in sorted(seen.items())
        for state in wanted
        if state not in states
    ]
