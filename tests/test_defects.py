"""Every seeded defect is caught by a direct check of the rule it breaks; the correct drivers pass them all.

These checks are deliberately small (one rule each). The conformance suites do
the same job with full reporting; here we prove the catalogue is detectable.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from labs.sim.defects import CATALOGUE, CORRECT, Defect
from labs.vfio import rules, uapi
from labs.vfio.client import AgentClient, AgentOSError
from labs.vfio.device import DeviceHandle

SMALL = {"content_size": 96 << 10, "record_size": 16 << 10, "window": 8 << 10}


@dataclass
class Ctx:
    client: AgentClient
    tmp: Path
    defect: Defect
    opened: list[DeviceHandle] = field(default_factory=list)
    count: itertools.count[int] = field(default_factory=itertools.count)

    def open(self, correct: bool = False, **options: Any) -> DeviceHandle:
        """A device of the variant under test (or, as a peer, of the correct driver)."""
        n = next(self.count)
        variant = CORRECT[self.defect.protocol] if correct else self.defect
        opts = {**SMALL, **dict(variant.options), **options}
        dev = DeviceHandle.open_sim(
            self.client, variant.driver, str(self.tmp / f"d{n}"), opts, name=f"d{n}", protocol=variant.protocol
        )
        self.opened.append(dev)
        return dev


CHECKS: dict[str, Callable[[Ctx], None]] = {}


def check(rule: str) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        CHECKS[rule] = fn
        return fn

    return register


def fails(fn: Callable[[], Any], *codes: int) -> int:
    try:
        fn()
    except AgentOSError as exc:
        assert not codes or exc.errno in codes, exc
        return exc.errno
    raise AssertionError("expected the call to fail")


# -- v1 -------------------------------------------------------------------------------


@check("V1-R2")
def _v1_width(ctx: Ctx) -> None:
    dev = ctx.open()
    fails(lambda: dev.call("v1_read", offset=8, width=4), errno.EINVAL)


@check("V1-R3")
def _v1_reserved(ctx: Ctx) -> None:
    dev = ctx.open()
    dev.v1_write("reserved", 0xDEAD)
    assert dev.v1_read("reserved") == 0


@check("V1-R4")
def _v1_reserved_bits(ctx: Ctx) -> None:
    dev = ctx.open()
    dev.v1_write("device_state", 0xA9)
    assert dev.v1_read("device_state") == 0xA9


@check("V1-R5")
def _v1_initial(ctx: Ctx) -> None:
    assert ctx.open().v1_read("device_state") & 7 == uapi.V1_RUNNING


@check("V1-R6")
def _v1_invalid(ctx: Ctx) -> None:
    dev = ctx.open()
    before = dev.v1_read("device_state")
    for bad in (5, 6, 7):
        fails(lambda bad=bad: dev.v1_write("device_state", bad))  # type: ignore[misc]
        assert dev.v1_read("device_state") == before


@check("V1-R8")
def _v1_failed_write(ctx: Ctx) -> None:
    dev = ctx.open()
    prior = dev.v1_read("device_state") & 7
    dev.faults(transitions=[{"from": uapi.v1_state_name(prior), "to": "STOP_COPY", "errno": "EBUSY"}])
    fails(lambda: dev.set_state("STOP_COPY"), errno.EBUSY)
    assert dev.v1_read("device_state") & 7 in (prior, uapi.V1_ERROR)


@check("V1-R9")
def _v1_error_reset(ctx: Ctx) -> None:
    dev = ctx.open()
    dev.faults(transitions=[{"from": dev.state(), "to": "STOP_COPY", "error": True}])
    fails(lambda: dev.set_state("STOP_COPY"))
    assert dev.state() == "ERROR"
    fails(lambda: dev.set_state("RUNNING"))
    dev.reset()
    assert dev.state() == "RUNNING"


@check("V1-R10")
def _v1_flows(ctx: Ctx) -> None:
    dev = ctx.open()
    dev.fill(1)
    dev.set_state("PRE_COPY")
    assert dev.v1_read("pending_bytes") > 0
    dev.set_state("STOP_COPY")
    dev.set_state("STOP")


def _v1_stream(dev: DeviceHandle) -> str:
    reader = dev.client.frames("v1_save", dev=dev.handle, max_bytes=10 << 20)
    reader.drain()
    assert reader.result is not None
    return reader.result.sha256


@check("V1-R11")
def _v1_pending_rereads(ctx: Ctx) -> None:
    dev = ctx.open()
    dev.fill(2)
    dev.set_state("STOP_COPY")
    plain = _v1_stream(dev)
    dev.set_state("STOP")
    dev.set_state("STOP_COPY")
    for _ in range(3):
        dev.v1_read("pending_bytes")
    assert _v1_stream(dev) == plain


@check("V1-R12")
def _v1_staging(ctx: Ctx) -> None:
    dev = ctx.open()
    dev.fill(6)
    dev.set_state("STOP_COPY")
    plain = _v1_stream(dev)
    dev.set_state("STOP")
    dev.set_state("STOP_COPY")
    region = dev.migration_region()
    assert region is not None and dev.v1_read("pending_bytes") > 0
    offset, size = dev.v1_read("data_offset"), dev.v1_read("data_size")
    assert size > 0
    assert (dev.v1_read("data_offset"), dev.v1_read("data_size")) == (offset, size)
    first = base64.b64decode(dev.call("region_read", index=region["index"], offset=offset, length=size)["data"])
    reader = dev.client.frames("v1_save", dev=dev.handle, max_bytes=10 << 20)
    rest = b"".join(reader)
    assert hashlib.sha256(first + rest).hexdigest() == plain  # the re-reads did not advance the stream


@check("V1-R13")
def _v1_window_stable(ctx: Ctx) -> None:
    dev = ctx.open()
    dev.fill(3)
    region = dev.migration_region()
    assert region is not None
    dev.set_state("STOP_COPY")
    dev.v1_read("pending_bytes")
    offset, size = dev.v1_read("data_offset"), dev.v1_read("data_size")
    reads = [dev.call("region_read", index=region["index"], offset=offset, length=size)["data"] for _ in range(2)]
    assert reads[0] == reads[1]


@check("V1-R14")
def _v1_data_offset(ctx: Ctx) -> None:
    dev = ctx.open(mmap=True)
    region = dev.migration_region()
    assert region is not None
    mmappable = any(c["id"] == 1 for c in region["caps"])
    dev.set_state("STOP_COPY")
    dev.v1_read("pending_bytes")
    offset = dev.v1_read("data_offset")
    assert offset >= uapi.V1_INFO_SIZE
    assert not mmappable or offset % 4096 == 0


@check("V1-R15")
def _v1_terminates(ctx: Ctx) -> None:
    dev = ctx.open()
    length = dev.sim("stream_length")["length"]
    dev.set_state("STOP_COPY")
    reader = dev.client.frames("v1_save", dev=dev.handle, max_bytes=2 * length)
    result = reader.drain()
    assert result.end == "done" and result.agent["pending"] == 0
    assert dev.v1_read("pending_bytes") == 0


def _round_trip(ctx: Ctx) -> None:
    # the source is a correct driver: this rule judges the resuming side (saving has its own rules)
    src, dst = ctx.open(correct=True), ctx.open()
    want = src.fill(4)
    dst.resume(src.save())
    assert dst.digest() == want


CHECKS["V1-R16"] = _round_trip
CHECKS["V2-R13"] = _round_trip


def _truncated(ctx: Ctx) -> None:
    src, dst = ctx.open(correct=True), ctx.open()
    src.fill(5)
    chunks = list(src.save().chunks())
    chunks[-1] = chunks[-1][:-8]
    fails(lambda: dst.resume(iter(chunks)))
    assert dst.state() != "RUNNING"


CHECKS["V1-R17"] = _truncated
CHECKS["V2-R14"] = _truncated


@check("V1-R19")
def _v1_reset_from_saving(ctx: Ctx) -> None:
    dev = ctx.open()
    dev.set_state("STOP_COPY")
    dev.reset()
    assert dev.state() == "RUNNING" and dev.v1_read("pending_bytes") == 0


# -- v2 -------------------------------------------------------------------------------


@check("V2-R1")
def _v2_flags(ctx: Ctx) -> None:
    flags = ctx.open().mig_flags
    assert flags in uapi.FLAG_SETS


@check("V2-R3")
def _v2_initial(ctx: Ctx) -> None:
    assert ctx.open().call("mig_get_state") == {"state": 2, "name": "RUNNING", "data_fd": -1}


@check("V2-R4")
def _v2_bad_target(ctx: Ctx) -> None:
    dev = ctx.open()
    before = dev.state()
    for target in (8, 0):
        fails(lambda target=target: dev.call("mig_set_state", state=target), errno.EINVAL)  # type: ignore[misc]
        assert dev.state() == before


@check("V2-R5")
def _v2_same_state(ctx: Ctx) -> None:
    dev = ctx.open()
    fd = dev.set_state("STOP_COPY")
    assert fd is not None
    assert dev.set_state("STOP_COPY") is None
    assert dev.client.call("fd_read", fd=fd, length=8)["length"] == 8  # still the same session


@check("V2-R6")
def _v2_paths(ctx: Ctx) -> None:
    dev = ctx.open()
    for target in ("STOP", "RUNNING", "STOP_COPY", "STOP"):
        cur = dev.state()
        dev.sim("arcs", clear=True)
        fd = dev.set_state(target)
        if fd is not None:
            dev.close_fd(fd)
        expect = uapi.path_names(cur, target, dev.mig_flags)
        assert expect is not None
        assert dev.sim("arcs") == [list(a) for a in itertools.pairwise(expect)]
        assert dev.state() == target


@check("V2-R7")
def _v2_fd_iff_session(ctx: Ctx) -> None:
    dev = ctx.open()
    assert dev.set_state("STOP") is None
    assert dev.set_state("RUNNING") is None
    assert dev.set_state("PRE_COPY") is not None


@check("V2-R8")
def _v2_saving_group_fd(ctx: Ctx) -> None:
    dev = ctx.open()
    fd = dev.set_state("PRE_COPY")
    assert fd is not None
    limit = 4 * dev.sim("stream_length")["length"]  # a defect may never run dry
    first, _ = dev.client.read_stream(fd, limit=limit)
    assert dev.set_state("STOP_COPY") is None
    rest, _ = dev.client.read_stream(fd, limit=limit)
    assert first.bytes + rest.bytes == dev.sim("stream_length")["length"]


@check("V2-R9")
def _v2_eof(ctx: Ctx) -> None:
    dev = ctx.open()
    fd = dev.set_state("STOP_COPY")
    assert fd is not None
    result, _ = dev.client.read_stream(fd, limit=4 * dev.sim("stream_length")["length"])
    assert result.end == "eof"
    assert dev.client.call("fd_read", fd=fd, length=16)["length"] == 0


@check("V2-R10")
def _v2_precopy_exhausted(ctx: Ctx) -> None:
    dev = ctx.open()
    fd = dev.set_state("PRE_COPY")
    assert fd is not None
    result, _ = dev.client.read_stream(fd, limit=4 * dev.sim("stream_length")["length"])
    assert result.end in ("enomsg", "eof")
    assert dev.precopy_info(fd) == {"initial_bytes": 0, "dirty_bytes": 0, "flags": 0}
    try:
        assert dev.client.call("fd_read", fd=fd, length=64)["length"] == 0
    except AgentOSError as exc:
        assert exc.errno == errno.ENOMSG


@check("V2-R11")
def _v2_precopy_info_state(ctx: Ctx) -> None:
    dev = ctx.open()
    fd = dev.set_state("STOP_COPY")
    assert fd is not None
    fails(lambda: dev.precopy_info(fd), errno.EINVAL)


@check("V2-R12")
def _v2_hanging_request(ctx: Ctx) -> None:
    dev = ctx.open()
    assert uapi.is_hanging("STOP_COPY", "PRE_COPY", dev.mig_flags)  # sim only: never on real kernels
    dev.set_state("STOP_COPY")
    fails(lambda: dev.set_state("PRE_COPY"), errno.EINVAL)
    assert dev.state() == "STOP_COPY"


@check("V2-R15")
def _v2_error_reset(ctx: Ctx) -> None:
    dev = ctx.open()
    dev.set_state("STOP")
    dev.faults(transitions=[{"from": "STOP", "to": "STOP_COPY", "error": True}])
    fails(lambda: dev.set_state("STOP_COPY"))
    assert dev.state() == "ERROR"
    fails(lambda: dev.set_state("RUNNING"), errno.EINVAL)
    dev.reset()
    assert dev.state() == "RUNNING"


@check("V2-R16")
def _v2_dead_fd(ctx: Ctx) -> None:
    dev = ctx.open()
    fd = dev.set_state("STOP_COPY")
    assert fd is not None
    dev.reset()
    fails(lambda: dev.client.call("fd_read", fd=fd, length=16))


@check("V2-R18")
def _v2_cloexec(ctx: Ctx) -> None:
    dev = ctx.open()
    fd = dev.set_state("STOP_COPY")
    assert fd is not None
    assert dev.client.call("fd_info", fd=fd)["cloexec"] is True
    fails(lambda: dev.client.call("fd_read", fd=fd, length=16, offset=0), errno.ESPIPE)


@check("V2-R19")
def _v2_data_size(ctx: Ctx) -> None:
    dev = ctx.open()
    assert dev.data_size() == dev.sim("stream_length")["length"]


# -- the tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentClient]:
    with AgentClient.local("defects", timeout=20) as client:
        yield client


def run_check(agent: AgentClient, tmp_path: Path, defect: Defect, rule: str) -> None:
    ctx = Ctx(agent, tmp_path, defect)
    try:
        CHECKS[rule](ctx)
    finally:
        for dev in ctx.opened:
            dev.close()


def test_catalogue_shape() -> None:
    assert len(CATALOGUE) >= 15
    for defect in CATALOGUE.values():
        assert defect.rule in rules.RULES, defect
        assert defect.rule in CHECKS, f"no check for {defect.rule}"
        assert defect.rule.startswith(defect.protocol.upper())


@pytest.mark.parametrize("rule", sorted(r for r in CHECKS if r.startswith("V1")))
def test_correct_v1_driver_passes(agent: AgentClient, tmp_path: Path, rule: str) -> None:
    run_check(agent, tmp_path, CORRECT["v1"], rule)


@pytest.mark.parametrize("rule", sorted(r for r in CHECKS if r.startswith("V2")))
def test_correct_v2_driver_passes(agent: AgentClient, tmp_path: Path, rule: str) -> None:
    run_check(agent, tmp_path, CORRECT["v2"], rule)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_defect_is_caught_by_its_rule(agent: AgentClient, tmp_path: Path, name: str) -> None:
    defect = CATALOGUE[name]
    with pytest.raises((AssertionError, AgentOSError)):
        run_check(agent, tmp_path, defect, defect.rule)
