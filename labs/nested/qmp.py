"""A minimal QMP client for a nested host's QEMU: its unix socket, one command at a time."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from labs.errors import InfraError


class Qmp:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise InfraError(f"QMP {path}: {exc}") from None
        self.reader = self.sock.makefile("r", encoding="utf-8")
        self._read()  # the greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise InfraError(f"QMP {self.path}: QEMU closed the socket")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def command(self, name: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "error" in reply:
                raise InfraError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
            if "return" in reply:
                return reply["return"]
            # anything else is an asynchronous event: not the answer

    def wait_migration(self, timeout: float) -> dict[str, Any]:
        """Poll query-migrate until the outgoing migration completes; raise when it fails or takes too long."""
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.command("query-migrate")
            state = info.get("status")
            if state == "completed":
                return info
            if state in ("failed", "cancelled"):
                raise InfraError(f"QMP {self.path}: migration {state}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise InfraError(f"QMP {self.path}: migration still {state} after {timeout:g}s")
            time.sleep(0.1)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
