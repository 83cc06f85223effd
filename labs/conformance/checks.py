"""One small check per spec rule (sections 2.8 and 3.9), written once for every caller.

A check gets a CheckContext: `ctx.open()` gives the device under test (a fresh
handle in RUNNING), `ctx.peer()` a second, compatible device to resume into or
save from. On a lab the peer is the device itself (the pair suites go host to
host); in tests/test_defects.py it is the correct driver, so a resume rule
judges the resuming side only. Call `ctx.open()` before `ctx.peer()`: the peer
may be the same handle. `ctx.step(title)` records a report step.

Checks use fault knobs and sim readback (`dev.sim`, `dev.fill`, `dev.digest`)
only where `Check.sim` says so, or behind `dev.is_sim`, so the same checks run
on real devices. They never send a request that hangs a real kernel
(uapi.is_hanging) to a device that is not simulated.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

from labs.conformance import model
from labs.vfio import rules, uapi
from labs.vfio.agent import VFIO_DEVICE_FEATURE_GET as GET
from labs.vfio.agent import VFIO_DEVICE_FEATURE_PROBE as PROBE
from labs.vfio.agent import VFIO_DEVICE_FEATURE_SET as SET
from labs.vfio.client import AgentOSError
from labs.vfio.device import DeviceHandle

FAULT_KNOBS = "fault knobs need a simulated driver"
HANGS_KERNELS = "STOP_COPY -> PRE_COPY hangs real kernels (spec 3.4)"


class CheckContext(Protocol):
    def open(self) -> DeviceHandle:
        """The device under test: a fresh handle, in RUNNING."""
        ...

    def peer(self) -> DeviceHandle:
        """A compatible second device in RUNNING (on a lab: possibly the device under test itself)."""
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
    for cap in region["caps"]:
        for offset, size in cap.get("areas", ()):
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
        with ctx.step("VFIO_DEVICE_RESET leaves 001"):
            dev.reset()
            assert dev.state() == "RUNNING"


@check("V1-R10")
def _v1_flows(ctx: CheckContext) -> None:
    dev = ctx.open()
    seed(dev, 1)
    for flow in (["STOP", "RUNNING"], ["STOP_COPY", "STOP", "RUNNING"], ["STOP", "STOP_COPY", "STOP", "RUNNING"]):
        with ctx.step(f"flow 001 -> {' -> '.join(flow)}"):
            for state in flow:
                dev.set_state(state)
    precopy_data = dev.is_sim and "pre_copy" in (declared_capabilities(ctx, dev) or ())
    with ctx.step(f"live flow 001 -> 011 -> 010 ({'pending_bytes > 0' if precopy_data else 'undrained'}) -> 000"):
        dev.set_state("PRE_COPY")
        assert not precopy_data or dev.v1_read("pending_bytes") > 0
        dev.set_state("STOP_COPY")
        assert not dev.is_sim or dev.v1_read("pending_bytes") > 0, "nothing to save in 010"
        dev.set_state("STOP")


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
    # the device under test resumes; its peer saves (in tests/test_defects.py a correct driver:
    # this rule judges the resuming side, saving has its own rules)
    dst = ctx.open()
    src = ctx.peer()
    want = seed(src, 4)
    with ctx.step("save the peer, resume it into the device under test"):
        saved = src.save()
        if dst.protocol == "v2":
            dst.resume(saved.rechunk(5000))  # arbitrary write sizes (V2-R13)
        else:
            dst.resume(saved)
        assert dst.state() == "RUNNING"
    assert digest(dst) == want, "the resumed content differs from the saved content"


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
    chunks = list(src.save().chunks())
    allowed = refused_resume_states(dst)
    cuts = {"its last chunk": chunks[:-1], "its last 8 bytes": [*chunks[:-1], chunks[-1][:-8]]}
    for what, cut in cuts.items():
        with ctx.step(f"resume a stream missing {what}: refused, then {' or '.join(allowed)}"):
            dst.reset()
            fails(lambda cut=cut: dst.resume(iter(cut)))  # type: ignore[misc]
            state = dst.state()
            assert state in allowed, f"after a refused resume GET shows {state}, not {'/'.join(allowed)}"
    dst.reset()


for _rule in ("V1-R16", "V2-R13"):
    CHECKS[_rule] = Check(_rule, _round_trip)
for _rule in ("V1-R17", "V2-R14"):
    CHECKS[_rule] = Check(_rule, _truncated)


@check("V1-R19")
def _v1_reset_anywhere(ctx: CheckContext) -> None:
    dev = ctx.open()
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
                    dev.reset()  # the session ends before its fd is closed (mtty: nested findings)
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
    with ctx.step("save a stream to leave RESUMING with"):
        stream = dev.save().data()
        dev.set_state("RUNNING")
    for cur, new in itertools.product(states, states):
        if uapi.is_hanging(cur, new, flags):
            continue  # V2-R12, simulators only
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
            # fds are closed after the SET that leaves their session, as QEMU does: mtty's
            # RESUMING -> STOP reads the resuming file (nested findings)
            for f in (old, fd):
                if f is not None:
                    dev.close_fd(f)
            assert dev.state_value() == new, f"GET shows {dev.state()} after SET {uapi.v2_state_name(new)}"
            if dev.is_sim:
                assert dev.sim("arcs") == [list(a) for a in itertools.pairwise(names)], "the driver ran other arcs"
    dev.reset()


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
        with ctx.step(f"SET {cur} -> {target}: a data_fd iff the last arc opens a session"):
            fd = dev.set_state(target)
            if fd is not None:
                dev.close_fd(fd)
            assert (fd is not None) == uapi.opens_session(p), f"data_fd {fd} for {cur} -> {target}"
    dev.reset()


@check("V2-R8", requires=("pre_copy",))
def _v2_saving_group_fd(ctx: CheckContext) -> None:
    dev = ctx.open()
    peer = ctx.peer()
    want = seed(dev, 7)
    limit = stream_limit(dev)
    with ctx.step("read PRE_COPY then STOP_COPY from the one fd"):
        fd = dev.set_state("PRE_COPY")
        assert fd is not None
        first, pre = dev.client.read_stream(fd, limit=limit)
        assert dev.set_state("STOP_COPY") is None, "a new data_fd inside the saving group"
        rest, stop = dev.client.read_stream(fd, limit=limit)
        dev.close_fd(fd)
        dev.set_state("STOP")
        assert pre is not None and stop is not None
    if dev.is_sim:
        assert first.bytes + rest.bytes == dev.sim("stream_length")["length"], "not one continuous stream"
    with ctx.step("the two parts resume as one stream"):
        peer.resume([pre + stop])
        assert digest(peer) == want


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
        fails(lambda: dev.client.call("precopy_info", fd=fd, argsz=16), errno.EINVAL)
        n = dev.client.call("fd_read", fd=fd, length=4096)["length"]
        after = dev.precopy_info(fd)
        assert after["initial_bytes"] <= max(0, before["initial_bytes"] - n), (before, n, after)
    with ctx.step("PRECOPY_INFO in STOP_COPY fails EINVAL"):
        assert dev.set_state("STOP_COPY") is None
        fails(lambda: dev.precopy_info(fd), errno.EINVAL)
    dev.close_fd(fd)
    dev.reset()


@check("V2-R12", sim=HANGS_KERNELS, requires=("pre_copy",))
def _v2_hanging_request(ctx: CheckContext) -> None:
    dev = ctx.open()
    assert dev.is_sim, "never on real kernels"
    for target in ("PRE_COPY", "PRE_COPY_P2P"):
        if not uapi.mig_state_supported(uapi.v2_state(target), dev.mig_flags):
            continue
        assert uapi.is_hanging("STOP_COPY", target, dev.mig_flags)
        with ctx.step(f"SET STOP_COPY -> {target} (hangs kernels; EINVAL in the simulator)"):
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
            dev.data_size()
    dev.reset()


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
