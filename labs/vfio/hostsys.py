"""The syscalls behind the agent: the real backend (os and fcntl), the simulated one
(labs.sim.kernel.SimKernel, loaded by name on the host), and the uAPI call sequences that run
on either: open a device by the group or the cdev path, read its regions, drive its migration.

Shipped to lab hosts with the agent (labs/vfio/bundle.py): stdlib only, Python 3.6 compatible.
"""

import errno
import fcntl
import importlib
import os
import struct

from labs.vfio.abi import (
    DEVICE_FLAGS,
    FEATURES,
    IOMMU_IOAS_ALLOC,
    REGION_FLAGS,
    ST_ATTACH_PT,
    ST_BIND_IOMMUFD,
    ST_CAP_HEADER,
    ST_CAP_SPARSE,
    ST_CAP_TYPE,
    ST_DEVICE_INFO,
    ST_FEATURE_HDR,
    ST_GROUP_STATUS,
    ST_IOAS_ALLOC,
    ST_LOG_CONTROL,
    ST_LOG_RANGE,
    ST_LOG_REPORT,
    ST_MIG_DATA_SIZE,
    ST_MIG_STATE,
    ST_MIGRATION,
    ST_PRECOPY_INFO,
    ST_REGION_INFO,
    ST_SPARSE_AREA,
    V2_STATES,
    VFIO_API_VERSION,
    VFIO_CHECK_EXTENSION,
    VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_GET_API_VERSION,
    VFIO_GROUP_FLAGS_VIABLE,
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_GROUP_GET_STATUS,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_MIG_GET_PRECOPY_INFO,
    VFIO_NOIOMMU_IOMMU,
    VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_CAP_TYPE,
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_SUBTYPE_MIGRATION,
    VFIO_REGION_TYPE_MIGRATION,
    VFIO_SET_IOMMU,
    VFIO_TYPE1_IOMMU,
    VFIO_TYPE1v2_IOMMU,
    flag_names,
    oserror,
)

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


# The simulated backend lives in the sim layer; naming it keeps this module free of imports upward.
SIM_BACKEND = "labs.sim.kernel:SimKernel"


def sim_backend(spec):
    """A new simulated kernel from `module:Class` (importable through the agent's sys.path)."""
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)()


def open_host_device(sysl, kind, address, path="auto", noiommu=None):
    """Open a real pci or mdev device by the group path or the cdev path ("auto": group when
    /dev/vfio/vfio exists). Returns (device_fd, [fds to close after it], info)."""
    sysfs = sysfs_device_path(kind, address)
    if path == "auto":
        path = "group" if os.path.exists("/dev/vfio/vfio") else "cdev"
    if path == "cdev":
        return open_cdev_path(sysl, sysfs)
    return open_group_path(sysl, sysfs, address, noiommu)


def sysfs_device_path(kind, address):
    if kind == "pci":
        return "/sys/bus/pci/devices/%s" % address
    if kind == "mdev":
        return "/sys/bus/mdev/devices/%s" % address
    raise oserror(errno.EINVAL, "unknown device kind %r" % kind)


# A real driver's labs fault knobs: module parameters a patch adds (the nested lab builds one, labs/nested)
KNOB_ANY_SOURCE = -2  # fail_from that matches an arc from any state
KNOBS_OFF = {  # the module's defaults: disarmed
    "fail_from": "-1",
    "fail_to": "-1",
    "fail_errno": "5",
    "fail_error": "N",
    "fail_times": "1",
    "stall_ms": "0",
    "stream_cut": "0",
    "stream_flip": "-1",
}
KNOBS = tuple(KNOBS_OFF)


def knob_dir(sysfs_dev):
    """The parameters directory of the module whose driver is bound to the device, if it has the knobs."""
    module = os.path.realpath(os.path.join(sysfs_dev, "driver", "module"))
    params = os.path.join(module, "parameters")
    if not os.path.exists(os.path.join(params, "fail_from")):
        raise oserror(errno.EOPNOTSUPP, "%s: its driver (module %s) has no labs fault knobs"
                      % (sysfs_dev, os.path.basename(module)))
    return params


def _errno_value(code):
    if code is None:
        return 0
    if isinstance(code, str):
        if not hasattr(errno, code):
            raise oserror(errno.EINVAL, "unknown errno name %r" % code)
        return getattr(errno, code)
    return int(code)


def driver_faults(sysfs_dev, spec):
    """Arm, clear and read a real driver's knobs with the sim drivers' spec: transitions=[{from, to,
    errno, error, times, stall_ms}] (one arc at a time; from '*': any source), stream_cut,
    stream_flip, clear. Returns the knobs, with `fired` as it was before a clear."""
    params = knob_dir(sysfs_dev)

    def put(name, value):
        with open(os.path.join(params, name), "w") as f:
            f.write(str(value))

    def get(name):
        with open(os.path.join(params, name)) as f:
            return f.read().strip()

    fired = int(get("fired"))
    if spec.get("clear"):
        for name in KNOBS:
            put(name, KNOBS_OFF[name])
        put("fired", 0)
    transitions = spec.get("transitions") or []
    if len(transitions) > 1:
        raise oserror(errno.EINVAL, "a real driver's knobs arm one arc at a time, not %d" % len(transitions))
    for t in transitions:
        src, dst = str(t["from"]).upper(), str(t["to"]).upper()
        for name in (src, dst):
            if name != "*" and name not in V2_STATES:
                raise oserror(errno.EINVAL, "unknown state %r in the arc %s -> %s" % (name, src, dst))
        times = t.get("times")
        put("fail_from", -1)  # disarmed while the rest is written
        put("fail_errno", _errno_value(t.get("errno", "EIO")))
        put("fail_error", "Y" if t.get("error") else "N")
        put("fail_times", -1 if times is None else int(times))
        put("stall_ms", int(t.get("stall_ms") or 0))
        put("fail_to", V2_STATES[dst])
        put("fail_from", KNOB_ANY_SOURCE if src == "*" else V2_STATES[src])
    for name in ("stream_cut", "stream_flip"):
        if name in spec:
            put(name, int(spec[name]))
    out = dict((name, get(name)) for name in KNOBS)
    out["fired"] = fired
    return out


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


WIDTH_FMT = {1: "=B", 2: "=H", 4: "=I", 8: "=Q"}


def v1_reg_read(sysl, dfd, region_offset, offset, width):
    """One pread of exactly `width` bytes: native width, one syscall per field (spec 1.2)."""
    data = sysl.pread(dfd, width, region_offset + offset)
    if len(data) != width:
        raise oserror(errno.EIO, "short %d-byte read at migration offset %d" % (width, offset))
    return struct.unpack(WIDTH_FMT[width], data)[0]


def v1_reg_write(sysl, dfd, region_offset, offset, width, value):
    value &= (1 << (8 * width)) - 1  # a negative value is written as the field's two's complement
    n = sysl.pwrite(dfd, struct.pack(WIDTH_FMT[width], value), region_offset + offset)
    if n != width:
        raise oserror(errno.EIO, "short %d-byte write at migration offset %d" % (width, offset))


