"""A v1 (migration region) simulated driver, following the v14 KABI thread to the letter.

The region (index 9, TYPE cap 3/1) starts with vfio_device_migration_info:
    device_state u32 @0 (rw), reserved u32 @4, pending_bytes u64 @8 (ro),
    data_offset u64 @16 (ro), data_size u64 @24 (rw)
and has a data window at `data_offset` (page aligned). Field accesses are only
valid at native width and alignment (anything else: EINVAL).

Save (spec 2.4): pending_bytes reads have no side effect except acknowledging a
staged chunk; a data_offset read stages the next chunk (and re-reads return the
same offset/size); the chunk is consumed only at the next pending_bytes read.
Transactions (2.5): a staged chunk is at most a window and never crosses a
stream header or record, so the chunking of a stream is fixed by the stream
and the window; on resume each data_size write must be exactly that
transaction (EINVAL otherwise): chunks replayed with other sizes are refused.
Resume (2.5): the user writes a chunk into the window, then data_size; the
driver applies it before the write returns. Leaving RESUMING validates.
Errors (2.6): a failed state write leaves the prior state or ERROR (110), which
only VFIO_DEVICE_RESET leaves, to 001.

Options:
    window: data window size in bytes (default 64 KiB)
    mmap: advertise the window as mmappable (sparse mmap cap)
    pre_copy: offer data in 011 (default true; false: 011 is accepted, pending_bytes reads 0 until 010)
    resume_failure: "stay" (default: stay in 100) | "error" (go to 110)
"""

from __future__ import annotations

import errno
import struct
from typing import Any

from labs.sim.base import (
    HEADER,
    RECORD,
    RW,
    Region,
    SimDriver,
    StreamSink,
    StreamSource,
    err,
    parse_size,
    sparse_cap,
    type_cap,
)
from labs.vfio import abi as uapi

MIG_INDEX = uapi.VFIO_PCI_NUM_REGIONS  # first device-specific index
DATA_OFFSET = 4096
FIELDS = {off: (name, width) for name, (off, width) in uapi.V1_FIELDS.items()}
RUNNING, SAVING, RESUMING, MASK = uapi.V1_RUNNING, uapi.V1_SAVING, uapi.V1_RESUMING, uapi.V1_STATE_MASK
ERROR = uapi.V1_ERROR


class V1Driver(SimDriver):
    data_offset = DATA_OFFSET  # where the window starts in the region (page aligned)

    def __init__(self, state_dir: str, options: dict[str, Any]) -> None:
        super().__init__(state_dir, options)
        self.window = parse_size(options.get("window", 64 << 10))
        self.mmap = bool(options.get("mmap", False))
        self.resume_failure = str(options.get("resume_failure", "stay"))
        self.state_reg = RUNNING  # V1-R5: 001 after open
        self.source: StreamSource | None = None
        self.sink: StreamSink | None = None
        self.staged: bytes | None = None  # the chunk made available by the last data_offset read
        self.window_buf = bytearray(self.window)
        self.last_data_size = 0
        self.pre_copy = bool(options.get("pre_copy", True))
        self.unit_left = 0  # resume: bytes left of the stream header/record the transactions are in
        self.header_seen = False

    @property
    def state(self) -> int:
        return self.state_reg & MASK

    def state_name(self) -> str:
        return uapi.V1_STATE_NAMES[self.state]

    # -- region layout ----------------------------------------------------------------
    def num_regions(self) -> int:
        return MIG_INDEX + 1

    def region(self, index: int) -> Region | None:
        if index != MIG_INDEX:
            return super().region(index)
        caps = [type_cap(uapi.VFIO_REGION_TYPE_MIGRATION, uapi.VFIO_REGION_SUBTYPE_MIGRATION)]
        flags = RW
        if self.mmap:
            caps.append(sparse_cap([(self.data_offset, self.window)]))
            flags |= uapi.VFIO_REGION_INFO_FLAG_MMAP
        return Region(flags, self.data_offset + self.window, caps)

    def region_read(self, index: int, offset: int, n: int) -> bytes:
        if index != MIG_INDEX:
            return super().region_read(index, offset, n)
        if offset < uapi.V1_INFO_SIZE:
            name = self.field_at(offset, n)  # validates the width first
            return struct.pack(_fmt(n), self.read_field(name))
        if offset >= self.data_offset:
            return self.window_read(offset - self.data_offset, n)
        return bytes(n)  # the gap between the registers and the window

    def region_write(self, index: int, offset: int, data: bytes) -> int:
        if index != MIG_INDEX:
            return super().region_write(index, offset, data)
        if offset < uapi.V1_INFO_SIZE:
            name = self.field_at(offset, len(data))
            self.write_field(name, struct.unpack(_fmt(len(data)), data)[0])
            return len(data)
        if offset >= self.data_offset:
            return self.window_write(offset - self.data_offset, data)
        raise err(errno.EINVAL, f"write to the gap at {offset}")

    def field_at(self, offset: int, width: int) -> str:
        """V1-R2: only whole fields at their native width and alignment."""
        found = FIELDS.get(offset)
        if found is None or found[1] != width:
            raise err(errno.EINVAL, f"{width}-byte access at offset {offset} is not a field")
        return found[0]

    # -- registers --------------------------------------------------------------------
    def read_field(self, name: str) -> int:
        if name == "device_state":
            return self.state_reg
        if name == "reserved":
            return 0  # V1-R3
        if name == "pending_bytes":
            return self.read_pending()
        if name == "data_offset":
            return self.read_data_offset()
        return self.read_data_size()

    def write_field(self, name: str, value: int) -> None:
        if name == "device_state":
            self.write_state(value)
        elif name == "reserved":
            pass  # writes ignored (V1-R3)
        elif name == "data_size":
            self.write_data_size(value)
        else:
            raise err(errno.EINVAL, f"{name} is read-only")

    def read_pending(self) -> int:
        if self.source is None or not self.state & SAVING:
            return 0  # undefined when !SAVING; 0 is the harmless answer
        self.staged = None  # acknowledgement: the previous chunk was consumed
        if not self.pre_copy and self.state & RUNNING:
            return 0  # a driver without pre-copy data: nothing to fetch until 010 (spec 2.3)
        return self.source.remaining()

    def read_data_offset(self) -> int:
        if self.source is not None and self.state & SAVING and self.staged is None:
            self.staged = self.stage_chunk()
        return self.data_offset

    def stage_chunk(self) -> bytes:
        assert self.source is not None
        if not self.pre_copy and self.state & RUNNING:
            return b""
        return self.source.read(min(self.window, self.source.unit_left()))

    def transaction_unit(self, data: bytes) -> int:
        """The size of the stream unit a resume transaction starting with `data` belongs to."""
        if self.unit_left:
            return self.unit_left
        if not self.header_seen:
            return HEADER.size
        if len(data) < RECORD.size:
            return RECORD.size  # a record header cut short: the size check refuses it
        return RECORD.size + int(RECORD.unpack_from(data)[3])

    def read_data_size(self) -> int:
        if self.state & SAVING:
            return len(self.staged) if self.staged is not None else 0
        if self.state & RESUMING:
            return self.last_data_size
        return 0

    def write_data_size(self, size: int) -> None:
        if not self.state & RESUMING or self.sink is None:
            raise err(errno.EINVAL, "data_size is written only in RESUMING")
        if size > self.window:
            raise err(errno.EINVAL, f"data_size {size} > window {self.window}")
        data = bytes(self.window_buf[:size])
        unit = self.transaction_unit(data)
        want = min(self.window, unit)
        if size != want:
            raise err(errno.EINVAL, f"a {size}-byte transaction where the stream's is {want} (same transaction size)")
        self.last_data_size = size
        self.unit_left, self.header_seen = unit - size, True
        self.sink.feed(data)  # applied before the write returns (V1-R16)

    def window_read(self, offset: int, n: int) -> bytes:
        if self.state & SAVING and self.staged is not None:
            return self.staged[offset : offset + n].ljust(min(n, self.window - offset), b"\0")
        return bytes(self.window_buf[offset : offset + n])

    def window_write(self, offset: int, data: bytes) -> int:
        if offset + len(data) > self.window:
            raise err(errno.EINVAL, "write past the data window")
        self.window_buf[offset : offset + len(data)] = data
        return len(data)

    # -- transitions ---------------------------------------------------------------------
    def write_state(self, value: int) -> None:
        cur, new = self.state, value & MASK
        if cur == ERROR:
            raise err(errno.EINVAL, "device is in ERROR: only reset leaves it")  # V1-R9
        if not uapi.v1_user_writable(new):
            raise err(errno.EINVAL, f"state {new:03b} is not valid")  # V1-R6
        fault = self.faults.transition(uapi.V1_STATE_NAMES[cur], uapi.V1_STATE_NAMES[new])
        if fault is not None:
            if fault.to_error:
                self.enter_error()
            raise err(fault.errno, f"injected failure of {cur:03b}->{new:03b}")
        try:
            self.transition(cur, new)
        except OSError:
            if self.resume_failure == "error":
                self.enter_error()
            raise
        self.arcs.append((uapi.V1_STATE_NAMES[cur], uapi.V1_STATE_NAMES[new]))
        self.state_reg = value & 0xFFFFFFFF  # reserved bits as the user wrote them (V1-R4)

    def transition(self, cur: int, new: int) -> None:
        if cur & RESUMING and not new & RESUMING:
            assert self.sink is not None
            self.sink.finish()  # validation; raises EINVAL and leaves 100 on a bad stream
            self.sink = None
        if not cur & SAVING and new & SAVING:
            self.source = self.new_source(precopy=bool(new & RUNNING))
            self.staged = None
        elif cur & SAVING and new & SAVING and not new & RUNNING and self.source is not None:
            self.source.stop_copy()  # 011 -> 010, regardless of pending_bytes (V1-R10)
        elif cur & SAVING and not new & SAVING:
            self.source = None
            self.staged = None
        if not cur & RESUMING and new & RESUMING:
            self.sink = self.new_sink()
            self.window_buf = bytearray(self.window)
            self.last_data_size = 0
            self.unit_left, self.header_seen = 0, False

    def enter_error(self) -> None:
        self.state_reg = uapi.v1_set_error(self.state_reg)
        self.source = None
        self.sink = None
        self.staged = None

    def active_source(self) -> StreamSource | None:
        return self.source

    def reset(self) -> None:
        """Back to 001, any SAVING/RESUMING session ended (V1-R9, V1-R19)."""
        super().reset()
        self.state_reg = RUNNING
        self.source = None
        self.sink = None
        self.staged = None


def _fmt(width: int) -> str:
    return {1: "=B", 2: "=H", 4: "=I", 8: "=Q"}[width]
