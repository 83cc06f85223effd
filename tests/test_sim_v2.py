"""The v2 sim driver through a local agent subprocess: every uAPI call goes the real agent path."""

from __future__ import annotations

import base64
import errno
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labs.conformance.checks import CHECKS
from labs.sim.defects import CATALOGUE, CORRECT
from labs.vfio import uapi
from labs.vfio.abi import VFIO_DEVICE_FEATURE_GET as GET
from labs.vfio.abi import VFIO_DEVICE_FEATURE_PROBE as PROBE
from labs.vfio.abi import VFIO_DEVICE_FEATURE_SET as SET
from labs.vfio.client import AgentClient, AgentOSError
from labs.vfio.device import DeviceHandle
from labs.vfio.hostsys import DATA_FD_SENTINEL
from tests.test_defects import run_check

DRIVER = "labs.sim.v2:V2Driver"
FULL = {"content_size": 256 << 10, "record_size": 32 << 10, "pre_copy": True, "p2p": True}


@pytest.fixture(scope="module")
def agents() -> Iterator[tuple[AgentClient, AgentClient]]:
    a, b = AgentClient.local("hostA", timeout=20), AgentClient.local("hostB", timeout=20)
    yield a, b
    a.close()
    b.close()


def open_dev(client: AgentClient, state_dir: Path, name: str = "simv2", **options: Any) -> DeviceHandle:
    return DeviceHandle.open_sim(client, DRIVER, str(state_dir), {**FULL, **options}, name=name, protocol="v2")


@pytest.fixture
def devs(agents: tuple[AgentClient, AgentClient], tmp_path: Path) -> Iterator[tuple[DeviceHandle, DeviceHandle]]:
    src, dst = open_dev(agents[0], tmp_path / "a"), open_dev(agents[1], tmp_path / "b")
    yield src, dst
    src.close()
    dst.close()


def errno_of(exc: pytest.ExceptionInfo[AgentOSError]) -> int:
    return exc.value.errno


def feature(dev: DeviceHandle, flags: int, payload: bytes = b"", argsz: int | None = None) -> bytes:
    out = dev.call("feature", flags=flags, payload=base64.b64encode(payload).decode(), argsz=argsz)
    return base64.b64decode(out["payload"])


def test_fresh_device_runs_with_flags(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    src, _ = devs
    assert src.call("mig_get_state") == {"state": 2, "name": "RUNNING", "data_fd": -1}  # V2-R3
    assert src.mig_flags == 7  # V2-R1
    info = src.info()
    assert info["flag_names"] == ["RESET", "PCI"] and info["num_regions"] == 9
    assert src.migration_region() is None


def test_feature_header_validation(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """V2-R2 and PROBE."""
    src, _ = devs
    mig = uapi.VFIO_DEVICE_FEATURE_MIGRATION
    state = uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    cases = [
        (GET | mig, bytes(8), 4),  # argsz < 8
        (GET | mig | (1 << 20), bytes(8), None),  # unknown flag bit
        (GET | SET | state, bytes(8), None),  # GET|SET without PROBE
        (SET | mig, bytes(8), None),  # MIGRATION is GET-only
        (GET | state, bytes(4), None),  # MIG_DEVICE_STATE argsz < 16
        (GET | 200, bytes(8), None),  # unknown feature, no driver handler
    ]
    for flags, payload, argsz in cases:
        with pytest.raises(AgentOSError) as exc:
            feature(src, flags, payload, argsz)
        assert exc.value.errname == "EINVAL", (hex(flags), argsz)
    assert src.call("feature", flags=PROBE | GET | mig)["ret"] == 0
    assert src.call("feature", flags=PROBE | GET | SET | state)["ret"] == 0
    with pytest.raises(AgentOSError) as exc:
        feature(src, SET | uapi.FEATURES["DMA_LOGGING_START"], bytes(24))
    assert exc.value.errname == "ENOTTY"  # no log_ops


def test_bad_targets_leave_state(agents: tuple[AgentClient, AgentClient], tmp_path: Path) -> None:
    """V2-R4 on a device without P2P/PRE_COPY; V2-R17: the failed buffer holds data_fd -1."""
    dev = open_dev(agents[0], tmp_path, pre_copy=False, p2p=False)
    try:
        for target in (8, 0, uapi.V2_STATES["RUNNING_P2P"], uapi.V2_STATES["PRE_COPY"]):
            with pytest.raises(AgentOSError) as exc:
                dev.call("mig_set_state", state=target)
            assert exc.value.errno == errno.EINVAL
            assert exc.value.detail["buffer"] == {"device_state": target, "data_fd": -1}
            assert dev.state() == "RUNNING"
    finally:
        dev.close()


def test_every_pair_walks_the_kernel_path(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """V2-R5/R6/R7: the arcs the driver ran equal uapi.path; a fd iff the last arc opens a session."""
    src, _ = devs
    flags = src.mig_flags
    states = uapi.supported_states(flags)
    stream = src.save().data()  # leaving RESUMING needs a valid stream
    for cur in states:
        for new in states:
            src.reset()
            fd = src.set_state(cur)
            if fd is not None:
                if cur == uapi.V2_STATES["RESUMING"]:
                    src.client.write_stream(fd, [stream])
                src.close_fd(fd)
            src.sim("arcs", clear=True)
            if uapi.is_hanging(cur, new, flags):
                with pytest.raises(AgentOSError) as exc:  # V2-R12 (sim only)
                    src.set_state(new)
                assert exc.value.errno == errno.EINVAL and src.state_value() == cur
                continue
            fd = src.set_state(new)
            expect = uapi.path(cur, new, flags)
            assert expect is not None
            arcs = src.sim("arcs")
            assert arcs == [[uapi.v2_state_name(a), uapi.v2_state_name(b)] for a, b in itertools.pairwise(expect)]
            assert (fd is not None) == uapi.opens_session(expect), (cur, new)
            assert src.state_value() == new
            if fd is not None:
                src.close_fd(fd)


def test_round_trip_between_hosts(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """V2-R13 through copy_stream (no stream held in the controller)."""
    src, dst = devs
    want = src.fill(seed=11)
    assert dst.digest() != want
    results = src.migrate_to(dst)
    assert dst.digest() == want and dst.state() == "RUNNING" and src.state() == "STOP"
    assert results[0].bytes == src.sim("stream_length")["length"]


def test_live_round_trip_with_dirtying(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """V2-R8/R10/R11: pre-copy, then device writes (dirty chunks resent), then stop-copy on the same fd."""
    src, dst = devs
    src.fill(seed=1)
    fd = src.set_state("PRE_COPY")
    assert fd is not None
    info = src.precopy_info(fd)
    assert info["initial_bytes"] > 0 and info["dirty_bytes"] == 0
    first = src.client.call("fd_read", fd=fd, length=1000)
    assert src.precopy_info(fd)["initial_bytes"] == info["initial_bytes"] - 1000
    rest, data = src.client.read_stream(fd)
    assert rest.end == "enomsg"  # spec-strict sim
    assert src.precopy_info(fd)["initial_bytes"] == 0
    src.sim("write", offset=5, data=base64.b64encode(b"dirty!").decode())
    assert src.precopy_info(fd)["dirty_bytes"] > 0
    assert src.set_state("STOP_COPY") is None  # same fd across the saving group
    final, tail = src.client.read_stream(fd)
    assert final.end == "eof"
    assert src.client.call("fd_read", fd=fd, length=10)["length"] == 0  # V2-R9: EOF stays
    src.set_state("STOP")
    src.close_fd(fd)
    want = src.digest()
    stream = base64.b64decode(first["data"]) + (data or b"") + (tail or b"")
    dfd = dst.set_state("RESUMING")
    assert dfd is not None
    dst.client.write_stream(dfd, (stream[i : i + 999] for i in range(0, len(stream), 999)))
    dst.close_fd(dfd)
    dst.set_state("RUNNING")
    assert dst.digest() == want


def test_save_then_resume_with_other_write_sizes(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    src, dst = devs
    want = src.fill(seed=2)
    saved = src.save(live=True)
    assert [p.end for p in saved.parts] == ["enomsg", "eof"]
    dst.resume(saved.rechunk(4093))
    assert dst.digest() == want


def test_precopy_zero_mode(agents: tuple[AgentClient, AgentClient], tmp_path: Path) -> None:
    dev = open_dev(agents[0], tmp_path, precopy_empty="zero")
    try:
        fd = dev.set_state("PRE_COPY")
        assert fd is not None
        res, _ = dev.client.read_stream(fd)
        assert res.end == "eof" and res.bytes > 0  # mtty-like: 0 means "nothing now"
        assert dev.precopy_info(fd)["initial_bytes"] == 0
    finally:
        dev.close()


def test_data_size_in_every_state(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """V2-R19: MIG_DATA_SIZE answers everywhere; before saving it is the exact stream length."""
    src, _ = devs
    length = src.sim("stream_length")["length"]
    for state in uapi.supported_states(src.mig_flags):
        src.reset()
        fd = src.set_state(state)
        assert src.data_size() > 0
        if state == uapi.V2_STATES["RUNNING"]:
            assert src.data_size() == length
        if fd is not None:
            src.close_fd(fd)


def test_truncated_and_corrupted_streams_are_rejected(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """V2-R14 then V2-R15: reset recovers, a full cycle works afterwards."""
    src, dst = devs
    want = src.fill(seed=3)
    data = src.save().data()
    bad_streams = [data[:-10], data[:100], data[:5000] + bytes([data[5000] ^ 0xFF]) + data[5001:]]
    for bad in bad_streams:
        dst.reset()
        fd = dst.set_state("RESUMING")
        assert fd is not None
        dst.client.write_stream(fd, [bad])
        with pytest.raises(AgentOSError) as exc:
            dst.set_state("RUNNING")
        assert exc.value.errno == errno.EINVAL
        assert dst.state() == "RESUMING"
        dst.close_fd(fd)
    dst.reset()
    assert dst.state() == "RUNNING"
    dst.resume(iter([data]))
    assert dst.digest() == want


def test_bad_header_fails_the_write(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    src, dst = devs
    data = bytearray(src.save().data())
    data[0] ^= 0xFF
    fd = dst.set_state("RESUMING")
    assert fd is not None
    with pytest.raises(AgentOSError) as exc:
        dst.client.write_stream(fd, [bytes(data)])
    assert exc.value.errno == errno.EINVAL and exc.value.detail["bytes"] == 0


def test_error_state_and_reset(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """Fault knob to ERROR; V2-R15; V2-R16 (dead fd after reset)."""
    src, dst = devs
    src.faults(transitions=[{"from": "RUNNING_P2P", "to": "STOP", "errno": "EIO", "error": True, "times": 1}])
    with pytest.raises(AgentOSError) as exc:
        src.set_state("STOP_COPY")
    assert exc.value.errname == "EIO"
    assert src.state() == "ERROR"
    for target in ("RUNNING", "STOP", "STOP_COPY"):
        with pytest.raises(AgentOSError) as exc:
            src.set_state(target)
        assert exc.value.errno == errno.EINVAL
    src.reset()
    assert src.state() == "RUNNING"
    fd = src.set_state("STOP_COPY")
    assert fd is not None
    src.reset()
    with pytest.raises(AgentOSError) as exc:
        src.client.call("fd_read", fd=fd, length=10)
    assert exc.value.errno == errno.ENODEV
    src.close_fd(fd)
    want = src.fill(seed=4)
    src.migrate_to(dst)  # a full cycle after recovery
    assert dst.digest() == want


def test_arc_failure_mid_path_keeps_last_good_state(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    src, _ = devs
    src.faults(transitions=[{"from": "STOP", "to": "STOP_COPY", "errno": errno.EAGAIN}])
    with pytest.raises(AgentOSError) as exc:
        src.set_state("STOP_COPY")
    assert exc.value.errname == "EAGAIN"
    assert src.state() == "STOP"  # RUNNING -> RUNNING_P2P -> STOP committed, the last arc failed
    src.faults(clear=True)
    fd = src.set_state("STOP_COPY")
    assert fd is not None
    src.close_fd(fd)


def test_data_fd_is_a_cloexec_stream(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """V2-R18, V2-R11 (PRECOPY_INFO outside PRE_COPY), V2-R16 (session end)."""
    src, _ = devs
    fd = src.set_state("STOP_COPY")
    assert fd is not None
    assert src.client.call("fd_info", fd=fd)["cloexec"] is True
    with pytest.raises(AgentOSError) as exc:
        src.client.call("fd_read", fd=fd, length=10, offset=0)
    assert exc.value.errname == "ESPIPE"
    with pytest.raises(AgentOSError) as exc:
        src.precopy_info(fd)
    assert exc.value.errname == "EINVAL"
    with pytest.raises(AgentOSError) as exc:
        src.client.call("fd_write", fd=fd, data="AA==")
    assert exc.value.errname == "EBADF"  # the saving fd is read-only
    src.set_state("STOP")
    with pytest.raises(AgentOSError) as exc:
        src.client.call("fd_read", fd=fd, length=10)
    assert exc.value.errname == "ENODEV"


def test_stream_faults(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    src, dst = devs
    src.fill(seed=5)
    src.faults(read_after=70_000)
    fd = src.set_state("STOP_COPY")
    assert fd is not None
    with pytest.raises(AgentOSError) as exc:
        src.client.read_stream(fd)
    assert exc.value.errname == "EIO" and exc.value.detail["bytes"] == 70_000
    src.close_fd(fd)
    src.reset()
    src.faults(read_after=None)
    data = src.save().data()
    dst.faults(write_after=50_000, write_errno="ENOSPC")
    dfd = dst.set_state("RESUMING")
    assert dfd is not None
    with pytest.raises(AgentOSError) as exc:
        dst.client.write_stream(dfd, (data[i : i + 10_000] for i in range(0, len(data), 10_000)))
    assert exc.value.errname == "ENOSPC" and exc.value.detail["bytes"] == 50_000
    assert dst.client.call("ping") == {}  # the session survived the failed stream


def test_content_persists_across_sessions(tmp_path: Path) -> None:
    """The device lives on its host: a new agent session sees the same content."""
    with AgentClient.local("first") as a:
        want = open_dev(a, tmp_path).fill(seed=6)
    with AgentClient.local("second") as b:
        dev = open_dev(b, tmp_path)
        assert dev.digest() == want and dev.state() == "RUNNING"


def test_v1_device_has_no_v2_features(agents: tuple[AgentClient, AgentClient], tmp_path: Path) -> None:
    dev = DeviceHandle.open_sim(agents[0], "labs.sim.v1:V1Driver", str(tmp_path), name="v1")
    try:
        with pytest.raises(AgentOSError) as exc:
            dev.call("mig_flags")
        assert exc.value.errname == "ENOTTY"  # V2-R1 on a device without v2 migration
    finally:
        dev.close()


V2_CORRECT = sorted(n for n, d in CORRECT.items() if d.protocol == "v2")


@pytest.mark.parametrize("name", V2_CORRECT)
def test_correct_driver_of_every_flag_set_passes_every_check(
    agents: tuple[AgentClient, AgentClient], tmp_path: Path, name: str
) -> None:
    defect = CORRECT[name]
    options = dict(defect.options)
    caps = {"stop_copy", *(c for c in ("p2p", "pre_copy", "dirty_logging") if options.get(c))}
    rules = sorted(r for r, c in CHECKS.items() if c.protocol == "v2" and set(c.requires) <= caps)
    assert "V2-R6" in rules
    for rule in rules:
        run_check(agents[0], tmp_path / rule, defect, rule)


def test_failed_set_leaves_no_sentinel_in_the_buffer(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    dev = devs[0]
    with pytest.raises(AgentOSError) as exc:
        dev.call("mig_set_state", state=9)
    assert exc.value.detail["buffer"] == {"device_state": 9, "data_fd": -1}


def test_a_driver_that_leaves_data_fd_alone_shows_the_sentinel(
    agents: tuple[AgentClient, AgentClient], tmp_path: Path
) -> None:
    dev = DeviceHandle.open_sim(agents[0], "labs.sim.defects:V2FailedSetKeepsFd", str(tmp_path / "k"), FULL, "k")
    try:
        with pytest.raises(AgentOSError) as exc:
            dev.call("mig_set_state", state=0)
        assert exc.value.detail["buffer"]["data_fd"] == DATA_FD_SENTINEL
        with pytest.raises(AssertionError, match="data_fd"):
            run_check(agents[0], tmp_path / "r17", CATALOGUE["V2FailedSetKeepsFd"], "V2-R17")
    finally:
        dev.close()


@pytest.mark.parametrize("value", [9, 0x10002, 0xFFFFFFFF, -1])
def test_undefined_state_values_are_refused(devs: tuple[DeviceHandle, DeviceHandle], value: int) -> None:
    dev = devs[0]
    with pytest.raises(AgentOSError) as exc:
        dev.call("mig_set_state", state=value)
    assert exc.value.errno == errno.EINVAL
    assert dev.state() == "RUNNING"


def test_data_fd_is_a_stream_with_cloexec(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    dev = devs[0]
    fd = dev.set_state("STOP_COPY")
    assert fd is not None
    assert dev.client.call("fd_info", fd=fd)["cloexec"] is True
    for call in (
        lambda: dev.client.call("fd_read", fd=fd, length=8, offset=0),
        lambda: dev.client.call("fd_write", fd=fd, data="AAAA", offset=0),
    ):
        with pytest.raises(AgentOSError) as exc:
            call()
        assert exc.value.errno == errno.ESPIPE
    dev.close_fd(fd)


# -- DMA dirty logging (V2-R20) ----------------------------------------------------------------

PAGE = 4096
LOG_RANGES = [[0x10000, 16 * PAGE], [0x100000, 8 * PAGE]]


def start_log(dev: DeviceHandle, ranges: list[list[int]], page_size: int = PAGE) -> int:
    return int(dev.call("dma_logging_start", page_size=page_size, ranges=ranges)["page_size"])


def report(dev: DeviceHandle, iova: int, length: int, page_size: int = PAGE) -> list[int]:
    return list(dev.call("dma_logging_report", iova=iova, length=length, page_size=page_size)["pages"])


@pytest.fixture
def logdev(agents: tuple[AgentClient, AgentClient], tmp_path: Path) -> Iterator[DeviceHandle]:
    dev = open_dev(agents[0], tmp_path / "log", name="simlog", dirty_logging=True)
    yield dev
    dev.close()


def test_dma_logging_start_validation(logdev: DeviceHandle) -> None:
    """The core's START checks (spec 3.7), in the order the kernel makes them."""
    cases: list[tuple[int, list[list[int]], int]] = [
        (PAGE, [], errno.EINVAL),  # no ranges
        (PAGE, [[2 * i * PAGE, PAGE] for i in range(257)], errno.E2BIG),  # more than PAGE_SIZE/16
        (PAGE, [[PAGE + 512, PAGE]], errno.EINVAL),  # iova not aligned
        (PAGE, [[PAGE, PAGE + 1]], errno.EINVAL),  # length not aligned
        (PAGE, [[(1 << 64) - PAGE, 2 * PAGE]], errno.EOVERFLOW),
        (PAGE, [[0, 4 * PAGE], [2 * PAGE, 4 * PAGE]], errno.EINVAL),  # overlapping
    ]
    for page_size, ranges, code in cases:
        with pytest.raises(AgentOSError) as exc:
            start_log(logdev, ranges, page_size)
        assert exc.value.errno == code, (len(ranges), ranges[:2])
    assert logdev.sim("dma_log")["ranges"] is None  # nothing started by a refused START
    assert start_log(logdev, [[2 * i * PAGE, PAGE] for i in range(256)]) == PAGE  # 256 is the limit
    with pytest.raises(AgentOSError) as exc:
        start_log(logdev, LOG_RANGES)
    assert exc.value.errno == errno.EINVAL  # one START until STOP
    logdev.call("dma_logging_stop")
    assert start_log(logdev, LOG_RANGES, 3000) == PAGE  # the driver's choice is written back


def test_dma_logging_report_reads_and_clears(logdev: DeviceHandle) -> None:
    start_log(logdev, LOG_RANGES)
    logdev.sim("dma_write", iova=0x10000 + PAGE + 8, length=8)  # page 1 of the first range
    logdev.sim("dma_write", iova=0x10000 + 3 * PAGE + 100, length=2 * PAGE)  # pages 3, 4, 5
    logdev.sim("dma_write", iova=0x80000, length=PAGE)  # outside every range: not logged
    logdev.sim("dma_write", iova=0x100000 + 7 * PAGE, length=4 * PAGE)  # last page of range 2, then beyond
    span = 0x100000 + 8 * PAGE - 0x10000
    assert report(logdev, 0x10000, span) == [1, 3, 4, 5, (0x100000 - 0x10000) // PAGE + 7]
    assert report(logdev, 0x10000, span) == []  # read and clear
    logdev.sim("dma_write", iova=0x10000 + 2 * PAGE, length=1)
    logdev.sim("dma_write", iova=0x10000 + 10 * PAGE, length=1)
    assert report(logdev, 0x10000, 8 * PAGE) == [2]  # only the reported range is cleared
    assert report(logdev, 0x10000, 16 * PAGE, 2 * PAGE) == [5]  # page 10 at 8 KiB granularity
    with pytest.raises(AgentOSError) as exc:
        report(logdev, 0x10000, span, 1000)
    assert exc.value.errno == errno.EINVAL  # page size not a power of two >= 4096
    logdev.call("dma_logging_stop")
    with pytest.raises(AgentOSError) as exc:
        report(logdev, 0x10000, span)
    assert exc.value.errno == errno.EINVAL  # no log after STOP


def test_dma_logging_needs_the_option_and_a_lent_pointer(
    logdev: DeviceHandle, devs: tuple[DeviceHandle, DeviceHandle]
) -> None:
    with pytest.raises(AgentOSError) as exc:
        start_log(devs[0], LOG_RANGES)
    assert exc.value.errno == errno.ENOTTY  # no dirty_logging option: no log_ops
    control = PAGE.to_bytes(8, "little") + (1).to_bytes(4, "little") + bytes(4) + (0x1000).to_bytes(8, "little")
    with pytest.raises(AgentOSError) as exc:
        feature(logdev, SET | uapi.FEATURES["DMA_LOGGING_START"], control)
    assert exc.value.errno == errno.EFAULT  # a pointer the agent did not lend
    assert logdev.call("feature", flags=PROBE | GET | uapi.FEATURES["DMA_LOGGING_REPORT"])["ret"] == 0


def test_dirty_logging_capability_is_probed(logdev: DeviceHandle, devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """The health probe checks an inventory's dirty_logging by PROBE|SET DMA_LOGGING_START (log_ops or ENOTTY)."""
    assert logdev.supports("dirty_logging")
    assert not devs[0].supports("dirty_logging")


def test_sparse_content_reads_as_written(tmp_path: Path) -> None:
    """Holes read as zeros without reading them; written bytes read back, across and at hole edges."""
    from labs.sim.base import ContentStore

    store = ContentStore(str(tmp_path), 4 << 20)
    assert store.read(0, 1 << 20) == bytes(1 << 20)
    store.write((2 << 20) + 5, b"abc")
    assert store.read(2 << 20, 8) == b"\0" * 5 + b"abc"
    assert store.read((2 << 20) - 4, 12) == bytes(9) + b"abc"
    assert store.read((4 << 20) - 8, 8) == bytes(8)
    assert store.read(1 << 20, 1 << 20) == bytes(1 << 20)
