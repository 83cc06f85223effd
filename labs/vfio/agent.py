"""labs device agent: drives a host's VFIO migration uAPI for a remote controller.

This one file is sent over SSH and run as root on lab hosts, so it is stdlib
only and Python 3.6 compatible (no walrus, no dataclasses, no annotations
future import). It is also imported in-process: the controller takes the uAPI
tables from here (single source of truth) and the simulator reuses the packing.

Wire protocol (stdin -> requests, stdout -> replies; stderr is free text):
  request   {"id": N, "op": "...", "args": {...}, "timeout": s}\\n
  reply     {"id": N, "ok": true, "result": ..., "duration": s}\\n
  error     {"id": N, "ok": false, "errno": E, "errname": "EINVAL", "error": "...", "detail": {...}}\\n
Bulk data travels as frames: a 4-byte big-endian length, then that many bytes;
a zero-length frame ends the sequence. Ops in FRAMES_IN read frames that follow
their request line; ops in FRAMES_OUT write frames *before* their reply line
(always ended by the zero frame, even on error).

A watchdog kills the process (exit 3, after a final line with "fatal") when an
op makes no progress for its timeout. Every device and data fd is closed on
every exit path; the kernel does the same when we are killed.
"""

import base64
import errno
import fcntl
import hashlib
import importlib
import json
import os
import platform
import signal
import struct
import sys
import threading
import time

AGENT_VERSION = "1.0"
PROTOCOL_VERSION = 1

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


# ---------------------------------------------------------------------------
# syscall layer: real backend (the sim backend, labs.sim.kernel.SimKernel, has the same methods)
# ---------------------------------------------------------------------------


class RealSys(object):
    """os/fcntl calls. ioctl buffers are mutable bytearrays so the kernel's writes and
    the syscall return value both reach us (spec 1.2)."""

    name = "real"

    def open(self, path, flags=os.O_RDWR):
        return os.open(path, flags | os.O_CLOEXEC)

    def close(self, fd):
        os.close(fd)

    def ioctl(self, fd, request, arg=0):
        if isinstance(arg, bytearray):
            return fcntl.ioctl(fd, request, arg, True)
        return fcntl.ioctl(fd, request, arg)

    def pread(self, fd, n, offset):
        return os.pread(fd, n, offset)

    def pwrite(self, fd, data, offset):
        return os.pwrite(fd, data, offset)

    def read(self, fd, n):
        return os.read(fd, n)

    def write(self, fd, data):
        return os.write(fd, data)

    def cloexec(self, fd):
        return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)

    def iommu_group(self, sysfs_dev):
        return os.path.basename(os.readlink(os.path.join(sysfs_dev, "iommu_group")))

    def exists(self, path):
        return os.path.exists(path)

    def listdir(self, path):
        return sorted(os.listdir(path))

    def driver_for(self, fd):
        raise oserror(errno.EOPNOTSUPP, "not a simulated device")


# ---------------------------------------------------------------------------
# uAPI operations on any backend
# ---------------------------------------------------------------------------


def sysfs_device_path(kind, address):
    if kind == "pci":
        return "/sys/bus/pci/devices/%s" % address
    if kind == "mdev":
        return "/sys/bus/mdev/devices/%s" % address
    raise oserror(errno.EINVAL, "unknown device kind %r" % kind)


def open_group_path(sysl, sysfs_dev, name, noiommu=None):
    """Legacy container/group sequence (spec 1.3). Returns (device_fd, [fds to close after it], info)."""
    group = sysl.iommu_group(sysfs_dev)
    if noiommu is None:
        noiommu = sysl.exists("/dev/vfio/noiommu-%s" % group)
    gpath = ("/dev/vfio/noiommu-%s" if noiommu else "/dev/vfio/%s") % group
    opened = []
    try:
        cfd = sysl.open("/dev/vfio/vfio")
        opened.append(cfd)
        version = sysl.ioctl(cfd, VFIO_GET_API_VERSION, 0)
        if version != VFIO_API_VERSION:
            raise oserror(errno.EPROTO, "VFIO API version %s, expected %s" % (version, VFIO_API_VERSION))
        if noiommu:
            iommu = VFIO_NOIOMMU_IOMMU
        elif sysl.ioctl(cfd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) > 0:
            iommu = VFIO_TYPE1v2_IOMMU
        else:
            iommu = VFIO_TYPE1_IOMMU
        gfd = sysl.open(gpath)
        opened.append(gfd)
        status = bytearray(ST_GROUP_STATUS.pack(ST_GROUP_STATUS.size, 0))
        sysl.ioctl(gfd, VFIO_GROUP_GET_STATUS, status)
        gflags = ST_GROUP_STATUS.unpack(bytes(status))[1]
        if not gflags & VFIO_GROUP_FLAGS_VIABLE:
            raise oserror(errno.EPERM, "group %s is not viable (bind every device in it to vfio)" % group)
        sysl.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", cfd)))
        sysl.ioctl(cfd, VFIO_SET_IOMMU, iommu)
        dfd = sysl.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, bytearray(name.encode() + b"\0"))
    except Exception:
        for fd in reversed(opened):
            _quiet_close(sysl, fd)
        raise
    # the device fd holds its own references; we keep group and container open
    # for the device's lifetime anyway (as QEMU does) and close them after it.
    return dfd, [gfd, cfd], {"path": "group", "group": group, "iommu": iommu}


def open_cdev_path(sysl, sysfs_dev):
    """cdev/iommufd sequence (spec 1.4). Returns (device_fd, [fds], info)."""
    vdir = os.path.join(sysfs_dev, "vfio-dev")
    names = [n for n in sysl.listdir(vdir) if n.startswith("vfio")]
    if not names:
        raise oserror(errno.ENODEV, "no vfio-dev under %s" % sysfs_dev)
    opened = []
    try:
        dfd = sysl.open("/dev/vfio/devices/%s" % names[0])
        opened.append(dfd)
        ifd = sysl.open("/dev/iommu")
        opened.append(ifd)
        bind = bytearray(ST_BIND_IOMMUFD.pack(ST_BIND_IOMMUFD.size, 0, ifd, 0))
        sysl.ioctl(dfd, VFIO_DEVICE_BIND_IOMMUFD, bind)
        devid = ST_BIND_IOMMUFD.unpack(bytes(bind))[3]
        alloc = bytearray(ST_IOAS_ALLOC.pack(ST_IOAS_ALLOC.size, 0, 0))
        sysl.ioctl(ifd, IOMMU_IOAS_ALLOC, alloc)
        ioas = ST_IOAS_ALLOC.unpack(bytes(alloc))[2]
        attach = bytearray(ST_ATTACH_PT.pack(ST_ATTACH_PT.size, 0, ioas))
        sysl.ioctl(dfd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach)
    except Exception:
        for fd in reversed(opened):
            _quiet_close(sysl, fd)
        raise
    return dfd, [ifd], {"path": "cdev", "cdev": names[0], "devid": devid, "ioas": ioas}


def _quiet_close(sysl, fd):
    try:
        sysl.close(fd)
    except OSError:
        pass


def device_info(sysl, dfd):
    buf = bytearray(ST_DEVICE_INFO.pack(ST_DEVICE_INFO.size, 0, 0, 0, 0, 0))
    sysl.ioctl(dfd, VFIO_DEVICE_GET_INFO, buf)
    argsz, flags, num_regions, num_irqs, cap_offset, _pad = ST_DEVICE_INFO.unpack(bytes(buf))
    return {
        "argsz": argsz,
        "flags": flags,
        "flag_names": flag_names(flags, DEVICE_FLAGS),
        "num_regions": num_regions,
        "num_irqs": num_irqs,
        "cap_offset": cap_offset,
    }


def region_info(sysl, dfd, index):
    """GET_REGION_INFO with the capability chain; re-issued with the argsz the kernel asks for."""
    argsz = ST_REGION_INFO.size
    for _attempt in range(3):
        buf = bytearray(argsz)
        ST_REGION_INFO.pack_into(buf, 0, argsz, 0, index, 0, 0, 0)
        sysl.ioctl(dfd, VFIO_DEVICE_GET_REGION_INFO, buf)
        need, flags, idx, cap_offset, size, offset = ST_REGION_INFO.unpack_from(bytes(buf), 0)
        if flags & VFIO_REGION_INFO_FLAG_CAPS and need > argsz and cap_offset == 0:
            argsz = need
            continue
        break
    caps = []
    if flags & VFIO_REGION_INFO_FLAG_CAPS and cap_offset:
        caps = walk_caps(bytes(buf), cap_offset)
    return {
        "index": idx,
        "flags": flags,
        "flag_names": flag_names(flags, REGION_FLAGS),
        "cap_offset": cap_offset,
        "size": size,
        "offset": offset,
        "argsz": need,
        "caps": caps,
    }


def walk_caps(buf, offset):
    caps = []
    seen = set()
    while offset:
        if offset in seen or offset + ST_CAP_HEADER.size > len(buf):
            raise oserror(errno.EPROTO, "broken capability chain at offset %d" % offset)
        seen.add(offset)
        cid, version, nxt = ST_CAP_HEADER.unpack_from(buf, offset)
        cap = {"id": cid, "version": version, "offset": offset}
        body = offset + ST_CAP_HEADER.size
        if cid == VFIO_REGION_INFO_CAP_TYPE and body + ST_CAP_TYPE.size <= len(buf):
            cap["type"], cap["subtype"] = ST_CAP_TYPE.unpack_from(buf, body)
        elif cid == VFIO_REGION_INFO_CAP_SPARSE_MMAP and body + ST_CAP_SPARSE.size <= len(buf):
            nr, _res = ST_CAP_SPARSE.unpack_from(buf, body)
            areas = []
            for i in range(min(nr, 1024)):
                at = body + ST_CAP_SPARSE.size + i * ST_SPARSE_AREA.size
                if at + ST_SPARSE_AREA.size > len(buf):
                    break
                areas.append(list(ST_SPARSE_AREA.unpack_from(buf, at)))
            cap["areas"] = areas
        caps.append(cap)
        offset = nxt
    return caps


def is_migration_region(info):
    for cap in info["caps"]:
        if cap["id"] == VFIO_REGION_INFO_CAP_TYPE and cap.get("type") == VFIO_REGION_TYPE_MIGRATION:
            if cap.get("subtype") == VFIO_REGION_SUBTYPE_MIGRATION:
                return True
    return False


def find_migration_region(sysl, dfd):
    info = device_info(sysl, dfd)
    for index in range(VFIO_PCI_NUM_REGIONS, info["num_regions"]):
        try:
            r = region_info(sysl, dfd, index)
        except OSError:
            continue
        if is_migration_region(r):
            return r
    return None


def device_feature(sysl, dfd, flags, payload=b"", argsz=None):
    """Raw VFIO_DEVICE_FEATURE: returns (ret, payload bytes after the kernel wrote them)."""
    size = ST_FEATURE_HDR.size + len(payload)
    buf = bytearray(size)
    ST_FEATURE_HDR.pack_into(buf, 0, size if argsz is None else argsz, flags)
    buf[ST_FEATURE_HDR.size :] = payload
    ret = sysl.ioctl(dfd, VFIO_DEVICE_FEATURE, buf)
    return ret, bytes(buf[ST_FEATURE_HDR.size :])


def mig_flags(sysl, dfd):
    _ret, out = device_feature(
        sysl, dfd, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION, bytes(ST_MIGRATION.size)
    )
    return ST_MIGRATION.unpack(out)[0]


def mig_get_state(sysl, dfd):
    _ret, out = device_feature(
        sysl, dfd, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, ST_MIG_STATE.pack(0, -1)
    )
    return ST_MIG_STATE.unpack(out)


class UserBuffer(object):
    """Process memory lent to the kernel through a pointer in an ioctl struct. A backend with a
    `user_buffers` dict (the sim kernel) is told the address, so it can refuse others (EFAULT)."""

    def __init__(self, sysl, data):
        import ctypes  # only the DMA-logging ops need it

        self.size = len(data)
        self.buf = ctypes.create_string_buffer(bytes(data), max(1, self.size))
        self.addr = ctypes.addressof(self.buf)
        self.lent = getattr(sysl, "user_buffers", None)
        if self.lent is not None:
            self.lent[self.addr] = self.size

    def read(self):
        return self.buf.raw[: self.size]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.lent is not None:
            self.lent.pop(self.addr, None)


def dma_logging_start(sysl, dfd, page_size, ranges):
    """SET DMA_LOGGING_START over [(iova, length)]; returns the page size the driver chose."""
    table = b"".join(ST_LOG_RANGE.pack(iova, length) for iova, length in ranges)
    with UserBuffer(sysl, table) as ranges_buf:
        payload = ST_LOG_CONTROL.pack(page_size, len(ranges), 0, ranges_buf.addr if ranges else 0)
        _ret, out = device_feature(sysl, dfd, VFIO_DEVICE_FEATURE_SET | FEATURES["DMA_LOGGING_START"], payload)
    return ST_LOG_CONTROL.unpack(out)[0]


def dma_logging_stop(sysl, dfd):
    device_feature(sysl, dfd, VFIO_DEVICE_FEATURE_SET | FEATURES["DMA_LOGGING_STOP"])


def dma_logging_report(sysl, dfd, iova, length, page_size):
    """GET DMA_LOGGING_REPORT into a zeroed bitmap (the kernel only sets bits); returns its bytes."""
    pages = (length + page_size - 1) // page_size if page_size else 0
    with UserBuffer(sysl, bytes((pages + 63) // 64 * 8)) as bitmap:
        payload = ST_LOG_REPORT.pack(iova, length, page_size, bitmap.addr)
        device_feature(sysl, dfd, VFIO_DEVICE_FEATURE_GET | FEATURES["DMA_LOGGING_REPORT"], payload)
        return bitmap.read()


def bitmap_pages(bitmap):
    """Set bits of a DMA-logging bitmap: page k is bit k%64 of little-endian u64 word k/64 (spec 3.7)."""
    out = []  # type: list[int]
    for w in range(len(bitmap) // 8):
        word = struct.unpack_from("<Q", bitmap, w * 8)[0]
        out.extend(w * 64 + b for b in range(64) if word >> b & 1)
    return out


# data_fd pre-fill for SET: not -1, so a failed SET that leaves the field alone shows (V2-R17)
DATA_FD_SENTINEL = -0x5A5A5A5A


def mig_set_state(sysl, dfd, state):
    """SET MIG_DEVICE_STATE. Returns (data_fd or -1, buffer state). On failure the OSError
    carries .buffer = (state, data_fd) as the kernel left it (V2-R17)."""
    size = ST_FEATURE_HDR.size + ST_MIG_STATE.size
    buf = bytearray(size)
    ST_FEATURE_HDR.pack_into(buf, 0, size, VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE)
    ST_MIG_STATE.pack_into(buf, ST_FEATURE_HDR.size, state & 0xFFFFFFFF, DATA_FD_SENTINEL)
    try:
        sysl.ioctl(dfd, VFIO_DEVICE_FEATURE, buf)
    except OSError as exc:
        exc.buffer = ST_MIG_STATE.unpack_from(bytes(buf), ST_FEATURE_HDR.size)  # type: ignore[attr-defined]
        raise
    bstate, data_fd = ST_MIG_STATE.unpack_from(bytes(buf), ST_FEATURE_HDR.size)
    return data_fd, bstate


def mig_data_size(sysl, dfd):
    _ret, out = device_feature(
        sysl, dfd, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, bytes(ST_MIG_DATA_SIZE.size)
    )
    return ST_MIG_DATA_SIZE.unpack(out)[0]


def precopy_info(sysl, data_fd, argsz=None):
    buf = bytearray(ST_PRECOPY_INFO.pack(ST_PRECOPY_INFO.size if argsz is None else argsz, 0, 0, 0))
    sysl.ioctl(data_fd, VFIO_MIG_GET_PRECOPY_INFO, buf)
    _argsz, flags, initial, dirty = ST_PRECOPY_INFO.unpack(bytes(buf))
    return {"initial_bytes": initial, "dirty_bytes": dirty, "flags": flags}


def read_exact_at(sysl, fd, n, offset):
    out = []
    got = 0
    while got < n:
        piece = sysl.pread(fd, n - got, offset + got)
        if not piece:
            raise oserror(errno.EIO, "short region read at %d" % (offset + got))
        out.append(piece)
        got += len(piece)
    return b"".join(out)


def write_all_at(sysl, fd, data, offset):
    done = 0
    view = memoryview(data)
    while done < len(data):
        n = sysl.pwrite(fd, bytes(view[done:]), offset + done)
        if n <= 0:
            raise oserror(errno.EIO, "short region write at %d" % (offset + done))
        done += n
    return done


_WIDTH_FMT = {1: "=B", 2: "=H", 4: "=I", 8: "=Q"}


def v1_reg_read(sysl, dfd, region_offset, offset, width):
    """One pread of exactly `width` bytes: native width, one syscall per field (spec 1.2)."""
    data = sysl.pread(dfd, width, region_offset + offset)
    if len(data) != width:
        raise oserror(errno.EIO, "short %d-byte read at migration offset %d" % (width, offset))
    return struct.unpack(_WIDTH_FMT[width], data)[0]


def v1_reg_write(sysl, dfd, region_offset, offset, width, value):
    value &= (1 << (8 * width)) - 1  # a negative value is written as the field's two's complement
    n = sysl.pwrite(dfd, struct.pack(_WIDTH_FMT[width], value), region_offset + offset)
    if n != width:
        raise oserror(errno.EIO, "short %d-byte write at migration offset %d" % (width, offset))


# ---------------------------------------------------------------------------
# the agent process
# ---------------------------------------------------------------------------

FRAMES_IN = frozenset(["data_write", "v1_resume"])
FRAMES_OUT = frozenset(["data_read", "v1_save", "blob"])
FRAME_HDR = struct.Struct(">I")
MAX_FRAME = 64 << 20
DEFAULT_CHUNK = 1 << 20


class ProtocolError(Exception):
    """A bad request: not the device's fault."""


class OpError(OSError):
    """A device errno plus what had been done when it happened (bytes moved...)."""

    def __init__(self, code, message, detail):
        OSError.__init__(self, code, message)
        self.detail = detail


class Wire(object):
    """Buffered framing over raw fds (stdin's own buffer would swallow frame bytes)."""

    def __init__(self, rfd=0, wfd=1):
        self.rfd = rfd
        self.wfd = wfd
        self.buf = bytearray()
        self.wlock = threading.Lock()

    def _fill(self):
        data = os.read(self.rfd, 1 << 20)
        if not data:
            raise EOFError()
        self.buf += data

    def readline(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > MAX_FRAME:
                raise ProtocolError("request line too long")
            self._fill()

    def readexact(self, n):
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_frame(self):
        (n,) = FRAME_HDR.unpack(self.readexact(FRAME_HDR.size))
        if n > MAX_FRAME:
            raise ProtocolError("frame of %d bytes is too large" % n)
        return self.readexact(n) if n else b""

    def _send(self, data):
        view = memoryview(data)
        while len(view):
            n = os.write(self.wfd, view)
            view = view[n:]

    def send_json(self, obj):
        line = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        with self.wlock:
            self._send(line)

    def send_frame(self, data):
        with self.wlock:
            self._send(FRAME_HDR.pack(len(data)))
            if data:
                self._send(data)


class Watchdog(object):
    """Kills the agent when the current op makes no progress for its timeout."""

    def __init__(self, wire):
        self.wire = wire
        self.lock = threading.Lock()
        self.deadline = None
        self.timeout = None
        self.current = None
        t = threading.Thread(target=self._run, name="watchdog")
        t.daemon = True
        t.start()

    def arm(self, req_id, op, timeout):
        with self.lock:
            self.current = (req_id, op)
            self.timeout = timeout
            self.deadline = time.monotonic() + timeout if timeout else None

    def touch(self):
        with self.lock:
            if self.timeout:
                self.deadline = time.monotonic() + self.timeout

    def disarm(self):
        with self.lock:
            self.deadline = None
            self.current = None

    def _run(self):
        while True:
            time.sleep(0.02)
            with self.lock:
                fire = self.deadline is not None and time.monotonic() > self.deadline
                current, timeout = self.current, self.timeout
            if fire:
                self._fire(current, timeout)

    def _fire(self, current, timeout):
        req_id, op = current or (None, None)
        message = "watchdog: op %r made no progress for %ss; agent exits" % (op, timeout)
        try:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        except Exception:
            pass
        # the main thread may hold the wire mid-frame: only speak if we can get it
        if self.wire.wlock.acquire(timeout=0.5):
            try:
                line = {"id": req_id, "ok": False, "fatal": "watchdog", "errno": None, "errname": None}
                line["error"] = message
                self.wire._send(b"\n" + json.dumps(line).encode() + b"\n")
            except Exception:
                pass
        os._exit(3)


def _summarize(value, depth=0):
    """A transcript-sized copy: long strings cut, big lists shortened."""
    if isinstance(value, str):
        return value if len(value) <= 80 else value[:77] + "..."
    if isinstance(value, dict):
        if depth > 2:
            return "{...}"
        return dict((k, _summarize(v, depth + 1)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if depth > 2 or len(value) > 16:
            return "[%d items]" % len(value)
        return [_summarize(v, depth + 1) for v in value]
    return value


class Handle(object):
    def __init__(self, hid, kind, sysl, fd, parent=None):
        self.id = hid
        self.kind = kind  # "device" | "data"
        self.sys = sysl
        self.fd = fd
        self.parent = parent
        self.extra_fds = []  # group/container/iommufd, closed after the device
        self.children = []  # data handles of a device
        self.mig_region = None  # cached v1 region info
        self.info = {}


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _unb64(text):
    return base64.b64decode(text.encode("ascii"))


class Agent(object):
    def __init__(self, wire):
        self.wire = wire
        self.handles = {}
        self.next_handle = 1
        self.default_timeout = 60.0
        self.transcript = []
        self.transcript_limit = 20000
        self.transcript_next = 0  # absolute seq: a long-lived (pooled) agent drops its oldest entries
        self.real = RealSys()
        self.sim = None
        # no cleanup from the watchdog thread: it could block on what hung; os._exit
        # makes the kernel close every fd (and drop the sim device's flock)
        self.watchdog = Watchdog(wire)
        self.closed = False
        self.locks = {}  # reservation name -> (fd, lock path): flocks this process holds

    # -- plumbing -----------------------------------------------------------
    def serve(self):
        while True:
            try:
                line = self.wire.readline()
            except EOFError:
                return
            if not line.strip():
                continue
            try:
                req = json.loads(line.decode())
                op = req["op"]
            except (ValueError, KeyError, TypeError):
                self.wire.send_json(
                    {
                        "id": None,
                        "ok": False,
                        "errno": None,
                        "errname": None,
                        "kind": "protocol",
                        "error": "malformed request line",
                    }
                )
                continue
            if self.handle_request(req, op) == "shutdown":
                return

    def handle_request(self, req, op):
        req_id = req.get("id")
        args = req.get("args") or {}
        timeout = req.get("timeout") or self.default_timeout
        start = time.monotonic()
        entry = {"seq": self.transcript_next, "op": op, "args": _summarize(args), "t": time.time()}
        self.transcript_next += 1
        frames_in = self._frames_in() if op in FRAMES_IN else None
        reply = {"id": req_id}
        self.watchdog.arm(req_id, op, timeout)
        try:
            handler = getattr(self, "op_" + op, None)
            if handler is None:
                raise ProtocolError("unknown op %r" % op)
            if op in FRAMES_IN:
                result = handler(args, frames_in)
            elif op in FRAMES_OUT:
                result = handler(args, self._emit)
            else:
                result = handler(args)
            reply["ok"] = True
            reply["result"] = result
            entry["ok"] = True
            entry["result"] = _summarize(result)
        except OSError as exc:
            code = exc.errno if exc.errno is not None else errno.EIO
            reply.update(ok=False, errno=code, errname=errname(code), error=exc.strerror or str(exc))
            detail = getattr(exc, "detail", None)
            if getattr(exc, "buffer", None) is not None:
                buf = exc.buffer  # type: ignore[attr-defined]
                detail = dict(detail or {}, buffer={"device_state": buf[0], "data_fd": buf[1]})
            if detail:
                reply["detail"] = detail
            entry.update(ok=False, errno=code, errname=errname(code))
        except (ProtocolError, KeyError, ValueError, TypeError) as exc:
            kind = "protocol" if isinstance(exc, ProtocolError) else "usage"
            reply.update(ok=False, errno=None, errname=None, kind=kind, error="%s: %s" % (type(exc).__name__, exc))
            entry.update(ok=False, error=reply["error"])
        finally:
            if frames_in is not None:
                for _frame in frames_in:  # drain what the controller still sends
                    pass
            if op in FRAMES_OUT:
                self.wire.send_frame(b"")
            self.watchdog.disarm()
        reply["duration"] = entry["duration"] = round(time.monotonic() - start, 6)
        self.transcript.append(entry)
        if len(self.transcript) > self.transcript_limit:
            del self.transcript[: self.transcript_limit // 2]
        self.wire.send_json(reply)
        return op if reply.get("ok") else None

    def _frames_in(self):
        while True:
            frame = self.wire.read_frame()
            self.watchdog.touch()
            if not frame:
                return
            yield frame

    def _emit(self, data):
        self.wire.send_frame(data)
        self.watchdog.touch()

    def _new_handle(self, kind, sysl, fd, parent=None):
        h = Handle(self.next_handle, kind, sysl, fd, parent)
        self.next_handle += 1
        self.handles[h.id] = h
        if parent is not None:
            parent.children.append(h)
        return h

    def _get(self, args, key="dev", kind="device"):
        hid = args.get(key)
        h = self.handles.get(hid)
        if h is None or h.kind != kind:
            raise oserror(errno.EBADF, "no open %s handle %r" % (kind, hid))
        return h

    def _close_handle(self, h):
        for child in list(h.children):
            self._close_handle(child)
        self.handles.pop(h.id, None)
        if h.parent is not None and h in h.parent.children:
            h.parent.children.remove(h)
        first_error = None
        for fd in [h.fd] + list(h.extra_fds):
            try:
                h.sys.close(fd)
            except OSError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def cleanup(self):
        """Close every data fd, then every device fd (and its group/container)."""
        if self.closed:
            return
        self.closed = True
        for name in list(self.locks):
            self._unlock(name)
        for h in [h for h in self.handles.values() if h.kind == "data"]:
            try:
                self._close_handle(h)
            except Exception:
                pass
        for h in list(self.handles.values()):
            try:
                self._close_handle(h)
            except Exception:
                pass

    # -- session ------------------------------------------------------------
    def op_hello(self, args):
        _add_sys_path(args.get("sys_path"))
        if args.get("timeout"):
            self.default_timeout = float(args["timeout"])
        uname = os.uname()
        return {
            "agent": AGENT_VERSION,
            "protocol": PROTOCOL_VERSION,
            "python": "%d.%d.%d" % sys.version_info[:3],
            "kernel": uname.release,
            "arch": uname.machine,
            "pid": os.getpid(),
            "uid": os.getuid(),
            "backends": ["real", "sim"],
            "default_timeout": self.default_timeout,
            "sim_host": os.environ.get("LABS_SIM_HOST"),
            "sim_dir": os.environ.get("LABS_SIM_DIR"),
            "dev_vfio": os.path.isdir("/dev/vfio"),
            "vfio_cdev": os.path.isdir("/dev/vfio/devices"),
        }

    def op_ping(self, args):
        return {}

    def op_transcript(self, args):
        """Entries with seq >= since (those still kept)."""
        since = int(args.get("since", 0))
        first = self.transcript[0]["seq"] if self.transcript else self.transcript_next
        return self.transcript[max(0, since - first):]

    def op_transcript_seq(self, args):
        """The seq the next request gets: pass it as `since` later to see only what came after."""
        return {"seq": self.transcript_next}

    def op_shutdown(self, args):
        self.cleanup()
        return {"closed": True}

    # -- reservations ---------------------------------------------------------
    # A device reservation is an flock on <lock dir>/<name>.lock with a JSON record beside it in
    # <name>.lock.owner (labs/reservations.py lists, sweeps and clears the same files). This process
    # holds the flock until unlock, its exit or its death: the kernel drops it however it dies.
    def op_lock(self, args):
        name = str(args["name"])
        if "/" in name or name.startswith("."):
            raise ValueError("bad reservation name %r" % name)
        path = os.path.join(_lock_dir(), name + ".lock")
        if name in self.locks:
            return {"locked": False, "owner": _read_text(path + ".owner")}
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (IOError, OSError) as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return {"locked": False, "owner": _read_text(path + ".owner")}
            raise
        record = dict(args.get("owner") or {}, holder=os.getpid())
        tmp = "%s.owner.%d" % (path, os.getpid())
        with open(tmp, "w") as f:
            f.write(json.dumps(record) + "\n")
        os.rename(tmp, path + ".owner")
        self.locks[name] = (fd, path)
        return {"locked": True, "holder": os.getpid(), "path": path}

    def op_unlock(self, args):
        if str(args["name"]) not in self.locks:
            raise KeyError("not held: %s" % args["name"])
        self._unlock(str(args["name"]))
        return {}

    def _unlock(self, name):
        fd, path = self.locks.pop(name)
        try:
            os.unlink(path + ".owner")
        except OSError:
            pass
        os.close(fd)

    def op_kmsg(self, args):
        """Kernel log records with a sequence number above `after` (dmesg's format), at most `limit`,
        and the kernel's taint mask;
        `after` < 0 reads none, only the newest sequence number (a cursor for later). Reading
        /dev/kmsg here spares the controller an SSH exec (a session, a shell, dmesg) per test."""
        after = int(args.get("after", -1))
        limit = int(args.get("limit", 400))
        tainted = None  # /proc/sys/kernel/tainted, world-readable even where dmesg is restricted
        try:
            with open("/proc/sys/kernel/tainted") as f:
                tainted = int(f.read().strip())
        except (OSError, ValueError):
            pass
        try:
            fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            return {"seq": None, "lines": [], "tainted": tainted, "error": errname(exc.errno or errno.EIO)}
        last, lines = after, []
        try:
            while True:
                try:
                    record = os.read(fd, 8192)
                except OSError as exc:
                    if exc.errno == errno.EPIPE:  # records overwritten under us: go on with the next
                        continue
                    if exc.errno == errno.EAGAIN:
                        break
                    raise
                head, _, text = record.decode("utf-8", "replace").partition(";")
                fields = head.split(",")
                seq, usec = int(fields[1]), int(fields[2])
                last = max(last, seq)
                if 0 <= after < seq:
                    lines.append("[%5d.%06d] %s" % (usec // 1000000, usec % 1000000, text.split("\n")[0]))
        finally:
            os.close(fd)
        return {"seq": last, "lines": lines[-limit:], "tainted": tainted}

    def op_sleep(self, args):
        """For watchdog tests: sleep without progress."""
        time.sleep(float(args.get("seconds", 1)))
        return {}

    def op_blob(self, args, emit):
        """Stream `length` zero bytes (link throughput probe)."""
        length = int(args["length"])
        chunk = bytes(min(int(args.get("chunk", DEFAULT_CHUNK)), max(length, 1)))
        sent = 0
        while sent < length:
            n = min(len(chunk), length - sent)
            emit(chunk[:n])
            sent += n
        return {"bytes": sent}

    # -- devices ------------------------------------------------------------
    def _sim_kernel(self):
        if self.sim is None:
            kernel = importlib.import_module("labs.sim.kernel")
            self.sim = kernel.SimKernel()
        return self.sim

    def op_open(self, args):
        kind = args["kind"]
        if kind == "sim":
            _add_sys_path(args.get("sys_path"))
            sysl = self._sim_kernel()
            name = args.get("name") or "sim0"
            state_dir = args.get("state_dir") or self._default_state_dir(name)
            sysfs = sysl.plug(name, args["driver"], args.get("options") or {}, state_dir)
            dfd, extra, info = open_group_path(sysl, sysfs, name)
            info["state_dir"] = state_dir
        else:
            sysl = self.real
            address = args.get("address") or args.get("uuid")
            if not address:
                raise ProtocolError("open %s needs an address or uuid" % kind)
            sysfs = sysfs_device_path(kind, address)
            path = args.get("path", "auto")
            if path == "auto":
                path = "group" if os.path.exists("/dev/vfio/vfio") else "cdev"
            if path == "cdev":
                dfd, extra, info = open_cdev_path(sysl, sysfs)
            else:
                dfd, extra, info = open_group_path(sysl, sysfs, address, args.get("noiommu"))
        h = self._new_handle("device", sysl, dfd)
        h.extra_fds = extra
        info.update(handle=h.id, backend=sysl.name, fd=dfd)
        h.info = info
        return info

    def _default_state_dir(self, name):
        base = os.environ.get("LABS_SIM_DIR")
        host = os.environ.get("LABS_SIM_HOST")
        if not base or not host:
            raise ProtocolError("sim open needs state_dir (or LABS_SIM_DIR and LABS_SIM_HOST)")
        return os.path.join(base, "hosts", host, "devices", name)

    def op_close(self, args):
        self._close_handle(self._get(args))
        return {}

    def op_close_fd(self, args):
        self._close_handle(self._get(args, "fd", "data"))
        return {}

    def op_handles(self, args):
        return [{"handle": h.id, "kind": h.kind, "fd": h.fd, "backend": h.sys.name} for h in self.handles.values()]

    def op_device_info(self, args):
        h = self._get(args)
        return device_info(h.sys, h.fd)

    def op_region_info(self, args):
        h = self._get(args)
        return region_info(h.sys, h.fd, int(args["index"]))

    def op_find_migration_region(self, args):
        h = self._get(args)
        h.mig_region = find_migration_region(h.sys, h.fd)
        return h.mig_region

    def op_region_read(self, args):
        h = self._get(args)
        base = region_info(h.sys, h.fd, int(args["index"]))["offset"]
        data = h.sys.pread(h.fd, int(args["length"]), base + int(args.get("offset", 0)))
        return {"data": _b64(data), "length": len(data)}

    def op_region_write(self, args):
        h = self._get(args)
        base = region_info(h.sys, h.fd, int(args["index"]))["offset"]
        n = h.sys.pwrite(h.fd, _unb64(args["data"]), base + int(args.get("offset", 0)))
        return {"written": n}

    def op_reset(self, args):
        h = self._get(args)
        return {"ret": h.sys.ioctl(h.fd, VFIO_DEVICE_RESET, 0)}

    def op_fd_info(self, args):
        h = self.handles.get(args.get("fd"))
        if h is None:
            raise oserror(errno.EBADF, "no handle %r" % args.get("fd"))
        return {"fd": h.fd, "kind": h.kind, "cloexec": h.sys.cloexec(h.fd)}

    def op_sim_control(self, args):
        h = self._get(args)
        driver = h.sys.driver_for(h.fd)
        return driver.control(args["action"], args.get("params") or {})

    # -- v1 -------------------------------------------------------------------
    def _mig_region(self, h):
        if h.mig_region is None:
            h.mig_region = find_migration_region(h.sys, h.fd)
            if h.mig_region is None:
                raise oserror(errno.ENODEV, "device has no v1 migration region (type 3, subtype 1)")
        return h.mig_region

    def _field(self, args):
        if "field" in args:
            if args["field"] not in V1_FIELDS:
                raise ProtocolError("unknown v1 field %r" % args["field"])
            return V1_FIELDS[args["field"]]
        width = int(args.get("width", 4))
        if width not in _WIDTH_FMT:
            raise ProtocolError("width must be 1, 2, 4 or 8")
        return int(args["offset"]), width

    def op_v1_read(self, args):
        h = self._get(args)
        offset, width = self._field(args)
        value = v1_reg_read(h.sys, h.fd, self._mig_region(h)["offset"], offset, width)
        out = {"value": value}
        if offset == 0 and width == 4:
            out["name"] = V1_STATE_NAMES[value & V1_STATE_MASK]
        return out

    def op_v1_write(self, args):
        h = self._get(args)
        offset, width = self._field(args)
        v1_reg_write(h.sys, h.fd, self._mig_region(h)["offset"], offset, width, int(args["value"]))
        return {}

    def op_v1_save(self, args, emit):
        """The save iteration of spec 2.4, one frame per chunk (chunk boundaries kept, V1-R18)."""
        h = self._get(args)
        base = self._mig_region(h)["offset"]
        max_bytes = args.get("max_bytes")
        max_chunks = args.get("max_chunks")
        digest = hashlib.sha256()
        sizes = hashlib.sha256()  # the data_size sequence the device reported (V1-R18)
        total = chunks = empty = 0
        end = "done"
        rd = lambda name: v1_reg_read(h.sys, h.fd, base, V1_FIELDS[name][0], V1_FIELDS[name][1])  # noqa: E731
        try:
            pending = rd("pending_bytes")
            while pending > 0:
                if max_bytes is not None and total >= max_bytes:
                    end = "limit"
                    break
                if max_chunks is not None and chunks >= max_chunks:
                    end = "limit"
                    break
                data_offset = rd("data_offset")
                size = rd("data_size")
                if size == 0:
                    empty += 1
                    if empty > 16:  # the driver offers nothing while claiming pending data
                        end = "stalled"
                        break
                else:
                    empty = 0
                    data = read_exact_at(h.sys, h.fd, size, base + data_offset)
                    digest.update(data)
                    sizes.update(struct.pack("<Q", size))
                    total += size
                    chunks += 1
                    emit(data)
                pending = rd("pending_bytes")
        except OSError as exc:
            raise OpError(
                exc.errno, exc.strerror or str(exc), {"bytes": total, "chunks": chunks, "sha256": digest.hexdigest()}
            ) from exc
        return {
            "bytes": total,
            "chunks": chunks,
            "sha256": digest.hexdigest(),
            "sizes_sha256": sizes.hexdigest(),
            "end": end,
            "pending": pending,
        }

    def op_v1_resume(self, args, frames):
        """Spec 2.5 for each frame: read data_offset, write the chunk there, write data_size."""
        h = self._get(args)
        base = self._mig_region(h)["offset"]
        digest = hashlib.sha256()
        sizes = hashlib.sha256()  # the data_size sequence written: one transaction per frame (V1-R18)
        total = chunks = 0
        try:
            for chunk in frames:
                data_offset = v1_reg_read(h.sys, h.fd, base, 16, 8)
                write_all_at(h.sys, h.fd, chunk, base + data_offset)
                v1_reg_write(h.sys, h.fd, base, 24, 8, len(chunk))
                digest.update(chunk)
                sizes.update(struct.pack("<Q", len(chunk)))
                total += len(chunk)
                chunks += 1
        except OSError as exc:
            raise OpError(
                exc.errno, exc.strerror or str(exc), {"bytes": total, "chunks": chunks, "sha256": digest.hexdigest()}
            ) from exc
        return {"bytes": total, "chunks": chunks, "sha256": digest.hexdigest(), "sizes_sha256": sizes.hexdigest()}

    # -- v2 -------------------------------------------------------------------
    def op_feature(self, args):
        h = self._get(args)
        payload = _unb64(args.get("payload", ""))
        ret, out = device_feature(h.sys, h.fd, int(args["flags"]), payload, args.get("argsz"))
        return {"ret": ret, "payload": _b64(out)}

    def op_mig_flags(self, args):
        h = self._get(args)
        flags = mig_flags(h.sys, h.fd)
        return {"flags": flags, "names": flag_names(flags, MIGRATION_FLAGS)}

    def op_mig_get_state(self, args):
        h = self._get(args)
        state, data_fd = mig_get_state(h.sys, h.fd)
        return {"state": state, "name": V2_STATE_NAMES.get(state, "?%d" % state), "data_fd": data_fd}

    def op_mig_set_state(self, args):
        h = self._get(args)
        state = args["state"]
        if not isinstance(state, int):
            state = V2_STATES[state]
        data_fd, bstate = mig_set_state(h.sys, h.fd, state)
        out = {"data_fd": None, "fd": data_fd, "buffer_state": bstate}
        if data_fd >= 0:
            out["data_fd"] = self._new_handle("data", h.sys, data_fd, h).id
        return out

    def op_mig_data_size(self, args):
        h = self._get(args)
        return {"stop_copy_length": mig_data_size(h.sys, h.fd)}

    def op_dma_logging_start(self, args):
        h = self._get(args)
        ranges = [(int(i), int(n)) for i, n in args.get("ranges") or []]
        return {"page_size": dma_logging_start(h.sys, h.fd, int(args["page_size"]), ranges)}

    def op_dma_logging_stop(self, args):
        h = self._get(args)
        dma_logging_stop(h.sys, h.fd)
        return {}

    def op_dma_logging_report(self, args):
        h = self._get(args)
        bitmap = dma_logging_report(h.sys, h.fd, int(args["iova"]), int(args["length"]), int(args["page_size"]))
        return {"bitmap": _b64(bitmap), "pages": bitmap_pages(bitmap)}

    def op_precopy_info(self, args):
        h = self._get(args, "fd", "data")
        return precopy_info(h.sys, h.fd, args.get("argsz"))

    def op_fd_read(self, args):
        """One read() (or pread() with offset): for rule tests on the raw fd."""
        h = self._get(args, "fd", "data")
        if args.get("offset") is not None:
            data = h.sys.pread(h.fd, int(args["length"]), int(args["offset"]))
        else:
            data = h.sys.read(h.fd, int(args["length"]))
        return {"data": _b64(data), "length": len(data)}

    def op_fd_write(self, args):
        h = self._get(args, "fd", "data")
        data = _unb64(args["data"])
        if args.get("offset") is not None:
            n = h.sys.pwrite(h.fd, data, int(args["offset"]))
        else:
            n = h.sys.write(h.fd, data)
        return {"written": n}

    def op_data_read(self, args, emit):
        """read() until 0 (EOF, or 'nothing now' on the sample mdev in PRE_COPY), ENOMSG or the limit."""
        h = self._get(args, "fd", "data")
        limit = args.get("limit")
        chunk = int(args.get("chunk", DEFAULT_CHUNK))
        digest = hashlib.sha256()
        total = reads = 0
        end = "eof"
        try:
            while True:
                want = chunk if limit is None else min(chunk, limit - total)
                if want <= 0:
                    end = "limit"
                    break
                try:
                    data = h.sys.read(h.fd, want)
                except OSError as exc:
                    if exc.errno == errno.ENOMSG:
                        end = "enomsg"
                        break
                    raise
                reads += 1
                if not data:
                    break
                digest.update(data)
                total += len(data)
                emit(data)
        except OSError as exc:
            raise OpError(
                exc.errno, exc.strerror or str(exc), {"bytes": total, "reads": reads, "sha256": digest.hexdigest()}
            ) from exc
        return {"bytes": total, "reads": reads, "sha256": digest.hexdigest(), "end": end}

    def op_data_write(self, args, frames):
        """One write() per frame (looping on short writes): frames are the write sizes."""
        h = self._get(args, "fd", "data")
        digest = hashlib.sha256()
        total = writes = 0
        try:
            for frame in frames:
                view = memoryview(frame)
                while len(view):
                    n = h.sys.write(h.fd, bytes(view))
                    writes += 1
                    if n <= 0:
                        raise oserror(errno.EIO, "write returned %d" % n)
                    digest.update(view[:n])
                    total += n
                    view = view[n:]
        except OSError as exc:
            raise OpError(
                exc.errno, exc.strerror or str(exc), {"bytes": total, "writes": writes, "sha256": digest.hexdigest()}
            ) from exc
        return {"bytes": total, "writes": writes, "sha256": digest.hexdigest()}


def _lock_dir():
    """Where reservations live: a sim host's own directory of its sim lab, else /run/labs/locks,
    else a per-user directory under TMPDIR (a user who cannot write /run)."""
    if os.environ.get("LABS_SIM_DIR"):
        d = os.path.join(os.environ["LABS_SIM_DIR"], "hosts", os.environ.get("LABS_SIM_HOST", ""), "locks")
    else:
        d = "/run/labs/locks"
        try:
            _makedirs(d)
        except OSError:
            pass
        if not os.access(d, os.W_OK):
            d = os.path.join(os.environ.get("TMPDIR") or "/tmp", "labs-locks-%d" % os.getuid())
    _makedirs(d)
    return d


def _makedirs(d):
    try:
        os.makedirs(d)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise


def _read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except (IOError, OSError):
        return ""


def _add_sys_path(entries):
    """Put `entries` first on sys.path, in their order: the labs checkout before a host's python_path."""
    sys.path[0:0] = [e for e in entries or [] if e not in sys.path]


def main():
    wire = Wire(0, 1)
    agent = Agent(wire)

    def _terminate(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            signal.signal(sig, _terminate)
        except (ValueError, OSError):
            pass
    try:
        agent.serve()
    finally:
        agent.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
