"""SimKernel: the agent's "sim" syscall backend.

It has the same methods as the agent's RealSys (open/close/ioctl/pread/pwrite/
read/write...) and takes the same request numbers, struct bytes and offsets, so
the agent's packing code runs unchanged against a simulated driver. The VFIO
core's own checks (device-feature header validation, region-info capability
chains, group/container rules, fd kinds) live here; drivers implement only the
device-specific parts.

A device is exclusive like a real VFIO group: a second open gets EBUSY, across
processes too (an flock in the device's state dir, dropped by the kernel when
the holding agent dies).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import importlib
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from labs.sim.base import REGION_SHIFT, SimDriver, err
from labs.vfio import abi as uapi

GET, SET, PROBE = uapi.VFIO_DEVICE_FEATURE_GET, uapi.VFIO_DEVICE_FEATURE_SET, uapi.VFIO_DEVICE_FEATURE_PROBE
# migration features: (operations supported, payload minimum) as the core registers them
MIG_FEATURES = {
    uapi.VFIO_DEVICE_FEATURE_MIGRATION: (GET, uapi.ST_MIGRATION.size),
    uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: (GET | SET, uapi.ST_MIG_STATE.size),
    uapi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: (GET, uapi.ST_MIG_DATA_SIZE.size),
}
LOG_START, LOG_STOP, LOG_REPORT = (uapi.FEATURES[f"DMA_LOGGING_{n}"] for n in ("START", "STOP", "REPORT"))
LOG_FEATURES = (LOG_START, LOG_STOP, LOG_REPORT)
LOG_MAX_RANGES = 4096 // uapi.ST_LOG_RANGE.size  # PAGE_SIZE / sizeof(range): 256
U64 = (1 << 64) - 1
REGION_MASK = (1 << REGION_SHIFT) - 1


def load_driver_class(ref: str) -> type[SimDriver]:
    module, _, name = ref.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, SimDriver)):
        raise TypeError(f"{ref} is not a labs.sim.base.SimDriver subclass")
    return cls


def payload(buf: bytearray, off: int, st: struct.Struct) -> tuple[Any, ...]:
    if len(buf) < off + st.size:
        raise err(errno.EFAULT, "buffer shorter than argsz")
    return st.unpack_from(bytes(buf), off)


@dataclass
class Slot:
    """A plugged device: what sysfs would show, plus the exclusive-open lock."""

    name: str
    group: str
    cls: type[SimDriver]
    options: dict[str, Any]
    state_dir: str
    driver: SimDriver | None = None
    group_open: bool = False
    refs: int = 0
    lock_fd: int = -1

    def acquire(self) -> None:
        if self.refs == 0:
            os.makedirs(self.state_dir, exist_ok=True)
            fd = os.open(os.path.join(self.state_dir, "device.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise err(errno.EBUSY, f"device {self.name} is open elsewhere") from None
            self.lock_fd = fd
        self.refs += 1

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0 and self.lock_fd >= 0:
            os.close(self.lock_fd)  # closing drops the flock
            self.lock_fd = -1


@dataclass
class Entry:
    kind: str  # container | group | device | data
    slot: Slot | None = None
    obj: Any = None  # data file for "data"
    cloexec: bool = True
    container: Entry | None = None  # group -> its container
    groups: list[Entry] = field(default_factory=list)  # container -> groups
    iommu: int = 0


class SimKernel:
    name = "sim"

    def __init__(self) -> None:
        self.fds: dict[int, Entry] = {}
        self.next_fd = 1000  # far from real fds, so a mix-up shows
        self.slots: dict[str, Slot] = {}
        self.user_buffers: dict[int, int] = {}  # address -> size of memory the agent lent (UserBuffer)

    # -- "sysfs" ------------------------------------------------------------------
    def plug(self, name: str, driver: str, options: dict[str, Any], state_dir: str) -> str:
        slot = self.slots.get(name)
        if slot is None or slot.driver is None:
            group = slot.group if slot else str(900 + len(self.slots))
            self.slots[name] = Slot(name, group, load_driver_class(driver), dict(options), state_dir)
        elif slot.state_dir != state_dir:
            raise err(errno.EBUSY, f"sim device {name} is open with another state dir")
        return f"/sys/bus/sim/devices/{name}"

    def _slot_by_sysfs(self, sysfs: str) -> Slot:
        slot = self.slots.get(os.path.basename(sysfs))
        if slot is None:
            raise err(errno.ENOENT, f"no such sim device {sysfs}")
        return slot

    def iommu_group(self, sysfs_dev: str) -> str:
        return self._slot_by_sysfs(sysfs_dev).group

    def exists(self, path: str) -> bool:
        return path == "/dev/vfio/vfio" or any(path == f"/dev/vfio/{s.group}" for s in self.slots.values())

    def listdir(self, path: str) -> list[str]:
        raise err(errno.ENOENT, f"{path}: the sim has no cdev interface")

    # -- fd table -------------------------------------------------------------------
    def _install(self, entry: Entry) -> int:
        fd = self.next_fd
        self.next_fd += 1
        self.fds[fd] = entry
        return fd

    def _entry(self, fd: int, kind: str | None = None) -> Entry:
        entry = self.fds.get(fd)
        if entry is None:
            raise err(errno.EBADF, f"fd {fd} is not open")
        if kind is not None and entry.kind != kind:
            raise err(errno.ENOTTY, f"fd {fd} is a {entry.kind}, not a {kind}")
        return entry

    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        if path == "/dev/vfio/vfio":
            return self._install(Entry("container"))
        for slot in self.slots.values():
            if path == f"/dev/vfio/{slot.group}":
                if slot.group_open:
                    raise err(errno.EBUSY, f"group {slot.group} is already open")
                slot.acquire()
                slot.group_open = True
                return self._install(Entry("group", slot))
        raise err(errno.ENOENT, f"{path}: no such file")

    def close(self, fd: int) -> None:
        entry = self.fds.pop(fd, None)
        if entry is None:
            raise err(errno.EBADF, f"fd {fd} is not open")
        if entry.kind == "group" and entry.slot is not None:
            entry.slot.group_open = False
            if entry.container is not None and entry in entry.container.groups:
                entry.container.groups.remove(entry)
            entry.slot.release()
        elif entry.kind == "device" and entry.slot is not None:
            if entry.slot.driver is not None:
                entry.slot.driver.close()
            entry.slot.driver = None
            entry.slot.release()
        # a data fd: the driver keeps its own reference, closing ours ends nothing (spec 6.10)

    def cloexec(self, fd: int) -> bool:
        return self._entry(fd).cloexec

    def driver_for(self, fd: int) -> SimDriver:
        entry = self._entry(fd, "device")
        assert entry.slot is not None and entry.slot.driver is not None
        return entry.slot.driver

    # -- ioctl ------------------------------------------------------------------------
    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        entry = self._entry(fd)
        handler = getattr(self, f"_ioctl_{entry.kind}")
        return int(handler(entry, request, arg))

    @staticmethod
    def _buf(arg: int | bytearray, minsz: int) -> bytearray:
        if not isinstance(arg, bytearray) or len(arg) < minsz:
            raise err(errno.EFAULT, "bad ioctl argument buffer")
        return arg

    def _ioctl_container(self, entry: Entry, request: int, arg: int | bytearray) -> int:
        if request == uapi.VFIO_GET_API_VERSION:
            return uapi.VFIO_API_VERSION
        if request == uapi.VFIO_CHECK_EXTENSION:
            return 1 if arg in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU) else 0
        if request == uapi.VFIO_SET_IOMMU:
            if not entry.groups or arg not in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU):
                raise err(errno.EINVAL, "SET_IOMMU needs a group in the container and a known type")
            if entry.iommu:
                raise err(errno.EBUSY, "IOMMU already set")
            entry.iommu = int(arg)
            return 0
        raise err(errno.ENOTTY, f"container ioctl {request:#x}")

    def _ioctl_group(self, entry: Entry, request: int, arg: int | bytearray) -> int:
        slot = entry.slot
        assert slot is not None
        if request == uapi.VFIO_GROUP_GET_STATUS:
            buf = self._buf(arg, 8)
            argsz, _ = uapi.ST_GROUP_STATUS.unpack_from(buf)
            if argsz < 8:
                raise err(errno.EINVAL, "argsz")
            flags = uapi.VFIO_GROUP_FLAGS_VIABLE | (uapi.VFIO_GROUP_FLAGS_CONTAINER_SET if entry.container else 0)
            uapi.ST_GROUP_STATUS.pack_into(buf, 0, argsz, flags)
            return 0
        if request == uapi.VFIO_GROUP_SET_CONTAINER:
            (cfd,) = struct.unpack_from("=i", self._buf(arg, 4))
            container = self._entry(cfd)
            if container.kind != "container":
                raise err(errno.EBADF, "not a container fd")
            if entry.container is not None:
                raise err(errno.EINVAL, "group already has a container")
            entry.container = container
            container.groups.append(entry)
            return 0
        if request == uapi.VFIO_GROUP_UNSET_CONTAINER:
            if entry.container is None or slot.driver is not None:
                raise err(errno.EBUSY if slot.driver else errno.EINVAL, "cannot unset container")
            entry.container.groups.remove(entry)
            entry.container = None
            return 0
        if request == uapi.VFIO_GROUP_GET_DEVICE_FD:
            buf = self._buf(arg, 1)
            name = bytes(buf).split(b"\0", 1)[0].decode()
            if entry.container is None or not entry.container.iommu:
                raise err(errno.EINVAL, "group is not in a container with an IOMMU set")
            if name != slot.name:
                raise err(errno.ENODEV, f"no device {name!r} in group {slot.group}")
            if slot.driver is not None:
                raise err(errno.EBUSY, f"device {name} is already open")
            slot.acquire()
            try:
                slot.driver = slot.cls(slot.state_dir, slot.options)
            except BaseException:
                slot.release()
                raise
            return self._install(Entry("device", slot))
        raise err(errno.ENOTTY, f"group ioctl {request:#x}")

    def _ioctl_device(self, entry: Entry, request: int, arg: int | bytearray) -> int:
        assert entry.slot is not None and entry.slot.driver is not None
        drv = entry.slot.driver
        if request == uapi.VFIO_DEVICE_GET_INFO:
            buf = self._buf(arg, 16)
            argsz = struct.unpack_from("=I", buf)[0]
            if argsz < 16:
                raise err(errno.EINVAL, "argsz < 16")
            fields = (argsz, drv.device_flags(), drv.num_regions(), drv.num_irqs())
            struct.pack_into("=IIII", buf, 0, *fields)
            if argsz >= uapi.ST_DEVICE_INFO.size and len(buf) >= uapi.ST_DEVICE_INFO.size:
                struct.pack_into("=II", buf, 16, 0, 0)
            return 0
        if request == uapi.VFIO_DEVICE_GET_REGION_INFO:
            return self._region_info(drv, self._buf(arg, 16))
        if request == uapi.VFIO_DEVICE_RESET:
            drv.reset()
            return 0
        if request == uapi.VFIO_DEVICE_FEATURE:
            return self._feature(drv, self._buf(arg, 8))
        if request == uapi.VFIO_DEVICE_GET_IRQ_INFO:
            raise err(errno.EINVAL, "the sim has no interrupts")
        raise err(errno.ENOTTY, f"device ioctl {request:#x}")

    def _ioctl_data(self, entry: Entry, request: int, arg: int | bytearray) -> int:
        if request == uapi.VFIO_MIG_GET_PRECOPY_INFO:
            return int(entry.obj.precopy_info(self._buf(arg, 8)))
        raise err(errno.ENOTTY, f"data fd ioctl {request:#x}")

    def _region_info(self, drv: SimDriver, buf: bytearray) -> int:
        argsz, _flags, index = struct.unpack_from("=III", buf)
        minsz = uapi.ST_REGION_INFO.size
        if argsz < minsz or len(buf) < minsz:
            raise err(errno.EINVAL, "argsz < 32")
        if index >= drv.num_regions():
            raise err(errno.EINVAL, f"region index {index} >= {drv.num_regions()}")
        region = drv.region(index)
        flags, size, caps = (region.flags, region.size, region.caps) if region else (0, 0, [])
        chain = bytearray()
        for i, (cid, version, body) in enumerate(caps):
            at = minsz + len(chain)
            nxt = at + uapi.ST_CAP_HEADER.size + len(body) if i + 1 < len(caps) else 0
            chain += uapi.ST_CAP_HEADER.pack(cid, version, nxt) + body
        cap_offset = 0
        out_argsz = argsz
        if chain:
            flags |= uapi.VFIO_REGION_INFO_FLAG_CAPS
            if argsz < minsz + len(chain):
                out_argsz = minsz + len(chain)  # tell the user how much room the chain needs
            else:
                if len(buf) < minsz + len(chain):
                    raise err(errno.EFAULT, "buffer shorter than argsz")
                buf[minsz : minsz + len(chain)] = chain
                cap_offset = minsz
        uapi.ST_REGION_INFO.pack_into(buf, 0, out_argsz, flags, index, cap_offset, size, index << REGION_SHIFT)
        return 0

    def _feature(self, drv: SimDriver, buf: bytearray) -> int:
        """vfio_ioctl_device_feature + vfio_check_feature (spec 3.1), then the handler."""
        argsz, flags = uapi.ST_FEATURE_HDR.unpack_from(buf)
        drv.check_feature_header(argsz, flags)
        feature = flags & uapi.VFIO_DEVICE_FEATURE_MASK
        if feature in LOG_FEATURES:
            if not drv.has_log_ops:
                raise err(errno.ENOTTY, "device has no DMA logging")
            return self._log_feature(drv, feature, flags, argsz - uapi.ST_FEATURE_HDR.size, buf)
        if feature not in MIG_FEATURES:
            return drv.feature(feature, flags, buf)
        if not drv.has_mig_v2:
            raise err(errno.ENOTTY, "device has no v2 migration support")
        supported, minsz = MIG_FEATURES[feature]
        if flags & (GET | SET) & ~supported:
            raise err(errno.EINVAL, f"feature {feature} does not support that operation")
        if flags & PROBE:
            return 0
        if not flags & (GET | SET):
            raise err(errno.EINVAL, "neither GET nor SET")
        if argsz - uapi.ST_FEATURE_HDR.size < minsz:
            raise err(errno.EINVAL, f"feature {feature} payload needs {minsz} bytes")
        if len(buf) < uapi.ST_FEATURE_HDR.size + minsz:
            raise err(errno.EFAULT, "buffer shorter than argsz")
        off = uapi.ST_FEATURE_HDR.size
        mig: Any = drv  # a V2Driver: the mig_* methods exist when has_mig_v2
        if feature == uapi.VFIO_DEVICE_FEATURE_MIGRATION:
            uapi.ST_MIGRATION.pack_into(buf, off, mig.mig_flags())
        elif feature == uapi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE:
            uapi.ST_MIG_DATA_SIZE.pack_into(buf, off, mig.mig_data_size())
        elif flags & GET:
            uapi.ST_MIG_STATE.pack_into(buf, off, mig.mig_get_state(), -1)
        else:
            new, _ = uapi.ST_MIG_STATE.unpack_from(buf, off)
            try:
                file = mig.mig_set_state(new)
            except OSError:
                # the core copies the struct back with the *requested* state and data_fd = -1 (V2-R17)
                fd = mig.failed_set_fd()
                if fd is None:
                    struct.pack_into("=I", buf, off, new)
                else:
                    uapi.ST_MIG_STATE.pack_into(buf, off, new, fd)
                raise
            data_fd = self._install(Entry("data", obj=file)) if file is not None else -1  # O_CLOEXEC, by the core
            uapi.ST_MIG_STATE.pack_into(buf, off, new, data_fd)
        return 0

    def _user_range(self, addr: int, n: int) -> None:
        """copy_{from,to}_user's access check: the range lies in memory the agent lent."""
        if not any(start <= addr and addr + n <= start + size for start, size in self.user_buffers.items()):
            raise err(errno.EFAULT, f"bad user address {addr:#x} (+{n})")

    def copy_from_user(self, addr: int, n: int) -> bytes:
        if n == 0:
            return b""
        self._user_range(addr, n)
        return ctypes.string_at(addr, n)

    def copy_to_user(self, addr: int, data: bytes) -> None:
        if data:
            self._user_range(addr, len(data))
            ctypes.memmove(addr, data, len(data))

    @staticmethod
    def _check_feature(flags: int, size: int, supported: int, minsz: int) -> bool:
        """vfio_check_feature: False for a PROBE (answered 0), True when the payload is to be handled."""
        if flags & (GET | SET) & ~supported:
            raise err(errno.EINVAL, "feature does not support that operation")
        if flags & PROBE:
            return False
        if not flags & (GET | SET):
            raise err(errno.EINVAL, "neither GET nor SET")
        if size < minsz:
            raise err(errno.EINVAL, f"feature payload needs {minsz} bytes")
        return True

    def _log_feature(self, drv: SimDriver, feature: int, flags: int, size: int, buf: bytearray) -> int:
        """vfio_ioctl_device_feature_logging_{start,stop,report} (spec 3.7), then the driver's log_ops."""
        log: Any = drv  # a DirtyLogging driver: has_log_ops is set
        off = uapi.ST_FEATURE_HDR.size
        if feature == LOG_STOP:
            if self._check_feature(flags, size, SET, 0):
                log.log_stop()
            return 0
        if feature == LOG_START:
            if not self._check_feature(flags, size, SET, uapi.ST_LOG_CONTROL.size):
                return 0
            page_size, count, _reserved, ranges_ptr = payload(buf, off, uapi.ST_LOG_CONTROL)
            if count == 0:
                raise err(errno.EINVAL, "START with no ranges")
            if count > LOG_MAX_RANGES:
                raise err(errno.E2BIG, f"START with {count} ranges (at most {LOG_MAX_RANGES})")
            mask = (page_size - 1) & U64  # IS_ALIGNED(x, page_size)
            ranges: list[tuple[int, int]] = []
            for i in range(count):
                raw = self.copy_from_user(ranges_ptr + i * uapi.ST_LOG_RANGE.size, uapi.ST_LOG_RANGE.size)
                iova, length = uapi.ST_LOG_RANGE.unpack(raw)
                if iova & mask or length & mask:
                    raise err(errno.EINVAL, f"range {i} is not aligned to page size {page_size}")
                if iova + length > U64:
                    raise err(errno.EOVERFLOW, f"range {i} ends past 2**64")
                if any(iova < s + n and s < iova + length for s, n in ranges):
                    raise err(errno.EINVAL, f"range {i} overlaps another")
                ranges.append((iova, length))
            chosen = log.log_start(ranges, page_size)
            uapi.ST_LOG_CONTROL.pack_into(buf, off, chosen, count, _reserved, ranges_ptr)
            return 0
        if not self._check_feature(flags, size, GET, uapi.ST_LOG_REPORT.size):
            return 0
        iova, length, page_size, bitmap_ptr = payload(buf, off, uapi.ST_LOG_REPORT)
        if page_size < 4096 or page_size & (page_size - 1):
            raise err(errno.EINVAL, f"REPORT page size {page_size} is not a power of two >= 4096")
        if iova + length > U64:
            raise err(errno.EOVERFLOW, "REPORT range ends past 2**64")
        words = ((length + page_size - 1) // page_size + 63) // 64
        bitmap = bytearray(self.copy_from_user(bitmap_ptr, words * 8))  # iova_bitmap pins the user's pages
        for span_iova, span_length in log.log_read_and_clear(iova, length):
            lo, hi = max(span_iova, iova), min(span_iova + span_length, iova + length)
            for page in range((lo - iova) // page_size, (hi - 1 - iova) // page_size + 1) if lo < hi else ():
                bitmap[page // 8] |= 1 << page % 8  # only sets bits (spec 3.7): bit k%64 of LE u64 word k/64
        self.copy_to_user(bitmap_ptr, bytes(bitmap))
        return 0

    # -- I/O ------------------------------------------------------------------------
    def _region_io(self, fd: int, offset: int, n: int, write: bool) -> tuple[SimDriver, int, int]:
        entry = self._entry(fd)
        if entry.kind != "device":
            raise err(errno.EINVAL, f"positional I/O on a {entry.kind} fd")
        assert entry.slot is not None and entry.slot.driver is not None
        drv = entry.slot.driver
        index, off = offset >> REGION_SHIFT, offset & REGION_MASK
        region = drv.region(index) if index < drv.num_regions() else None
        need = uapi.VFIO_REGION_INFO_FLAG_WRITE if write else uapi.VFIO_REGION_INFO_FLAG_READ
        if region is None or not region.flags & need:
            raise err(errno.EINVAL, f"region {index} does not allow that access")
        if off >= region.size or n < 0:
            raise err(errno.EINVAL, f"offset {off} outside region {index} (size {region.size})")
        return drv, index, off

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        entry = self._entry(fd)
        if entry.kind == "data":
            return bytes(entry.obj.pread(n, offset))  # the driver's file decides (stream_open: ESPIPE)
        drv, index, off = self._region_io(fd, offset, n, False)
        size = drv.region(index).size  # type: ignore[union-attr]
        return drv.region_read(index, off, min(n, size - off))

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        entry = self._entry(fd)
        if entry.kind == "data":
            return int(entry.obj.pwrite(bytes(data), offset))
        drv, index, off = self._region_io(fd, offset, len(data), True)
        size = drv.region(index).size  # type: ignore[union-attr]
        if off + len(data) > size:
            raise err(errno.EINVAL, f"write past the end of region {index}")
        return drv.region_write(index, off, bytes(data))

    def read(self, fd: int, n: int) -> bytes:
        entry = self._entry(fd)
        if entry.kind != "data":
            raise err(errno.EINVAL, f"read() on a {entry.kind} fd")
        return bytes(entry.obj.read(n))

    def write(self, fd: int, data: bytes) -> int:
        entry = self._entry(fd)
        if entry.kind != "data":
            raise err(errno.EINVAL, f"write() on a {entry.kind} fd")
        return int(entry.obj.write(bytes(data)))
