"""The base of simulated vendor drivers: device content, the migration stream, fault knobs.

A simulated device lives on its host: its content (a BAR-like register file and
a buffer of `content_size` bytes in a sparse file) sits in the device's state
directory and survives agent sessions. Its migration state does not: every open
starts in RUNNING, as V1-R5/V2-R3 expect of a freshly opened device.

Users model their own device by subclassing V1Driver or V2Driver (or this class)
and naming it in the inventory as `driver: package.module:ClassName`.

The migration stream is the same for both protocols (only the transport differs):
    header  "=8sIIQQ"  magic, version, model crc32, content_size, regs_size      (32 B)
    record  "=IIQQ"    type, flags, offset, length, then `length` payload bytes  (24 B + payload)
      CONTENT records carry a slice of the buffer; a chunk changed during pre-copy is sent again
      REGS    carries the register file
      END     carries sha256 of every stream byte before it
A truncated stream has no END; a corrupted one fails the checksum; both are
rejected when the device leaves RESUMING (structure errors fail the write itself).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from labs.vfio import abi as uapi

MAGIC = b"LABSSIM1"
STREAM_VERSION = 1
HEADER = struct.Struct("=8sIIQQ")
RECORD = struct.Struct("=IIQQ")
REC_CONTENT, REC_REGS, REC_END = 1, 2, 3
END_PAYLOAD = 32
REGION_SHIFT = 40  # vfio-pci's VFIO_PCI_OFFSET_SHIFT; callers still take `offset` from region info
REGS_SIZE = 256
PATTERN_BLOCK = 64 << 10
CONFIG_SPACE = bytes.fromhex("361b3412") + bytes(252)  # vendor 0x1b36, device 0x1234: a made-up PCI device


def parse_size(value: int | str) -> int:
    """1048576, "64K", "4M", "1G" -> bytes."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def err(code: int, message: str) -> OSError:
    return OSError(code, f"{errno.errorcode.get(code, code)}: {message}")


def pattern_block(seed: str | int, index: int, size: int = PATTERN_BLOCK) -> bytes:
    """Deterministic bytes for block `index` of a content pattern: a readback needs no copy."""
    unit = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return (unit * (size // len(unit) + 1))[:size]


# ---------------------------------------------------------------------------
# content: registers + sparse buffer, persisted in the state dir
# ---------------------------------------------------------------------------


class ContentStore:
    def __init__(self, state_dir: str, size: int) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.size = size
        self.path = os.path.join(state_dir, "content.bin")
        self.regs_path = os.path.join(state_dir, "regs.bin")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)  # sparse: a gigabyte device costs nothing until written
        try:
            with open(self.regs_path, "rb") as f:
                self.regs = bytearray(f.read(REGS_SIZE).ljust(REGS_SIZE, b"\0"))
        except FileNotFoundError:
            self.regs = bytearray(REGS_SIZE)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise err(errno.EINVAL, f"content read [{offset}, +{length}) outside {self.size}")
        if self._hole(offset, length):
            return bytes(length)  # reading a hole would fill the page cache with zeros first
        out = []
        while length > 0:
            piece = os.pread(self.fd, length, offset)
            if not piece:  # cannot happen on a truncated file, but never spin
                piece = bytes(length)
            out.append(piece)
            offset += len(piece)
            length -= len(piece)
        return b"".join(out)

    def _hole(self, offset: int, length: int) -> bool:
        """No byte of [offset, +length) was ever written (sparse file)."""
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA) >= offset + length
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after offset
                return True
            if exc.errno == errno.EINVAL:  # a filesystem without SEEK_DATA: read it
                return False
            raise

    def write(self, offset: int, data: bytes) -> int:
        if offset < 0 or offset + len(data) > self.size:
            raise err(errno.EINVAL, f"content write [{offset}, +{len(data)}) outside {self.size}")
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        return len(data)

    def save_regs(self) -> None:
        tmp = self.regs_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(bytes(self.regs))
        os.replace(tmp, self.regs_path)

    def digest(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for off in range(0, self.size, 1 << 20):
            h.update(self.read(off, min(1 << 20, self.size - off)))
        content = h.hexdigest()
        regs = hashlib.sha256(bytes(self.regs)).hexdigest()
        both = hashlib.sha256(f"{content}:{regs}".encode()).hexdigest()
        return {"content": content, "regs": regs, "digest": both, "size": self.size}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------
# fault knobs
# ---------------------------------------------------------------------------


@dataclass
class TransitionFault:
    """Fail the (single) arc/transition src -> dst with `errno`; to ERROR or staying put."""

    src: str
    dst: str
    errno: int = errno.EIO
    to_error: bool = False
    times: int | None = None  # None: every time

    @classmethod
    def parse(cls, spec: dict[str, Any]) -> TransitionFault:
        code = spec.get("errno", errno.EIO)
        if isinstance(code, str):
            code = getattr(errno, code)
        return cls(
            str(spec["from"]).upper(), str(spec["to"]).upper(), int(code), bool(spec.get("error")), spec.get("times")
        )


@dataclass
class Faults:
    transitions: list[TransitionFault] = field(default_factory=list)
    read_after: int | None = None  # fail saving reads once this many stream bytes were read
    read_errno: int = errno.EIO
    write_after: int | None = None  # fail resume writes past this many stream bytes
    write_errno: int = errno.EIO
    fired: list[str] = field(default_factory=list)

    def update(self, spec: dict[str, Any]) -> None:
        if spec.get("clear"):
            self.transitions.clear()
            self.read_after = self.write_after = None
        for t in spec.get("transitions", ()):
            self.transitions.append(TransitionFault.parse(t))
        for key in ("read_after", "write_after"):
            if key in spec:
                setattr(self, key, spec[key])
        for key in ("read_errno", "write_errno"):
            if key in spec:
                code = spec[key]
                setattr(self, key, getattr(errno, code) if isinstance(code, str) else int(code))

    def transition(self, src: str, dst: str) -> TransitionFault | None:
        for t in self.transitions:
            if t.src == src and t.dst == dst and (t.times is None or t.times > 0):
                if t.times is not None:
                    t.times -= 1
                self.fired.append(f"{src}->{dst}")
                return t
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "transitions": [vars(t) for t in self.transitions],
            "read_after": self.read_after,
            "write_after": self.write_after,
            "fired": list(self.fired),
        }


# ---------------------------------------------------------------------------
# the stream
# ---------------------------------------------------------------------------


class StreamSource:
    """Produces a saving stream lazily from the device content.

    In pre-copy the initial pass sends every content chunk, then chunks written
    since they were sent ("dirty"); `stop_copy()` adds the final part (dirty
    chunks, registers, END). Bytes are read from the content when generated, so
    a chunk reflects the device at that moment, as on real hardware.
    """

    def __init__(self, drv: SimDriver, precopy: bool) -> None:
        self.drv = drv
        self.precopy = precopy
        self.final = not precopy
        self.rec = drv.record_size
        self.size = drv.content.size
        self.nchunks = (self.size + self.rec - 1) // self.rec
        self.next_chunk = 0
        self.dirty: dict[int, None] = {}  # ordered set of chunk indexes to resend
        self.hash = hashlib.sha256()
        self.buf = b""
        self.pos = 0
        self.read_total = 0
        self.regs_done = self.end_done = False
        self._produce(self.header())

    # -- layout ---------------------------------------------------------------
    def header(self) -> bytes:
        return HEADER.pack(MAGIC, STREAM_VERSION, self.drv.model_crc(), self.size, REGS_SIZE)

    def chunk_len(self, i: int) -> int:
        return min(self.rec, self.size - i * self.rec)

    @property
    def initial_total(self) -> int:
        return HEADER.size + self.nchunks * RECORD.size + self.size

    @staticmethod
    def full_length(size: int, rec: int) -> int:
        nchunks = (size + rec - 1) // rec
        return HEADER.size + nchunks * RECORD.size + size + RECORD.size + REGS_SIZE + RECORD.size + END_PAYLOAD

    # -- production -----------------------------------------------------------
    def _produce(self, data: bytes) -> None:
        self.hash.update(data)
        self.buf = self.buf[self.pos :] + data
        self.pos = 0

    def chunk_record(self, i: int) -> bytes:
        n = self.chunk_len(i)
        return RECORD.pack(REC_CONTENT, 0, i * self.rec, n) + self.drv.content.read(i * self.rec, n)

    def regs_record(self) -> bytes:
        return RECORD.pack(REC_REGS, 0, 0, REGS_SIZE) + bytes(self.drv.content.regs)

    def end_record(self) -> bytes:
        return RECORD.pack(REC_END, 0, 0, END_PAYLOAD) + self.hash.digest()

    def _refill(self) -> bool:
        if self.next_chunk < self.nchunks:
            self._produce(self.chunk_record(self.next_chunk))
            self.next_chunk += 1
        elif self.dirty:
            i = next(iter(self.dirty))
            del self.dirty[i]
            self._produce(self.chunk_record(i))
        elif self.final and not self.regs_done:
            self.regs_done = True
            self._produce(self.regs_record())
        elif self.final and not self.end_done:
            self.end_done = True
            self._produce(self.end_record())
        else:
            return False
        return True

    def mark_dirty(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, last = offset // self.rec, (offset + length - 1) // self.rec
        for i in range(first, min(last, self.next_chunk - 1) + 1):
            self.dirty[i] = None

    def stop_copy(self) -> None:
        self.final = True

    # -- consumption ------------------------------------------------------------
    def available(self) -> int:
        return len(self.buf) - self.pos

    def unit_left(self) -> int:
        """Bytes left of the header or record being read (the next one's at a boundary; 0: none ready)."""
        if not self.available():
            self._refill()
        return self.available()

    def read(self, n: int) -> bytes:
        """Up to n bytes; b"" when nothing is available (end of stream once final)."""
        faults = self.drv.faults
        if faults.read_after is not None:
            if self.read_total >= faults.read_after:
                raise err(faults.read_errno, f"injected read failure after {faults.read_after} bytes")
            n = min(n, faults.read_after - self.read_total)
        out = []
        got = 0
        while got < n:
            if not self.available() and not self._refill():
                break
            take = min(n - got, self.available())
            out.append(self.buf[self.pos : self.pos + take])
            self.pos += take
            got += take
        self.read_total += got
        return b"".join(out)

    # -- accounting -------------------------------------------------------------
    def initial_bytes(self) -> int:
        return max(0, self.initial_total - self.read_total)

    def dirty_bytes(self) -> int:
        queued = sum(RECORD.size + self.chunk_len(i) for i in self.dirty)
        in_buf = self.available() if self.read_total >= self.initial_total else 0
        return queued + in_buf

    def remaining(self, final: bool | None = None) -> int:
        """Bytes still to read: pre-copy counts what exists now; final counts to the END."""
        final = self.final if final is None else final
        rest = self.available()
        rest += sum(RECORD.size + self.chunk_len(i) for i in range(self.next_chunk, self.nchunks))
        rest += sum(RECORD.size + self.chunk_len(i) for i in self.dirty)
        if final:
            rest += 0 if self.regs_done else RECORD.size + REGS_SIZE
            rest += 0 if self.end_done else RECORD.size + END_PAYLOAD
        return rest


class StreamSink:
    """Parses a resuming stream as it arrives and applies it to the device.

    Content is written in place as it streams (a gigabyte device has no room for
    a staging copy), so a rejected stream leaves the content undefined: the
    device must be reset, as on hardware. Registers are committed at finish().
    """

    def __init__(self, drv: SimDriver) -> None:
        self.drv = drv
        self.hash = hashlib.sha256()
        self.fed = 0
        self.pending = bytearray()
        self.header_ok = False
        self.record: tuple[int, int, int] | None = None  # type, offset, remaining payload
        self.rec_written = 0
        self.regs = bytearray()
        self.ended = False
        self.error: OSError | None = None  # sticky
        self.deferred: str | None = None  # checksum failure, reported at finish()

    def _fail(self, message: str) -> OSError:
        self.error = err(errno.EINVAL, message)
        return self.error

    def feed(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        faults = self.drv.faults
        if faults.write_after is not None and self.fed + len(data) > faults.write_after:
            raise err(faults.write_errno, f"injected write failure past {faults.write_after} bytes")
        self.fed += len(data)
        view = memoryview(data)
        while len(view):
            view = self._step(view)
        return len(data)

    def _take_struct(self, view: memoryview, size: int) -> tuple[bytes | None, memoryview]:
        need = size - len(self.pending)
        self.pending += view[:need]
        view = view[need:]
        if len(self.pending) < size:
            return None, view
        raw = bytes(self.pending)
        self.pending.clear()
        return raw, view

    def _step(self, view: memoryview) -> memoryview:
        if self.ended:
            raise self._fail(f"{len(view)} bytes after the end of the stream")
        if not self.header_ok:
            raw, view = self._take_struct(view, HEADER.size)
            if raw is not None:
                self.hash.update(raw)
                self.check_header(raw)
                self.header_ok = True
            return view
        if self.record is None:
            raw, view = self._take_struct(view, RECORD.size)
            if raw is not None:
                rtype, _flags, offset, length = RECORD.unpack(raw)
                if rtype != REC_END:
                    self.hash.update(raw)
                self.check_record(rtype, offset, length)
                self.record = (rtype, offset, length)
                self.rec_written = 0
                if length == 0:
                    self.record = None
            return view
        rtype, offset, length = self.record
        take = view[: length - self.rec_written]
        view = view[len(take) :]
        if rtype == REC_CONTENT:
            self.hash.update(take)
            self.apply_content(offset + self.rec_written, bytes(take))
        elif rtype == REC_REGS:
            self.hash.update(take)
            self.regs += take
        else:
            self.pending += take
        self.rec_written += len(take)
        if self.rec_written == length:
            self.record = None
            if rtype == REC_END:
                self.ended = True
                if bytes(self.pending) != self.hash.digest():
                    self.deferred = "stream checksum mismatch (corrupted data)"
                self.pending.clear()
        return view

    # -- hooks (defects override these) ----------------------------------------
    def check_header(self, raw: bytes) -> None:
        magic, version, model, size, regs = HEADER.unpack(raw)
        if magic != MAGIC or version != STREAM_VERSION:
            raise self._fail("not a labs sim stream (bad magic or version)")
        if model != self.drv.model_crc():
            raise self._fail("stream is from an incompatible device model")
        if size != self.drv.content.size or regs != REGS_SIZE:
            raise self._fail(f"stream content size {size} != device content size {self.drv.content.size}")

    def check_record(self, rtype: int, offset: int, length: int) -> None:
        if rtype == REC_CONTENT:
            if offset + length > self.drv.content.size:
                raise self._fail(f"content record [{offset}, +{length}) outside the device")
        elif rtype == REC_REGS:
            if length != REGS_SIZE or self.regs:
                raise self._fail("bad register record")
        elif rtype == REC_END:
            if length != END_PAYLOAD:
                raise self._fail("bad end record")
        else:
            raise self._fail(f"unknown record type {rtype}")

    def apply_content(self, offset: int, data: bytes) -> None:
        self.drv.content.write(offset, data)

    def finish(self) -> None:
        """Validate and commit (leaving RESUMING): EINVAL for a truncated or corrupted stream."""
        if self.error is not None:
            raise self.error
        if not self.ended:
            raise self._fail(f"truncated stream: no end record after {self.fed} bytes")
        if self.deferred:
            raise self._fail(self.deferred)
        if self.regs:
            self.drv.content.regs[:] = self.regs
            self.drv.content.save_regs()


# ---------------------------------------------------------------------------
# regions
# ---------------------------------------------------------------------------


@dataclass
class Region:
    flags: int
    size: int
    caps: list[tuple[int, int, bytes]] = field(default_factory=list)  # (id, version, body after header)


def type_cap(rtype: int, subtype: int) -> tuple[int, int, bytes]:
    return (uapi.VFIO_REGION_INFO_CAP_TYPE, 1, uapi.ST_CAP_TYPE.pack(rtype, subtype))


def sparse_cap(areas: list[tuple[int, int]]) -> tuple[int, int, bytes]:
    body = uapi.ST_CAP_SPARSE.pack(len(areas), 0) + b"".join(uapi.ST_SPARSE_AREA.pack(o, s) for o, s in areas)
    return (uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, body)


RW = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE


# ---------------------------------------------------------------------------
# the driver base
# ---------------------------------------------------------------------------


class SimDriver:
    """What the sim kernel calls. Subclasses add a migration protocol."""

    has_mig_v2 = False  # mig_ops present: VFIO_DEVICE_FEATURE migration features answer
    has_log_ops = False  # DMA logging: ENOTTY without it (spec 3.1)
    model = "labs-sim"  # devices of one model are stream-compatible

    def __init__(self, state_dir: str, options: dict[str, Any]) -> None:
        self.state_dir = state_dir
        self.options = dict(options)
        self.model = str(options.get("model", self.model))
        self.record_size = parse_size(options.get("record_size", 256 << 10))
        self.content = ContentStore(state_dir, parse_size(options.get("content_size", 1 << 20)))
        self.faults = Faults()
        self.faults.update(options.get("faults") or {})
        self.arcs: list[tuple[str, str]] = []
        self.resets = 0
        self.closed = False
        self._write_meta()

    def _write_meta(self) -> None:
        meta = {"class": f"{type(self).__module__}:{type(self).__name__}", "options": self.options, "time": time.time()}
        with open(os.path.join(self.state_dir, "meta.json"), "w") as f:
            json.dump(meta, f, default=str)

    def model_crc(self) -> int:
        return zlib.crc32(self.model.encode())

    # -- device surface ---------------------------------------------------------
    def device_flags(self) -> int:
        return uapi.VFIO_DEVICE_FLAGS_PCI | uapi.VFIO_DEVICE_FLAGS_RESET

    def num_regions(self) -> int:
        return uapi.VFIO_PCI_NUM_REGIONS

    def num_irqs(self) -> int:
        return 5  # INTX, MSI, MSIX, ERR, REQ like vfio-pci

    def region(self, index: int) -> Region | None:
        if index == 0:
            return Region(RW, REGS_SIZE)
        if index == 2 and self.content.size:
            return Region(RW, self.content.size)
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            return Region(RW, len(CONFIG_SPACE))
        return None

    def region_read(self, index: int, offset: int, n: int) -> bytes:
        if index == 0:
            return bytes(self.content.regs[offset : offset + n])
        if index == 2:
            return self.content.read(offset, n)
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            return CONFIG_SPACE[offset : offset + n]
        raise err(errno.EINVAL, f"region {index} is not readable")

    def region_write(self, index: int, offset: int, data: bytes) -> int:
        if index == 0:
            self.content.regs[offset : offset + len(data)] = data
            self.content.save_regs()
            return len(data)
        if index == 2:
            return self.write_content(offset, data)
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            return len(data)  # config writes are accepted and dropped
        raise err(errno.EINVAL, f"region {index} is not writable")

    def write_content(self, offset: int, data: bytes) -> int:
        """Device activity: changes content and dirties an active pre-copy stream."""
        n = self.content.write(offset, data)
        source = self.active_source()
        if source is not None:
            source.mark_dirty(offset, n)
        return n

    def active_source(self) -> StreamSource | None:
        return None

    def new_source(self, precopy: bool) -> StreamSource:
        return StreamSource(self, precopy)

    def new_sink(self) -> StreamSink:
        return StreamSink(self)

    def reset(self) -> None:
        self.resets += 1

    def check_feature_header(self, argsz: int, flags: int) -> None:
        """The VFIO core's header validation (spec 3.1); a method so a driver shipping its own
        core backport (out-of-tree vendor drivers do) can be modelled."""
        every = uapi.VFIO_DEVICE_FEATURE_MASK | uapi.VFIO_DEVICE_FEATURE_GET | uapi.VFIO_DEVICE_FEATURE_SET
        every |= uapi.VFIO_DEVICE_FEATURE_PROBE
        get_set = uapi.VFIO_DEVICE_FEATURE_GET | uapi.VFIO_DEVICE_FEATURE_SET
        if argsz < uapi.ST_FEATURE_HDR.size:
            raise err(errno.EINVAL, "feature argsz < 8")
        if flags & ~every:
            raise err(errno.EINVAL, f"unknown feature flag bits {flags & ~every:#x}")
        if flags & get_set == get_set and not flags & uapi.VFIO_DEVICE_FEATURE_PROBE:
            raise err(errno.EINVAL, "GET and SET together without PROBE")

    def feature(self, feature: int, flags: int, buf: bytearray) -> int:
        """Features the core does not handle: without a driver handler, EINVAL (spec 3.1)."""
        raise err(errno.EINVAL, f"unknown device feature {feature}")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.content.save_regs()
            self.content.close()

    # -- sim_control --------------------------------------------------------------
    def state_name(self) -> str:
        return "RUNNING"

    def control(self, action: str, params: dict[str, Any]) -> Any:
        handler = getattr(self, f"ctl_{action}", None)
        if handler is None:
            raise ValueError(f"unknown sim_control action {action!r}")
        return handler(params)

    def ctl_info(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "class": f"{type(self).__module__}:{type(self).__name__}",
            "model": self.model,
            "state": self.state_name(),
            "content_size": self.content.size,
            "record_size": self.record_size,
            "options": self.options,
            "resets": self.resets,
            "state_dir": self.state_dir,
        }

    def ctl_digest(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.content.digest()

    def ctl_fill(self, params: dict[str, Any]) -> dict[str, Any]:
        seed = params.get("seed", 1)
        offset = int(params.get("offset", 0))
        length = int(params.get("length", self.content.size - offset))
        pos = offset
        while pos < offset + length:
            block = pos // PATTERN_BLOCK
            start = pos - block * PATTERN_BLOCK
            n = min(PATTERN_BLOCK - start, offset + length - pos)
            self.write_content(pos, pattern_block(seed, block)[start : start + n])
            pos += n
        if params.get("regs", True) and offset == 0:
            self.content.regs[:] = pattern_block(f"regs:{seed}", 0, REGS_SIZE)
            self.content.save_regs()
        return self.content.digest()

    def ctl_write(self, params: dict[str, Any]) -> dict[str, Any]:
        import base64

        return {"written": self.write_content(int(params["offset"]), base64.b64decode(params["data"]))}

    def ctl_read(self, params: dict[str, Any]) -> dict[str, Any]:
        import base64

        data = self.content.read(int(params["offset"]), int(params["length"]))
        return {"data": base64.b64encode(data).decode()}

    def ctl_faults(self, params: dict[str, Any]) -> dict[str, Any]:
        self.faults.update(params)
        return self.faults.describe()

    def ctl_arcs(self, params: dict[str, Any]) -> list[list[str]]:
        out = [list(a) for a in self.arcs]
        if params.get("clear"):
            self.arcs.clear()
        return out

    def ctl_sleep(self, params: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(params.get("seconds", 1)))
        return {}

    def ctl_stream_length(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"length": StreamSource.full_length(self.content.size, self.record_size)}


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
