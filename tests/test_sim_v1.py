"""The v1 region sim driver through a local agent: the seed's protocol step by step."""

from __future__ import annotations

import base64
import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labs.conformance.checks import CHECKS
from labs.sim.defects import CORRECT
from labs.vfio import uapi
from labs.vfio.client import AgentClient, AgentOSError
from labs.vfio.device import DeviceHandle
from tests.test_defects import run_check

DRIVER = "labs.sim.v1:V1Driver"
OPTS = {"content_size": 200 << 10, "record_size": 16 << 10, "window": 8 << 10}


@pytest.fixture(scope="module")
def agents() -> Iterator[tuple[AgentClient, AgentClient]]:
    a, b = AgentClient.local("hostA", timeout=20), AgentClient.local("hostB", timeout=20)
    yield a, b
    a.close()
    b.close()


def open_dev(client: AgentClient, state_dir: Path, **options: Any) -> DeviceHandle:
    return DeviceHandle.open_sim(client, DRIVER, str(state_dir), {**OPTS, **options}, name="simv1", protocol="v1")


@pytest.fixture
def devs(agents: tuple[AgentClient, AgentClient], tmp_path: Path) -> Iterator[tuple[DeviceHandle, DeviceHandle]]:
    src, dst = open_dev(agents[0], tmp_path / "a"), open_dev(agents[1], tmp_path / "b")
    yield src, dst
    src.close()
    dst.close()


def window(dev: DeviceHandle, length: int) -> bytes:
    region = dev.migration_region()
    assert region is not None
    off = dev.v1_read("data_offset")
    out = dev.call("region_read", index=region["index"], offset=off, length=length)
    return base64.b64decode(out["data"])


def test_region_and_initial_state(agents: tuple[AgentClient, AgentClient], tmp_path: Path) -> None:
    """V1-R1, V1-R5, V1-R14 (with the mmappable window)."""
    dev = open_dev(agents[0], tmp_path, mmap=True)
    try:
        region = dev.migration_region()
        assert region is not None and region["index"] == 9
        assert {"READ", "WRITE", "CAPS", "MMAP"} <= set(region["flag_names"])
        assert [(c["id"], c.get("type"), c.get("subtype")) for c in region["caps"]] == [(2, 3, 1), (1, None, None)]
        assert region["caps"][1]["areas"] == [[4096, 8 << 10]]
        assert region["size"] >= 32 + (8 << 10)
        assert dev.v1_read("device_state") & 7 == uapi.V1_RUNNING
        offset = dev.v1_read("data_offset")
        assert offset >= 32 and offset % 4096 == 0
    finally:
        dev.close()


def test_field_widths_reserved_and_invalid_states(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """V1-R2, V1-R3, V1-R4, V1-R6."""
    dev, _ = devs
    for offset, width in ((0, 2), (8, 4), (2, 4), (12, 4)):
        with pytest.raises(AgentOSError) as exc:
            dev.call("v1_read", offset=offset, width=width)
        assert exc.value.errno == errno.EINVAL
    assert dev.v1_read("reserved") == 0
    dev.v1_write("reserved", 0xDEAD)
    assert dev.v1_read("reserved") == 0
    dev.v1_write("device_state", 0xA8 | uapi.V1_RUNNING)  # reserved bits set by the user
    assert dev.v1_read("device_state") == 0xA9
    dev.set_state("STOP")  # read-modify-write
    assert dev.v1_read("device_state") == 0xA8
    for bad in (5, 6, 7):
        with pytest.raises(AgentOSError) as exc:
            dev.v1_write("device_state", bad)
        assert exc.value.errno == errno.EINVAL
        assert dev.v1_read("device_state") == 0xA8
    with pytest.raises(AgentOSError):
        dev.v1_write("pending_bytes", 1)  # read-only


def test_save_iteration_is_stable(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """V1-R11, V1-R12, V1-R13 by hand, then V1-R15 and V1-R16 with the bytes."""
    src, dst = devs
    want = src.fill(seed=1)
    src.set_state("STOP_COPY")
    pending = src.v1_read("pending_bytes")
    assert pending > 0
    assert src.v1_read("pending_bytes") == pending  # no side effect
    chunks = []
    while pending:
        off = src.v1_read("data_offset")
        size = src.v1_read("data_size")
        assert (src.v1_read("data_offset"), src.v1_read("data_size")) == (off, size)
        first = window(src, size)
        assert window(src, size) == first
        chunks.append(first)
        pending = src.v1_read("pending_bytes")
    assert src.v1_read("pending_bytes") == 0
    src.set_state("STOP")
    assert all(len(c) <= 8 << 10 for c in chunks)
    dst.resume(iter(chunks))
    assert dst.digest() == want


def test_live_flow_and_round_trip_between_hosts(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """V1-R10: 001 -> 011 -> 010 with pending_bytes > 0, then 000; chunk boundaries kept (V1-R18)."""
    src, dst = devs
    want = src.fill(seed=2)
    src.set_state("PRE_COPY")
    assert src.v1_read("pending_bytes") > 0
    src.set_state("STOP_COPY")  # without draining
    reader = src.client.frames("v1_save", dev=src.handle)
    chunks = list(reader)
    assert reader.result is not None and reader.result.end == "done"
    src.set_state("STOP")
    res = dst.resume(iter(chunks))
    assert res.chunks == len(chunks) and dst.digest() == want
    # and host to host without holding the stream
    want = dst.fill(seed=3)
    dst.migrate_to(src, live=True)
    assert src.digest() == want and src.state() == "RUNNING" and dst.state() == "STOP"


def test_documented_flows(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    dev, _ = devs
    for flow in (["STOP"], ["STOP_COPY", "STOP"], ["PRE_COPY", "STOP_COPY", "STOP"], ["STOP", "STOP_COPY", "STOP"]):
        dev.reset()
        for state in flow:
            dev.set_state(state)
            assert dev.state() == state  # V1-R7
        dev.set_state("RUNNING")


def test_corrupted_resume_and_error_recovery(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    """V1-R17 + V1-R8; a fault to ERROR; V1-R9 and V1-R19 (reset ends the session)."""
    src, dst = devs
    want = src.fill(seed=4)
    chunks = list(src.save().chunks())
    broken = [*chunks[:-1], chunks[-1][:-8]]  # truncated: no complete END record
    with pytest.raises(AgentOSError) as exc:
        dst.resume(iter(broken))
    assert exc.value.errno == errno.EINVAL
    assert dst.state() in ("RESUMING", "ERROR")
    dst.reset()
    assert dst.state() == "RUNNING"
    dst.faults(transitions=[{"from": "RUNNING", "to": "STOP_COPY", "errno": "EIO", "error": True}])
    with pytest.raises(AgentOSError) as exc:
        dst.set_state("STOP_COPY")
    assert exc.value.errname == "EIO"
    assert dst.v1_read("device_state") & 7 == uapi.V1_ERROR
    for state in ("RUNNING", "STOP", "RESUMING"):
        with pytest.raises(AgentOSError):
            dst.set_state(state)
    dst.faults(clear=True)
    dst.reset()
    assert dst.state() == "RUNNING" and dst.v1_read("pending_bytes") == 0
    dst.resume(iter(chunks))
    assert dst.digest() == want


def test_failed_write_stays_in_prior_state(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    dev, _ = devs
    dev.faults(transitions=[{"from": "RUNNING", "to": "STOP", "errno": "EBUSY", "times": 1}])
    with pytest.raises(AgentOSError) as exc:
        dev.set_state("STOP")
    assert exc.value.errname == "EBUSY" and dev.state() == "RUNNING"
    dev.set_state("STOP")
    assert dev.state() == "STOP"


def test_resume_failure_to_error_option(agents: tuple[AgentClient, AgentClient], tmp_path: Path) -> None:
    dev = open_dev(agents[0], tmp_path, resume_failure="error")
    try:
        dev.set_state("RESUMING")
        with pytest.raises(AgentOSError):
            dev.set_state("RUNNING")  # nothing was written: truncated
        assert dev.state() == "ERROR"
        dev.reset()
        assert dev.state() == "RUNNING"
    finally:
        dev.close()


def test_read_fault_mid_save(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    src, _ = devs
    src.faults(read_after=20_000)
    src.set_state("STOP_COPY")
    reader = src.client.frames("v1_save", dev=src.handle)
    with pytest.raises(AgentOSError) as exc:
        reader.drain()
    assert exc.value.errname == "EIO" and exc.value.detail["bytes"] <= 20_000
    src.reset()
    assert src.state() == "RUNNING"


def test_transactions_follow_the_stream_and_replay_only_as_read(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    src, dst = devs
    src.fill(11)
    saved = src.save()
    sizes = [len(c) for c in saved.chunks()]
    window_size = OPTS["window"]
    # header (32), then each 16 KiB record in window-sized transactions and its remainder: never across a record
    assert sizes[0] == 32 and max(sizes) == window_size and len(set(sizes)) > 2, sizes
    merged = [b"".join(saved.chunks())[i : i + window_size] for i in range(0, saved.bytes, window_size)]
    with pytest.raises(AgentOSError) as exc:
        dst.resume(iter(merged))
    assert exc.value.errno == errno.EINVAL and "transaction" in str(exc.value)
    assert dst.state() == "RESUMING"
    dst.reset()
    result = dst.resume(saved)
    assert result.agent["sizes_sha256"] == saved.parts[0].agent["sizes_sha256"]
    assert dst.state() == "RUNNING" and dst.digest() == src.digest()


def test_without_pre_copy_data_011_is_accepted_and_empty(
    agents: tuple[AgentClient, AgentClient], tmp_path: Path
) -> None:
    dev = open_dev(agents[0], tmp_path / "np", pre_copy=False)
    try:
        dev.set_state("PRE_COPY")
        assert dev.v1_read("pending_bytes") == 0
        dev.set_state("STOP_COPY")
        assert dev.v1_read("pending_bytes") > 0
    finally:
        dev.close()


@pytest.mark.parametrize("name", sorted(n for n, d in CORRECT.items() if d.protocol == "v1"))
def test_correct_driver_with_and_without_pre_copy_passes_every_check(
    agents: tuple[AgentClient, AgentClient], tmp_path: Path, name: str
) -> None:
    for rule in sorted(r for r, c in CHECKS.items() if c.protocol == "v1"):
        run_check(agents[0], tmp_path / rule, CORRECT[name], rule)


def test_device_state_values_over_the_whole_field(devs: tuple[DeviceHandle, DeviceHandle]) -> None:
    dev = devs[0]
    for value in (8, 0x80000001, 0xFFFFFFF9):
        dev.reset()
        dev.v1_write("device_state", value)
        assert dev.v1_read("device_state") == value
    for value in (13, 0xFFFFFFFD, -1):
        dev.reset()
        with pytest.raises(AgentOSError):
            dev.v1_write("device_state", value)
        assert dev.v1_read("device_state") == uapi.V1_RUNNING
