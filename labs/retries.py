"""Retries of lab infrastructure (SSH, libvirt connections), with a record of each one.

Only connection-level failures are retried: nothing here wraps an assertion or a
device operation, whose failure is a finding. Every retry is recorded, so a test
that passed only on its second connection attempt says so in its report and the
run's summary counts them per host.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

T = TypeVar("T")

ATTEMPTS = 3
WAIT_MIN = 0.5
WAIT_MAX = 4.0


@dataclass(frozen=True)
class RetryEvent:
    when: float
    host: str
    what: str
    attempt: int  # the attempt that failed, from 1
    error: str
    wait_s: float

    def __str__(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.when))
        failed = f"attempt {self.attempt} failed ({self.error})"
        return f"{stamp} {self.host}: {self.what}: {failed}; retry in {self.wait_s:.1f}s"


_events: list[RetryEvent] = []
_lock = threading.Lock()


def mark() -> int:
    """A position in the record; `since(mark)` gives what was retried after it."""
    with _lock:
        return len(_events)


def since(position: int) -> list[RetryEvent]:
    with _lock:
        return list(_events[position:])


def record(event: RetryEvent) -> None:
    with _lock:
        _events.append(event)


def retrying(
    host: str,
    what: str,
    call: Callable[[], T],
    retry_on: Callable[[BaseException], bool],
    *,
    attempts: int = ATTEMPTS,
    before_retry: Callable[[], None] | None = None,
) -> T:
    """`call()`, again with exponential backoff while it raises what `retry_on` accepts; the last error is raised."""

    def note(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        record(RetryEvent(time.time(), host, what, state.attempt_number, str(exc), float(wait)))
        if before_retry is not None:
            before_retry()

    for attempt in Retrying(
        retry=retry_if_exception(retry_on),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=WAIT_MIN, max=WAIT_MAX),
        before_sleep=note,
        reraise=True,
    ):
        with attempt:
            return call()
    raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

