"""One SSH connection per host per worker process.

pytest-xdist workers are separate processes; a forked child must not share its
parent's sockets, so the pool notices a new pid and starts afresh.
"""

from __future__ import annotations

import os
import threading

from labs.inventory import Inventory
from labs.inventory.models import Host, JumpHost
from labs.transport.ssh import HostConnection


class SSHPool:
    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self._pid = os.getpid()
        self._conns: dict[str, HostConnection] = {}
        self._lock = threading.RLock()

    def get(self, host: str) -> HostConnection:
        with self._lock:
            if os.getpid() != self._pid:
                self._conns = {}  # inherited across fork: never touch the parent's sockets
                self._pid = os.getpid()
            conn = self._conns.get(host)
            if conn is None:
                conn = self._make(host, self.inventory.host(host).spec)
                self._conns[host] = conn
            return conn

    def _make(self, name: str, spec: Host) -> HostConnection:
        t = self.inventory.settings.timeouts
        jump: HostConnection | None = None
        if isinstance(spec.jump, str):
            jump = self.get(spec.jump)
        elif isinstance(spec.jump, JumpHost):
            jump = self._make(f"{name}-jump", Host(**spec.jump.model_dump()))
        return HostConnection(
            name,
            spec,
            connect_timeout=t.connect,
            command_timeout=t.command,
            keepalive=self.inventory.settings.keepalive,
            jump=jump,
        )

    def close(self) -> None:
        with self._lock:
            if os.getpid() == self._pid:
                for conn in self._conns.values():
                    conn.close()
            self._conns = {}
