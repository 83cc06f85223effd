"""The bootblock's mailbox: its layout (mirrors labs/workloads/bootblock/bootblock.c) and its verdict.

The guest publishes it at MAILBOX_ADDR; the host reads it with HMP `xp` through
the monitor of the QEMU that runs the VM. A reading before a move (stop, save,
migration) and two after it judge the move as the guest saw it: the second
reading after proves the guest runs, the counters must go on from the first
reading before (a guest that restarted, or RAM left behind, starts over), no
byte may come back wrong or go missing from the device's FIFO, and no pause the
guest saw may be longer than the move's downtime.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

MAILBOX_ADDR = 0x101000
MAGIC = 0x4B42424C  # "LBBK"
VERSION = 1
MAX_PORTS = 8
MAX_GAPS = 8
HEADER = struct.Struct("<IIQQQIIIIIIIIIIQIIQII24x")  # 128 bytes
GAP = struct.Struct("<QQII")  # 24
PORT = struct.Struct("<IIQQQQII")  # 48
SIZE = HEADER.size + MAX_GAPS * GAP.size + MAX_PORTS * PORT.size
STATUS_RUNNING = 2
ERRORS = {
    1: "a byte came back other than the one sent",
    2: "bytes in flight went missing from the FIFO",
    3: "an I/O BAR nobody assigned",
}
# the RTC counts whole seconds, and after a migration it runs on the destination's clock, which may be
# up to a second ahead of the source's (hosts set their clocks from a whole-second RTC at boot)
RTC_SLACK_S = 2


@dataclass
class PortStats:
    io_base: int
    bdf: int
    sent: int
    received: int
    mismatched: int
    stalls: int
    overruns: int
    inflight: int


@dataclass
class Gap:
    heartbeat: int
    tsc: int
    rtc_s: int


@dataclass
class Mailbox:
    magic: int
    version: int
    heartbeat: int
    dirty_passes: int
    dirty_pages: int
    tsc_khz: int
    nports: int
    status: int
    dirty_mib: int
    rate_mib: int
    depth: int
    rtc_now: int
    ngaps: int
    err_code: int
    err_port: int
    err_seq: int
    err_expected: int
    err_found: int
    max_gap_tsc: int
    max_gap_rtc: int
    gaps: list[Gap] = field(default_factory=list)
    ports: list[PortStats] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes) -> Mailbox:
        if len(data) < SIZE:
            raise ValueError(f"mailbox: {len(data)} bytes, want {SIZE}")
        head = HEADER.unpack_from(data, 0)
        box = cls(*head)
        ring = [Gap(*GAP.unpack_from(data, HEADER.size + i * GAP.size)[:3]) for i in range(MAX_GAPS)]
        box.gaps = [g for g in ring if g.heartbeat]
        base = HEADER.size + MAX_GAPS * GAP.size
        count = min(box.nports, MAX_PORTS)
        box.ports = [PortStats(*PORT.unpack_from(data, base + i * PORT.size)) for i in range(count)]
        return box

    @property
    def valid(self) -> bool:
        return self.magic == MAGIC and self.version == VERSION

    def error(self) -> str | None:
        if not self.err_code:
            return None
        what = ERRORS.get(self.err_code, f"error {self.err_code}")
        return (
            f"port {self.err_port}: {what} at byte {self.err_seq} "
            f"(expected {self.err_expected:#x}, found {self.err_found:#x})"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_xp(text: str) -> bytes:
    """The bytes of HMP `xp /Nwx ADDR` output (lines `ADDR: 0x... 0x...`), little-endian words."""
    out = bytearray()
    for line in text.splitlines():
        if ":" not in line:
            continue
        _addr, _sep, words = line.partition(":")
        for word in words.split():
            out += int(word, 16).to_bytes(4, "little")
    return bytes(out)


def judge(
    before: Mailbox | None,
    after: Mailbox,
    later: Mailbox,
    allowed_stall_s: float | None,
) -> list[str]:
    """What the guest saw go wrong across one move (empty: nothing)."""
    out: list[str] = []
    if not after.valid or not later.valid:
        return [f"no bootblock mailbox (magic {later.magic:#x}, version {later.version}): not the bootblock"]
    if later.heartbeat <= after.heartbeat:
        out.append(f"heartbeat stands at {later.heartbeat}: the guest does not run after the move")
    if before is not None:
        if after.heartbeat < before.heartbeat or after.dirty_passes < before.dirty_passes:
            out.append(
                f"heartbeat went back from {before.heartbeat} to {after.heartbeat}: "
                "the guest restarted or its RAM is not the one it left"
            )
        if after.nports != before.nports:
            out.append(f"the guest drives {after.nports} ports, {before.nports} before the move")
        for i, (b, a) in enumerate(zip(before.ports, after.ports, strict=False)):
            if a.sent < b.sent or a.received < b.received:
                went = f"sent {b.sent} -> {a.sent}, received {b.received} -> {a.received}"
                out.append(f"port {i}: counters went back ({went})")
    for i, p in enumerate(later.ports):
        if p.mismatched:
            out.append(f"port {i}: {p.mismatched} bytes came back wrong")
        if p.stalls:
            out.append(f"port {i}: {p.stalls} times bytes in flight went missing from the device's FIFO")
    error = later.error()
    if error:
        out.append(f"guest error: {error}")
    if allowed_stall_s is not None:
        stall = stall_since(before, later)
        limit = math.ceil(allowed_stall_s) + RTC_SLACK_S
        if stall > limit:
            out.append(f"the guest stood still {stall} s, longer than the move's downtime ({allowed_stall_s:.3f}s)")
    return out


def stall_since(before: Mailbox | None, later: Mailbox, clock: Literal["rtc", "tsc"] = "rtc") -> int:
    """The longest pause since `before` was read: by the RTC (whole seconds) or the guest's TSC (ticks).

    From the gap ring, and from the all-time longest gap when it grew since `before`: then that gap came
    after it, even where more than MAX_GAPS later gaps pushed it out of the ring.
    """
    since = before.heartbeat if before is not None else 0
    seen = [g.rtc_s if clock == "rtc" else g.tsc for g in later.gaps if g.heartbeat > since]
    longest = "max_gap_rtc" if clock == "rtc" else "max_gap_tsc"
    if before is not None and getattr(later, longest) > getattr(before, longest):
        seen.append(getattr(later, longest))
    return max(seen, default=0)
