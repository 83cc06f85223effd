"""Every step of a scenario, recorded: a list for the test and its report, an Allure step when Allure runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from labs.attachments import attach, step


@dataclass
class StepRecord:
    title: str
    started: float
    duration: float = 0.0
    ok: bool = True
    error: str | None = None
    detail: dict[str, Any] | None = None


class StepLog:
    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    @contextmanager
    def step(self, title: str) -> Iterator[StepRecord]:
        rec = StepRecord(title, time.time())
        self.records.append(rec)
        start = time.monotonic()
        with step(title):
            try:
                yield rec
            except BaseException as exc:
                rec.ok = False
                rec.error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                rec.duration = time.monotonic() - start

    def titles(self) -> list[str]:
        return [r.title for r in self.records]

    def attach(self, name: str = "scenario steps") -> None:
        if self.records:
            attach(name, [asdict(r) for r in self.records], "json")
