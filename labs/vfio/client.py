"""Controller side of the device agent: start it, talk to it, stream through it.

    client = AgentClient.local()                       # a subprocess on this machine
    client = AgentClient.over_ssh(conn, python="python3")  # over a HostConnection
    dev = client.call("open", kind="sim", driver="labs.sim.v2:V2Driver", state_dir=...)["handle"]

Both start the agent the same way: `python3 -u -c BOOTSTRAP`, then the agent's
bundled source is sent on stdin (12 ASCII digits of length, then the bytes), so nothing
is installed on a host. Device errors come back as AgentOSError (tests assert on
errno); everything else that goes wrong (EOF, watchdog, garbage, a timeout) is
AgentInfraError, which reports classify as lab infrastructure.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from labs.errors import InfraError
from labs.vfio import agent as _agent
from labs.vfio.bundle import SHIPPED, bundle_source, module_path

if TYPE_CHECKING:
    import paramiko

    from labs.transport import HostConnection

FRAME = _agent.FRAME_HDR
GRACE = 5.0  # the agent's watchdog fires first; ours is the backstop for a dead link
BOOTSTRAP = """import os,sys
def _r(n):
    b=b''
    while len(b)<n:
        c=os.read(0,n-len(b))
        if not c:
            sys.exit(2)
        b+=c
    return b
_src=_r(int(_r(12)))
_g={'__name__':'labs_agent','__file__':'labs_agent.py'}
exec(compile(_src,'labs_agent.py','exec'),_g)
sys.exit(_g['main']())
"""


_bundle_lock = threading.Lock()
_bundled: dict[tuple[int, ...], bytes] = {}


def agent_source() -> bytes:
    """What a host runs: the agent with the modules it imports (labs/vfio/bundle.py), built once per version
    of its files. Under the lock: CPython 3.11.7's ast.parse is not thread-safe (the janitor opens hosts in threads)."""
    key = tuple(module_path(name).stat().st_mtime_ns for name in SHIPPED)
    with _bundle_lock:
        source = _bundled.get(key)
        if source is None:
            _bundled.clear()
            source = _bundled[key] = bundle_source()
    return source


def bootstrap_payload() -> bytes:
    src = agent_source()
    return b"%012d" % len(src) + src


def agent_command(python: str = "python3") -> str:
    return f"{python} -u -c {shlex.quote(BOOTSTRAP)}"


def labs_sys_path() -> str:
    """The sys.path entry under which `labs` is importable (for the agent's sim backend)."""
    return str(Path(_agent.__file__).resolve().parents[2])


def agent_sys_path(python_path: Iterable[str] = ()) -> list[str]:
    """The agent's sys.path entries: the labs checkout, then the host's inventory `python_path`."""
    return [labs_sys_path(), *python_path]


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


class AgentOSError(Exception):
    """The device (or the kernel) refused an operation with an errno."""

    def __init__(self, op: str, errno: int, errname: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(f"{op}: {errname} ({errno}): {message}")
        self.op = op
        self.errno = errno
        self.errname = errname
        self.message = message
        self.detail = detail or {}


class AgentInfraError(InfraError):
    """The agent session failed: EOF, watchdog, protocol error, or a client-side timeout."""


class AgentWatchdogError(AgentInfraError):
    """An operation made no progress for its timeout; the agent killed itself."""


class AgentProtocolError(AgentInfraError):
    """A malformed request or reply (a framework bug, not the device's)."""


# ---------------------------------------------------------------------------
# duplex byte pipes
# ---------------------------------------------------------------------------


class Duplex(ABC):
    """A bidirectional byte pipe to a running agent."""

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def read(self, n: int, timeout: float | None) -> bytes:
        """Up to n bytes; b"" at EOF; TimeoutError when nothing arrives in time."""

    @abstractmethod
    def close(self) -> None: ...

    def kill(self) -> None:
        self.close()

    def stderr_tail(self) -> str:
        return ""

    def hung_up(self) -> bool:
        """The link is gone (closed under us, e.g. its SSH connection ended): nothing written can arrive."""
        return False

    def describe(self) -> str:
        return type(self).__name__


class SubprocessDuplex(Duplex):
    """The agent as a local child process, started exactly as over SSH (bootstrap + source)."""

    def __init__(self, python: str = sys.executable, env: dict[str, str] | None = None) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the agent
        self.proc = subprocess.Popen(
            [python, "-u", "-c", BOOTSTRAP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin
        self._out = self.proc.stdout.fileno()
        self.write(bootstrap_payload())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def write(self, data: bytes) -> None:
        try:
            self._in.write(data)
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise EOFError(f"agent stdin closed: {exc}") from exc

    def read(self, n: int, timeout: float | None) -> bytes:
        ready, _, _ = select.select([self._out], [], [], timeout)
        if not ready:
            raise TimeoutError
        return os.read(self._out, n)

    def close(self) -> None:
        try:
            self._in.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_out()

    def _close_out(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        try:
            self._in.close()
        except OSError:
            pass
        self._close_out()

    def stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read()[-4000:].decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def describe(self) -> str:
        return f"local agent pid {self.proc.pid}"


class ChannelDuplex(Duplex):
    """A paramiko Channel running the bootstrap command (HostConnection.exec_channel)."""

    def __init__(self, channel: paramiko.Channel, send_source: bool = True, name: str = "ssh") -> None:
        self.chan = channel
        self.name = name
        self._err = bytearray()
        if send_source:
            self.write(bootstrap_payload())

    def write(self, data: bytes) -> None:
        try:
            self.chan.sendall(data)
        except OSError as exc:
            raise EOFError(f"channel closed: {exc}") from exc

    def hung_up(self) -> bool:
        transport = self.chan.get_transport()
        return self.chan.closed or transport is None or not transport.is_active()

    def read(self, n: int, timeout: float | None) -> bytes:
        self.chan.settimeout(timeout)
        data = bytes(self.chan.recv(n))  # socket.timeout is TimeoutError
        self._drain_stderr()
        return data

    def _drain_stderr(self) -> None:
        while self.chan.recv_stderr_ready():
            self._err += self.chan.recv_stderr(65536)
            del self._err[:-8000]

    def close(self) -> None:
        try:
            self.chan.shutdown_write()  # EOF on the agent's stdin: it closes everything and exits
            deadline = time.monotonic() + 5
            while not self.chan.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.02)
        except OSError:
            pass
        self.chan.close()

    def kill(self) -> None:
        self.chan.close()  # sshd hangs up the session; the agent sees EOF/SIGHUP

    def stderr_tail(self) -> str:
        try:
            self._drain_stderr()
        except OSError:
            pass
        return bytes(self._err[-4000:]).decode(errors="replace")

    def describe(self) -> str:
        return f"agent over {self.name}"


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


@dataclass
class StreamResult:
    """What a stream op moved: the agent's count and sha256, checked against ours."""

    bytes: int
    sha256: str
    end: str = ""  # data_read: eof | enomsg | limit; v1_save: done | limit | stalled
    chunks: int = 0  # frames (v1: chunks, with their boundaries)
    duration: float = 0.0
    agent: dict[str, Any] = field(default_factory=dict)

    @property
    def mbps(self) -> float:
        return self.bytes / self.duration / 1e6 if self.duration else 0.0


class FrameReader:
    """Iterates the frames of one FRAMES_OUT op; `.result` holds the reply after the end."""

    def __init__(self, client: AgentClient, op: str, args: dict[str, Any], timeout: float | None) -> None:
        self.client = client
        self.op = op
        self.timeout = timeout
        self.result: StreamResult | None = None
        self._hash = hashlib.sha256()
        self._count = 0
        self._frames = 0
        self._start = time.monotonic()
        self._done = False
        client._lock.acquire()
        try:
            self._id = client._send_request(op, args, timeout)
        except BaseException:
            client._lock.release()
            raise

    def __iter__(self) -> Iterator[bytes]:
        if self._done:
            return
        finished = False
        try:
            while True:
                frame = self.client._read_frame(self.timeout)
                if not frame:
                    break
                self._hash.update(frame)
                self._count += len(frame)
                self._frames += 1
                yield frame
            finished = True  # the end frame came: the reply (ok or errno) is all that is left
            reply = self.client._read_reply(self._id, self.op, self.timeout)
        finally:
            self._done = True
            if not finished and self.client.dead is None:
                # abandoned mid-stream: the rest of the frames are still on the wire
                self.client.dead = f"{self.op} stream abandoned"
            self.client._lock.release()
        self.result = _checked(self.op, reply, self._count, self._hash.hexdigest(), self._frames, self._start)

    def close(self) -> None:
        """Consume what is left (or give up the session) so the client can go on."""
        if not self._done:
            try:
                self.drain()
            except (AgentOSError, AgentInfraError):
                pass

    def drain(self) -> StreamResult:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


def _checked(op: str, res: dict[str, Any], count: int, sha: str, frames: int, start: float) -> StreamResult:
    # every stream op hashes what it moved, except blob (a bare link probe)
    if res.get("bytes") != count or res.get("sha256", sha) != sha:
        raise AgentProtocolError(f"{op}: agent says {res.get('bytes')} bytes {res.get('sha256')}, got {count} {sha}")
    return StreamResult(count, sha, str(res.get("end", "")), frames, time.monotonic() - start, res)


# ---------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------


class AgentClient:
    def __init__(
        self,
        duplex: Duplex,
        name: str = "agent",
        timeout: float = 60.0,
        sys_path: list[str] | None = None,
        hello: bool = True,
    ) -> None:
        self.duplex = duplex
        self.name = name
        self.timeout = timeout
        self.sys_path = sys_path if sys_path is not None else [labs_sys_path()]
        self._buf = bytearray()
        self._next_id = 1
        self._lock = threading.Lock()
        self.dead: str | None = None
        self.info: dict[str, Any] = {}
        if hello:
            self.info = self.call("hello", sys_path=self.sys_path, timeout_default=timeout)

    # -- construction --------------------------------------------------------------
    @classmethod
    def local(cls, name: str = "local", timeout: float = 60.0, env: dict[str, str] | None = None) -> AgentClient:
        return cls(SubprocessDuplex(env=env), name=name, timeout=timeout)

    @classmethod
    def over_ssh(
        cls,
        conn: HostConnection,
        python: str = "python3",
        sudo: bool | None = None,
        timeout: float = 60.0,
        sys_path: list[str] | None = None,
    ) -> AgentClient:
        chan = conn.exec_channel(agent_command(python), sudo=sudo)
        if sys_path is None:
            sys_path = agent_sys_path(getattr(conn.spec, "python_path", ()))
        return cls(ChannelDuplex(chan, name=conn.name), name=conn.name, timeout=timeout, sys_path=sys_path)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Polite shutdown (the agent closes every fd), then hang up."""
        if self.dead is None:
            try:
                self.call("shutdown", timeout=10)
            except (AgentInfraError, AgentOSError):
                pass
            self.dead = "closed"
        self.duplex.close()

    def kill(self) -> None:
        """Hang up without a word: the agent sees EOF and still closes everything."""
        self.dead = self.dead or "killed"
        self.duplex.kill()

    # -- wire ------------------------------------------------------------------------
    def _fail(self, message: str, cls: type[AgentInfraError] = AgentInfraError) -> AgentInfraError:
        self.dead = self.dead or message
        tail = self.duplex.stderr_tail().strip()
        return cls(f"{self.name}: {message}" + (f"\nagent stderr:\n{tail}" if tail else ""))

    def _fill(self, timeout: float | None) -> None:
        limit = None if timeout is None else timeout + GRACE
        try:
            data = self.duplex.read(1 << 20, limit)
        except TimeoutError:
            self.duplex.kill()
            raise self._fail(f"no reply for {limit}s; agent killed") from None
        except OSError as exc:
            raise self._fail(f"agent link failed: {exc}") from exc
        if not data:
            raise self._fail("agent exited (EOF)")
        self._buf += data

    def _readline(self, timeout: float | None) -> bytes:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                if line.strip():
                    return line
                continue
            self._fill(timeout)

    def _readexact(self, n: int, timeout: float | None) -> bytes:
        while len(self._buf) < n:
            self._fill(timeout)
        with memoryview(self._buf) as view:
            out = bytes(view[:n])  # one copy: a bytearray slice, then bytes(), would be two
        del self._buf[:n]
        return out

    def _read_frame(self, timeout: float | None) -> bytes:
        (n,) = FRAME.unpack(self._readexact(FRAME.size, timeout))
        if n > _agent.MAX_FRAME:
            raise self._fail(f"frame of {n} bytes: stream out of sync", AgentProtocolError)
        return self._readexact(n, timeout) if n else b""

    def _write(self, data: bytes) -> None:
        try:
            self.duplex.write(data)
        except (EOFError, OSError) as exc:
            raise self._fail(f"cannot write to agent: {exc}") from exc

    def _send_request(self, op: str, args: dict[str, Any], timeout: float | None) -> int:
        if self.dead is not None:
            raise AgentInfraError(f"{self.name}: agent session is gone ({self.dead})")
        req_id = self._next_id
        self._next_id += 1
        req = {"id": req_id, "op": op, "args": args, "timeout": timeout or self.timeout}
        self._write(json.dumps(req, separators=(",", ":")).encode() + b"\n")
        return req_id

    def _send_frame(self, data: bytes) -> None:
        self._write(FRAME.pack(len(data)) + data if len(data) < 65536 else FRAME.pack(len(data)))
        if len(data) >= 65536:
            self._write(data)

    def _read_reply(self, req_id: int, op: str, timeout: float | None) -> Any:
        line = self._readline(timeout or self.timeout)
        try:
            reply = json.loads(line)
        except ValueError:
            raise self._fail(f"garbage from agent: {line[:200]!r}", AgentProtocolError) from None
        if reply.get("fatal"):
            raise self._fail(str(reply.get("error", "agent died")), AgentWatchdogError)
        if reply.get("id") != req_id:
            raise self._fail(f"reply id {reply.get('id')} for request {req_id}", AgentProtocolError)
        if reply.get("ok"):
            return reply.get("result")
        if reply.get("errno") is None:
            raise AgentProtocolError(f"{self.name}: {op}: {reply.get('error')}")
        raise AgentOSError(op, reply["errno"], reply["errname"], reply.get("error", ""), reply.get("detail"))

    # -- requests ------------------------------------------------------------------
    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """One request, one reply. Device errnos raise AgentOSError."""
        if op == "hello" and "timeout_default" in args:
            args["timeout"] = args.pop("timeout_default")
        with self._lock:
            req_id = self._send_request(op, args, timeout)
            return self._read_reply(req_id, op, timeout)

    def ping(self) -> None:
        self.call("ping")

    def transcript(self, since: int = 0) -> list[dict[str, Any]]:
        return list(self.call("transcript", since=since))

    def transcript_seq(self) -> int:
        return int(self.call("transcript_seq")["seq"])

    def frames(self, op: str, timeout: float | None = None, **args: Any) -> FrameReader:
        """Start a FRAMES_OUT op; iterate the returned reader for its frames."""
        return FrameReader(self, op, args, timeout)

    def send_frames(self, op: str, chunks: Iterable[bytes], timeout: float | None = None, **args: Any) -> StreamResult:
        """A FRAMES_IN op: the request, one frame per chunk, the end frame, the reply.

        If `chunks` fails midway (say, the source of a copy), the agent still gets
        its end frame and replies, and the chunks' error is re-raised."""
        digest = hashlib.sha256()
        count = frames = 0
        start = time.monotonic()
        source_error: BaseException | None = None
        with self._lock:
            req_id = self._send_request(op, args, timeout)
            try:
                for chunk in chunks:
                    if chunk:
                        self._send_frame(chunk)
                        digest.update(chunk)
                        count += len(chunk)
                        frames += 1
            except AgentInfraError:
                raise
            except BaseException as exc:  # the producer failed: finish the request cleanly first
                source_error = exc
            self._send_frame(b"")
            try:
                res = self._read_reply(req_id, op, timeout)
            except AgentOSError:
                if source_error is not None:
                    raise source_error from None
                raise
        if source_error is not None:
            raise source_error
        return _checked(op, res, count, digest.hexdigest(), frames, start)

    # -- streaming helpers ------------------------------------------------------------
    def read_stream(
        self,
        fd: int,
        sink: IO[bytes] | Callable[[bytes], Any] | None = None,
        limit: int | None = None,
        chunk: int | None = None,
        timeout: float | None = None,
    ) -> tuple[StreamResult, bytes | None]:
        """data_read into a file/callable (returns None as data) or into memory (returns the bytes)."""
        args: dict[str, Any] = {"fd": fd, "limit": limit}
        if chunk:
            args["chunk"] = chunk
        reader = self.frames("data_read", timeout=timeout, **args)
        parts: list[bytes] = []
        for frame in reader:
            if sink is None:
                parts.append(frame)
            elif callable(sink):
                sink(frame)
            else:
                sink.write(frame)
        assert reader.result is not None
        return reader.result, (b"".join(parts) if sink is None else None)

    def write_stream(self, fd: int, chunks: Iterable[bytes], timeout: float | None = None) -> StreamResult:
        return self.send_frames("data_write", chunks, timeout=timeout, fd=fd)


@dataclass
class CopyResult:
    bytes: int
    sha256: str
    source: StreamResult
    destination: StreamResult
    duration: float

    @property
    def mbps(self) -> float:
        return self.bytes / self.duration / 1e6 if self.duration else 0.0


def copy_stream(
    src: AgentClient,
    src_fd: int,
    dst: AgentClient,
    dst_fd: int,
    limit: int | None = None,
    chunk: int | None = None,
    timeout: float | None = None,
) -> CopyResult:
    """Carry a saving stream from one host's data fd to another's, chunk by chunk.

    Nothing is held beyond one chunk in flight: the destination's frames are the
    source's frames as they arrive. Both ends' counts and sha256 must agree.
    """
    start = time.monotonic()
    if src is dst:
        # one agent cannot read and write at once: spool through a temporary file
        with tempfile.TemporaryFile() as spool:
            s, _ = src.read_stream(src_fd, spool, limit=limit, chunk=chunk, timeout=timeout)
            spool.seek(0)
            d = dst.write_stream(dst_fd, iter(lambda: spool.read(chunk or _agent.DEFAULT_CHUNK), b""), timeout)
    else:
        args: dict[str, Any] = {"fd": src_fd, "limit": limit}
        if chunk:
            args["chunk"] = chunk
        reader = src.frames("data_read", timeout=timeout, **args)
        try:
            d = dst.write_stream(dst_fd, reader, timeout=timeout)
            if reader.result is None:
                reader.drain()
        finally:
            reader.close()
        assert reader.result is not None
        s = reader.result
    if (s.bytes, s.sha256) != (d.bytes, d.sha256):
        raise AgentProtocolError(f"copy mismatch: read {s.bytes} {s.sha256}, wrote {d.bytes} {d.sha256}")
    return CopyResult(s.bytes, s.sha256, s, d, time.monotonic() - start)
