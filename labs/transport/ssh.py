"""One SSH connection to one lab host: commands with timeouts, SFTP, channels.

Remote commands run under coreutils `timeout`, which puts the command in its own
process group and kills the whole group at the deadline; closing our channel
alone would leave the remote process running. The controller keeps its own,
slightly later deadline in case the host is too broken to honour the first.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from labs import retries
from labs.errors import CommandTimeout, InfraError, SSHError
from labs.inventory.models import Host, JumpHost
from labs.transport import hostkeys

log = logging.getLogger(__name__)

TIMEOUT_EXIT = 124  # coreutils timeout: the command ran out of time
KILLED_EXIT = 137  # 128 + SIGKILL: it ignored SIGTERM and `-k` killed it
KILL_GRACE = 3.0
CONTROLLER_GRACE = KILL_GRACE + 5.0
EOF_GRACE = 5.0  # after the exit status, for the output behind it
NO_CLIENT_REKEY = 1 << 62  # bytes and packets: paramiko never starts a key exchange itself
NETWORK_ERRORS = (paramiko.SSHException, EOFError, OSError, socket.error)


class CommandFailed(InfraError):
    def __init__(self, result: Result) -> None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        super().__init__(f"{result.host}: exit {result.exit_status}: {result.command}: {' | '.join(tail)}")
        self.result = result


class HostKeyError(SSHError):
    """The host presented a key we do not trust."""


class AuthFailed(SSHError):
    """The host refused our credentials: another attempt would be refused too."""


class ConnectionLost(SSHError):
    """The connection dropped while a non-idempotent command was in flight."""


def _worth_reconnecting(exc: BaseException) -> bool:
    """A refused, dropped or timed-out connection may work next time; a wrong host key never will."""
    return isinstance(exc, SSHError) and not isinstance(exc, (HostKeyError, AuthFailed))


@dataclass(frozen=True)
class Result:
    host: str
    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def check(self) -> Result:
        if not self.ok:
            raise CommandFailed(self)
        return self


@dataclass(frozen=True)
class Endpoint:
    """Where and how to log in; a lab host or a jump host."""

    name: str
    spec: Host | JumpHost

    @property
    def where(self) -> str:
        return f"{self.spec.user}@{self.spec.address}:{self.spec.port}"


def _transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """paramiko's transport as ours differ from its defaults."""
    transport = paramiko.Transport(sock, **kwargs)
    opts = transport.get_security_options()
    # AES-GCM first, the rest as paramiko orders them: no HMAC and no Python-level MAC compare per packet, so
    # paramiko's thread spends a third less CPU per byte (docs/nested-findings.md, "The SSH stream")
    opts.ciphers = tuple(sorted(opts.ciphers, key=lambda name: not name.endswith("-gcm@openssh.com")))
    # paramiko's own rekey (every 2**29 bytes) deadlocks its thread on a channel closing mid-exchange and ends
    # the connection (paramiko#822); the server rekeys by its cipher's limit, as it does for an OpenSSH client
    transport.packetizer.REKEY_BYTES = transport.packetizer.REKEY_PACKETS = NO_CLIENT_REKEY
    return transport


class HostConnection:
    """A lazily opened, self-healing SSH connection to one host."""

    def __init__(
        self,
        name: str,
        spec: Host,
        *,
        connect_timeout: float = 15.0,
        command_timeout: float = 120.0,
        keepalive: float = 15.0,
        jump: HostConnection | None = None,
    ) -> None:
        self.endpoint = Endpoint(name, spec)
        self.spec = spec
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.keepalive = keepalive
        self.jump = jump
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.endpoint.name

    def __repr__(self) -> str:
        return f"HostConnection({self.name} {self.endpoint.where})"

    # -- connection -------------------------------------------------------
    def client(self) -> paramiko.SSHClient:
        with self._lock:
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return self._client
                self._drop()
            # a host that is rebooting, or an sshd at its MaxStartups limit, answers the next attempt
            self._client = retries.retrying(self.name, "ssh connect", self._connect, _worth_reconnecting)
            return self._client

    def _connect(self) -> paramiko.SSHClient:
        spec = self.spec
        client = paramiko.SSHClient()
        hostkeys.configure(client, spec.host_key_policy, spec.known_hosts)
        sock = None
        if self.jump is not None:
            try:
                sock = self.jump.client().get_transport().open_channel(  # type: ignore[union-attr]
                    "direct-tcpip", (spec.address, spec.port), ("127.0.0.1", 0), timeout=self.connect_timeout
                )
            except NETWORK_ERRORS as exc:
                via = f"jump through {self.jump.name} to {self.endpoint.where}"
                raise SSHError(f"{self.name}: {via} failed: {exc}") from exc
        passphrase = None
        if isinstance(spec, Host) and spec.identity_passphrase_env:
            passphrase = os.environ.get(spec.identity_passphrase_env)
        try:
            client.connect(
                spec.address,
                port=spec.port,
                username=spec.user,
                key_filename=str(spec.identity_file.expanduser()) if spec.identity_file else None,
                passphrase=passphrase,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                sock=sock,
                transport_factory=_transport,
                allow_agent=spec.identity_file is None,
                look_for_keys=spec.identity_file is None,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"{self.name}: host key mismatch for {self.endpoint.where} "
                f"(got {exc.key.get_name()} {exc.key.get_fingerprint().hex()}); refusing to connect"
            ) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise AuthFailed(f"{self.name}: {self.endpoint.where} refused our credentials: {exc}") from None
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise HostKeyError(
                    f"{self.name}: {self.endpoint.where} is not in {hostkeys.known_hosts_path(spec.known_hosts)} "
                    "(strict host-key checking; set host_key_policy: accept-new to pin it on first use)"
                ) from None
            raise SSHError(f"{self.name}: ssh to {self.endpoint.where} failed: {exc}") from None
        except OSError as exc:
            client.close()
            raise SSHError(f"{self.name}: cannot reach {self.endpoint.where}: {exc}") from None
        transport = client.get_transport()
        if transport is not None and self.keepalive:
            transport.set_keepalive(max(1, int(self.keepalive)))
        log.debug("connected to %s (%s)", self.name, self.endpoint.where)
        return client

    def _drop(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- commands ---------------------------------------------------------
    def wrap(self, command: str, timeout: float, sudo: bool | None = None) -> str:
        wrapped = f"timeout -k {KILL_GRACE:g} {timeout:g} sh -c {shlex.quote(command)}"
        use_sudo = self.spec.sudo if sudo is None else sudo
        if use_sudo and self.spec.user != "root":
            wrapped = f"sudo -n -- {wrapped}"
        return wrapped

    def run(
        self,
        command: str,
        timeout: float | None = None,
        *,
        idempotent: bool = False,
        sudo: bool | None = None,
        stdin: bytes | None = None,
        check: bool = False,
    ) -> Result:
        """Run `command` in a shell on the host; kill it (and its children) at `timeout`."""
        limit = self.command_timeout if timeout is None else timeout
        wrapped = self.wrap(command, limit, sudo)
        if idempotent:
            result = self._retrying(lambda: self._run_once(command, wrapped, limit, stdin))
        else:
            result = self._run_once(command, wrapped, limit, stdin)
        return result.check() if check else result

    def _retrying(self, call: Callable[[], Result]) -> Result:
        # Only an idempotent command may run twice; the connection is rebuilt before the next attempt.
        # A connect that failed was retried in client() already: retrying it here too would multiply the
        # attempts (and a dead host's connect timeouts).
        return retries.retrying(
            self.name, "command", call, lambda e: isinstance(e, ConnectionLost), attempts=4, before_retry=self.close
        )

    def _run_once(self, command: str, wrapped: str, limit: float, stdin: bytes | None) -> Result:
        client = self.client()  # (re)connecting here is always safe: nothing was sent yet
        start = time.monotonic()
        try:
            chan = client.get_transport().open_session(timeout=self.connect_timeout)  # type: ignore[union-attr]
        except NETWORK_ERRORS as exc:
            self.close()
            raise ConnectionLost(f"{self.name}: cannot open a session: {exc}") from exc
        out, err = bytearray(), bytearray()
        try:
            chan.settimeout(0.2)
            chan.exec_command(wrapped)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            deadline = start + limit + CONTROLLER_GRACE
            while True:
                _drain(chan, out, err)
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    text = out.decode(errors="replace"), err.decode(errors="replace")
                    raise CommandTimeout(self.name, command, limit, *text)
            # sshd sends the exit status as the command ends, some output maybe still in the pipe: EOF comes last
            _read_to_eof(chan, out, err, EOF_GRACE)
            status = chan.recv_exit_status()
            if status == -1:  # paramiko: the channel closed without an exit status
                raise ConnectionLost(f"{self.name}: connection lost while running: {command}")
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.close()
            raise ConnectionLost(f"{self.name}: connection lost while running {command!r}: {exc}") from exc
        finally:
            chan.close()
        duration = time.monotonic() - start
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if status in (TIMEOUT_EXIT, KILLED_EXIT) and duration >= limit:
            raise CommandTimeout(self.name, command, limit, stdout, stderr)
        return Result(self.name, command, status, stdout, stderr, duration)

    def exec_channel(self, command: str, sudo: bool | None = None) -> paramiko.Channel:
        """A raw channel running `command` (no timeout wrapper): the agent's pipe."""
        use_sudo = self.spec.sudo if sudo is None else sudo
        if use_sudo and self.spec.user != "root":
            command = f"sudo -n -- {command}"
        try:
            chan = self.client().get_transport().open_session(timeout=self.connect_timeout)  # type: ignore[union-attr]
            chan.exec_command(command)
        except NETWORK_ERRORS as exc:
            self.close()
            raise SSHError(f"{self.name}: cannot start {command!r}: {exc}") from exc
        return chan

    # -- files ------------------------------------------------------------
    def put(self, local: str | Path, remote: str, mode: int | None = None) -> None:
        with self.client().open_sftp() as sftp:
            sftp.put(str(local), remote)
            if mode is not None:
                sftp.chmod(remote, mode)

    def get(self, remote: str, local: str | Path) -> None:
        with self.client().open_sftp() as sftp:
            sftp.get(remote, str(local))

    def put_bytes(self, data: bytes, remote: str, mode: int | None = None) -> None:
        with self.client().open_sftp() as sftp:
            with sftp.open(remote, "wb") as f:
                f.write(data)
            if mode is not None:
                sftp.chmod(remote, mode)


def _read_to_eof(chan: paramiko.Channel, out: bytearray, err: bytearray, grace: float) -> None:
    """The output that came after the exit status, up to the channel's EOF; `grace` seconds at most (a child the
    command left holding its stdout keeps the channel open)."""
    end = time.monotonic() + grace
    while time.monotonic() < end:
        try:
            data: bytes | None = chan.recv(65536)  # waits the channel's timeout at most
        except TimeoutError:
            data = None
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        if data == b"":  # EOF (or the channel closed): nothing more comes
            return
        out += data or b""


def _drain(chan: paramiko.Channel, out: bytearray, err: bytearray) -> None:
    got = False
    while chan.recv_ready():
        out += chan.recv(65536)
        got = True
    while chan.recv_stderr_ready():
        err += chan.recv_stderr(65536)
        got = True
    if not got:
        # Wait for the next packet without spinning; the 0.2 s channel timeout bounds it.
        chan.status_event.wait(0.05)
