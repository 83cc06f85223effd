"""Domain lifecycle events: one libvirt event loop per process, one log per host.

libvirt delivers events (and keepalives on remote connections) only while some
thread runs its event loop, and the default implementation must be registered
before the first connection that wants events is opened.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import libvirt

_loop_lock = threading.Lock()
_loop_started = False

# libvirt's enum values in the order libvirt numbers them (virDomainEventType)
EVENT_NAMES = (
    "defined",
    "undefined",
    "started",
    "suspended",
    "resumed",
    "stopped",
    "shutdown",
    "pmsuspended",
    "crashed",
)
# Every detail name libvirt-python knows (virDomainEvent*DetailType), e.g. ("resumed", 0): "unpaused"
DETAILS = {
    (event, value): const[len(f"VIR_DOMAIN_EVENT_{event.upper()}_") :].lower()
    for event in EVENT_NAMES
    for const, value in vars(libvirt).items()
    if const.startswith(f"VIR_DOMAIN_EVENT_{event.upper()}_") and not const.endswith("_LAST")
}


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once per process)."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


@dataclass(frozen=True)
class DomainEvent:
    time: float
    host: str
    domain: str
    event: str
    detail: str

    def __str__(self) -> str:
        return f"{self.host}/{self.domain}: {self.event} ({self.detail})"


class EventLog:
    """Every lifecycle event of one connection, kept in order; scenarios read the slice they care about."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._events: list[DomainEvent] = []
        self._lock = threading.Condition()
        self._callback_id: int | None = None

    def attach(self, conn: libvirt.virConnect) -> None:
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
        )

    def detach(self, conn: libvirt.virConnect) -> None:
        if self._callback_id is not None:
            try:
                conn.domainEventDeregisterAny(self._callback_id)
            except libvirt.libvirtError:
                pass
            self._callback_id = None

    def _on_lifecycle(self, _conn: object, dom: libvirt.virDomain, event: int, detail: int, _opaque: object) -> None:
        name = EVENT_NAMES[event] if 0 <= event < len(EVENT_NAMES) else str(event)
        ev = DomainEvent(time.time(), self.host, dom.name(), name, DETAILS.get((name, detail), str(detail)))
        with self._lock:
            self._events.append(ev)
            self._lock.notify_all()

    def since(self, mark: int, domain: str | None = None) -> list[DomainEvent]:
        with self._lock:
            return [e for e in self._events[mark:] if domain is None or e.domain == domain]

    def mark(self) -> int:
        with self._lock:
            return len(self._events)

    def wait_for(self, domain: str, event: str, since: int = 0, timeout: float = 10.0) -> DomainEvent | None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for e in self._events[since:]:
                    if e.domain == domain and e.event == event:
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._lock.wait(left)
