"""The VFIO migration uAPI as data, for the controller and the suites.

Every number and table comes from labs.vfio.abi (the module the agent also carries
to hosts), so the controller and the agent can never disagree. This module adds
names, typed helpers and the questions suites ask: which arcs does a SET walk,
which requests hang a real kernel, which arcs open a data session.
"""

from __future__ import annotations

import re

from labs.vfio.abi import (
    FEATURES,
    MIG_NEXT_STATE,
    MIG_STATE_FLAGS,
    MIGRATION_FLAGS,
    SAVING_GROUP,
    SESSION_OPENING_ARCS,
    STRUCT_SIZES,
    V1_ERROR,
    V1_FIELDS,
    V1_INFO_SIZE,
    V1_RESUMING,
    V1_RUNNING,
    V1_SAVING,
    V1_STATE_MASK,
    V1_STATE_NAMES,
    V1_STOP,
    V2_STATE_NAMES,
    V2_STATES,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_STATE_NR,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    VFIO_REGION_SUBTYPE_MIGRATION,
    VFIO_REGION_TYPE_MIGRATION,
    ioctl_numbers,
    mig_path,
    mig_request_hangs,
    mig_state_supported,
    v1_is_error,
    v1_set_error,
    v1_user_writable,
    v1_valid,
)

__all__ = [
    "ALL_FLAGS",
    "FEATURES",
    "FLAG_SETS",
    "MIGRATION_FLAGS",
    "MIG_NEXT_STATE",
    "MIG_STATE_FLAGS",
    "SAVING_GROUP",
    "SESSION_OPENING_ARCS",
    "STRUCT_SIZES",
    "V1_ERROR",
    "V1_FIELDS",
    "V1_INFO_SIZE",
    "V1_RESUMING",
    "V1_RUNNING",
    "V1_SAVING",
    "V1_STATE_MASK",
    "V1_STATE_NAMES",
    "V1_STOP",
    "V2_STATES",
    "V2_STATE_NAMES",
    "VFIO_DEVICE_FEATURE_GET",
    "VFIO_DEVICE_FEATURE_MASK",
    "VFIO_DEVICE_FEATURE_MIGRATION",
    "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
    "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE",
    "VFIO_DEVICE_FEATURE_PROBE",
    "VFIO_DEVICE_FEATURE_SET",
    "VFIO_DEVICE_STATE_NR",
    "VFIO_MIGRATION_P2P",
    "VFIO_MIGRATION_PRE_COPY",
    "VFIO_MIGRATION_STOP_COPY",
    "VFIO_REGION_SUBTYPE_MIGRATION",
    "VFIO_REGION_TYPE_MIGRATION",
    "hanging_requests",
    "ioctl_numbers",
    "is_hanging",
    "migration_flag_names",
    "opens_session",
    "path",
    "path_names",
    "supported_states",
    "v1_is_error",
    "v1_set_error",
    "v1_state",
    "v1_state_name",
    "v1_user_writable",
    "v1_valid",
    "v2_state",
    "v2_state_name",
]

SC, P2P, PRE_COPY = VFIO_MIGRATION_STOP_COPY, VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY
FLAG_SETS = (SC, SC | P2P, SC | PRE_COPY, SC | P2P | PRE_COPY)  # the defined combinations (V2-R1)
ALL_FLAGS = SC | P2P | PRE_COPY
V1_STATES = {name: value for value, name in V1_STATE_NAMES.items()}


def v2_state(state: int | str) -> int:
    """A v2 state value from its value or name ("STOP_COPY")."""
    return state if isinstance(state, int) else V2_STATES[state.upper()]


def v2_state_name(state: int) -> str:
    return V2_STATE_NAMES.get(state, f"INVALID_{state}")


def v1_state(state: int | str) -> int:
    """v1 device_state bits from bits or a friendly name (RUNNING=001, PRE_COPY=011, ERROR=110...)."""
    return state if isinstance(state, int) else V1_STATES[state.upper()]


def v1_state_name(bits: int) -> str:
    return V1_STATE_NAMES[bits & V1_STATE_MASK]


def migration_flag_names(flags: int) -> list[str]:
    return [name for name, bit in MIGRATION_FLAGS if flags & bit]


def supported_states(flags: int) -> list[int]:
    return [s for s in range(VFIO_DEVICE_STATE_NR) if mig_state_supported(s, flags)]


def path(cur: int, new: int, flags: int) -> list[int] | None:
    """The states a SET walks, [cur, ..., new], as vfio_mig_get_next_state resolves them;
    None when the kernel answers EINVAL (or would hang: see is_hanging)."""
    try:
        return list(mig_path(cur, new, flags))
    except OSError:
        return None


def path_names(cur: int | str, new: int | str, flags: int) -> list[str] | None:
    p = path(v2_state(cur), v2_state(new), flags)
    return None if p is None else [v2_state_name(s) for s in p]


def is_hanging(cur: int | str, new: int | str, flags: int) -> bool:
    """True for requests that spin forever in kernels >= 6.2 without FIX-2026 (spec 3.4):
    send them to simulated devices, or where `blocked_arc_fixed` (V2-R12)."""
    return bool(mig_request_hangs(v2_state(cur), v2_state(new), flags))


# FIX-2026 (spec 3.4), merged as "vfio: prevent infinite loop in vfio_mig_get_next_state() on blocked arc":
# the stable series known to carry it, from its first sublevel (6.12.96's ChangeLog, as Debian's linux
# 6.12.96-1 lists it; the 6.12.117 source's skip loop stops on ERROR)
BLOCKED_ARC_FIXED_FROM: dict[tuple[int, int], int] = {(6, 12): 96}


def blocked_arc_fixed(release: str) -> bool:
    """True for a kernel release (`uname -r`) known to fail the blocked arcs with EINVAL instead of hanging;
    False for one without the fix or not known to have it (a mainline release, another series)."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", release)
    if not m:
        return False
    major, minor, sublevel = (int(g) for g in m.groups())
    first = BLOCKED_ARC_FIXED_FROM.get((major, minor))
    return first is not None and sublevel >= first


def hanging_requests(flags: int = ALL_FLAGS) -> list[tuple[str, str]]:
    """All (cur, target) pairs that hang a real kernel for a device with `flags`."""
    states = supported_states(flags)
    return [(v2_state_name(c), v2_state_name(n)) for c in states for n in states if mig_request_hangs(c, n, flags)]


def opens_session(states: list[int]) -> bool:
    """V2-R7: a SET returns a data_fd iff its last arc opens a session."""
    return len(states) >= 2 and (states[-2], states[-1]) in SESSION_OPENING_ARCS
