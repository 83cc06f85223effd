"""uAPI numbers, struct layouts and the v2 resolver against the spec's own tables."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from labs.vfio import abi, rules, uapi

# spec 1.1: n, name, hex (x86; aarch64 is the same generic encoding)
SPEC_IOCTLS = """
0 VFIO_GET_API_VERSION 0x3B64
1 VFIO_CHECK_EXTENSION 0x3B65
2 VFIO_SET_IOMMU 0x3B66
3 VFIO_GROUP_GET_STATUS 0x3B67
4 VFIO_GROUP_SET_CONTAINER 0x3B68
5 VFIO_GROUP_UNSET_CONTAINER 0x3B69
6 VFIO_GROUP_GET_DEVICE_FD 0x3B6A
7 VFIO_DEVICE_GET_INFO 0x3B6B
8 VFIO_DEVICE_GET_REGION_INFO 0x3B6C
9 VFIO_DEVICE_GET_IRQ_INFO 0x3B6D
10 VFIO_DEVICE_SET_IRQS 0x3B6E
11 VFIO_DEVICE_RESET 0x3B6F
12 VFIO_DEVICE_GET_PCI_HOT_RESET_INFO 0x3B70
12 VFIO_IOMMU_GET_INFO 0x3B70
13 VFIO_IOMMU_MAP_DMA 0x3B71
17 VFIO_DEVICE_FEATURE 0x3B75
18 VFIO_DEVICE_BIND_IOMMUFD 0x3B76
19 VFIO_DEVICE_ATTACH_IOMMUFD_PT 0x3B77
20 VFIO_DEVICE_DETACH_IOMMUFD_PT 0x3B78
21 VFIO_MIG_GET_PRECOPY_INFO 0x3B79
"""


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_ioctl_numbers_match_spec_table(arch: str) -> None:
    numbers = abi.ioctl_numbers(arch)
    for line in SPEC_IOCTLS.strip().splitlines():
        n, name, hexval = line.split()
        assert numbers[name] == int(hexval, 16) == 0x3B64 + int(n), name
    assert numbers["VFIO_GET_API_VERSION"] == 15204 and numbers["VFIO_MIG_GET_PRECOPY_INFO"] == 15225
    assert numbers["IOMMU_IOAS_ALLOC"] == 0x3B81  # iommufd: ';' with command base 0x80


def test_powerpc_io_differs() -> None:
    # spec 1.1 pitfall: _IOC_NONE is 1 there
    assert abi.ioctl_numbers("ppc64le")["VFIO_GET_API_VERSION"] == 0x20003B64


def test_host_constants_use_host_arch() -> None:
    assert abi.ioctl_numbers()["VFIO_DEVICE_FEATURE"] == abi.VFIO_DEVICE_FEATURE


def test_struct_sizes_match_spec() -> None:
    assert abi.STRUCT_SIZES == {
        "vfio_group_status": 8,
        "vfio_device_info": 24,
        "vfio_region_info": 32,
        "vfio_info_cap_header": 8,
        "vfio_region_info_cap_type": 16,
        "vfio_device_feature": 8,
        "vfio_device_feature_migration": 8,
        "vfio_device_feature_mig_state": 8,
        "vfio_device_feature_mig_data_size": 8,
        "vfio_precopy_info": 24,
        "vfio_device_migration_info": 32,
        "vfio_device_bind_iommufd": 16,
        "vfio_device_attach_iommufd_pt": 12,
        "iommu_ioas_alloc": 12,
    }
    assert uapi.V1_FIELDS == {
        "device_state": (0, 4),
        "reserved": (4, 4),
        "pending_bytes": (8, 8),
        "data_offset": (16, 8),
        "data_size": (24, 8),
    }


def test_feature_words_from_spec() -> None:
    get, set_, probe = uapi.VFIO_DEVICE_FEATURE_GET, uapi.VFIO_DEVICE_FEATURE_SET, uapi.VFIO_DEVICE_FEATURE_PROBE
    assert get | uapi.VFIO_DEVICE_FEATURE_MIGRATION == 0x10001
    assert get | uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE == 0x10002
    assert set_ | uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE == 0x20002
    assert probe | uapi.FEATURES["DMA_LOGGING_START"] == 0x40006
    assert get | uapi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE == 0x10009
    assert uapi.V2_STATES == {
        "ERROR": 0,
        "STOP": 1,
        "RUNNING": 2,
        "STOP_COPY": 3,
        "RESUMING": 4,
        "RUNNING_P2P": 5,
        "PRE_COPY": 6,
        "PRE_COPY_P2P": 7,
    }


def test_v1_macros() -> None:
    assert [uapi.v1_valid(s) for s in range(8)] == [True, True, True, True, True, False, False, False]
    assert uapi.v1_is_error(6) and uapi.v1_is_error(0x16) and not uapi.v1_is_error(2)
    assert uapi.v1_set_error(0xF1) == 0xF6  # keeps bits 3-31 (and without the SATE typo)
    assert [uapi.v1_user_writable(s) for s in range(8)] == [True] * 5 + [False] * 3


# spec 3.4 next-step table, transcribed independently of the agent's copy
SPEC_TABLE = """
ERROR        ERROR ERROR ERROR ERROR ERROR ERROR ERROR ERROR
STOP         ERROR STOP RUNNING_P2P STOP_COPY RESUMING RUNNING_P2P RUNNING_P2P RUNNING_P2P
RUNNING      ERROR RUNNING_P2P RUNNING RUNNING_P2P RUNNING_P2P RUNNING_P2P PRE_COPY RUNNING_P2P
STOP_COPY    ERROR STOP STOP STOP_COPY STOP STOP ERROR ERROR
RESUMING     ERROR STOP STOP STOP RESUMING STOP STOP STOP
RUNNING_P2P  ERROR STOP RUNNING STOP STOP RUNNING_P2P RUNNING PRE_COPY_P2P
PRE_COPY     ERROR RUNNING RUNNING PRE_COPY_P2P RUNNING RUNNING PRE_COPY PRE_COPY_P2P
PRE_COPY_P2P ERROR RUNNING_P2P RUNNING_P2P STOP_COPY RUNNING_P2P RUNNING_P2P PRE_COPY PRE_COPY_P2P
"""


def test_next_state_table_is_the_kernels() -> None:
    for row in SPEC_TABLE.strip().splitlines():
        cur, *targets = row.split()
        got = [uapi.v2_state_name(s) for s in uapi.MIG_NEXT_STATE[uapi.v2_state(cur)]]
        assert got == targets, cur


SC, P2P, PC = uapi.SC, uapi.P2P, uapi.PRE_COPY


@pytest.mark.parametrize(
    ("flags", "cur", "new", "expect"),
    [
        (SC, "RUNNING", "STOP_COPY", "RUNNING STOP STOP_COPY"),
        (SC, "RUNNING", "RESUMING", "RUNNING STOP RESUMING"),
        (SC, "STOP_COPY", "RUNNING", "STOP_COPY STOP RUNNING"),
        (SC, "STOP_COPY", "RESUMING", "STOP_COPY STOP RESUMING"),
        (SC, "RESUMING", "RUNNING", "RESUMING STOP RUNNING"),
        (SC, "RESUMING", "STOP_COPY", "RESUMING STOP STOP_COPY"),
        (SC | P2P, "RUNNING", "STOP", "RUNNING RUNNING_P2P STOP"),
        (SC | P2P, "RUNNING", "STOP_COPY", "RUNNING RUNNING_P2P STOP STOP_COPY"),
        (SC | P2P, "RESUMING", "RUNNING", "RESUMING STOP RUNNING_P2P RUNNING"),
        (SC | P2P, "STOP_COPY", "RUNNING", "STOP_COPY STOP RUNNING_P2P RUNNING"),
        (SC | PC, "PRE_COPY", "STOP_COPY", "PRE_COPY STOP_COPY"),
        (SC | PC, "PRE_COPY", "STOP", "PRE_COPY RUNNING STOP"),
        (SC | PC, "PRE_COPY", "RESUMING", "PRE_COPY RUNNING STOP RESUMING"),
        (SC | PC, "RESUMING", "PRE_COPY", "RESUMING STOP RUNNING PRE_COPY"),
        (SC | PC, "STOP", "PRE_COPY", "STOP RUNNING PRE_COPY"),
        (SC | P2P | PC, "PRE_COPY", "STOP_COPY", "PRE_COPY PRE_COPY_P2P STOP_COPY"),
        (SC | P2P | PC, "PRE_COPY", "STOP", "PRE_COPY RUNNING RUNNING_P2P STOP"),
        (SC | P2P | PC, "PRE_COPY", "RESUMING", "PRE_COPY RUNNING RUNNING_P2P STOP RESUMING"),
        (SC | P2P | PC, "PRE_COPY_P2P", "RUNNING", "PRE_COPY_P2P RUNNING_P2P RUNNING"),
        (SC | P2P | PC, "RESUMING", "PRE_COPY", "RESUMING STOP RUNNING_P2P RUNNING PRE_COPY"),
        (SC | P2P | PC, "STOP", "PRE_COPY_P2P", "STOP RUNNING_P2P PRE_COPY_P2P"),
    ],
)
def test_resolved_paths_from_spec(flags: int, cur: str, new: str, expect: str) -> None:
    assert uapi.path_names(cur, new, flags) == expect.split()


def test_einval_requests() -> None:
    assert uapi.path_names("RUNNING", "ERROR", uapi.ALL_FLAGS) is None  # ERROR is never supported
    assert uapi.path_names("ERROR", "RUNNING", uapi.ALL_FLAGS) is None
    assert uapi.path_names("RUNNING", "RUNNING_P2P", SC) is None  # not advertised
    assert uapi.path(2, 8, uapi.ALL_FLAGS) is None


def test_hanging_requests() -> None:
    assert uapi.hanging_requests(SC) == []
    assert uapi.hanging_requests(SC | P2P) == []
    assert uapi.hanging_requests(SC | PC) == [("STOP_COPY", "PRE_COPY")]
    assert uapi.hanging_requests(SC | P2P | PC) == [("STOP_COPY", "PRE_COPY"), ("STOP_COPY", "PRE_COPY_P2P")]
    assert uapi.path_names("STOP_COPY", "PRE_COPY", SC | PC) is None  # the sim answers EINVAL


@pytest.mark.parametrize(
    ("release", "fixed"),
    [
        ("6.12.117+deb13-amd64", True),  # the nested lab's kernel
        ("6.12.96", True),
        ("6.12.95+deb13-amd64", False),
        ("6.6.140", False),  # another series: not known
        ("7.1.0", False),  # mainline: the version that took the fix is not known here
        ("", False),
        ("unknown", False),
    ],
)
def test_the_blocked_arcs_are_sent_only_to_kernels_known_to_carry_the_fix(release: str, fixed: bool) -> None:
    assert uapi.blocked_arc_fixed(release) is fixed


@pytest.mark.parametrize("flags", uapi.FLAG_SETS)
def test_every_path_is_shortest_and_never_passes_through_saving(flags: int) -> None:
    states = uapi.supported_states(flags)
    for cur in states:
        for new in states:
            p = uapi.path(cur, new, flags)
            if uapi.is_hanging(cur, new, flags):
                assert p is None
                continue
            assert p is not None and p[0] == cur and p[-1] == new
            assert all(uapi.mig_state_supported(s, flags) for s in p)
            assert not set(p[1:-1]) & {uapi.V2_STATES["STOP_COPY"], uapi.V2_STATES["RESUMING"]}
            # a session opens only as the last arc of a path (V2-R7)
            for a, b in itertools.pairwise(p[:-1]):
                assert (a, b) not in uapi.SESSION_OPENING_ARCS


def test_rule_ids_cover_the_spec() -> None:
    assert list(rules.V1_RULES) == [f"V1-R{i}" for i in range(1, 20)]
    assert list(rules.V2_RULES) == [f"V2-R{i}" for i in range(1, 21)]
    spec = Path("/work/shared/spec/vfio-migration-uapi.md")
    if spec.exists():
        in_spec = set(re.findall(r"\*\*(V[12]-R\d+)\*\*", spec.read_text()))
        assert in_spec == set(rules.RULES)
