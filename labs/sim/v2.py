"""A v2 (VFIO_DEVICE_FEATURE FSM) simulated driver.

The multi-step resolution is the kernel's (vfio_mig_get_next_state, from the
agent's table); a driver implements single arcs in `arc()`, like the sample mdev and mlx5,
and the state is committed after each arc, so a failure mid-path leaves the last
good state (spec 3.8). Options:
    pre_copy: bool        advertise PRE_COPY (and the PRE_COPY_P2P state with p2p)
    p2p: bool             advertise P2P (RUNNING_P2P)
    precopy_empty: "enomsg" | "zero"   what an exhausted pre-copy read returns (V2-R10)
    resume_failure: "stay" | "error"   state after a rejected stream (RESUMING or ERROR)
    dirty_logging: bool   DMA dirty logging (log_ops, labs.sim.dirty)
"""

from __future__ import annotations

import errno
from typing import Any

from labs.sim.base import SimDriver, StreamSink, StreamSource, err
from labs.sim.dirty import DirtyLogging
from labs.vfio import abi as uapi

S = uapi.V2_STATES
NAMES = uapi.V2_STATE_NAMES
ERROR, STOP, RUNNING, STOP_COPY, RESUMING = S["ERROR"], S["STOP"], S["RUNNING"], S["STOP_COPY"], S["RESUMING"]
RUNNING_P2P, PRE_COPY, PRE_COPY_P2P = S["RUNNING_P2P"], S["PRE_COPY"], S["PRE_COPY_P2P"]


class DataFile:
    """The migration data_fd: a stream (no positions), killed when its session ends."""

    def __init__(self, drv: V2Driver, source: StreamSource | None = None, sink: StreamSink | None = None) -> None:
        self.drv = drv
        self.source = source
        self.sink = sink
        self.dead = False

    def read(self, n: int) -> bytes:
        if self.dead:
            raise err(errno.ENODEV, "migration session is over")
        if self.source is None:
            raise err(errno.EBADF, "resuming fd is write-only")
        data = self.source.read(n)
        if not data and not self.source.final:
            return self.drv.precopy_exhausted()
        return data

    def write(self, data: bytes) -> int:
        if self.dead:
            raise err(errno.ENODEV, "migration session is over")
        if self.sink is None:
            raise err(errno.EBADF, "saving fd is read-only")
        return self.sink.feed(data)

    def pread(self, n: int, offset: int) -> bytes:
        raise err(errno.ESPIPE, "the migration data fd is a stream (stream_open)")

    def pwrite(self, data: bytes, offset: int) -> int:
        raise err(errno.ESPIPE, "the migration data fd is a stream (stream_open)")

    def precopy_info(self, buf: bytearray) -> int:
        if self.dead:
            raise err(errno.ENODEV, "migration session is over")
        argsz = uapi.ST_PRECOPY_INFO.unpack_from(bytes(buf[: uapi.ST_PRECOPY_INFO.size].ljust(24, b"\0")))[0]
        if argsz < uapi.ST_PRECOPY_INFO.size or len(buf) < uapi.ST_PRECOPY_INFO.size:
            raise err(errno.EINVAL, "precopy_info argsz < 24")
        if self.drv.state not in (PRE_COPY, PRE_COPY_P2P) or self.source is None:
            raise err(errno.EINVAL, "PRECOPY_INFO outside PRE_COPY")
        initial, dirty = self.drv.precopy_counts(self.source)
        uapi.ST_PRECOPY_INFO.pack_into(buf, 0, argsz, 0, initial, dirty)
        return 0


class V2Driver(DirtyLogging, SimDriver):
    has_mig_v2 = True

    def __init__(self, state_dir: str, options: dict[str, Any]) -> None:
        super().__init__(state_dir, options)
        self.flags = uapi.VFIO_MIGRATION_STOP_COPY
        if options.get("p2p"):
            self.flags |= uapi.VFIO_MIGRATION_P2P
        if options.get("pre_copy"):
            self.flags |= uapi.VFIO_MIGRATION_PRE_COPY
        self.precopy_empty = str(options.get("precopy_empty", "enomsg"))
        self.resume_failure = str(options.get("resume_failure", "stay"))
        self.state = RUNNING
        self.file: DataFile | None = None
        self.init_dirty_logging(options)

    def state_name(self) -> str:
        return NAMES.get(self.state, str(self.state))

    # -- the core's entry points ---------------------------------------------------
    def mig_flags(self) -> int:
        return self.flags

    def mig_get_state(self) -> int:
        return self.state

    def failed_set_fd(self) -> int | None:
        """data_fd the core copies back after a failed SET (None: the field is left as the user wrote it)."""
        return -1

    def mig_data_size(self) -> int:
        source = self.active_source()
        if source is not None:
            return source.remaining(final=True)
        return StreamSource.full_length(self.content.size, self.record_size)

    def next_state(self, cur: int, new: int) -> int:
        return uapi.mig_next_state(cur, new, self.flags)

    def mig_set_state(self, new: int) -> DataFile | None:
        """The driver loop of the sample mdev and mlx5: one arc at a time, state committed after each."""
        result: DataFile | None = None
        while self.state != new:
            cur = self.state
            nxt = self.next_state(cur, new)
            fault = self.faults.transition(NAMES[cur], NAMES[nxt])
            if fault is not None:
                if fault.to_error:
                    self.enter_error()
                raise err(fault.errno, f"injected failure of arc {NAMES[cur]}->{NAMES[nxt]}")
            result = self.arc(cur, nxt)
            self.arcs.append((NAMES[cur], NAMES[nxt]))
            self.state = nxt
            if result is not None and nxt != new:
                raise err(errno.EINVAL, "a session opened mid-path")
        return result

    def enter_error(self) -> None:
        self.end_session()
        self.state = ERROR

    def end_session(self) -> None:
        if self.file is not None:
            self.file.dead = True
            self.file = None

    def active_source(self) -> StreamSource | None:
        return self.file.source if self.file is not None else None

    # -- single arcs ----------------------------------------------------------------
    def open_saving(self, precopy: bool) -> DataFile:
        self.file = DataFile(self, source=self.new_source(precopy))
        return self.file

    def open_resuming(self) -> DataFile:
        self.file = DataFile(self, sink=self.new_sink())
        return self.file

    def arc(self, cur: int, nxt: int) -> DataFile | None:
        arc = (cur, nxt)
        if arc in (
            (RUNNING, STOP),
            (STOP, RUNNING),
            (RUNNING, RUNNING_P2P),
            (RUNNING_P2P, RUNNING),
            (RUNNING_P2P, STOP),
            (STOP, RUNNING_P2P),
            (PRE_COPY, PRE_COPY_P2P),
            (PRE_COPY_P2P, PRE_COPY),
        ):
            return None  # run/quiesce changes: nothing to stream
        if arc in ((STOP, STOP_COPY),):
            return self.open_saving(precopy=False)
        if arc in ((RUNNING, PRE_COPY), (RUNNING_P2P, PRE_COPY_P2P)):
            return self.open_saving(precopy=True)
        if arc in ((PRE_COPY, STOP_COPY), (PRE_COPY_P2P, STOP_COPY)):
            self.enter_stop_copy()
            return None
        if arc in ((STOP_COPY, STOP), (PRE_COPY, RUNNING), (PRE_COPY_P2P, RUNNING_P2P)):
            self.end_session()
            return None
        if arc == (STOP, RESUMING):
            return self.open_resuming()
        if arc == (RESUMING, STOP):
            self.finish_resume()
            return None
        raise err(errno.EINVAL, f"arc {NAMES[cur]}->{NAMES[nxt]} is not implemented")

    def enter_stop_copy(self) -> None:
        source = self.active_source()
        if source is not None:
            source.stop_copy()

    def finish_resume(self) -> None:
        sink = self.file.sink if self.file is not None else None
        if sink is None:
            raise err(errno.EINVAL, "no resume session")
        try:
            sink.finish()
        except OSError:
            if self.resume_failure == "error":
                self.enter_error()
            raise
        self.end_session()

    # -- data ---------------------------------------------------------------------------
    def precopy_exhausted(self) -> bytes:
        if self.precopy_empty == "zero":
            return b""  # the sample mdev
        raise err(errno.ENOMSG, "no pre-copy data right now")

    def precopy_counts(self, source: StreamSource) -> tuple[int, int]:
        return source.initial_bytes(), source.dirty_bytes()

    def reset(self) -> None:
        """RESET: RUNNING, every session and fd dead (spec 3.8)."""
        super().reset()
        self.end_session()
        self.state = RUNNING
