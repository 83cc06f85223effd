"""One small check per spec rule (sections 2.8 and 3.9), written once for every caller.

A check gets a CheckContext: `ctx.open()` gives the device under test (a fresh
handle in RUNNING), `ctx.peer()` a second, compatible device to resume into or
save from, never the device under test itself (on a lab its pair partner or
another device of its model; in tests/test_defects.py the correct driver, so a
resume rule judges the resuming side only). A round trip seeds both sides apart
first and proves the content arrived: by digest on a simulated device, else by
saving the resumed device again and comparing streams (the model's normaliser, labs.models).
`ctx.step(title)` records a report step.

Checks use fault knobs and sim readback (`dev.sim`, `dev.fill`, `dev.digest`)
only where `Check.sim` says so, or behind `dev.is_sim`, so the same checks run
on real devices. They never send a request that hangs a real kernel
(uapi.is_hanging) to a device that is not simulated, unless its kernel is known to
carry the fix (uapi.blocked_arc_fixed).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import itertools
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

from labs import models
from labs.conformance import model
from labs.models import DeviceModel, Seeder
from labs.vfio import abi as vfio
from labs.vfio import rules, uapi
from labs.vfio.abi import VFIO_DEVICE_FEATURE_GET as GET
from labs.vfio.abi import VFIO_DEVICE_FEATURE_PROBE as PROBE
from labs.vfio.abi import VFIO_DEVICE_FEATURE_SET as SET
from labs.vfio.abi import VFIO_PCI_CONFIG_REGION_INDEX as CONFIG_REGION
from labs.vfio.client import AgentOSError
from labs.vfio.device import DeviceHandle, SavedStream

FAULT_KNOBS = "fault knobs need a simulated driver"
HANGS_KERNELS = "STOP_COPY -> PRE_COPY hangs real kernels without FIX-2026 (spec 3.4)"


class CheckContext(Protocol):
    model: str  # the device's pairing key (inventory `model`)

    def open(self) -> DeviceHandle:
        """The device under test: a fresh handle, in RUNNING."""
        ...

    def peer(self) -> DeviceHandle:
        """A compatible second device in RUNNING, never the device under test (skips when there is none)."""
        ...

    def step(self, title: str) -> AbstractContextManager[Any]:
        """A report step (the context adds host and device to the title)."""
        ...


CheckFn = Callable[[CheckContext], None]


@dataclass(frozen=True)
class Check:
    rule: str
    fn: CheckFn
    sim: str | None = None  # why it needs a simulated driver (fault knobs, a request that hangs kernels)
    requires: tuple[str, ...] = ()  # device capabilities it needs (inventory names: pre_copy, p2p, ...)

    @property
    def protocol(self) -> str:
        return self.rule.split("-", 1)[0].lower()

    @property
    def title(self) -> str:
        return rules.RULES[self.rule]

    def __call__(self, ctx: CheckContext) -> None:
        self.fn(ctx)

    def __repr__(self) -> str:
        # the report shows a test parameter by its repr: the rule, not a function address
        return f"{self.rule}: {self.title}"


CHECKS: dict[str, Check] = {}


def check(rule: str, sim: str | None = None, requires: tuple[str, ...] = ()) -> Callable[[CheckFn], CheckFn]:
    if rule not in rules.RULES:
        raise ValueError(f"unknown rule {rule}")

    def register(fn: CheckFn) -> CheckFn:
        CHECKS[rule] = Check(rule, fn, sim, requires)
        return fn

    return register


def checks_for(protocol: str) -> list[Check]:
    """The checks of one protocol, in rule order (V2-R2 before V2-R10)."""
    out = [c for c in CHECKS.values() if c.protocol == protocol]
    return sorted(out, key=lambda c: int(c.rule.rsplit("R", 1)[1]))


def fails(fn: Callable[[], Any], *codes: int) -> AgentOSError:
    """Run fn, which must be refused (with one of `codes`, if given); returns the error."""
    try:
        fn()
    except AgentOSError as exc:
        assert not codes or exc.errno in codes, f"expected {'/'.join(errno.errorcode[c] for c in codes)}: {exc}"
        return exc
    raise AssertionError("expected the call to fail")


def stream_limit(dev: DeviceHandle) -> int:
    """A bound for one saving phase: a defect may never run dry, a test must still end."""
    if dev.is_sim:
        return 4 * int(dev.sim("stream_length")["length"])
    if dev.protocol == "v2":
        return 4 * dev.data_size() + (1 << 20)
    return 1 << 30


def seed(dev: DeviceHandle, value: int | str) -> str | None:
    """Fill a simulated device with a distinctive pattern (its digest); None for real devices."""
    return dev.fill(value) if dev.is_sim else None


def digest(dev: DeviceHandle) -> str | None:
    return dev.digest() if dev.is_sim else None


# -- round trips: distinct devices, content that must change ------------------------------

# None when two streams carry the same device state, else what differs
StreamComparator = Callable[[bytes, bytes], "str | None"]


def same_bytes(a: bytes, b: bytes) -> str | None:
    if a == b:
        return None
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"the streams differ from byte {at} ({len(a)} vs {len(b)} bytes)"


def model_of_handle(dev: DeviceHandle) -> DeviceModel | None:
    """The model of an opened real device, by the vendor:device its config space reports (None: sim, unknown)."""
    return None if dev.is_sim else models.model_for_pci_id(pci_id(dev))


def comparator(dev: DeviceHandle) -> StreamComparator:
    """Byte for byte, after the model's normaliser where its stream has volatile fields (a timestamp, a counter)."""
    model = model_of_handle(dev)
    normalise = model.normalise if model is not None else None
    if normalise is None:
        return same_bytes
    return lambda a, b: same_bytes(normalise(a), normalise(b))


def pci_id(dev: DeviceHandle) -> tuple[int, int]:
    """Vendor and device id from the device's PCI config space (VFIO's config region)."""
    raw = base64.b64decode(dev.call("region_read", index=CONFIG_REGION, offset=0, length=4)["data"])
    return int.from_bytes(raw[:2], "little"), int.from_bytes(raw[2:4], "little")


def seeder_for(dev: DeviceHandle) -> Seeder | None:
    """How the model gives the device a distinctive state its stream carries (registers), or None."""
    model = model_of_handle(dev)
    return model.seeder if model is not None else None


def apart(ctx: CheckContext, src: DeviceHandle, dst: DeviceHandle, src_seed: str, dst_seed: str) -> str | None:
    """Seed source and destination with different patterns; the source's digest (sim) or None.
    A real device is seeded through its model's seeder where one exists; `differs_before` then
    compares its streams."""
    if not (src.is_sim and dst.is_sim):
        seeders = [(dev, seeder_for(dev), value) for dev, value in ((src, src_seed), (dst, dst_seed)) if not dev.is_sim]
        for dev, seeder, value in seeders:
            if seeder is not None:
                with ctx.step(f"give {dev.name} a distinctive state ('{value}') through its model's registers"):
                    seeder(dev, value)
        return None
    with ctx.step(f"fill the source with '{src_seed}', the destination with '{dst_seed}'"):
        want, other = seed(src, src_seed), seed(dst, dst_seed)
        assert want is not None and want != other, "the two devices hold the same content before the resume"
    return want


def differs_before(ctx: CheckContext, dst: DeviceHandle, stream: SavedStream) -> None:
    """A real destination must hold another state than the stream, or a resume that writes nothing passes."""
    if dst.is_sim:
        return  # `apart` seeded it
    with ctx.step("save the destination before the resume: its state must differ from the stream's"):
        before = dst.save()
        same = comparator(dst)(stream.data(), before.data()) is None
        dst.reset()
    if same:
        pytest.skip("the destination already holds the source's state: the round trip cannot show the resume")


def verify_resumed(
    ctx: CheckContext, dst: DeviceHandle, want: str | None, stream: SavedStream | None, resave: bool = True
) -> None:
    """dst (RUNNING) holds what `stream` carries: its digest on a sim (and, unless `resave` is off for a
    stream that re-sent dirty chunks, a new save equal to `stream`), else a new save of dst compared
    with `stream` through the model's comparator. Never passes without a comparison."""
    if dst.is_sim:
        got = digest(dst)
        assert want is not None and got is not None, "no digest to compare"
        assert got == want, "the resumed content differs from the saved content"
        if stream is not None and resave:
            # the sim's stream is a pure function of its state: the resumed device saves it again byte for byte
            with ctx.step("save the resumed device again: the same stream, byte for byte"):
                again = dst.save()
                dst.set_state("RUNNING")
            problem = same_bytes(stream.data(), again.data())
            assert problem is None, f"the resumed device saves another stream: {problem}"
        return
    assert stream is not None, "no stream to compare the resumed device with"
    with ctx.step("save the resumed device again and compare its stream with the one it resumed"):
        again = dst.save(live=len(stream.parts) > 1)
        problem = comparator(dst)(stream.data(), again.data())
        assert problem is None, f"the resumed device saves another state: {problem}"


def hold(ctx: CheckContext, dev: DeviceHandle, what: str) -> tuple[str | None, SavedStream | None]:
    """Content that arcs other than a resume must leave alone: a sim is seeded (its digest); a real
    device is saved once (the stream; the device is back in RUNNING after)."""
    if dev.is_sim:
        return seed(dev, what), None
    with ctx.step("save the device: the state the arcs must keep"):
        before = dev.save()
        dev.set_state("RUNNING")
    return None, before


def content_kept(
    ctx: CheckContext, dev: DeviceHandle, want: str | None, after: str, before: SavedStream | None = None
) -> None:
    """The device still holds what `hold` recorded: its digest on a sim (after every arc sequence);
    a real device only where `before` is given, by saving it again from RUNNING."""
    if dev.is_sim:
        got = digest(dev)
        assert want is not None and got is not None, "no digest to compare"
        assert got == want, f"the content changed {after}"
    elif before is not None:
        with ctx.step(f"save the device again: the state {after} must be the one saved before"):
            if dev.state() != "RUNNING":
                dev.set_state("RUNNING")
            problem = comparator(dev)(before.data(), dev.save().data())
            assert problem is None, f"the device state changed {after}: {problem}"


def poke(dev: DeviceHandle, spans: list[tuple[int, int]], what: str) -> None:
    """Device activity on a sim: write (offset, length) spans of the content with bytes no pattern has."""
    for offset, length in spans:
        data = hashlib.sha256(f"{what}:{offset}".encode()).digest() * (length // 32 + 1)
        dev.sim("write", offset=offset, data=base64.b64encode(data[:length]).decode())


def read_exactly(dev: DeviceHandle, fd: int, n: int) -> int:
    """Read n bytes of a saving fd (fewer if it runs dry first); the bytes read."""
    got = 0
    while got < n:
        piece = dev.client.call("fd_read", fd=fd, length=min(n - got, 1 << 16))["length"]
        if not piece:
            break
        got += piece
    return got


def resume_into(ctx: CheckContext, dst: DeviceHandle, saved: SavedStream, title: str) -> None:
    """Resume `saved` into dst (v2: arbitrary write sizes, V2-R13; v1: the chunks as read)."""
    with ctx.step(title):
        dst.resume(saved.rechunk(5000) if dst.protocol == "v2" else saved)
        assert dst.state() == "RUNNING"


def declared_capabilities(ctx: CheckContext, dev: DeviceHandle) -> set[str] | None:
    """The capabilities the inventory lists for the device (a sim's from its options), or None."""
    device = getattr(ctx, "device", None)  # a lab context knows its inventory device
    caps = getattr(device, "capabilities", None)
    if caps is not None:
        return {str(getattr(c, "value", c)) for c in caps}
    if dev.is_sim:
        options = dev.sim("info")["options"]
        if dev.protocol == "v1":
            return {"stop_copy", "pre_copy"} if options.get("pre_copy", True) else {"stop_copy"}
        return {"stop_copy", *(c for c in ("p2p", "pre_copy") if options.get(c))}
    return None


def declared_flags(ctx: CheckContext, dev: DeviceHandle) -> int | None:
    """The MIGRATION flags the inventory claims for the device, or None."""
    caps = declared_capabilities(ctx, dev)
    return None if caps is None else model.flags_of(caps)


# -- v1 -------------------------------------------------------------------------------


@check("V1-R1")
def _v1_region(ctx: CheckContext) -> None:
    dev = ctx.open()
    with ctx.step("find the migration region and read its info"):
        region = dev.migration_region()
    assert region is not None, "no region with a TYPE capability (3, 1)"
    types = [(c.get("type"), c.get("subtype")) for c in region["caps"] if c["id"] == 2]
    assert (uapi.VFIO_REGION_TYPE_MIGRATION, uapi.VFIO_REGION_SUBTYPE_MIGRATION) in types, region
    assert {"READ", "WRITE"} <= set(region["flag_names"]), region["flag_names"]
    assert region["size"] > uapi.V1_INFO_SIZE, f"region size {region['size']} leaves no data section"
    _v1_region_caps(region)
    if dev.is_sim and not dev.sim("info")["options"].get("mmap"):
        # the same driver with an mmappable window: a chain of two capabilities (TYPE, SPARSE_MMAP)
        other = _sibling(dev, "mmap", mmap=True)
        try:
            with ctx.step("the migration region of an mmappable sibling: TYPE and SPARSE_MMAP chained"):
                mapped = other.migration_region()
                assert mapped is not None, "no migration region with mmap: true"
                assert sorted(c["id"] for c in mapped["caps"]) == [1, 2], mapped["caps"]
                assert "MMAP" in mapped["flag_names"], mapped["flag_names"]
                _v1_region_caps(mapped)
        finally:
            other.close()


def _v1_region_caps(region: dict[str, Any]) -> None:
    types = [(c.get("type"), c.get("subtype")) for c in region["caps"] if c["id"] == 2]
    assert (uapi.VFIO_REGION_TYPE_MIGRATION, uapi.VFIO_REGION_SUBTYPE_MIGRATION) in types, region
    assert "CAPS" in region["flag_names"], region["flag_names"]
    sparse = [c for c in region["caps"] if c["id"] == 1]
    assert not sparse or "MMAP" in region["flag_names"], f"SPARSE_MMAP without the MMAP flag: {region['flag_names']}"
    for cap in sparse:
        assert cap.get("areas"), f"a SPARSE_MMAP capability with no areas: {cap}"
        for offset, size in cap["areas"]:
            assert offset >= uapi.V1_INFO_SIZE and offset + size <= region["size"], (offset, size, region["size"])


@check("V1-R2")
def _v1_width(ctx: CheckContext) -> None:
    dev = ctx.open()
    with ctx.step("a 4-byte read of pending_bytes (8 bytes @8) and a 2-byte read of device_state must fail"):
        fails(lambda: dev.call("v1_read", offset=8, width=4), errno.EINVAL)
        fails(lambda: dev.call("v1_read", offset=0, width=2), errno.EINVAL)


@check("V1-R3")
def _v1_reserved(ctx: CheckContext) -> None:
    dev = ctx.open()
    with ctx.step("write 0xDEAD to reserved, read it back"):
        assert dev.v1_read("reserved") == 0
        dev.v1_write("reserved", 0xDEAD)
        assert dev.v1_read("reserved") == 0


@check("V1-R4")
def _v1_reserved_bits(ctx: CheckContext) -> None:
    dev = ctx.open()
    with ctx.step("write device_state 0xA9 (reserved bits 0xA8 | RUNNING), read it back"):
        dev.v1_write("device_state", 0xA9)
        assert dev.v1_read("device_state") == 0xA9
    with ctx.step("read-modify-write to STOP keeps the reserved bits"):
        dev.set_state("STOP")
        assert dev.v1_read("device_state") == 0xA8


def skip_if_reset_at_open(dev: DeviceHandle, rule: str) -> None:
    """The state after open means nothing on a device the test had to reset when it opened it."""
    found = dev.open_info.get("found_in")
    if found is not None:
        pytest.skip(f"{rule}: {dev.name} was found in {found} at open (left so by someone else) and had to be reset")


@check("V1-R5")
def _v1_initial(ctx: CheckContext) -> None:
    dev = ctx.open()
    skip_if_reset_at_open(dev, "V1-R5")
    with ctx.step("device_state after open"):
        assert dev.v1_read("device_state") & 7 == uapi.V1_RUNNING


# device_state values over the field's whole width: every 4-bit value, then high and "negative" ones
STATE_INPUTS = (*range(16), 0x10, 0x100, 0x10002, 0x7FFFFFFF, 0x80000001, 0x80000002, 0xFFFFFFF9, -2, -1)


def state_inputs() -> list[int]:
    """STATE_INPUTS as the u32 device_state field holds them (-1 is 0xFFFFFFFF)."""
    return [v & 0xFFFFFFFF for v in STATE_INPUTS]


@check("V1-R6")
def _v1_invalid(ctx: CheckContext) -> None:
    dev = ctx.open()
    for value in state_inputs():
        valid = uapi.v1_user_writable(value)
        verdict = "accepted" if valid else "refused"
        with ctx.step(f"write device_state {value:#x} (low bits {value & 7:03b}): {verdict}"):
            dev.reset()
            before = dev.v1_read("device_state")
            if valid:
                dev.v1_write("device_state", value)  # reserved bits ride along (V1-R4)
                assert dev.v1_read("device_state") == value, f"device_state reads {dev.v1_read('device_state'):#x}"
            else:
                fails(lambda value=value: dev.v1_write("device_state", value))  # type: ignore[misc]
                assert dev.v1_read("device_state") == before
    dev.reset()


@check("V1-R7")
def _v1_write_completes(ctx: CheckContext) -> None:
    dev = ctx.open()
    for state in ("STOP", "RUNNING", "STOP_COPY", "STOP", "STOP_COPY", "RUNNING", "PRE_COPY", "STOP_COPY", "STOP"):
        with ctx.step(f"write {state}, read it back"):
            dev.set_state(state)
            assert dev.state() == state


@check("V1-R8", sim=FAULT_KNOBS)
def _v1_failed_write(ctx: CheckContext) -> None:
    dev = ctx.open()
    prior = dev.v1_read("device_state") & 7
    dev.faults(transitions=[{"from": uapi.v1_state_name(prior), "to": "STOP_COPY", "errno": "EBUSY"}])
    with ctx.step("a state write failed by the fault knob, then the read-back"):
        fails(lambda: dev.set_state("STOP_COPY"), errno.EBUSY)
        assert dev.v1_read("device_state") & 7 in (prior, uapi.V1_ERROR)


V1_SESSION_STATES = ("STOP_COPY", "PRE_COPY", "RESUMING")  # the v1 states that hold a SAVING/RESUMING session


@check("V1-R9", sim=FAULT_KNOBS)
def _v1_error_reset(ctx: CheckContext) -> None:
    dev = ctx.open()
    for origin in ("RUNNING", *V1_SESSION_STATES):
        dev.reset()
        if origin != "RUNNING":
            dev.set_state(origin)
        target = "STOP" if origin == "RUNNING" else "RUNNING"
        dev.faults(transitions=[{"from": origin, "to": target, "error": True, "times": 1}])
        with ctx.step(f"{origin} -> {target} failed into ERROR (110)"):
            fails(lambda target=target: dev.set_state(target))  # type: ignore[misc]
            assert dev.state() == "ERROR"
        with ctx.step("every state write fails in ERROR"):
            for state in ("RUNNING", "STOP", "STOP_COPY", "PRE_COPY", "RESUMING"):
                fails(lambda state=state: dev.set_state(state))  # type: ignore[misc]
                assert dev.state() == "ERROR"
        with ctx.step("the other fields in ERROR: a value or an errno (never a driver crash); data_size writes fail"):
            for name in ("pending_bytes", "data_offset", "data_size"):
                try:
                    dev.v1_read(name)
                except AgentOSError:
                    pass  # undefined outside SAVING/RESUMING (spec 2.4): a refusal is fine
            fails(lambda: dev.v1_write("data_size", 32))
            assert dev.state() == "ERROR"
        with ctx.step("VFIO_DEVICE_RESET leaves 001"):
            dev.reset()
            assert dev.state() == "RUNNING"


@check("V1-R10")
def _v1_flows(ctx: CheckContext) -> None:
    dev = ctx.open()
    want, before = hold(ctx, dev, "flows")
    for flow in (["STOP", "RUNNING"], ["STOP_COPY", "STOP", "RUNNING"], ["STOP", "STOP_COPY", "STOP", "RUNNING"]):
        with ctx.step(f"flow 001 -> {' -> '.join(flow)}"):
            for state in flow:
                dev.set_state(state)
        content_kept(ctx, dev, want, f"over 001 -> {' -> '.join(flow)}")
    precopy_data = dev.is_sim and "pre_copy" in (declared_capabilities(ctx, dev) or ())
    with ctx.step(f"live flow 001 -> 011 -> 010 ({'pending_bytes > 0' if precopy_data else 'undrained'}) -> 000"):
        dev.set_state("PRE_COPY")
        pending = dev.v1_read("pending_bytes")
        assert not precopy_data or pending > 0
        if pending > 0:
            # spec 2.4 a: pending_bytes > 0 means there is something to fetch now
            dev.v1_read("data_offset")
            assert dev.v1_read("data_size") > 0, f"pending_bytes {pending} in 011, but the staged chunk is empty"
        dev.set_state("STOP_COPY")
        assert not dev.is_sim or dev.v1_read("pending_bytes") > 0, "nothing to save in 010"
        dev.set_state("STOP")
    content_kept(ctx, dev, want, "over 001 -> 011 -> 010 -> 000", before)


def _v1_stream(dev: DeviceHandle) -> str:
    reader = dev.client.frames("v1_save", dev=dev.handle, max_bytes=stream_limit(dev))
    reader.drain()
    assert reader.result is not None
    return reader.result.sha256


@check("V1-R11")
def _v1_pending_rereads(ctx: CheckContext) -> None:
    dev = ctx.open()
    seed(dev, 2)
    with ctx.step("stop-and-copy stream read plainly"):
        dev.set_state("STOP_COPY")
        plain = _v1_stream(dev)
        dev.set_state("STOP")
    with ctx.step("the same stream after three extra pending_bytes reads"):
        dev.set_state("STOP_COPY")
        for _ in range(3):
            dev.v1_read("pending_bytes")
        assert _v1_stream(dev) == plain


@check("V1-R12")
def _v1_staging(ctx: CheckContext) -> None:
    dev = ctx.open()
    seed(dev, 6)
    with ctx.step("stop-and-copy stream read plainly"):
        dev.set_state("STOP_COPY")
        plain = _v1_stream(dev)
        dev.set_state("STOP")
    with ctx.step("stage a chunk, re-read data_offset/data_size, then read the rest"):
        dev.set_state("STOP_COPY")
        region = dev.migration_region()
        assert region is not None and dev.v1_read("pending_bytes") > 0
        offset, size = dev.v1_read("data_offset"), dev.v1_read("data_size")
        assert size > 0
        assert (dev.v1_read("data_offset"), dev.v1_read("data_size")) == (offset, size)
        first = base64.b64decode(dev.call("region_read", index=region["index"], offset=offset, length=size)["data"])
        reader = dev.client.frames("v1_save", dev=dev.handle, max_bytes=stream_limit(dev))
        rest = b"".join(reader)
        assert hashlib.sha256(first + rest).hexdigest() == plain, "the re-reads advanced the stream"


@check("V1-R13")
def _v1_window_stable(ctx: CheckContext) -> None:
    dev = ctx.open()
    seed(dev, 3)
    region = dev.migration_region()
    assert region is not None
    with ctx.step("stage a chunk and read the data window twice"):
        dev.set_state("STOP_COPY")
        dev.v1_read("pending_bytes")
        offset, size = dev.v1_read("data_offset"), dev.v1_read("data_size")
        reads = [dev.call("region_read", index=region["index"], offset=offset, length=size)["data"] for _ in range(2)]
        assert reads[0] == reads[1]


@check("V1-R14")
def _v1_data_offset(ctx: CheckContext) -> None:
    dev = ctx.open()
    region = dev.migration_region()
    assert region is not None
    mmappable = any(c["id"] == 1 for c in region["caps"])
    with ctx.step(f"data_offset of a staged chunk ({'mmappable' if mmappable else 'not mmappable'} window)"):
        dev.set_state("STOP_COPY")
        dev.v1_read("pending_bytes")
        offset = dev.v1_read("data_offset")
        assert offset >= uapi.V1_INFO_SIZE
        assert not mmappable or offset % 4096 == 0, f"data_offset {offset} is not page aligned"


@check("V1-R15")
def _v1_terminates(ctx: CheckContext) -> None:
    dev = ctx.open()
    limit = stream_limit(dev)
    with ctx.step("iterate stop-and-copy until pending_bytes reads 0"):
        dev.set_state("STOP_COPY")
        reader = dev.client.frames("v1_save", dev=dev.handle, max_bytes=limit)
        result = reader.drain()
        assert result.end == "done" and result.agent["pending"] == 0, result
        assert dev.v1_read("pending_bytes") == 0


@check("V1-R18")
def _v1_chunk_boundaries(ctx: CheckContext) -> None:
    dev = ctx.open()
    peer = ctx.peer()
    want = seed(dev, 8)
    with ctx.step("save: the data_size of every chunk as the device reported it"):
        saved = dev.save()
        assert len(saved.parts) == 1
        reported = saved.parts[0].agent.get("sizes_sha256")
        mine = hashlib.sha256(b"".join(len(c).to_bytes(8, "little") for c in saved.chunks())).hexdigest()
        assert reported == mine, "the chunks kept are not the transactions the device reported"
    with ctx.step("resume with exactly those transactions, byte for byte"):
        result = peer.resume(saved)
        assert result.agent.get("sizes_sha256") == reported, "the resume wrote other transaction sizes"
        assert (result.chunks, result.bytes, result.sha256) == (saved.nchunks, saved.bytes, saved.sha256)
        assert peer.state() == "RUNNING"
    assert digest(peer) == want, "the resumed content differs from the saved content"


# -- both protocols ---------------------------------------------------------------------


def _round_trip(ctx: CheckContext) -> None:
    # the device under test resumes what its peer saved (in tests/test_defects.py a correct driver:
    # this part judges the resuming side); then it saves on every path and its peer resumes
    dst = ctx.open()
    src = ctx.peer()
    want = apart(ctx, src, dst, "round-trip/source", "round-trip/destination")
    with ctx.step("save the peer"):
        saved = src.save()
    differs_before(ctx, dst, saved)
    resume_into(ctx, dst, saved, "resume the peer's stream into the device under test")
    verify_resumed(ctx, dst, want, saved)
    _saves_past_the_first(ctx, dst, src)
    if dst.protocol == "v1":
        _v1_early_stop(ctx, dst, src)  # v2: V2-R8
        _v1_split_transaction(ctx, dst, src)
    if dst.is_sim:
        _odd_size_round_trip(ctx, dst)
        if dst.protocol == "v1":
            _v1_saves_after_every_arc(ctx, dst, src)


V1_VALID = ("RUNNING", "STOP", "PRE_COPY", "STOP_COPY", "RESUMING")


def _v1_saves_after_every_arc(ctx: CheckContext, dev: DeviceHandle, peer: DeviceHandle) -> None:
    """After any arc between valid states (a session opened, kept or closed by it), a save carries
    the content of that moment: sessions start and end on the right arcs. Sim only: some of these
    arcs are undocumented flows (spec 2.3)."""
    with ctx.step("a stream of the device to leave RESUMING with"):
        own = list(dev.save().chunks())
        dev.set_state("RUNNING")
    for a, b in itertools.permutations(V1_VALID, 2):
        if b == "RESUMING":
            continue  # leaving it needs a stream: covered as the arc's origin
        with ctx.step(f"{a} -> {b}, then save the rest and resume it into the peer"):
            dev.reset()
            dev.set_state(a)
            if a == "RESUMING":
                dev.client.send_frames("v1_resume", iter(own), dev=dev.handle)
            dev.set_state(b)
            want = seed(dev, f"arc {a}->{b}") if b in ("RUNNING", "PRE_COPY") else digest(dev)
            saved = SavedStream(dev.protocol)
            if b == "PRE_COPY":
                for chunk in dev.client.frames("v1_save", dev=dev.handle, max_bytes=stream_limit(dev)):
                    saved.append(chunk)
            if b in ("RUNNING", "STOP"):
                dev.set_state("STOP")
            dev.set_state("STOP_COPY")
            for chunk in dev.client.frames("v1_save", dev=dev.handle, max_bytes=stream_limit(dev)):
                saved.append(chunk)
            assert dev.v1_read("pending_bytes") == 0, "pending_bytes after the save"
            dev.set_state("STOP")
            peer.fill(f"arc {a}->{b}/peer")
            peer.resume(saved)
        verify_resumed(ctx, peer, want, saved, resave=b != "PRE_COPY")
    dev.reset()


def _v1_split_transaction(ctx: CheckContext, dev: DeviceHandle, peer: DeviceHandle) -> None:
    """A chunk written into the window in two pieces (spec 2.5 b: the write may take several) is one
    transaction: the resume still succeeds."""
    want = apart(ctx, peer, dev, "split/source", "split/destination")
    with ctx.step("save the peer"):
        saved = peer.save()
    region = dev.migration_region()
    assert region is not None
    chunks = list(saved.chunks())
    first = chunks[0]
    half = len(first) // 2
    with ctx.step(f"RESUMING: the first chunk ({len(first)} bytes) written in two pieces, then the rest"):
        dev.set_state("RESUMING")
        offset = dev.v1_read("data_offset")
        for at, piece in ((half, first[half:]), (0, first[:half])):  # the second half first: any order holds
            dev.call("region_write", index=region["index"], offset=offset + at, data=base64.b64encode(piece).decode())
        dev.v1_write("data_size", len(first))
        dev.client.send_frames("v1_resume", iter(chunks[1:]), dev=dev.handle)
        dev.set_state("RUNNING")
    verify_resumed(ctx, dev, want, saved)


def _sibling(dev: DeviceHandle, what: str, **options: Any) -> DeviceHandle:
    """Another simulated device of the device's own driver class, on its agent, with other options."""
    info = dev.sim("info")
    name = f"{dev.name}-{what}"
    state_dir = os.path.join(os.path.dirname(str(dev.open_info["state_dir"])), name)
    return DeviceHandle.open_sim(
        dev.client, str(info["class"]), state_dir, {**info["options"], **options}, name=name, protocol=dev.protocol
    )


def _tiny_writes(chunks: Iterator[bytes], head: int) -> Iterator[bytes]:
    """The stream's first `head` bytes in 1- to 7-byte writes (headers straddle writes), then as given."""
    sizes = itertools.cycle((1, 7, 3, 6))  # 17 a cycle: pieces end inside headers, not on their boundaries
    done = 0
    for c in chunks:
        while done < head and c:
            n = min(next(sizes), head - done, len(c))
            yield c[:n]
            c, done = c[n:], done + n
        if c:
            yield c


def _odd_size_round_trip(ctx: CheckContext, dev: DeviceHandle) -> None:
    """A device whose content is not a whole number of records (its last one short) round-trips too;
    v2 writes the stream's start a few bytes at a time (V2-R13: arbitrary write sizes)."""
    info = dev.sim("info")
    size = int(info["content_size"]) + 1
    src, dst = _sibling(dev, "odd-src", content_size=size), _sibling(dev, "odd-dst", content_size=size)
    try:
        want = apart(ctx, src, dst, "odd/source", "odd/destination")
        with ctx.step(f"save a device of {size} bytes (a 1-byte last record)"):
            expect = src.data_size() if dev.protocol == "v2" else None
            saved = src.save()
            assert expect is None or saved.bytes == expect, f"MIG_DATA_SIZE {expect}, the stream {saved.bytes} bytes"
        how = "" if dev.protocol == "v1" else ", the first 400 bytes 1 to 7 at a time"
        with ctx.step(f"resume it into another such device{how}"):
            chunks = saved.chunks() if dev.protocol == "v1" else _tiny_writes(saved.rechunk(5000), 400)
            dst.resume(chunks)
            assert dst.state() == "RUNNING"
        verify_resumed(ctx, dst, want, saved)
    finally:
        src.close()
        dst.close()


def _saves_past_the_first(ctx: CheckContext, dev: DeviceHandle, peer: DeviceHandle) -> None:
    """A save after another save of the same open, and a save after a reset, carry the content of
    their moment: on a sim the content changes in between and the peer must get the new one."""
    if not dev.is_sim:
        # a real device cannot be changed between saves, and a reset may reinitialise it: the
        # second save of one open must carry the state the first did
        with ctx.step("save twice in one open: the second stream carries the state of the first"):
            first = dev.save()
            dev.set_state("RUNNING")
            problem = comparator(dev)(first.data(), dev.save().data())
            dev.set_state("RUNNING")
        assert problem is None, f"a second save in one open carries another state: {problem}"
        return
    for what, between in (
        ("a second save in one open", lambda: dev.set_state("RUNNING")),
        ("a save after VFIO_DEVICE_RESET", dev.reset),
    ):
        seed(dev, f"{what}/before")
        with ctx.step(f"save the device under test, then {'RUNNING' if 'second' in what else 'reset'}"):
            dev.save()
            between()
        want = apart(ctx, dev, peer, f"{what}/after", f"{what}/peer")
        with ctx.step(f"{what}: save the device under test"):
            saved = dev.save()
        resume_into(ctx, peer, saved, f"resume {what} into the peer")
        verify_resumed(ctx, peer, want, saved)
        dev.set_state("RUNNING")


def _v1_early_stop(ctx: CheckContext, dev: DeviceHandle, peer: DeviceHandle) -> None:
    """Pre-copy (011) left after two chunks, then 010 to the end: the stream is still complete."""
    want = apart(ctx, dev, peer, "early-stop/source", "early-stop/peer")
    stopped = SavedStream(dev.protocol)
    with ctx.step("read two chunks in 011, then 010 to the end"):
        dev.set_state("PRE_COPY")
        for chunk in dev.client.frames("v1_save", dev=dev.handle, max_chunks=2):
            stopped.append(chunk)
        if dev.is_sim:
            # the device runs in 011: what it writes there (sent or not) must reach the peer
            size = int(dev.sim("info")["content_size"])
            poke(dev, [(0, 1), (size // 2, 2), (size - 1, 1)], "early-stop")
            want = dev.digest()
        dev.set_state("STOP_COPY")
        for chunk in dev.client.frames("v1_save", dev=dev.handle, max_bytes=stream_limit(dev)):
            stopped.append(chunk)
        dev.set_state("STOP")
    if dev.is_sim:
        resume_into(ctx, peer, stopped, "resume the early-stopped stream into the peer")
        verify_resumed(ctx, peer, want, stopped, resave=False)
        return
    with ctx.step("the early-stopped stream carries the state of a full save"):
        dev.set_state("RUNNING")
        problem = comparator(dev)(dev.save().data(), stopped.data())
    assert problem is None, f"the early-stopped stream carries another state: {problem}"


def _cut(chunks: list[bytes], at: int) -> list[bytes]:
    """The chunks up to byte `at` (the last one cut short where `at` falls inside it)."""
    out, pos = [], 0
    for c in chunks:
        if pos + len(c) > at:
            if at > pos:
                out.append(c[: at - pos])
            break
        out.append(c)
        pos += len(c)
    return out


def _flip(chunks: list[bytes], at: int) -> list[bytes]:
    """The chunks with the byte at `at` inverted."""
    out, pos = [], 0
    for c in chunks:
        if pos <= at < pos + len(c):
            i = at - pos
            c = c[:i] + bytes([c[i] ^ 0xFF]) + c[i + 1 :]
        out.append(c)
        pos += len(c)
    return out


def _foreign(dev: DeviceHandle, what: str, **options: Any) -> list[bytes]:
    """The stream of a simulated device of another model, saved on the device's own agent."""
    info = dev.sim("info")
    driver = "labs.sim.v1:V1Driver" if dev.protocol == "v1" else "labs.sim.v2:V2Driver"
    name = f"{dev.name}-foreign-{what}"
    state_dir = os.path.join(os.path.dirname(str(dev.open_info["state_dir"])), name)
    other = DeviceHandle.open_sim(
        dev.client, driver, state_dir, {**info["options"], **options}, name=name, protocol=dev.protocol
    )
    try:
        other.fill(f"foreign/{what}")
        return list(other.save().chunks())
    finally:
        other.close()


def _malformed(dst: DeviceHandle, saved: SavedStream) -> Iterator[tuple[str, Callable[[], list[bytes]]]]:
    """(what, the chunks to resume): inputs a device must refuse. v1 chunks keep the boundaries read."""
    chunks = list(saved.chunks())
    n = saved.bytes
    boundary = sum(len(c) for c in chunks[: max(1, len(chunks) // 2)])
    yield "an empty stream", lambda: []
    yield "a stream cut inside its first 16 bytes", lambda: _cut(chunks, 16)
    if boundary < n:
        yield f"a stream cut at a chunk boundary (byte {boundary})", lambda: _cut(chunks, boundary)
    yield f"a stream cut mid-body (byte {n // 2 + 7})", lambda: _cut(chunks, n // 2 + 7)
    yield "a stream missing its last 8 bytes", lambda: _cut(chunks, n - 8)
    yield "a stream with its first byte corrupted", lambda: _flip(chunks, 0)
    if dst.is_sim:
        # the sim's stream carries a checksum; a real format without one (the sample mdev's) cannot tell a
        # corrupted body from other content
        yield f"a stream with byte {n // 2 + 3} corrupted", lambda: _flip(chunks, n // 2 + 3)
        size = int(dst.sim("info")["content_size"])
        yield "the stream of another device model", lambda: _foreign(dst, "model", model="labs-sim-foreign")
        yield "the stream of a device of another size", lambda: _foreign(dst, "size", content_size=size // 2)
        yield "a stream with its register record twice (checksum redone)", lambda: _regs_twice(chunks)


def _regs_twice(chunks: list[bytes]) -> list[bytes]:
    """The sim's stream with its REGS record repeated and the END checksum recomputed: well formed
    bytes, a malformed stream (the sim's format: 32-byte header, records "=IIQQ" + payload)."""
    data, pos = b"".join(chunks), 32
    out: list[bytes] = []
    while pos < len(data):
        rtype, _flags, _offset, length = struct.unpack_from("=IIQQ", data, pos)
        record = data[pos : pos + 24 + length]
        if rtype == 3:  # END: sha256 of every byte before it
            body = data[:32] + b"".join(out)
            return [body + record[:24] + hashlib.sha256(body).digest()]
        out.append(record + record if rtype == 2 else record)
        pos += 24 + length
    raise AssertionError("no END record in the sim's stream")


def _unfinished_v1(dst: DeviceHandle, chunks: list[bytes]) -> None:
    """Every chunk but the last as spec 2.5 says; the last written into the window without its data_size."""
    region = dst.migration_region()
    assert region is not None
    dst.set_state("RESUMING")
    dst.client.send_frames("v1_resume", iter(chunks[:-1]), dev=dst.handle)
    offset = dst.v1_read("data_offset")
    dst.call("region_write", index=region["index"], offset=offset, data=base64.b64encode(chunks[-1]).decode())
    dst.set_state("RUNNING")


def refused_resume_states(dev: DeviceHandle) -> tuple[str, ...]:
    """The states the oracle allows after a refused exit from RESUMING (V1-R17 via V1-R8, V2-R14)."""
    oracle: model.Oracle
    if dev.protocol == "v2":
        oracle = model.V2Oracle(dev.mig_flags, dev.is_sim)
        target = uapi.V2_STATES["RUNNING"]
    else:
        oracle = model.V1Oracle(dev.is_sim)
        target = uapi.V1_RUNNING
    oracle.state, oracle.session, oracle.resume_data = "RESUMING", "resuming", "partial"
    expect = oracle.set_state(target)
    assert expect.ok is False, expect
    return expect.states


def _truncated(ctx: CheckContext) -> None:
    dst = ctx.open()
    src = ctx.peer()
    seed(src, 5)
    allowed = refused_resume_states(dst)
    with ctx.step("save the peer: the stream the malformed inputs are made from"):
        saved = src.save()
    cases: list[tuple[str, Callable[[], None]]] = [
        (what, lambda make=make: dst.resume(iter(make())))  # type: ignore[misc]
        for what, make in _malformed(dst, saved)
    ]
    if dst.protocol == "v1":
        cases.append(("an unfinished transaction (the last chunk without its data_size)",
                      lambda: _unfinished_v1(dst, list(saved.chunks()))))  # fmt: skip
    for what, resume in cases:
        with ctx.step(f"resume {what}: refused, then {' or '.join(allowed)}"):
            fails(resume)
            assert dst.state() in allowed, f"{what} left {dst.state()}"
            dst.reset()


for _rule in ("V1-R16", "V2-R13"):
    CHECKS[_rule] = Check(_rule, _round_trip)
for _rule in ("V1-R17", "V2-R14"):
    CHECKS[_rule] = Check(_rule, _truncated)


def reset_advertised(ctx: CheckContext, dev: DeviceHandle) -> None:
    """The reset rules use VFIO_DEVICE_RESET: GET_INFO well formed (advertising RESET, on a sim), the ioctl return 0."""
    with ctx.step("VFIO_DEVICE_GET_INFO: RESET advertised, a PCI device's regions, no stray cap_offset"):
        info = dev.info()
        if dev.is_sim:  # a real driver may answer RESET without advertising it (the sample mdev: flags PCI only)
            assert info["flags"] & vfio.VFIO_DEVICE_FLAGS_RESET, f"GET_INFO flags {info['flag_names']} lack RESET"
        if info["flags"] & vfio.VFIO_DEVICE_FLAGS_PCI:
            assert info["num_regions"] >= vfio.VFIO_PCI_NUM_REGIONS, f"a PCI device with {info['num_regions']} regions"
        if not info["flags"] & vfio.VFIO_DEVICE_FLAGS_CAPS:
            assert info["cap_offset"] == 0, f"cap_offset {info['cap_offset']} without the CAPS flag"
    with ctx.step("VFIO_DEVICE_RESET in RUNNING returns 0"):
        assert dev.call("reset")["ret"] == 0, "VFIO_DEVICE_RESET returned non-zero"


@check("V1-R19")
def _v1_reset_anywhere(ctx: CheckContext) -> None:
    dev = ctx.open()
    reset_advertised(ctx, dev)
    with ctx.step("save a stream to resume from"):
        chunks = list(dev.save().chunks())
    for state in ("RUNNING", "STOP", *V1_SESSION_STATES):
        with ctx.step(f"reset in {state}: 001, the session over"):
            dev.reset()
            dev.set_state(state)
            if state in ("STOP_COPY", "PRE_COPY"):
                dev.v1_read("pending_bytes")
                dev.v1_read("data_offset")  # a chunk staged when the reset comes
            if state == "RESUMING":
                dev.client.send_frames("v1_resume", chunks[:1], dev=dev.handle)  # half a session
            dev.reset()
            assert dev.state() == "RUNNING", f"device_state reads {dev.state()} after the reset"
            assert dev.v1_read("pending_bytes") == 0, "pending_bytes still counts the saving session"
    with ctx.step("a whole resume after the reset: nothing of the old session is left"):
        dev.resume(iter(chunks))
        assert dev.state() == "RUNNING"


# -- v2 -------------------------------------------------------------------------------


def feature(dev: DeviceHandle, flags: int, payload: bytes, argsz: int | None = None) -> dict[str, Any]:
    return dict(dev.call("feature", flags=flags, payload=base64.b64encode(payload).decode(), argsz=argsz))


@check("V2-R1")
def _v2_flags(ctx: CheckContext) -> None:
    dev = ctx.open()
    with ctx.step("GET and PROBE|GET MIGRATION"):
        flags = dev.mig_flags
        names = "|".join(uapi.migration_flag_names(flags))
        assert flags in uapi.FLAG_SETS, f"flags {flags:#x} ({names}) not in {uapi.FLAG_SETS}"
        assert feature(dev, PROBE | GET | uapi.VFIO_DEVICE_FEATURE_MIGRATION, b"")["ret"] == 0
        assert feature(dev, GET | uapi.VFIO_DEVICE_FEATURE_MIGRATION, bytes(8))["ret"] == 0, (
            "GET MIGRATION returned non-zero"
        )
    want = declared_flags(ctx, dev)
    if want is not None:
        with ctx.step("the flags are the ones the inventory lists"):
            listed = "|".join(uapi.migration_flag_names(want))
            assert flags == want, f"the device reports flags {flags} ({names}), the inventory lists {want} ({listed})"


@check("V2-R2")
def _v2_header(ctx: CheckContext) -> None:
    dev = ctx.open()
    mig, state = uapi.VFIO_DEVICE_FEATURE_MIGRATION, uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    cases = [
        ("argsz < 8", GET | mig, bytes(8), 4),
        ("an unknown flag bit", GET | mig | (1 << 20), bytes(8), None),
        ("GET|SET without PROBE", GET | SET | state, bytes(8), None),
        ("SET on MIGRATION", SET | mig, bytes(8), None),
        ("MIG_DEVICE_STATE with argsz < 16", GET | state, bytes(4), None),
        # the payload asks for RUNNING, which a SET would grant: the refusal must come from the header
        ("MIG_DEVICE_STATE with neither GET nor SET (nor PROBE)", state, (2).to_bytes(4, "little") + bytes(4), None),
    ]
    for what, flags, payload, argsz in cases:
        with ctx.step(f"VFIO_DEVICE_FEATURE with {what}"):
            fails(lambda f=flags, p=payload, a=argsz: feature(dev, f, p, a), errno.EINVAL)  # type: ignore[misc]


@check("V2-R3")
def _v2_initial(ctx: CheckContext) -> None:
    dev = ctx.open()
    skip_if_reset_at_open(dev, "V2-R3")
    with ctx.step("GET MIG_DEVICE_STATE after open"):
        assert dev.call("mig_get_state") == {"state": 2, "name": "RUNNING", "data_fd": -1}


@check("V2-R4")
def _v2_bad_target(ctx: CheckContext) -> None:
    dev = ctx.open()
    flags = dev.mig_flags
    for target in state_inputs():
        ok = target < uapi.VFIO_DEVICE_STATE_NR and target != 0 and uapi.mig_state_supported(target, flags)
        name = uapi.v2_state_name(target) if target < uapi.VFIO_DEVICE_STATE_NR else "undefined"
        with ctx.step(f"SET {target:#x} ({name}) from RUNNING: {'accepted' if ok else 'EINVAL'}"):
            dev.reset()
            if ok:
                fd = dev.set_state(target)
                got = dev.state_value()
                if fd is not None:
                    dev.reset()  # the session ends before its fd is closed (the sample mdev: nested findings)
                    dev.close_fd(fd)
                assert got == target, f"GET shows {uapi.v2_state_name(got)} after SET {name}"
            else:
                fails(lambda target=target: dev.call("mig_set_state", state=target), errno.EINVAL)  # type: ignore[misc]
                assert dev.state() == "RUNNING", f"GET shows {dev.state()} after a refused SET {target:#x}"
    dev.reset()


@check("V2-R5")
def _v2_same_state(ctx: CheckContext) -> None:
    dev = ctx.open()
    with ctx.step("SET RUNNING in RUNNING"):
        assert dev.set_state("RUNNING") is None and dev.state() == "RUNNING"
    with ctx.step("SET STOP_COPY twice: no new fd, the session goes on"):
        fd = dev.set_state("STOP_COPY")
        assert fd is not None
        assert dev.set_state("STOP_COPY") is None
        assert dev.client.call("fd_read", fd=fd, length=8)["length"] == 8, "the session did not go on"


@check("V2-R6")
def _v2_paths(ctx: CheckContext) -> None:
    dev = ctx.open()
    flags = dev.mig_flags
    states = uapi.supported_states(flags)
    want = _v2_arcs_keep_content(ctx, dev)
    with ctx.step("save a stream to leave RESUMING with"):
        stream = dev.save().data()
        dev.set_state("RUNNING")
    for cur, new in itertools.product(states, states):
        if uapi.is_hanging(cur, new, flags):
            continue  # V2-R12, where the kernel cannot hang on it
        expect = uapi.path(cur, new, flags)
        assert expect is not None
        names = [uapi.v2_state_name(s) for s in expect]
        with ctx.step(f"{' -> '.join(names) if len(names) > 1 else names[0] + ' (same)'}"):
            dev.reset()
            old = dev.set_state(cur)
            if old is not None and cur == uapi.V2_STATES["RESUMING"]:
                dev.client.write_stream(old, [stream])
            if dev.is_sim:
                dev.sim("arcs", clear=True)
            fd = dev.set_state(new)
            # fds are closed after the SET that leaves their session, as QEMU does: the sample mdev's
            # RESUMING -> STOP reads the resuming file (nested findings)
            for f in (old, fd):
                if f is not None:
                    dev.close_fd(f)
            assert dev.state_value() == new, f"GET shows {dev.state()} after SET {uapi.v2_state_name(new)}"
            if dev.is_sim:
                assert dev.sim("arcs") == [list(a) for a in itertools.pairwise(names)], "the driver ran other arcs"
                # RESUMING restores what was there; the sim keeps its content over a reset
                content_kept(ctx, dev, want, f"over {' -> '.join(names)}")
    dev.reset()


def _v2_arcs_keep_content(ctx: CheckContext, dev: DeviceHandle) -> str | None:
    """Arc sequences other than a resume leave the content alone (no reset in between: a reset may
    reinitialise a real device). Returns the sim's digest."""
    flags = dev.mig_flags
    want, before = hold(ctx, dev, "arcs")
    walks = [["STOP", "RUNNING"], ["STOP", "STOP_COPY", "STOP", "RUNNING"]]
    if flags & uapi.P2P:
        walks += [["RUNNING_P2P", "RUNNING"], ["RUNNING_P2P", "STOP", "RUNNING_P2P", "RUNNING"]]
    if flags & uapi.PRE_COPY:
        walks.append(["PRE_COPY", "RUNNING"])
    for walk in walks:
        with ctx.step(f"RUNNING -> {' -> '.join(walk)}"):
            fds = [dev.set_state(state) for state in walk]
            for fd in fds:
                if fd is not None:
                    dev.close_fd(fd)  # after leaving the session, as QEMU does
        content_kept(ctx, dev, want, f"over RUNNING -> {' -> '.join(walk)}")
    with ctx.step("a full save, then RUNNING"):
        dev.save()
        dev.set_state("RUNNING")
    content_kept(ctx, dev, want, "over a save and RUNNING after it", before)
    return want


@check("V2-R7")
def _v2_fd_iff_session(ctx: CheckContext) -> None:
    dev = ctx.open()
    flags = dev.mig_flags
    walk = ["STOP", "RUNNING", "STOP_COPY", "STOP", "RESUMING"]
    if flags & uapi.PRE_COPY:
        walk = ["STOP", "RUNNING", "PRE_COPY", "RUNNING", *walk[2:]]
    for target in walk:
        cur = dev.state()
        p = uapi.path(uapi.v2_state(cur), uapi.v2_state(target), flags)
        assert p is not None
        with ctx.step(f"SET {cur} -> {target}: a data_fd iff the last arc opens a session, else exactly -1"):
            reply = dev.call("mig_set_state", state=uapi.v2_state(target))
            fd = reply["data_fd"]
            if fd is not None:
                dev.close_fd(fd)
            assert (fd is not None) == uapi.opens_session(p), f"data_fd {reply['fd']} for {cur} -> {target}"
            assert fd is not None or reply["fd"] == -1, f"data_fd {reply['fd']} without a session (not -1)"
    dev.reset()


def _saving_group(ctx: CheckContext, dev: DeviceHandle, pre_limit: int | None, title: str) -> tuple[SavedStream, int]:
    """PRE_COPY read up to `pre_limit` bytes (None: until exhausted), then STOP_COPY on the same fd."""
    limit = stream_limit(dev)
    out = SavedStream(dev.protocol)
    with ctx.step(title):
        fd = dev.set_state("PRE_COPY")
        assert fd is not None
        first, _ = dev.client.read_stream(fd, out.append, limit=limit if pre_limit is None else pre_limit)
        assert dev.set_state("STOP_COPY") is None, "a new data_fd inside the saving group"
        rest, _ = dev.client.read_stream(fd, out.append, limit=limit)
        dev.close_fd(fd)
        dev.set_state("STOP")
    out.parts += [first, rest]
    return out, first.bytes


@check("V2-R8", requires=("pre_copy",))
def _v2_saving_group_fd(ctx: CheckContext) -> None:
    dev = ctx.open()
    peer = ctx.peer()
    want = apart(ctx, dev, peer, "saving-group/source", "saving-group/peer")
    saved, _ = _saving_group(ctx, dev, None, "read PRE_COPY to its end, then STOP_COPY, from the one fd")
    if dev.is_sim:
        assert saved.bytes == dev.sim("stream_length")["length"], "not one continuous stream"
    differs_before(ctx, peer, saved)
    resume_into(ctx, peer, saved, "the two parts resume as one stream into the peer")
    verify_resumed(ctx, peer, want, saved)
    # pre-copy stopped early: whatever the initial pass had not sent yet must come in STOP_COPY
    dev.set_state("RUNNING")
    want = apart(ctx, dev, peer, "saving-group/early-stop", "saving-group/peer-2")
    early = max(1, (dev.data_size() if not dev.is_sim else dev.sim("stream_length")["length"]) // 3)
    stopped, pre = _saving_group(ctx, dev, early, f"read {early} bytes of PRE_COPY, then STOP_COPY, from the one fd")
    assert pre <= early
    if dev.is_sim:
        resume_into(ctx, peer, stopped, "the early-stopped stream resumes into the peer")
        verify_resumed(ctx, peer, want, stopped)
    else:
        # `apart` may have given the device a new state since the first save: compare with a full save now
        with ctx.step("the early-stopped stream carries the state of a full save made after it"):
            dev.set_state("RUNNING")
            problem = comparator(dev)(dev.save().data(), stopped.data())
        assert problem is None, f"the early-stopped stream carries another state: {problem}"
    if dev.is_sim:
        dev.set_state("RUNNING")
        _v2_dirtied_in_precopy(ctx, dev, peer)


def _v2_dirtied_in_precopy(ctx: CheckContext, dev: DeviceHandle, peer: DeviceHandle) -> None:
    """Content written during PRE_COPY (to sent, half-sent and unsent parts, before and after the
    initial pass) reaches the peer: the stream carries the device as it is at STOP_COPY."""
    apart(ctx, dev, peer, "saving-group/dirty", "saving-group/peer-3")
    info = dev.sim("info")
    rec, size = int(info["record_size"]), int(info["content_size"])
    out = SavedStream(dev.protocol)
    with ctx.step("PRE_COPY: read a part, write the content, read on, write again, then STOP_COPY"):
        fd = dev.set_state("PRE_COPY")
        assert fd is not None
        # a part ending inside the second record: its chunk is the last one the stream took
        first, _ = dev.client.read_stream(fd, out.append, limit=rec + rec // 2)
        poke(dev, [(0, 1), (rec, 1), (rec + rec // 2, 3), (size - 1, 1)], "mid-pass")
        second, _ = dev.client.read_stream(fd, out.append, limit=stream_limit(dev))
        poke(dev, [(2 * rec - 1, 1), (min(3 * rec, size - rec), rec), (size // 2 - 1, 2), (size - 1, 1)], "after")
        assert dev.precopy_info(fd)["dirty_bytes"] > 0, "content written after the initial pass: dirty_bytes is 0"
        left = dev.data_size()  # the sim's MIG_DATA_SIZE is exact (V2-R19): the bytes to the end
        assert dev.set_state("STOP_COPY") is None
        rest, _ = dev.client.read_stream(fd, out.append, limit=stream_limit(dev))
        assert rest.bytes == left, f"MIG_DATA_SIZE said {left} bytes were left, STOP_COPY gave {rest.bytes}"
        dev.close_fd(fd)
        dev.set_state("STOP")
        want = dev.digest()
    out.parts += [first, second, rest]
    resume_into(ctx, peer, out, "the stream resumes into the peer, which must hold the content as at STOP_COPY")
    verify_resumed(ctx, peer, want, out, resave=False)


@check("V2-R9")
def _v2_eof(ctx: CheckContext) -> None:
    dev = ctx.open()
    with ctx.step("read STOP_COPY to the end, then read again"):
        fd = dev.set_state("STOP_COPY")
        assert fd is not None
        result, _ = dev.client.read_stream(fd, limit=stream_limit(dev))
        assert result.end == "eof", f"the stream ended with {result.end}"
        for _ in range(2):
            assert dev.client.call("fd_read", fd=fd, length=16)["length"] == 0


@check("V2-R10", requires=("pre_copy",))
def _v2_precopy_exhausted(ctx: CheckContext) -> None:
    dev = ctx.open()
    with ctx.step("read PRE_COPY until it is exhausted (ENOMSG or 0)"):
        fd = dev.set_state("PRE_COPY")
        assert fd is not None
        result, _ = dev.client.read_stream(fd, limit=stream_limit(dev))
        assert result.end in ("enomsg", "eof"), f"the pre-copy read ended with {result.end}"
    with ctx.step("PRECOPY_INFO and one more read"):
        info = dev.precopy_info(fd)
        assert info["initial_bytes"] == 0, info
        try:
            assert dev.client.call("fd_read", fd=fd, length=64)["length"] == 0
        except AgentOSError as exc:
            assert exc.errno == errno.ENOMSG, exc


@check("V2-R11", requires=("pre_copy",))
def _v2_precopy_info(ctx: CheckContext) -> None:
    dev = ctx.open()
    with ctx.step("PRECOPY_INFO in PRE_COPY: initial_bytes shrinks by the bytes read"):
        fd = dev.set_state("PRE_COPY")
        assert fd is not None
        before = dev.precopy_info(fd)
        assert before["initial_bytes"] > 0 and before["dirty_bytes"] == 0, f"at the start of PRE_COPY: {before}"
        assert before["flags"] == 0, f"PRECOPY_INFO set flags {before['flags']:#x} (none are defined)"
        fails(lambda: dev.client.call("precopy_info", fd=fd, argsz=16), errno.EINVAL)
        n = dev.client.call("fd_read", fd=fd, length=4096)["length"]
        after = dev.precopy_info(fd)
        assert after["initial_bytes"] <= max(0, before["initial_bytes"] - n), (before, n, after)
    with ctx.step("read initial_bytes more bytes: the initial data is over (0); with no dirty bytes, ENOMSG or 0"):
        left = after["initial_bytes"]
        got = read_exactly(dev, fd, left)
        assert got == left, f"PRECOPY_INFO announced {left} initial bytes, the fd gave {got}"
        done = dev.precopy_info(fd)
        assert done["initial_bytes"] == 0, done
        # spec 3.6: dirty_bytes starts at 0 and grows with device activity; an idle sim has none
        assert not dev.is_sim or done["dirty_bytes"] == 0, f"dirty_bytes on an idle device: {done}"
        if done["dirty_bytes"] == 0:
            try:
                extra = dev.client.call("fd_read", fd=fd, length=64)["length"]
            except AgentOSError as exc:
                assert exc.errno == errno.ENOMSG, exc
            else:
                assert extra == 0, f"{extra} bytes past initial_bytes with dirty_bytes 0 (spec 3.5: ENOMSG)"
    if dev.is_sim:
        with ctx.step("write the content after the initial pass: dirty_bytes grows, initial_bytes stays 0"):
            rec = int(dev.sim("info")["record_size"])
            poke(dev, [(rec, 1)], "precopy-info")
            dirty = dev.precopy_info(fd)
            assert dirty["initial_bytes"] == 0 and dirty["dirty_bytes"] > 0, dirty
            # reading the re-sent part drains it: dirty_bytes shrinks by the bytes read, then both are 0
            half = dirty["dirty_bytes"] // 2
            assert read_exactly(dev, fd, half) == half
            part = dev.precopy_info(fd)
            assert part["dirty_bytes"] == dirty["dirty_bytes"] - half, (dirty, half, part)
            assert read_exactly(dev, fd, part["dirty_bytes"]) == part["dirty_bytes"]
            drained = dev.precopy_info(fd)
            assert (drained["initial_bytes"], drained["dirty_bytes"]) == (0, 0), drained
    with ctx.step("PRECOPY_INFO in STOP_COPY fails EINVAL"):
        assert dev.set_state("STOP_COPY") is None
        fails(lambda: dev.precopy_info(fd), errno.EINVAL)
    dev.close_fd(fd)
    dev.reset()


def blocked_arcs_safe(dev: DeviceHandle) -> bool:
    """May the blocked arcs (V2-R12) go to this device: a simulator, or a kernel known to carry the fix."""
    return dev.is_sim or uapi.blocked_arc_fixed(kernel_of(dev))


def kernel_of(dev: DeviceHandle) -> str:
    return str(dev.client.info.get("kernel", ""))


@check("V2-R12", requires=("pre_copy",))
def _v2_hanging_request(ctx: CheckContext) -> None:
    dev = ctx.open()
    if not blocked_arcs_safe(dev):
        pytest.skip(f"{HANGS_KERNELS}: {kernel_of(dev) or 'this kernel'} is not known to carry it")
    for target in ("PRE_COPY", "PRE_COPY_P2P"):
        if not uapi.mig_state_supported(uapi.v2_state(target), dev.mig_flags):
            continue
        assert uapi.is_hanging("STOP_COPY", target, dev.mig_flags)
        with ctx.step(f"SET STOP_COPY -> {target}: EINVAL, state unchanged (kernels without FIX-2026 hang)"):
            dev.reset()
            fd = dev.set_state("STOP_COPY")
            fails(lambda target=target: dev.set_state(target), errno.EINVAL)  # type: ignore[misc]
            assert dev.state() == "STOP_COPY"
            if fd is not None:
                dev.close_fd(fd)
    dev.reset()


def v2_session_states(flags: int) -> list[str]:
    """The v2 states that hold a migration session (a data_fd) on a device with `flags`."""
    names = ("PRE_COPY", "PRE_COPY_P2P", "STOP_COPY", "RESUMING")
    return [n for n in names if uapi.mig_state_supported(uapi.v2_state(n), flags)]


def enter_session(dev: DeviceHandle, state: str) -> int:
    """Reset, then SET `state` (which holds a session); returns its data_fd."""
    dev.reset()
    if state == "PRE_COPY_P2P":
        dev.set_state("RUNNING_P2P")
    fd = dev.set_state(state)
    assert fd is not None, f"SET {state} returned no data_fd"
    return fd


def fd_io(dev: DeviceHandle, fd: int, state: str) -> None:
    """One I/O of the kind the session's fd does: read a saving fd, write a resuming one."""
    if state == "RESUMING":
        dev.client.call("fd_write", fd=fd, data=base64.b64encode(bytes(8)).decode())
    else:
        dev.client.call("fd_read", fd=fd, length=16)


@check("V2-R15", sim=FAULT_KNOBS)
def _v2_error_reset(ctx: CheckContext) -> None:
    dev = ctx.open()
    flags = dev.mig_flags
    for origin in ("STOP", *v2_session_states(flags)):
        fd = None
        if origin == "STOP":
            dev.reset()
            dev.set_state("STOP")
            target = "STOP_COPY"
        else:
            fd = enter_session(dev, origin)
            target = "RUNNING"
        path = uapi.path_names(origin, target, flags)
        assert path is not None
        dev.faults(transitions=[{"from": origin, "to": path[1], "error": True, "times": 1}])
        with ctx.step(f"{origin} -> {path[1]} failed into ERROR"):
            fails(lambda target=target: dev.set_state(target))  # type: ignore[misc]
            assert dev.state() == "ERROR"
        with ctx.step("every SET fails EINVAL in ERROR"):
            for state in uapi.supported_states(flags):
                fails(lambda state=state: dev.set_state(state), errno.EINVAL)  # type: ignore[misc]
                assert dev.state() == "ERROR"
        with ctx.step("VFIO_DEVICE_RESET leaves ERROR for RUNNING" + (f"; the {origin} fd is dead" if fd else "")):
            dev.reset()
            assert dev.state() == "RUNNING"
            if fd is not None:
                fails(lambda fd=fd, origin=origin: fd_io(dev, fd, origin))  # type: ignore[misc]
                dev.close_fd(fd)


@check("V2-R16")
def _v2_dead_fd(ctx: CheckContext) -> None:
    dev = ctx.open()
    reset_advertised(ctx, dev)
    flags = dev.mig_flags
    with ctx.step("save a stream to leave RESUMING with"):
        stream = dev.save().data()
    leave = {"PRE_COPY": "RUNNING", "PRE_COPY_P2P": "RUNNING_P2P", "STOP_COPY": "STOP", "RESUMING": "STOP"}
    for state in v2_session_states(flags):
        with ctx.step(f"reset during {state}, then I/O on the old fd"):
            fd = enter_session(dev, state)
            fd_io(dev, fd, state)  # alive before
            dev.reset()
            fails(lambda fd=fd, state=state: fd_io(dev, fd, state))  # type: ignore[misc]
            dev.close_fd(fd)
        with ctx.step(f"leave {state} for {leave[state]}, then I/O on the old fd"):
            fd = enter_session(dev, state)
            if state == "RESUMING":
                dev.client.write_stream(fd, [stream])
            assert dev.set_state(leave[state]) is None
            fails(lambda fd=fd, state=state: fd_io(dev, fd, state))  # type: ignore[misc]
            dev.close_fd(fd)
    dev.reset()


@check("V2-R17")
def _v2_failed_set_buffer(ctx: CheckContext) -> None:
    dev = ctx.open()
    for target in (0, 8):
        with ctx.step(f"SET {uapi.v2_state_name(target)} fails: buffer data_fd -1, GET shows the real state"):
            exc = fails(lambda target=target: dev.call("mig_set_state", state=target))  # type: ignore[misc]
            assert exc.detail.get("buffer", {}).get("data_fd") == -1, exc.detail
            assert dev.state() == "RUNNING"
    if dev.is_sim:
        dev.faults(transitions=[{"from": "STOP", "to": "STOP_COPY", "errno": "EIO", "times": 1}])
        with ctx.step("RUNNING -> STOP_COPY failing on its last arc: GET shows a state of the path"):
            exc = fails(lambda: dev.set_state("STOP_COPY"))
            assert exc.detail.get("buffer", {}).get("data_fd") == -1, exc.detail
            path = uapi.path_names("RUNNING", "STOP_COPY", dev.mig_flags) or []
            assert dev.state() in [*path[:-1], "ERROR"]
        dev.reset()


@check("V2-R18")
def _v2_cloexec(ctx: CheckContext) -> None:
    dev = ctx.open()
    with ctx.step("the STOP_COPY data_fd: close-on-exec, pread fails ESPIPE"):
        fd = dev.set_state("STOP_COPY")
        assert fd is not None
        assert dev.client.call("fd_info", fd=fd)["cloexec"] is True, "data_fd is not close-on-exec"
        fails(lambda: dev.client.call("fd_read", fd=fd, length=16, offset=0), errno.ESPIPE)


@check("V2-R19")
def _v2_data_size(ctx: CheckContext) -> None:
    dev = ctx.open()
    with ctx.step("MIG_DATA_SIZE in RUNNING"):
        size = dev.data_size()
        if dev.is_sim:
            assert size == dev.sim("stream_length")["length"]
    walk = ["STOP", "STOP_COPY", "STOP", "RESUMING"]
    if dev.supports("pre_copy"):
        walk = ["PRE_COPY", "RUNNING", *walk]
    for state in walk:
        with ctx.step(f"MIG_DATA_SIZE in {state}"):
            fd = dev.set_state(state)
            if fd is not None:
                dev.close_fd(fd)
            got = dev.data_size()
            if dev.is_sim and state in ("RUNNING", "STOP"):
                assert got == size, f"MIG_DATA_SIZE {got} in {state}, the stream is {size} bytes"
    dev.reset()
    if dev.is_sim:
        # the sim knows its stream exactly (as the sample mdev does): what is left to the end, whatever was read
        for state in ("PRE_COPY", "STOP_COPY") if dev.supports("pre_copy") else ("STOP_COPY",):
            with ctx.step(f"MIG_DATA_SIZE in {state} after reading 5000 bytes: the bytes left to the end"):
                if state == "STOP_COPY":
                    dev.set_state("STOP")
                fd = dev.set_state(state)
                assert fd is not None
                n = read_exactly(dev, fd, 5000)
                got = dev.data_size()
                dev.reset()
                dev.close_fd(fd)
                assert got == size - n, f"MIG_DATA_SIZE {got} after {n} of {size} bytes were read"


LOG_PAGE = 4096
LOG_RANGES = [(0x10000, 16 * LOG_PAGE), (0x100000, 8 * LOG_PAGE)]  # an unlogged hole between them
LOG_SPAN = (0x10000, 0x100000 + 8 * LOG_PAGE - 0x10000)  # both ranges and the hole, for REPORT


def log_start(dev: DeviceHandle, page_size: int, ranges: list[tuple[int, int]]) -> int:
    """DMA_LOGGING_START; the page size the driver chose."""
    return int(dev.call("dma_logging_start", page_size=page_size, ranges=[list(r) for r in ranges])["page_size"])


def log_report(dev: DeviceHandle, iova: int, length: int, page_size: int = LOG_PAGE) -> list[int]:
    """DMA_LOGGING_REPORT into a zeroed bitmap: the dirty pages (index from iova, of page_size bytes)."""
    return list(dev.call("dma_logging_report", iova=iova, length=length, page_size=page_size)["pages"])


def logged_pages(writes: list[tuple[int, int]], tracker: int, iova: int, length: int, page_size: int) -> list[int]:
    """What a correct log REPORTs for [iova, iova+length) after the device wrote `writes`: the tracker's
    pages (of the START page size it chose) inside LOG_RANGES, seen at the REPORT's page size."""
    tracked: set[int] = set()
    for w_iova, w_len in writes:
        for r_iova, r_len in LOG_RANGES:
            lo, hi = max(w_iova, r_iova), min(w_iova + w_len, r_iova + r_len)
            if lo < hi:
                tracked.update(range(lo // tracker, (hi - 1) // tracker + 1))
    out: set[int] = set()
    for t in tracked:
        lo, hi = max(t * tracker, iova), min((t + 1) * tracker, iova + length)
        if lo < hi:
            out.update(range((lo - iova) // page_size, (hi - 1 - iova) // page_size + 1))
    return sorted(out)


def dma(dev: DeviceHandle, writes: list[tuple[int, int]]) -> None:
    for iova, length in writes:
        dev.sim("dma_write", iova=iova, length=length)


@check("V2-R20", requires=("dirty_logging",))
def _v2_dma_logging(ctx: CheckContext) -> None:
    dev = ctx.open()
    start, report = uapi.FEATURES["DMA_LOGGING_START"], uapi.FEATURES["DMA_LOGGING_REPORT"]
    with ctx.step("PROBE DMA_LOGGING_START, START with no ranges (EINVAL), REPORT with page_size 1000 (EINVAL)"):
        assert feature(dev, PROBE | SET | start, b"")["ret"] == 0
        control = (4096).to_bytes(8, "little") + bytes(16)  # page_size 4096, num_ranges 0, ranges 0
        fails(lambda: feature(dev, SET | start, control), errno.EINVAL)
        body = bytes(16) + (1000).to_bytes(8, "little") + bytes(8)  # iova 0, length 0, page_size 1000
        fails(lambda: feature(dev, GET | report, body), errno.EINVAL)
    page = LOG_PAGE
    refused = [
        ([(2 * i * page, page) for i in range(257)], errno.E2BIG),  # more than PAGE_SIZE/16 ranges
        ([(page + 512, page)], errno.EINVAL),  # iova not aligned
        ([(page, page + 1)], errno.EINVAL),  # length not aligned
        ([((1 << 64) - page, 2 * page)], errno.EOVERFLOW),
        ([(0, 4 * page), (2 * page, 4 * page)], errno.EINVAL),  # overlapping
    ]
    with ctx.step("START with 257 ranges (E2BIG), unaligned (EINVAL), past 2**64 (EOVERFLOW), overlapping (EINVAL)"):
        for ranges, code in refused:
            fails(lambda: log_start(dev, page, ranges), code)  # noqa: B023 (called at once)
    with ctx.step("START two ranges: the page size written back is a power of two; a second START is refused"):
        tracker = log_start(dev, page, LOG_RANGES)
        assert tracker > 0 and tracker & (tracker - 1) == 0, f"START wrote back page size {tracker}"
        fails(lambda: log_start(dev, page, LOG_RANGES))
    if dev.is_sim:
        writes = [
            (0x10000 + page + 8, 8),  # inside one page
            (0x10000 + 3 * page + 100, 2 * page),  # across three pages
            (0x80000, page),  # in the hole: not logged
            (0x100000 + 7 * page, 4 * page),  # the last logged page, then past the range
        ]
        with ctx.step("the device DMAs to known iovas; REPORT: exactly the logged pages it wrote are dirty"):
            dma(dev, writes)
            got = log_report(dev, *LOG_SPAN)
            assert got == logged_pages(writes, tracker, *LOG_SPAN, page), f"REPORT pages {got}"
        with ctx.step("REPORT again: clean (REPORT reads and clears)"):
            assert log_report(dev, *LOG_SPAN) == [], "REPORT did not clear the pages it reported"
        first = (LOG_RANGES[0][0], 8 * page)
        writes = [(0x10000 + 2 * page, 1), (0x10000 + 10 * page, 1)]
        with ctx.step("DMA to two pages; REPORT half the range clears that half only; REPORT at 8 KiB pages"):
            dma(dev, writes)
            got = log_report(dev, *first)
            assert got == logged_pages(writes, tracker, *first, page), f"REPORT of the first half: pages {got}"
            got = log_report(dev, *LOG_RANGES[0], 2 * page)
            want = logged_pages(writes[1:], tracker, *LOG_RANGES[0], 2 * page)
            assert got == want, f"REPORT of the range at 8 KiB pages: {got}, want {want}"
    else:
        with ctx.step("REPORT twice: only pages of the logged ranges can be dirty"):
            logged = set(logged_pages(LOG_RANGES, tracker, *LOG_SPAN, page))
            for _ in range(2):
                got = log_report(dev, *LOG_SPAN)
                assert set(got) <= logged, f"REPORT shows pages outside the logged ranges: {sorted(set(got) - logged)}"
    with ctx.step("STOP, then START again (STOP ended the log)"):
        dev.call("dma_logging_stop")
        if dev.is_sim:  # the spec leaves REPORT without a log open; mlx5 and pds refuse it
            fails(lambda: log_report(dev, *LOG_SPAN))
            dma(dev, [(0x10000, page)])
        log_start(dev, page, LOG_RANGES)
    if dev.is_sim:
        with ctx.step("a new log starts clean"):
            assert log_report(dev, *LOG_SPAN) == [], "pages written before START are dirty"
    dev.call("dma_logging_stop")
