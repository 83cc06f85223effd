"""pytest's JUnit XML, read once for everyone: each test case, its properties, and each failure or error it had."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    kind: str  # "failure" (the test) or "error" (its setup or teardown)
    message: str
    text: str  # the traceback pytest wrote

    @property
    def first_line(self) -> str:
        said = (self.message or self.text).strip().splitlines()
        return said[0] if said else ""


@dataclass(frozen=True)
class Case:
    nodeid: str
    properties: tuple[tuple[str, str], ...]
    skipped: bool
    problems: tuple[Problem, ...]  # failures first, then errors: a teardown error after a failure is a second one

    def values(self, name: str) -> list[str]:
        return sorted({v for k, v in self.properties if k == name})


def cases(path: Path) -> list[Case]:
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        problems = tuple(
            Problem(bad.tag, bad.get("message") or "", bad.text or "")
            for bad in (*case.findall("failure"), *case.findall("error"))
        )
        out.append(
            Case(
                nodeid=f"{case.get('classname', '')}::{case.get('name', '')}",
                properties=tuple((p.get("name", ""), p.get("value", "")) for p in case.iter("property")),
                skipped=case.find("skipped") is not None,
                problems=problems,
            )
        )
    return out
