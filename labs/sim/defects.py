"""Seeded defects: driver variants that each break exactly one spec rule.

Every class here is a small subclass of the correct V1Driver/V2Driver that
changes one behaviour. CATALOGUE maps a variant name to the rule it breaks, so
a run of the conformance suites against every variant can show which test
caught it (a test named after the rule must). Point an inventory device at one
with `driver: labs.sim.defects:ClassName`.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from labs.sim.base import (
    HEADER,
    MAGIC,
    REC_CONTENT,
    REC_REGS,
    RECORD,
    REGS_SIZE,
    STREAM_VERSION,
    Region,
    StreamSink,
    StreamSource,
    err,
    sparse_cap,
)
from labs.sim.v1 import MASK, MIG_INDEX, RESUMING, RUNNING, SAVING, V1Driver
from labs.sim.v2 import (
    ERROR,
    PRE_COPY,
    PRE_COPY_P2P,
    RUNNING_P2P,
    STOP,
    STOP_COPY,
    DataFile,
    V2Driver,
)
from labs.sim.v2 import RESUMING as RESUMING_V2
from labs.sim.v2 import RUNNING as V2_RUNNING
from labs.vfio import abi as uapi

# ---------------------------------------------------------------------------
# v1
# ---------------------------------------------------------------------------


class V1WidthUnchecked(V1Driver):
    """V1-R2: any access width inside a field is served (a 4-byte read of pending_bytes works)."""

    def field_at(self, offset: int, width: int) -> str:
        for name, (off, size) in uapi.V1_FIELDS.items():
            if off <= offset < off + size:
                return name
        raise err(errno.EINVAL, "no field")

    def region_read(self, index: int, offset: int, n: int) -> bytes:
        if index == 9 and offset < uapi.V1_INFO_SIZE:
            name = self.field_at(offset, n)
            value = self.read_field(name).to_bytes(8, "little")
            start = offset - uapi.V1_FIELDS[name][0]
            return value[start : start + n].ljust(n, b"\0")
        return super().region_read(index, offset, n)


class V1ReservedJunk(V1Driver):
    """V1-R3: reserved reads back what was written to it."""

    junk = 0

    def read_field(self, name: str) -> int:
        return self.junk if name == "reserved" else super().read_field(name)

    def write_field(self, name: str, value: int) -> None:
        if name == "reserved":
            self.junk = value
        else:
            super().write_field(name, value)


class V1DropsReservedBits(V1Driver):
    """V1-R4: device_state keeps only the 3 defined bits of what the user writes."""

    def write_state(self, value: int) -> None:
        super().write_state(value & MASK)


class V1StoppedAfterOpen(V1Driver):
    """V1-R5: a freshly opened device reads 000."""

    def __init__(self, state_dir: str, options: dict[str, Any]) -> None:
        super().__init__(state_dir, options)
        self.state_reg = 0


class V1Accepts101(V1Driver):
    """V1-R6: the invalid state 101 (RESUMING|RUNNING) is accepted."""

    def write_state(self, value: int) -> None:
        if value & MASK == RESUMING | RUNNING:
            self.state_reg = value
            return
        super().write_state(value)


class V1FailureReportsNewState(V1Driver):
    """V1-R8: after a failed state write, device_state reads the *requested* state."""

    def write_state(self, value: int) -> None:
        cur = self.state
        try:
            super().write_state(value)
        except OSError:
            # only a failed *valid* transition lies (invalid writes and resume validation are other rules)
            if self.state != uapi.V1_ERROR and uapi.v1_user_writable(value) and not cur & RESUMING:
                self.state_reg = value
            raise


class V1ErrorSticksAfterReset(V1Driver):
    """V1-R9: VFIO_DEVICE_RESET does not leave ERROR."""

    def reset(self) -> None:
        was_error = self.state == uapi.V1_ERROR
        super().reset()
        if was_error:
            self.state_reg = uapi.v1_set_error(self.state_reg)


class V1PrecopyNeedsDrain(V1Driver):
    """V1-R10: 011 -> 010 is refused while pending_bytes > 0."""

    def write_state(self, value: int) -> None:
        if self.state == SAVING | RUNNING and value & MASK == SAVING and self.source and self.source.remaining():
            raise err(errno.EBUSY, "drain pre-copy data first")
        super().write_state(value)


class V1PendingConsumes(V1Driver):
    """V1-R11: every pending_bytes read consumes a chunk, staged or not."""

    def read_pending(self) -> int:
        if self.source is not None and self.state & SAVING and self.staged is None:
            self.source.read(self.window)  # silently thrown away
        return super().read_pending()


class V1OffsetRestages(V1Driver):
    """V1-R12: every data_offset read stages a new chunk, so a re-read skips data."""

    def read_data_offset(self) -> int:
        if self.source is not None and self.state & SAVING:
            self.staged = self.stage_chunk()
        return self.data_offset


class V1WindowRereadDiffers(V1Driver):
    """V1-R13: a second read of the same staged chunk returns other bytes."""

    seen: set[int] = set()

    def window_read(self, offset: int, n: int) -> bytes:
        data = super().window_read(offset, n)
        if self.staged is None:
            return data
        key = id(self.staged)
        if key in self.seen:
            return bytes(b ^ 0x5A for b in data)
        self.seen = {key}
        return data


class V1UnalignedDataOffset(V1Driver):
    """V1-R14: the mmappable data window starts at an offset that is not page aligned."""

    data_offset = 40


class V1PendingNeverZero(V1Driver):
    """V1-R15: in 010 pending_bytes never reaches 0 (it reports a phantom chunk)."""

    def read_pending(self) -> int:
        value = super().read_pending()
        return value if value or not self.state & SAVING else 4096


class V1ResumeIgnoresDataSize(V1Driver):
    """V1-R16: the data_size write returns before the chunk is applied (it is dropped)."""

    def write_data_size(self, size: int) -> None:
        if not self.state & RESUMING or self.sink is None:
            raise err(errno.EINVAL, "not resuming")
        self.last_data_size = size  # never fed to the sink


class _LaxSink(StreamSink):
    def finish(self) -> None:
        self.ended = True
        self.deferred = None
        self.error = None
        if self.regs:
            self.drv.content.regs[:] = self.regs


class V1AcceptsTruncated(V1Driver):
    """V1-R17: an incomplete or corrupted stream is accepted on leaving 100."""

    def new_sink(self) -> StreamSink:
        return _LaxSink(self)


class V1ResetKeepsState(V1Driver):
    """V1-R19: reset from a SAVING state leaves the state and its session alone."""

    def reset(self) -> None:
        if self.state in (SAVING, SAVING | RUNNING):
            self.resets += 1
            return
        super().reset()


class V1SparseAreaPastRegion(V1Driver):
    """V1-R1: the sparse-mmap area of the data window runs past the end of the region."""

    def region(self, index: int) -> Region | None:
        region = super().region(index)
        if index == MIG_INDEX and region is not None:
            region.caps = [c for c in region.caps if c[0] != uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP]
            region.caps.append(sparse_cap([(self.data_offset, 2 * self.window)]))
        return region


class V1StateWriteAsync(V1Driver):
    """V1-R7: a state write returns before the transition is done: the next read shows the old state."""

    stale: int | None = None

    def write_state(self, value: int) -> None:
        before = self.state_reg
        super().write_state(value)
        self.stale = before

    def read_field(self, name: str) -> int:
        if name == "device_state" and self.stale is not None:
            value, self.stale = self.stale, None
            return value
        return super().read_field(name)


class V1ChunksCrossRecords(V1Driver):
    """V1-R18: saving stages whole windows across stream records, so its transactions are not the
    ones its own resume side expects (a stream saved here does not replay)."""

    def stage_chunk(self) -> bytes:
        assert self.source is not None
        return self.source.read(self.window)


class V1RefusedResumeLeavesStop(V1Driver):
    """V1-R17: a refused exit from 100 drops the session and reads back 000 (neither prior state nor 110)."""

    def write_state(self, value: int) -> None:
        cur = self.state
        try:
            super().write_state(value)
        except OSError:
            if cur == RESUMING and self.state == RESUMING and uapi.v1_user_writable(value) and value & MASK != cur:
                self.sink = None
                self.state_reg = 0
            raise


class V1ResetIgnoredInResuming(V1Driver):
    """V1-R19: VFIO_DEVICE_RESET during 100 is dropped: the device stays in its resume session."""

    def reset(self) -> None:
        if self.state == RESUMING:
            self.resets += 1
            return
        super().reset()


# ---------------------------------------------------------------------------
# v2
# ---------------------------------------------------------------------------


class V2BadFlags(V2Driver):
    """V2-R1: MIGRATION reports an undefined flag bit (flags outside {1, 3, 5, 7})."""

    def mig_flags(self) -> int:
        return self.flags | (1 << 8)


class V2StoppedAfterOpen(V2Driver):
    """V2-R3: a freshly opened device is in STOP."""

    def __init__(self, state_dir: str, options: dict[str, Any]) -> None:
        super().__init__(state_dir, options)
        self.state = STOP


class V2GetLiesAfterFailedSet(V2Driver):
    """V2-R4: after a SET to an invalid state fails, GET reports the requested state."""

    lie: int | None = None

    def mig_set_state(self, new: int) -> DataFile | None:
        self.lie = None
        try:
            return super().mig_set_state(new)
        except OSError:
            if not uapi.mig_state_supported(new, self.flags):
                self.lie = new
            raise

    def mig_get_state(self) -> int:
        return self.lie if self.lie is not None else self.state


class V2SameStateReopens(V2Driver):
    """V2-R5: SET STOP_COPY while in STOP_COPY starts a new session and returns a new fd."""

    def mig_set_state(self, new: int) -> DataFile | None:
        if new == self.state == STOP_COPY:
            self.end_session()
            return self.open_saving(precopy=False)
        return super().mig_set_state(new)


class V2SkipsP2P(V2Driver):
    """V2-R6: RUNNING -> STOP goes directly, skipping RUNNING_P2P on a P2P device."""

    def next_state(self, cur: int, new: int) -> int:
        nxt = super().next_state(cur, new)
        if cur == V2_RUNNING and nxt == RUNNING_P2P and new == STOP:
            return STOP
        return nxt

    def arc(self, cur: int, nxt: int) -> DataFile | None:
        if (cur, nxt) == (V2_RUNNING, STOP):
            return None
        return super().arc(cur, nxt)


class V2FdOnRunningToStop(V2Driver):
    """V2-R7: SET STOP from RUNNING(_P2P) returns a (useless) data_fd."""

    def mig_set_state(self, new: int) -> DataFile | None:
        before = self.state
        out = super().mig_set_state(new)
        if out is None and new == STOP and before in (V2_RUNNING, RUNNING_P2P):
            out = DataFile(self, source=None)
            out.dead = True
        return out


class V2PrecopyIgnored(V2Driver):
    """V2-R7: PRE_COPY is advertised but entering it returns no data_fd
    (so nothing that needs the pre-copy fd, V2-R8/R10, can run either)."""

    def arc(self, cur: int, nxt: int) -> DataFile | None:
        out = super().arc(cur, nxt)
        return None if nxt in (PRE_COPY, PRE_COPY_P2P) and cur in (V2_RUNNING, RUNNING_P2P) else out


class V2NewFdInSavingGroup(V2Driver):
    """V2-R8: PRE_COPY -> STOP_COPY kills the pre-copy fd and returns a fresh one."""

    def arc(self, cur: int, nxt: int) -> DataFile | None:
        if nxt == STOP_COPY and cur in (PRE_COPY, PRE_COPY_P2P):
            self.end_session()
            return self.open_saving(precopy=False)
        return super().arc(cur, nxt)


class _NoEofSource(StreamSource):
    def read(self, n: int) -> bytes:
        data = super().read(n)
        if not data and self.final:
            raise err(errno.ENOMSG, "no data right now")
        return data


class V2StopCopyNoEof(V2Driver):
    """V2-R9: an exhausted STOP_COPY stream answers ENOMSG instead of EOF."""

    def new_source(self, precopy: bool) -> StreamSource:
        return _NoEofSource(self, precopy)


class V2PrecopyGarbage(V2Driver):
    """V2-R10: an exhausted PRE_COPY read returns garbage bytes instead of ENOMSG or 0
    (the garbage lands in the stream, so the saving-group stream (V2-R8) shows it too)."""

    def precopy_exhausted(self) -> bytes:
        return b"\xde\xad\xbe\xef" * 16


class _AnyStateFile(DataFile):
    def precopy_info(self, buf: bytearray) -> int:
        if self.drv.state == STOP_COPY and self.source is not None and not self.dead:
            uapi.ST_PRECOPY_INFO.pack_into(buf, 0, uapi.ST_PRECOPY_INFO.size, 0, 0, 0)
            return 0
        return super().precopy_info(buf)


class V2PrecopyInfoAnywhere(V2Driver):
    """V2-R11: PRECOPY_INFO answers in STOP_COPY too."""

    def open_saving(self, precopy: bool) -> DataFile:
        self.file = _AnyStateFile(self, source=self.new_source(precopy))
        return self.file


class V2HangingArcAccepted(V2Driver):
    """V2-R12: STOP_COPY -> PRE_COPY is carried out instead of failing EINVAL."""

    def next_state(self, cur: int, new: int) -> int:
        if cur == STOP_COPY and new in (PRE_COPY, PRE_COPY_P2P):
            return new
        return super().next_state(cur, new)

    def arc(self, cur: int, nxt: int) -> DataFile | None:
        if cur == STOP_COPY and nxt in (PRE_COPY, PRE_COPY_P2P):
            return None
        return super().arc(cur, nxt)


class _CorruptingSink(StreamSink):
    def apply_content(self, offset: int, data: bytes) -> None:
        if offset == 0 and data:
            data = bytes([data[0] ^ 0x01]) + data[1:]
        super().apply_content(offset, data)


class V2CorruptsOnResume(V2Driver):
    """V2-R13: resume flips one bit of the restored content."""

    def new_sink(self) -> StreamSink:
        return _CorruptingSink(self)


class V2AcceptsTruncated(V2Driver):
    """V2-R14: a truncated or corrupted stream is accepted on leaving RESUMING."""

    def new_sink(self) -> StreamSink:
        return _LaxSink(self)


class V2ErrorSticksAfterReset(V2Driver):
    """V2-R15: RESET does not leave ERROR."""

    def reset(self) -> None:
        was_error = self.state == ERROR
        super().reset()
        if was_error:
            self.state = ERROR


class V2FdSurvivesReset(V2Driver):
    """V2-R16: the old data_fd stays readable after RESET."""

    def reset(self) -> None:
        self.resets += 1
        self.file = None  # forgotten, but not killed
        self.state = V2_RUNNING


class V2DataSizeOnlyWhenStopped(V2Driver):
    """V2-R19: MIG_DATA_SIZE fails in RUNNING."""

    def mig_data_size(self) -> int:
        if self.state == V2_RUNNING:
            raise err(errno.EINVAL, "not stopped")
        return super().mig_data_size()


class _DryRunSink(StreamSink):
    def apply_content(self, offset: int, data: bytes) -> None:
        pass

    def finish(self) -> None:
        self.regs = bytearray()  # validated, never committed
        super().finish()


class V1ResumeWritesNothing(V1Driver):
    """V1-R16: resume validates the stream but applies nothing (a dry run left on)."""

    def new_sink(self) -> StreamSink:
        return _DryRunSink(self)


class V2ResumeWritesNothing(V2Driver):
    """V2-R13: resume validates the stream but applies nothing (a dry run left on)."""

    def new_sink(self) -> StreamSink:
        return _DryRunSink(self)


class _EmptyOkSink(StreamSink):
    def finish(self) -> None:
        if self.fed:
            super().finish()


class V2AcceptsEmpty(V2Driver):
    """V2-R14: leaving RESUMING with no data written succeeds (nothing to restore taken as nothing to do)."""

    def new_sink(self) -> StreamSink:
        return _EmptyOkSink(self)


class _NoChecksumSink(StreamSink):
    def finish(self) -> None:
        self.deferred = None
        super().finish()


class V2SkipsChecksum(V2Driver):
    """V2-R14: the end record's checksum is never verified: a corrupted body is applied."""

    def new_sink(self) -> StreamSink:
        return _NoChecksumSink(self)


class _MagicOnlySink(StreamSink):
    def check_header(self, raw: bytes) -> None:
        magic, version, _model, _size, _regs = HEADER.unpack(raw)
        if magic != MAGIC or version != STREAM_VERSION:
            raise self._fail("not a labs sim stream")


class V2AcceptsForeignModel(V2Driver):
    """V2-R14: the header check reads magic and version only: another model's stream is applied."""

    def new_sink(self) -> StreamSink:
        return _MagicOnlySink(self)


class V1AcceptsUnfinished(V1Driver):
    """V1-R17: leaving 100 applies a chunk still in the data window whose data_size was never written."""

    unfed = 0

    def window_write(self, offset: int, data: bytes) -> int:
        n = super().window_write(offset, data)
        self.unfed = max(self.unfed, offset + n)
        return n

    def write_data_size(self, size: int) -> None:
        super().write_data_size(size)
        self.unfed = 0

    def transition(self, cur: int, new: int) -> None:
        if cur & RESUMING and not new & RESUMING and self.sink is not None and self.unfed:
            self.sink.feed(bytes(self.window_buf[: self.unfed]))
            self.unfed = 0
        super().transition(cur, new)


class _ImageSource(StreamSource):
    """A saving stream of a device image taken earlier, not of the content now."""

    def __init__(self, drv: V2Driver, image: tuple[bytes, bytes]) -> None:
        self.image = image
        super().__init__(drv, precopy=False)

    def chunk_record(self, i: int) -> bytes:
        n = self.chunk_len(i)
        return RECORD.pack(REC_CONTENT, 0, i * self.rec, n) + self.image[0][i * self.rec : i * self.rec + n]

    def regs_record(self) -> bytes:
        return RECORD.pack(REC_REGS, 0, 0, REGS_SIZE) + self.image[1]


class V2SecondSaveStale(V2Driver):
    """V2-R13: every STOP_COPY save of one open sends the device image taken at its first save."""

    image: tuple[bytes, bytes] | None = None

    def open_saving(self, precopy: bool) -> DataFile:
        if precopy:
            return super().open_saving(precopy)
        if self.image is None:
            self.image = (self.content.read(0, self.content.size), bytes(self.content.regs))
        self.file = DataFile(self, source=_ImageSource(self, self.image))
        return self.file


class V2SaveAfterResetStale(V2SecondSaveStale):
    """V2-R13: a save after RESET sends the device image cached before it (only running again drops it)."""

    def arc(self, cur: int, nxt: int) -> DataFile | None:
        if nxt == V2_RUNNING:
            self.image = None
        return super().arc(cur, nxt)


class V2EarlyStopLosesTail(V2Driver):
    """V2-R8: STOP_COPY sends only what pre-copy dirtied, as if its initial pass had finished."""

    def enter_stop_copy(self) -> None:
        source = self.active_source()
        if source is not None:
            source.next_chunk = source.nchunks  # the chunks pre-copy had not sent yet are lost
        super().enter_stop_copy()


class V1EarlyStopLosesTail(V1Driver):
    """V1-R16: 011 -> 010 sends only what pre-copy dirtied, as if its initial pass had finished."""

    def transition(self, cur: int, new: int) -> None:
        if cur == SAVING | RUNNING and new & MASK == SAVING and self.source is not None:
            self.source.next_chunk = self.source.nchunks  # the chunks pre-copy had not sent yet are lost
        super().transition(cur, new)


class _ClobbersOnRestart(V2Driver):
    restart: tuple[int, int] = (STOP, V2_RUNNING)
    resumed = False

    def arc(self, cur: int, nxt: int) -> DataFile | None:
        if (cur, nxt) == self.restart and not self.resumed:
            self.content.regs[:] = bytes(REGS_SIZE)
            self.content.save_regs()
        if nxt == V2_RUNNING:
            self.resumed = False
        elif (cur, nxt) == (RESUMING_V2, STOP):
            self.resumed = True
        return super().arc(cur, nxt)


class V2StopRunClobbers(_ClobbersOnRestart):
    """V2-R6: STOP -> RUNNING after a plain pause re-initialises the register file (a resume's restore is kept)."""


class V2P2PRunClobbers(_ClobbersOnRestart):
    """V2-R6: RUNNING_P2P -> RUNNING re-initialises the register file, unless a resume just restored it."""

    restart = (RUNNING_P2P, V2_RUNNING)


class V1PauseClobbers(V1Driver):
    """V1-R10: 000 -> 001 (resuming a paused device) re-initialises the register file."""

    def transition(self, cur: int, new: int) -> None:
        if cur == 0 and new == RUNNING:
            self.content.regs[:] = bytes(REGS_SIZE)
            self.content.save_regs()
        super().transition(cur, new)


class V2FlagsDropP2P(V2Driver):
    """V2-R1: MIGRATION reports SC|PRE_COPY (a defined set) on a device built, and listed, with P2P."""

    def mig_flags(self) -> int:
        return self.flags & ~uapi.VFIO_MIGRATION_P2P


class V2CoreAcceptsGetSet(V2Driver):
    """V2-R2: a driver shipping its own VFIO core backport that lets GET|SET through without PROBE."""

    def check_feature_header(self, argsz: int, flags: int) -> None:
        super().check_feature_header(argsz, flags & ~uapi.VFIO_DEVICE_FEATURE_SET)


class V2MasksStateValue(V2Driver):
    """V2-R4: the driver indexes its arc table with the low 3 bits of device_state: 9 is taken as STOP,
    0x10002 as RUNNING."""

    def mig_set_state(self, new: int) -> DataFile | None:
        return super().mig_set_state(new & 7)


class V2RefusedResumeLeavesStop(V2Driver):
    """V2-R14: RESUMING -> STOP commits STOP before validating: a refused stream leaves the device in
    STOP (neither RESUMING nor ERROR)."""

    def finish_resume(self) -> None:
        try:
            super().finish_resume()
        except OSError:
            self.end_session()
            self.state = STOP
            raise


class V2ResetSparesResumingFd(V2Driver):
    """V2-R16: RESET ends saving sessions but leaves a resuming data_fd writable."""

    def reset(self) -> None:
        file = self.file if self.file is not None and self.file.sink is not None else None
        super().reset()
        if file is not None:
            file.dead = False


class V2FailedSetKeepsFd(V2Driver):
    """V2-R17: a driver shipping its own core backport copies back only device_state after a failed
    SET: data_fd keeps whatever the user's buffer held."""

    def failed_set_fd(self) -> int | None:
        return None


class _SeekableFile(DataFile):
    def pread(self, n: int, offset: int) -> bytes:
        return self.read(n)  # the position is ignored: no stream_open


class V2FdSeekable(V2Driver):
    """V2-R18: the data_fd is not opened as a stream: pread succeeds (ignoring the offset) instead of ESPIPE."""

    def open_saving(self, precopy: bool) -> DataFile:
        self.file = _SeekableFile(self, source=self.new_source(precopy))
        return self.file


class V2DirtyReportKeepsBits(V2Driver):
    """V2-R20: REPORT reads the dirty log without clearing it, so a page once written shows dirty on
    every later REPORT."""

    def log_read_and_clear(self, iova: int, length: int) -> list[tuple[int, int]]:
        kept = set(self.log_dirty)
        spans = super().log_read_and_clear(iova, length)
        self.log_dirty = kept
        return spans


class V2DirtyReportClearsAll(V2Driver):
    """V2-R20: REPORT clears the whole log, not only its range: pages dirtied outside a partial REPORT are lost."""

    def log_read_and_clear(self, iova: int, length: int) -> list[tuple[int, int]]:
        spans = super().log_read_and_clear(iova, length)
        self.log_dirty.clear()
        return spans


class V2DirtyFirstPageOnly(V2Driver):
    """V2-R20: the tracker marks only the page where a DMA write starts; the rest of a write that
    crosses pages is never logged."""

    def device_dma_write(self, iova: int, length: int) -> int:
        return super().device_dma_write(iova, min(length, 1))


class V2DirtyRestartsOnStart(V2Driver):
    """V2-R20: a second START replaces the running log (and its dirty pages) instead of being refused."""

    def log_start(self, ranges: list[tuple[int, int]], page_size: int) -> int:
        self.log_ranges = None
        return super().log_start(ranges, page_size)


# ---------------------------------------------------------------------------
# the catalogue
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Defect:
    name: str
    rule: str
    protocol: str
    driver: str  # the inventory's `driver:` value
    description: str
    options: tuple[tuple[str, Any], ...] = ()
    also: tuple[str, ...] = ()  # rules that fail as a direct consequence (the defect makes them untestable)


def _defect(cls: type, rule: str, options: dict[str, Any] | None = None, also: tuple[str, ...] = ()) -> Defect:
    protocol = "v1" if issubclass(cls, V1Driver) else "v2"
    doc = " ".join((cls.__doc__ or "").split()).split(": ", 1)[-1]
    opts = tuple(sorted((options or {}).items()))
    return Defect(cls.__name__, rule, protocol, f"{__name__}:{cls.__name__}", doc, opts, also)


_V2_FULL = {"pre_copy": True, "p2p": True}
_V2_DIRTY = {**_V2_FULL, "dirty_logging": True}

CATALOGUE: dict[str, Defect] = {
    d.name: d
    for d in [
        _defect(V1WidthUnchecked, "V1-R2"),
        _defect(V1ReservedJunk, "V1-R3"),
        _defect(V1DropsReservedBits, "V1-R4"),
        _defect(V1StoppedAfterOpen, "V1-R5"),
        _defect(V1Accepts101, "V1-R6"),
        _defect(V1FailureReportsNewState, "V1-R8"),
        _defect(V1ErrorSticksAfterReset, "V1-R9"),
        _defect(V1PrecopyNeedsDrain, "V1-R10"),
        _defect(V1PendingConsumes, "V1-R11"),
        _defect(V1OffsetRestages, "V1-R12"),
        _defect(V1WindowRereadDiffers, "V1-R13"),
        _defect(V1UnalignedDataOffset, "V1-R14", {"mmap": True}),
        _defect(V1PendingNeverZero, "V1-R15"),
        _defect(V1ResumeIgnoresDataSize, "V1-R16"),
        _defect(V1AcceptsTruncated, "V1-R17"),
        _defect(V1ResetKeepsState, "V1-R19"),
        _defect(V1SparseAreaPastRegion, "V1-R1", {"mmap": True}),
        _defect(V1StateWriteAsync, "V1-R7"),
        _defect(V1ChunksCrossRecords, "V1-R18", also=("V1-R16", "V1-R9")),  # a lab resumes into the saver itself
        _defect(V1RefusedResumeLeavesStop, "V1-R17"),
        _defect(V1ResetIgnoredInResuming, "V1-R19"),
        _defect(V2BadFlags, "V2-R1", _V2_FULL),
        _defect(V2StoppedAfterOpen, "V2-R3", _V2_FULL),
        _defect(V2GetLiesAfterFailedSet, "V2-R4", _V2_FULL),
        _defect(V2SameStateReopens, "V2-R5", _V2_FULL),
        _defect(V2SkipsP2P, "V2-R6", _V2_FULL),
        _defect(V2FdOnRunningToStop, "V2-R7", _V2_FULL),
        _defect(V2PrecopyIgnored, "V2-R7", _V2_FULL, also=("V2-R8", "V2-R10")),
        _defect(V2NewFdInSavingGroup, "V2-R8", _V2_FULL),
        _defect(V2StopCopyNoEof, "V2-R9", _V2_FULL),
        _defect(V2PrecopyGarbage, "V2-R10", _V2_FULL, also=("V2-R8",)),
        _defect(V2PrecopyInfoAnywhere, "V2-R11", _V2_FULL),
        _defect(V2HangingArcAccepted, "V2-R12", _V2_FULL),
        _defect(V2CorruptsOnResume, "V2-R13", _V2_FULL),
        _defect(V2AcceptsTruncated, "V2-R14", _V2_FULL),
        _defect(V2ErrorSticksAfterReset, "V2-R15", _V2_FULL),
        _defect(V2FdSurvivesReset, "V2-R16", _V2_FULL),
        _defect(V2FlagsDropP2P, "V2-R1", _V2_FULL),
        _defect(V2CoreAcceptsGetSet, "V2-R2", _V2_FULL),
        _defect(V2MasksStateValue, "V2-R4", _V2_FULL),
        _defect(V2RefusedResumeLeavesStop, "V2-R14", _V2_FULL),
        _defect(V2ResetSparesResumingFd, "V2-R16", _V2_FULL),
        _defect(V2FailedSetKeepsFd, "V2-R17", _V2_FULL),
        _defect(V2FdSeekable, "V2-R18", _V2_FULL),
        _defect(V2DataSizeOnlyWhenStopped, "V2-R19", _V2_FULL),
        _defect(V1ResumeWritesNothing, "V1-R16"),
        _defect(V2ResumeWritesNothing, "V2-R13", _V2_FULL),
        _defect(V2AcceptsEmpty, "V2-R14", _V2_FULL),
        _defect(V2SkipsChecksum, "V2-R14", _V2_FULL),
        _defect(V2AcceptsForeignModel, "V2-R14", _V2_FULL),
        _defect(V1AcceptsUnfinished, "V1-R17"),
        _defect(V2SecondSaveStale, "V2-R13", _V2_FULL),
        _defect(V2SaveAfterResetStale, "V2-R13", _V2_FULL),
        _defect(V2EarlyStopLosesTail, "V2-R8", _V2_FULL),
        _defect(V1EarlyStopLosesTail, "V1-R16"),
        _defect(V2StopRunClobbers, "V2-R6", {"pre_copy": True}),
        _defect(V2P2PRunClobbers, "V2-R6", _V2_FULL),
        _defect(V1PauseClobbers, "V1-R10"),
        _defect(V2DirtyReportKeepsBits, "V2-R20", _V2_DIRTY),
        _defect(V2DirtyReportClearsAll, "V2-R20", _V2_DIRTY),
        _defect(V2DirtyFirstPageOnly, "V2-R20", _V2_DIRTY),
        _defect(V2DirtyRestartsOnStart, "V2-R20", _V2_DIRTY),
    ]
}

def _correct(name: str, protocol: str, what: str, options: dict[str, Any]) -> Defect:
    driver = f"labs.sim.{protocol}:{protocol.upper()}Driver"
    return Defect(name, "", protocol, driver, f"correct {protocol} driver, {what}", tuple(sorted(options.items())))


# The correct drivers the catalogue is measured against: v1 with and without pre-copy data, v2 with
# every defined flag set. "v1"/"v2" are each protocol's full driver (the peer of a variant).
CORRECT = {
    "v1": _correct("V1Driver", "v1", "pre-copy data", {}),
    "v2": _correct("V2Driver", "v2", "STOP_COPY|P2P|PRE_COPY", _V2_FULL),
    "v1-no-precopy": _correct("V1DriverNoPreCopy", "v1", "no pre-copy data", {"pre_copy": False}),
    "v2-sc": _correct("V2DriverSC", "v2", "STOP_COPY", {}),
    "v2-p2p": _correct("V2DriverP2P", "v2", "STOP_COPY|P2P", {"p2p": True}),
    "v2-precopy": _correct("V2DriverPreCopy", "v2", "STOP_COPY|PRE_COPY", {"pre_copy": True}),
    "v2-dirty": _correct("V2DriverDirtyLog", "v2", "STOP_COPY|P2P|PRE_COPY, DMA dirty logging", _V2_DIRTY),
}
