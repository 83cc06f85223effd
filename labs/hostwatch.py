"""After an infrastructure error, the hosts it touched get the doctor again before more work.

A test that ends in an infrastructure error (a hung agent killed by its watchdog,
a remote command past its timeout, a lost connection, libvirt failing, the test
itself past its pytest-timeout) makes its hosts suspects. The next test that
wants a suspect host first re-runs the doctor on it: a healthy host goes back to
work, an unhealthy one has the rest of its tests skipped with the doctor's
reason, and the run goes on with the other hosts.

The record lives in a small JSON file per run next to the run marks, under an
flock, so xdist workers of one run see each other's suspects and a host is
rechecked once per incident, not once per worker.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import libvirt
import paramiko

from labs.errors import InfraError
from labs.liveruns import RUNS_DIR

# What ends a test as "the lab broke", whatever the test was doing at the time.
INFRA_EXCEPTIONS: tuple[type[BaseException], ...] = (
    InfraError,
    libvirt.libvirtError,
    paramiko.SSHException,
    socket.timeout,
    TimeoutError,
    ConnectionError,
)
TIMEOUT_MESSAGE = "Timeout (>"  # how pytest-timeout's failure starts


class TestTimeout(InfraError):
    """The test ran past its per-test timeout (pytest-timeout), wherever it was."""

    __test__ = False  # not a test class, whatever pytest's collector thinks of the name


def infra_error(exc: BaseException | None) -> BaseException | None:
    """The infrastructure error that ended a test, or None for anything else (an assertion is a finding)."""
    if exc is None or isinstance(exc, AssertionError):
        return None
    if isinstance(exc, INFRA_EXCEPTIONS):
        return exc
    cause = exc.__cause__
    return cause if isinstance(cause, INFRA_EXCEPTIONS) else None


def infra_exception_names() -> list[str]:
    """Every infrastructure exception class by name (subclasses too), for matching report messages."""
    # the modules that define subclasses, loaded so that the list does not depend on what ran before
    import labs.reservations
    import labs.transport.ssh
    import labs.vfio.client  # noqa: F401

    names: set[str] = set()
    todo = list(INFRA_EXCEPTIONS)
    while todo:
        cls = todo.pop()
        if cls.__name__ not in names:
            names.add(cls.__name__)
            todo.extend(cls.__subclasses__())
    return sorted(names)


def is_pytest_timeout(exc: BaseException) -> bool:
    return type(exc).__name__ == "Failed" and str(exc).startswith(TIMEOUT_MESSAGE)


@dataclass(frozen=True)
class Recheck:
    host: str
    after: str  # the test whose infrastructure error made the host a suspect
    error: str
    problem: str | None  # the doctor's reason, or None: healthy again
    seconds: float

    @property
    def verdict(self) -> str:
        return f"unhealthy: {self.problem}" if self.problem else "healthy"

    def __str__(self) -> str:
        return f"{self.host}: rechecked after {self.after} ({self.error}): {self.verdict} ({self.seconds:.1f}s)"


class HostWatch:
    """The suspects and verdicts of one run, shared by its processes through `path`."""

    def __init__(self, run_id: str, runs_dir: Path = RUNS_DIR) -> None:
        self.path = runs_dir / f"{run_id}.health.json"
        self.rechecks: list[Recheck] = []  # the ones this process made
        self.infra_ended: list[tuple[str, str]] = []  # (test, error) seen by this process

    def _update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 1 << 20)
            data: dict[str, Any] = json.loads(raw) if raw.strip() else {}
            data.setdefault("suspects", {})
            data.setdefault("unhealthy", {})
            result = change(data)
            body = json.dumps(data).encode()
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, body)
            return result
        finally:
            os.close(fd)

    def suspect(self, hosts: list[str], test: str, error: BaseException) -> None:
        line = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        self.infra_ended.append((test, line))

        def mark(data: dict[str, Any]) -> None:
            for host in hosts:
                data["suspects"][host] = {"test": test, "error": line}

        self._update(mark)

    def unhealthy(self, host: str) -> str | None:
        """The doctor's reason this run's host takes no more work, if a recheck found one."""
        if not self.path.exists():  # the usual case: no infrastructure error so far
            return None
        problem = self._update(lambda data: data["unhealthy"].get(host))
        return str(problem) if problem else None

    def recheck_if_suspect(self, host: str, doctor: Callable[[str], str | None]) -> Recheck | None:
        """Run `doctor(host)` (the problem, or None) if the host is a suspect; once per incident, for the run."""
        if not self.path.exists():
            return None
        claim = self._update(lambda data: data["suspects"].pop(host, None))
        if claim is None:
            return None
        start = time.monotonic()
        try:
            problem = doctor(host)
        except Exception as exc:  # the doctor reports problems as checks; anything raised is a problem too
            problem = f"doctor failed: {exc}"
        found = Recheck(host, claim["test"], claim["error"], problem, time.monotonic() - start)
        self.rechecks.append(found)
        if problem:
            self._update(lambda data: data["unhealthy"].__setitem__(host, f"{problem} (after {claim['test']})"))
        return found

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        return {"infra_ended": self.infra_ended, "rechecks": [asdict(r) for r in self.rechecks]}
