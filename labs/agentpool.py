"""Device agents on lab hosts, pooled per session: the glue between LabSession and labs.vfio.

Starting an agent costs an SSH exec plus sending its source; a nightly run opens
devices thousands of times, so agents are kept per host and lent out one borrower
at a time (a stream on one channel cannot interleave with another caller's
requests). A borrowed agent that died is dropped, never returned to the pool.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from weakref import WeakKeyDictionary

from labs.attachments import attach
from labs.doctor import FlagsMismatch
from labs.errors import InfraError, LabError
from labs.inventory import LabDevice
from labs.reservations import ReservationBusy, reserve
from labs.session import LabSession
from labs.vfio import uapi
from labs.vfio.client import AgentClient, AgentInfraError, AgentOSError
from labs.vfio.device import DeviceHandle


class AgentPool:
    """Idle agents per host for one session (and one process: a fork gets a fresh pool)."""

    def __init__(self, session: LabSession) -> None:
        self.session = session
        self.pid = os.getpid()
        self._idle: dict[str, list[AgentClient]] = {}
        self._lock = threading.Lock()
        self.started = 0  # agents started over the pool's life (a figure for `lab bench`)

    def _start(self, host: str) -> AgentClient:
        spec = self.session.inventory.host(host).spec
        timeout = self.session.inventory.settings.timeouts.agent_op
        self.started += 1
        return AgentClient.over_ssh(self.session.ssh(host), python=spec.python, timeout=timeout)

    @contextmanager
    def borrow(self, host: str) -> Iterator[AgentClient]:
        with self._lock:
            idle = self._idle.setdefault(host, [])
            client = idle.pop() if idle else None
        if client is not None and client.dead is None and client.duplex.hung_up():
            client.kill()  # its SSH connection ended while it idled: a borrower would write into nothing
            client = None
        if client is None or client.dead:
            client = self._start(host)
        try:
            yield client
        finally:
            if client.dead:
                client.kill()
            else:
                with self._lock:
                    self._idle.setdefault(host, []).append(client)

    def drop(self, host: str) -> None:
        """Forget the host's idle agents (after an infrastructure error there): the next borrower starts afresh."""
        with self._lock:
            clients = self._idle.pop(host, [])
        self._shut(clients)

    def close(self) -> None:
        with self._lock:
            clients = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        self._shut(clients)

    @staticmethod
    def _shut(clients: list[AgentClient]) -> None:
        for client in clients:
            try:
                client.close()
            except LabError:
                client.kill()


_pools: WeakKeyDictionary[LabSession, AgentPool] = WeakKeyDictionary()
_pools_lock = threading.Lock()


def agent_pool(session: LabSession) -> AgentPool:
    with _pools_lock:
        pool = _pools.get(session)
        if pool is None or pool.pid != os.getpid():
            pool = AgentPool(session)
            _pools[session] = pool
            session.on_close(pool.close)
        return pool


@contextmanager
def agent_for(session: LabSession, host: str) -> Iterator[AgentClient]:
    """A host's agent, exclusively yours until the block ends."""
    with agent_pool(session).borrow(host) as client:
        yield client


@contextmanager
def open_device(session: LabSession, device: LabDevice) -> Iterator[DeviceHandle]:
    """An inventory device opened through a pooled agent; closed (fds and all) at the end."""
    with agent_for(session, device.host.name) as client:
        handle = DeviceHandle.open(client, device.spec, name=device.spec.label)
        first = client.transcript_seq()
        try:
            yield handle
        finally:
            if not client.dead:
                try:
                    handle.close()
                    # the report shows what this test asked of the device, not the pooled agent's past
                    attach(f"agent transcript {device.id}", client.transcript(since=first), "json")
                except (AgentOSError, AgentInfraError):
                    # an agent that cannot close a device is not lent out again
                    client.kill()


def migration_probe(session: LabSession, device: LabDevice) -> str:
    """What the device says about its migration support, checked against the inventory's claims.

    The device is reserved for the probe like for a test: a device another run holds is busy, not
    broken (opening it under that run's feet would fail with EBUSY, or worse, disturb its test)."""
    try:
        held = reserve(
            session.ssh(device.host.name),
            device,
            session.run_id,
            wait=0,
            expires_in=session.inventory.settings.timeouts.test,
        )
    except ReservationBusy as exc:
        return f"not probed: {exc}"
    try:
        return _probe(session, device)
    finally:
        held.release()


def _probe(session: LabSession, device: LabDevice) -> str:
    try:
        with open_device(session, device) as dev:
            if dev.protocol == "v1":
                region = dev.migration_region()
                if region is None:
                    raise FlagsMismatch("no v1 migration region (type 3 subtype 1) in the region-info chain")
                state = dev.state()
                return f"v1 region {region.get('index')} ({region.get('size')} bytes), device_state {state}"
            flags = dev.mig_flags
            names = uapi.migration_flag_names(flags)
            missing = [c.value for c in device.spec.capabilities if not dev.supports(c.value)]
            if missing:
                raise FlagsMismatch(
                    f"inventory lists {', '.join(missing)} but the device reports flags {flags} ({'|'.join(names)})"
                )
            return f"v2 flags {flags} ({'|'.join(names)}), state {dev.state()}"
    except AgentOSError as exc:
        raise InfraError(f"{exc.op} failed: {exc.errname} ({exc.message})") from None
