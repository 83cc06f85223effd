"""The agent process itself: protocol, watchdog, cleanup on every exit path, transcript."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from labs.vfio import agent, hostsys
from labs.vfio.client import (
    AgentClient,
    AgentInfraError,
    AgentOSError,
    AgentProtocolError,
    AgentWatchdogError,
    SubprocessDuplex,
    agent_command,
    copy_stream,
)
from labs.vfio.device import DeviceHandle
from tests.conftest import FOREVER_S, HANG_S

V2 = "labs.sim.v2:V2Driver"


def test_hello_and_transcript() -> None:
    with AgentClient.local("h") as client:
        info = client.info
        assert info["protocol"] == agent.PROTOCOL_VERSION and info["pid"] != os.getpid()
        assert info["arch"] == os.uname().machine
        client.ping()
        with pytest.raises(AgentOSError) as exc:
            client.call("device_info", dev=99)
        assert exc.value.errname == "EBADF"
        lines = client.transcript()
        assert [t["op"] for t in lines] == ["hello", "ping", "device_info"]
        assert lines[2]["ok"] is False and lines[2]["errname"] == "EBADF" and lines[2]["duration"] >= 0


def test_the_agent_widens_its_stdout_pipe_to_a_whole_frame() -> None:
    """A frame fits in the pipe: the device's next read overlaps the sending of the one before."""
    with AgentClient.local("w") as client:
        assert client.info["pipe_bytes"] == agent.PIPE_BYTES
    left, right = socket.socketpair()
    with left, right:
        agent.widen_pipe(left.fileno())
        assert agent.pipe_size(left.fileno()) is None  # not a pipe: left as it is


def test_transcript_cursor_survives_a_long_lived_agent() -> None:
    """A pooled agent serves many tests: each asks only for what came after its cursor."""
    with AgentClient.local("t") as client:
        client.call("ping")
        cursor = client.transcript_seq()
        client.ping()
        client.ping()
        mine = client.transcript(since=cursor)
        assert [t["op"] for t in mine] == ["ping", "ping"] and mine[0]["seq"] == cursor


def test_protocol_errors_keep_the_session() -> None:
    with AgentClient.local("p") as client:
        with pytest.raises(AgentProtocolError):
            client.call("no_such_op")
        with pytest.raises(AgentProtocolError):
            client.call("open")  # missing "kind"
        # a frames-in op that fails before reading its frames still drains them
        with pytest.raises(AgentOSError) as exc:
            client.send_frames("data_write", [b"x" * 100_000, b"y" * 10], fd=12345)
        assert exc.value.errname == "EBADF"
        client.ping()


def test_watchdog_kills_a_stuck_op() -> None:
    client = AgentClient.local("w")
    duplex = client.duplex
    assert isinstance(duplex, SubprocessDuplex)
    start = time.monotonic()
    with pytest.raises(AgentWatchdogError, match="no progress"):
        client.call("sleep", seconds=FOREVER_S, timeout=0.3)
    assert time.monotonic() - start < HANG_S  # the watchdog ended it, not the sleep
    assert duplex.proc.wait(timeout=HANG_S) == 3
    with pytest.raises(AgentInfraError):
        client.ping()
    client.close()


def test_watchdog_in_sim_driver_releases_the_device(tmp_path: Path) -> None:
    client = AgentClient.local("w2")
    dev = DeviceHandle.open_sim(client, V2, str(tmp_path), name="d")
    with pytest.raises(AgentWatchdogError):
        client.call("sim_control", dev=dev.handle, action="sleep", params={"seconds": 30}, timeout=0.3)
    client.close()
    with AgentClient.local("again") as other:
        DeviceHandle.open_sim(other, V2, str(tmp_path), name="d").close()


def test_device_is_exclusive_and_released_on_eof(tmp_path: Path) -> None:
    """A second open gets EBUSY; a controller that vanishes leaves nothing open."""
    first = AgentClient.local("first")
    dev = DeviceHandle.open_sim(first, V2, str(tmp_path), {"pre_copy": True}, name="d")
    fd = dev.set_state("PRE_COPY")
    assert fd is not None
    with AgentClient.local("second") as second:
        with pytest.raises(AgentOSError) as exc:
            DeviceHandle.open_sim(second, V2, str(tmp_path), name="d")
        assert exc.value.errname == "EBUSY"
        duplex = first.duplex
        assert isinstance(duplex, SubprocessDuplex) and duplex.proc.stdin is not None
        duplex.proc.stdin.close()  # the controller vanished: no shutdown op, only EOF
        assert duplex.proc.wait(timeout=HANG_S) == 0
        first.kill()
        again = DeviceHandle.open_sim(second, V2, str(tmp_path), name="d")
        assert again.state() == "RUNNING"
        with pytest.raises(AgentOSError) as exc:  # in-process second open too
            DeviceHandle.open_sim(second, V2, str(tmp_path), name="d")
        assert exc.value.errname == "EBUSY"
        again.close()
        DeviceHandle.open_sim(second, V2, str(tmp_path), name="d").close()


@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_signals_close_everything(tmp_path: Path, how: str) -> None:
    client = AgentClient.local("t")
    DeviceHandle.open_sim(client, V2, str(tmp_path), name="d")
    assert isinstance(client.duplex, SubprocessDuplex)
    getattr(client.duplex.proc, how)()
    client.duplex.proc.wait(timeout=HANG_S)
    client.kill()
    with AgentClient.local("u") as other:
        DeviceHandle.open_sim(other, V2, str(tmp_path), name="d").close()


def test_copy_within_one_agent(tmp_path: Path) -> None:
    """Two devices on one host: the copy spools (one agent cannot read and write at once)."""
    with AgentClient.local("one") as client:
        a = DeviceHandle.open_sim(client, V2, str(tmp_path / "a"), {"content_size": 300_000}, name="a")
        b = DeviceHandle.open_sim(client, V2, str(tmp_path / "b"), {"content_size": 300_000}, name="b")
        want = a.fill(seed=9)
        src, dst = a.set_state("STOP_COPY"), b.set_state("RESUMING")
        assert src is not None and dst is not None
        result = copy_stream(client, src, client, dst, chunk=50_000)
        assert result.bytes == a.sim("stream_length")["length"]
        b.set_state("RUNNING")
        assert b.digest() == want


def test_blob_stream_and_limits() -> None:
    with AgentClient.local("b") as client:
        reader = client.frames("blob", length=3_000_000, chunk=1 << 20)
        assert sum(len(f) for f in reader) == 3_000_000
        assert reader.result is not None and reader.result.chunks == 3


def test_real_backend_without_vfio() -> None:
    """On a host without this device the real path fails with the kernel's errno, not a crash."""
    with AgentClient.local("r") as client:
        with pytest.raises(AgentOSError) as exc:
            client.call("open", kind="pci", address="0000:ff:1f.7", path="group")
        assert exc.value.errname == "ENOENT"


def test_agent_module_imports_in_process() -> None:
    assert hostsys.RealSys().name == "real"
    assert "python3 -u -c" in agent_command()


def test_kmsg_cursor_reads_only_later_records() -> None:
    with AgentClient.local("kmsg") as client:
        start = client.call("kmsg", after=-1)
        if start["seq"] is None:
            pytest.skip(f"/dev/kmsg not readable here: {start['error']}")
        assert start["lines"] == []
        later = client.call("kmsg", after=start["seq"] - 2, limit=1)
        assert later["seq"] >= start["seq"] and len(later["lines"]) == 1
        assert later["lines"][0].startswith("[")


def test_locks_are_held_until_unlock_or_exit(tmp_path: Path) -> None:
    env = {"LABS_SIM_DIR": str(tmp_path), "LABS_SIM_HOST": "h"}
    with AgentClient.local("l1", env=env) as one, AgentClient.local("l2", env=env) as two:
        assert one.call("lock", name="dev", owner={"run": "r1"})["locked"]
        busy = two.call("lock", name="dev", owner={"run": "r2"})
        assert not busy["locked"] and '"run": "r1"' in busy["owner"]
        one.call("unlock", name="dev")
        assert two.call("lock", name="dev", owner={"run": "r2"})["locked"]
    assert not list((tmp_path / "hosts" / "h" / "locks").glob("*.owner"))  # exiting agents leave no record
