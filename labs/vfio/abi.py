"""The VFIO migration uAPI as the kernel defines it: ioctl numbers, constants, the v1 and v2
state machines and the struct layouts.

Shipped to lab hosts with the agent (labs/vfio/bundle.py), so stdlib only and Python 3.6
compatible; the controller (labs/vfio/uapi.py) and the simulator (labs/sim) read the same tables.
"""

import errno
import platform
import struct

# ---------------------------------------------------------------------------
# ioctl encoding
# ---------------------------------------------------------------------------

# (value of _IOC_NONE, shift of the direction field, width of the size field).
# x86_64 and aarch64 use the asm-generic layout; the others differ (spec 1.1).
_IOC_LAYOUTS = {
    "generic": (0, 30, 14),
    "powerpc": (1, 29, 13),  # also mips, sparc, alpha: _IOC_NONE = 1, 13-bit size
}
_ARCH_LAYOUT = {
    "x86_64": "generic",
    "aarch64": "generic",
    "arm64": "generic",
    "riscv64": "generic",
    "s390x": "generic",
    "ppc64": "powerpc",
    "ppc64le": "powerpc",
    "mips": "powerpc",
    "mips64": "powerpc",
    "sparc64": "powerpc",
    "alpha": "powerpc",
}
HOST_ARCH = platform.machine() or "x86_64"


def ioc_layout(arch):
    return _IOC_LAYOUTS[_ARCH_LAYOUT.get(arch, "generic")]


def _IOC(direction, typ, nr, size, arch=None):
    _none, dir_shift, size_bits = ioc_layout(arch or HOST_ARCH)
    if size >= (1 << size_bits):
        raise ValueError("ioctl size too large")
    return (direction << dir_shift) | (size << 16) | (typ << 8) | nr


def _IO(typ, nr, arch=None):
    none = ioc_layout(arch or HOST_ARCH)[0]
    return _IOC(none, typ, nr, 0, arch)


VFIO_TYPE = ord(";")
VFIO_BASE = 100
IOMMUFD_TYPE = ord(";")
IOMMUFD_CMD_BASE = 0x80

# n -> names; one number means different things on different fds (spec 1.1).
VFIO_IOCTL_OFFSETS = (
    ("VFIO_GET_API_VERSION", 0),
    ("VFIO_CHECK_EXTENSION", 1),
    ("VFIO_SET_IOMMU", 2),
    ("VFIO_GROUP_GET_STATUS", 3),
    ("VFIO_GROUP_SET_CONTAINER", 4),
    ("VFIO_GROUP_UNSET_CONTAINER", 5),
    ("VFIO_GROUP_GET_DEVICE_FD", 6),
    ("VFIO_DEVICE_GET_INFO", 7),
    ("VFIO_DEVICE_GET_REGION_INFO", 8),
    ("VFIO_DEVICE_GET_IRQ_INFO", 9),
    ("VFIO_DEVICE_SET_IRQS", 10),
    ("VFIO_DEVICE_RESET", 11),
    ("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", 12),
    ("VFIO_IOMMU_GET_INFO", 12),
    ("VFIO_DEVICE_PCI_HOT_RESET", 13),
    ("VFIO_IOMMU_MAP_DMA", 13),
    ("VFIO_DEVICE_QUERY_GFX_PLANE", 14),
    ("VFIO_IOMMU_UNMAP_DMA", 14),
    ("VFIO_DEVICE_GET_GFX_DMABUF", 15),
    ("VFIO_IOMMU_ENABLE", 15),
    ("VFIO_DEVICE_IOEVENTFD", 16),
    ("VFIO_IOMMU_DISABLE", 16),
    ("VFIO_DEVICE_FEATURE", 17),
    ("VFIO_IOMMU_DIRTY_PAGES", 17),
    ("VFIO_DEVICE_BIND_IOMMUFD", 18),
    ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", 19),
    ("VFIO_DEVICE_DETACH_IOMMUFD_PT", 20),
    ("VFIO_MIG_GET_PRECOPY_INFO", 21),
    ("VFIO_EEH_PE_OP", 21),
)
IOMMUFD_IOCTL_OFFSETS = (
    ("IOMMU_DESTROY", 0),
    ("IOMMU_IOAS_ALLOC", 1),
)


def ioctl_numbers(arch=None):
    """name -> request number for `arch` (default: this host)."""
    out = {}
    for name, n in VFIO_IOCTL_OFFSETS:
        out[name] = _IO(VFIO_TYPE, VFIO_BASE + n, arch)
    for name, n in IOMMUFD_IOCTL_OFFSETS:
        out[name] = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + n, arch)
    return out


_NR = ioctl_numbers()
VFIO_GET_API_VERSION = _NR["VFIO_GET_API_VERSION"]
VFIO_CHECK_EXTENSION = _NR["VFIO_CHECK_EXTENSION"]
VFIO_SET_IOMMU = _NR["VFIO_SET_IOMMU"]
VFIO_GROUP_GET_STATUS = _NR["VFIO_GROUP_GET_STATUS"]
VFIO_GROUP_SET_CONTAINER = _NR["VFIO_GROUP_SET_CONTAINER"]
VFIO_GROUP_UNSET_CONTAINER = _NR["VFIO_GROUP_UNSET_CONTAINER"]
VFIO_GROUP_GET_DEVICE_FD = _NR["VFIO_GROUP_GET_DEVICE_FD"]
VFIO_DEVICE_GET_INFO = _NR["VFIO_DEVICE_GET_INFO"]
VFIO_DEVICE_GET_REGION_INFO = _NR["VFIO_DEVICE_GET_REGION_INFO"]
VFIO_DEVICE_GET_IRQ_INFO = _NR["VFIO_DEVICE_GET_IRQ_INFO"]
VFIO_DEVICE_RESET = _NR["VFIO_DEVICE_RESET"]
VFIO_DEVICE_FEATURE = _NR["VFIO_DEVICE_FEATURE"]
VFIO_DEVICE_BIND_IOMMUFD = _NR["VFIO_DEVICE_BIND_IOMMUFD"]
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _NR["VFIO_DEVICE_ATTACH_IOMMUFD_PT"]
VFIO_DEVICE_DETACH_IOMMUFD_PT = _NR["VFIO_DEVICE_DETACH_IOMMUFD_PT"]
VFIO_MIG_GET_PRECOPY_INFO = _NR["VFIO_MIG_GET_PRECOPY_INFO"]
IOMMU_DESTROY = _NR["IOMMU_DESTROY"]
IOMMU_IOAS_ALLOC = _NR["IOMMU_IOAS_ALLOC"]

# ---------------------------------------------------------------------------
# constants (spec 1.3, 1.5, 2.1, 3.1, 3.2)
# ---------------------------------------------------------------------------

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

DEVICE_FLAGS = (
    ("RESET", 1 << 0),
    ("PCI", 1 << 1),
    ("PLATFORM", 1 << 2),
    ("AMBA", 1 << 3),
    ("CCW", 1 << 4),
    ("AP", 1 << 5),
    ("FSL_MC", 1 << 6),
    ("CAPS", 1 << 7),
    ("CDX", 1 << 8),
)
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_CAPS = 1 << 7

REGION_FLAGS = (("READ", 1), ("WRITE", 2), ("MMAP", 4), ("CAPS", 8))
VFIO_REGION_INFO_FLAG_READ = 1
VFIO_REGION_INFO_FLAG_WRITE = 2
VFIO_REGION_INFO_FLAG_MMAP = 4
VFIO_REGION_INFO_FLAG_CAPS = 8
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_TYPE_MIGRATION = 3  # _DEPRECATED since 5.18
VFIO_REGION_SUBTYPE_MIGRATION = 1
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_NUM_REGIONS = 9

# v1 device_state bits (<= 5.17 names; VFIO_DEVICE_STATE_V1_* from 5.18)
V1_STOP = 0
V1_RUNNING = 1 << 0
V1_SAVING = 1 << 1
V1_RESUMING = 1 << 2
V1_STATE_MASK = 0x7
V1_ERROR = V1_SAVING | V1_RESUMING
# Friendly names shared with v2 where the meaning matches (a suite can be protocol-agnostic).
V1_STATE_NAMES = {
    0: "STOP",
    1: "RUNNING",
    2: "STOP_COPY",
    3: "PRE_COPY",
    4: "RESUMING",
    5: "INVALID_101",
    6: "ERROR",
    7: "INVALID_111",
}


def v1_valid(state):
    """VFIO_DEVICE_STATE_VALID from the 5.8 header: false for 101, 110 and 111."""
    if state & V1_RESUMING:
        return (state & V1_STATE_MASK) == V1_RESUMING
    return True


def v1_is_error(state):
    return (state & V1_STATE_MASK) == V1_ERROR


def v1_set_error(state):
    return (state & ~V1_STATE_MASK & 0xFFFFFFFF) | V1_SAVING | V1_RESUMING


def v1_user_writable(state):
    """The five states a user may write (spec 2.2)."""
    return (state & V1_STATE_MASK) in (0, 1, 2, 3, 4)


# v1 register block at migration-region offset 0: name -> (offset, width)
V1_FIELDS = {
    "device_state": (0, 4),
    "reserved": (4, 4),
    "pending_bytes": (8, 8),
    "data_offset": (16, 8),
    "data_size": (24, 8),
}
V1_INFO_SIZE = 32

# v2 VFIO_DEVICE_FEATURE
VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18
FEATURES = {
    "PCI_VF_TOKEN": 0,
    "MIGRATION": 1,
    "MIG_DEVICE_STATE": 2,
    "LOW_POWER_ENTRY": 3,
    "LOW_POWER_ENTRY_WITH_WAKEUP": 4,
    "LOW_POWER_EXIT": 5,
    "DMA_LOGGING_START": 6,
    "DMA_LOGGING_STOP": 7,
    "DMA_LOGGING_REPORT": 8,
    "MIG_DATA_SIZE": 9,
    "BUS_MASTER": 10,
    "DMA_BUF": 11,
}
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2
VFIO_DEVICE_FEATURE_MIG_DATA_SIZE = 9

VFIO_MIGRATION_STOP_COPY = 1 << 0
VFIO_MIGRATION_P2P = 1 << 1
VFIO_MIGRATION_PRE_COPY = 1 << 2
MIGRATION_FLAGS = (("STOP_COPY", 1 << 0), ("P2P", 1 << 1), ("PRE_COPY", 1 << 2))

V2_STATES = {
    "ERROR": 0,
    "STOP": 1,
    "RUNNING": 2,
    "STOP_COPY": 3,
    "RESUMING": 4,
    "RUNNING_P2P": 5,
    "PRE_COPY": 6,
    "PRE_COPY_P2P": 7,
}
V2_STATE_NAMES = dict((v, k) for k, v in V2_STATES.items())
VFIO_DEVICE_STATE_NR = 8
S_ERROR, S_STOP, S_RUNNING, S_STOP_COPY, S_RESUMING, S_RUNNING_P2P, S_PRE_COPY, S_PRE_COPY_P2P = range(8)

# ---------------------------------------------------------------------------
# v2 next-state resolution: vfio_mig_get_next_state (spec 3.4), copied table
# ---------------------------------------------------------------------------

_E, _S, _R, _SC, _RS, _RP, _PC, _PCP = range(8)
MIG_NEXT_STATE = (
    # target: ERROR STOP RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY PRE_COPY_P2P
    (_E, _E, _E, _E, _E, _E, _E, _E),  # from ERROR
    (_E, _S, _RP, _SC, _RS, _RP, _RP, _RP),  # from STOP
    (_E, _RP, _R, _RP, _RP, _RP, _PC, _RP),  # from RUNNING
    (_E, _S, _S, _SC, _S, _S, _E, _E),  # from STOP_COPY
    (_E, _S, _S, _S, _RS, _S, _S, _S),  # from RESUMING
    (_E, _S, _R, _S, _S, _RP, _R, _PCP),  # from RUNNING_P2P
    (_E, _R, _R, _PCP, _R, _R, _PC, _PCP),  # from PRE_COPY
    (_E, _RP, _RP, _SC, _RP, _RP, _PC, _PCP),  # from PRE_COPY_P2P
)
_SC_F, _P2P_F, _PC_F = VFIO_MIGRATION_STOP_COPY, VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY
MIG_STATE_FLAGS = (
    0xFFFFFFFF,  # ERROR: never satisfiable
    _SC_F,
    _SC_F,
    _SC_F,
    _SC_F,
    _SC_F | _P2P_F,
    _SC_F | _PC_F,
    _SC_F | _P2P_F | _PC_F,
)


def mig_state_supported(state, flags):
    return 0 <= state < VFIO_DEVICE_STATE_NR and (MIG_STATE_FLAGS[state] & flags) == MIG_STATE_FLAGS[state]


def mig_request_hangs(cur, new, flags):
    """True when the kernel's skip loop spins forever on this request (spec 3.4, before FIX-2026):
    both states are supported but the resolution runs into ERROR, which is never 'supported'."""
    if not (mig_state_supported(cur, flags) and mig_state_supported(new, flags)):
        return False
    nxt = MIG_NEXT_STATE[cur][new]
    seen = set()
    while not mig_state_supported(nxt, flags):
        if nxt == S_ERROR or nxt in seen:
            return True
        seen.add(nxt)
        nxt = MIG_NEXT_STATE[nxt][new]
    return False


def mig_next_state(cur, new, flags):
    """The next single arc from `cur` toward `new`, or raise OSError(EINVAL).

    Same result as the kernel's function for every request, except the two that
    hang a real kernel (mig_request_hangs): there we stop on ERROR and fail, which
    is what the kernel documents and what FIX-2026 does.
    """
    if not mig_state_supported(cur, flags):
        raise OSError(errno.EINVAL, "current state %s not supported" % cur)
    if new >= VFIO_DEVICE_STATE_NR or new < 0 or not mig_state_supported(new, flags):
        raise OSError(errno.EINVAL, "target state %s not supported" % new)
    nxt = MIG_NEXT_STATE[cur][new]
    while nxt != S_ERROR and not mig_state_supported(nxt, flags):
        nxt = MIG_NEXT_STATE[nxt][new]
    if nxt == S_ERROR:
        raise OSError(errno.EINVAL, "no path from %s to %s" % (V2_STATE_NAMES[cur], V2_STATE_NAMES[new]))
    return nxt


def mig_path(cur, new, flags):
    """The arcs a driver sees for SET `new` from `cur`: [cur, a, b, ..., new]."""
    path = [cur]
    while cur != new:
        cur = mig_next_state(cur, new, flags)
        path.append(cur)
    return path


# arcs whose last step opens a data session (V2-R7)
SESSION_OPENING_ARCS = (
    (S_RUNNING, S_PRE_COPY),
    (S_RUNNING_P2P, S_PRE_COPY_P2P),
    (S_STOP, S_STOP_COPY),
    (S_STOP, S_RESUMING),
)
SAVING_GROUP = (S_PRE_COPY, S_PRE_COPY_P2P, S_STOP_COPY)

# ---------------------------------------------------------------------------
# struct layouts (native byte order, standard sizes; none has holes)
# ---------------------------------------------------------------------------

ST_GROUP_STATUS = struct.Struct("=II")  # argsz, flags
ST_DEVICE_INFO = struct.Struct("=IIIIII")  # argsz, flags, num_regions, num_irqs, cap_offset, pad
ST_REGION_INFO = struct.Struct("=IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
ST_CAP_HEADER = struct.Struct("=HHI")  # id, version, next
ST_CAP_TYPE = struct.Struct("=II")  # type, subtype (after the header)
ST_CAP_SPARSE = struct.Struct("=II")  # nr_areas, reserved
ST_SPARSE_AREA = struct.Struct("=QQ")  # offset, size
ST_FEATURE_HDR = struct.Struct("=II")  # argsz, flags
ST_MIGRATION = struct.Struct("=Q")  # migration flags
ST_MIG_STATE = struct.Struct("=Ii")  # device_state, data_fd
ST_MIG_DATA_SIZE = struct.Struct("=Q")  # stop_copy_length
ST_PRECOPY_INFO = struct.Struct("=IIQQ")  # argsz, flags, initial_bytes, dirty_bytes
ST_BIND_IOMMUFD = struct.Struct("=IIiI")  # argsz, flags, iommufd, out_devid (original 16-byte form)
ST_ATTACH_PT = struct.Struct("=III")  # argsz, flags, pt_id
ST_IOAS_ALLOC = struct.Struct("=III")  # size, flags, out_ioas_id
ST_V1_INFO = struct.Struct("=IIQQQ")  # device_state, reserved, pending_bytes, data_offset, data_size
ST_LOG_CONTROL = struct.Struct("=QIIQ")  # page_size, num_ranges, reserved, ranges (user pointer)
ST_LOG_RANGE = struct.Struct("=QQ")  # iova, length
ST_LOG_REPORT = struct.Struct("=QQQQ")  # iova, length, page_size, bitmap (user pointer)

STRUCT_SIZES = {
    "vfio_group_status": ST_GROUP_STATUS.size,
    "vfio_device_info": ST_DEVICE_INFO.size,
    "vfio_region_info": ST_REGION_INFO.size,
    "vfio_info_cap_header": ST_CAP_HEADER.size,
    "vfio_region_info_cap_type": ST_CAP_HEADER.size + ST_CAP_TYPE.size,
    "vfio_device_feature": ST_FEATURE_HDR.size,
    "vfio_device_feature_migration": ST_MIGRATION.size,
    "vfio_device_feature_mig_state": ST_MIG_STATE.size,
    "vfio_device_feature_mig_data_size": ST_MIG_DATA_SIZE.size,
    "vfio_precopy_info": ST_PRECOPY_INFO.size,
    "vfio_device_migration_info": ST_V1_INFO.size,
    "vfio_device_bind_iommufd": ST_BIND_IOMMUFD.size,
    "vfio_device_attach_iommufd_pt": ST_ATTACH_PT.size,
    "iommu_ioas_alloc": ST_IOAS_ALLOC.size,
}


def flag_names(value, table):
    return [name for name, bit in table if value & bit]


def errname(code):
    return errno.errorcode.get(code, "E%s" % code) if code is not None else None


def oserror(code, message):
    return OSError(code, "%s: %s" % (errname(code), message))

