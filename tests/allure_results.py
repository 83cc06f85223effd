"""Reading a run's Allure results back: each test's steps and attachments, its fixtures' included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def results(alluredir: Path) -> dict[str, dict[str, Any]]:
    """Each test's result document, by test name."""
    out = {}
    for path in alluredir.glob("*-result.json"):
        doc = json.loads(path.read_text())
        out[doc["name"]] = doc
    return out


def _walk(node: dict[str, Any]) -> tuple[list[str], list[str]]:
    steps, attachments = [], [a["name"] for a in node.get("attachments", [])]
    for child in node.get("steps", []):
        steps.append(child["name"])
        more_steps, more_attachments = _walk(child)
        steps += more_steps
        attachments += more_attachments
    return steps, attachments


Evidence = dict[str, tuple[list[str], list[str]]]


def evidence(alluredir: Path, phases: tuple[str, ...] = ("befores", "afters")) -> Evidence:
    """(step names, attachment names) per test name, with those of its fixtures' `phases`: fixture setup
    is in the containers' "befores", teardown (where a scenario gathers its evidence) in their "afters"."""
    fixtures: dict[str, list[dict[str, Any]]] = {}
    for path in alluredir.glob("*-container.json"):
        doc = json.loads(path.read_text())
        for child in doc.get("children", []):
            fixtures.setdefault(child, []).extend(f for phase in phases for f in doc.get(phase, []))
    out = {}
    for name, doc in results(alluredir).items():
        steps, attachments = _walk(doc)
        for fixture in fixtures.get(doc["uuid"], []):
            more_steps, more_attachments = _walk(fixture)
            steps, attachments = steps + more_steps, attachments + more_attachments
        out[name] = (steps, attachments)
    return out
