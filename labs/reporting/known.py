"""Known issues: tracked driver bugs whose failures are shown as known, do not fail the gates, and are
reported as fixed when their tests pass again.

One YAML file per lab (`lab.known_issues`, relative to the inventory); an issue
can be narrowed to device models, so the same file serves a lab of several.
Allure shows them through its resolutions (an "issue" rule per known issue,
matched on the test cases this run's results of it have).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from labs.certify.results import TestResult
from labs.errors import ConfigError
from labs.inventory import Inventory
from labs.inventory.yamlsource import read_yaml
from labs.models import model_of

FAILED = ("failed", "broken")


class KnownIssue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][\w.-]*$")
    title: str = Field(min_length=1)
    link: str = Field(pattern=r"^https?://\S+$")
    models: tuple[str, ...] = ()  # inventory `model` keys or device model names; empty: every device
    tests: tuple[str, ...] = ()  # fnmatch patterns on the test name, e.g. "test_rule[V2-R16*"
    rules: tuple[str, ...] = ()  # spec rule ids

    @model_validator(mode="after")
    def _covers_something(self) -> KnownIssue:
        if not self.tests and not self.rules:
            raise ValueError("an issue needs 'tests' or 'rules' to say which failures it covers")
        return self

    def covers(self, result: TestResult, models: set[str]) -> bool:
        if self.models and not models & set(self.models):
            return False
        by_test = any(fnmatch.fnmatchcase(result.name, p) for p in self.tests)
        return by_test or bool(set(self.rules) & set(result.rules))


class KnownIssuesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    issues: tuple[KnownIssue, ...]


def load(path: Path) -> list[KnownIssue]:
    if not path.is_file():
        raise ConfigError(f"{path}: known issues file not found")
    doc = read_yaml(path)
    try:
        issues = list(KnownIssuesFile.model_validate(doc.data).issues)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise doc.error(tuple(err["loc"]), str(err["msg"]).removeprefix("Value error, ")) from None
    seen: set[str] = set()
    for i, issue in enumerate(issues):
        if issue.id in seen:
            raise doc.error(("issues", i, "id"), f"duplicate issue id {issue.id!r}")
        seen.add(issue.id)
    return issues


def for_inventory(inv: Inventory) -> list[KnownIssue]:
    name = inv.settings.known_issues
    return load(name if name.is_absolute() else inv.file.parent / name) if name is not None else []


@dataclass
class Seen:
    issue: KnownIssue
    failed: list[TestResult] = field(default_factory=list)
    passed: list[TestResult] = field(default_factory=list)

    @property
    def fixed(self) -> bool:
        """Its tests ran and none failed: the bug no longer reproduces here."""
        return bool(self.passed) and not self.failed


def classify(issues: list[KnownIssue], results: list[TestResult], inv: Inventory | None) -> list[Seen]:
    # an issue's `models` name pairing keys (inventory `model`) or device models (labs.models)
    models = {d.id: {d.spec.model_key, model_of(d).name} for d in inv.devices} if inv is not None else {}
    seen = [Seen(issue) for issue in issues]
    for r in results:
        result_models = {m for d in r.devices if d in models for m in models[d]}
        for s in seen:
            if s.issue.covers(r, result_models):
                if r.status in FAILED:
                    s.failed.append(r)
                elif r.status == "passed":
                    s.passed.append(r)
                break  # the first issue that covers a failure claims it
    return seen


def known_failures(seen: list[Seen]) -> list[TestResult]:
    return [r for s in seen for r in s.failed]


def lines(seen: list[Seen]) -> list[str]:
    out = []
    for s in seen:
        if s.failed:
            out.append(f"known issue {s.issue.id} ({s.issue.link}): {len(s.failed)} failed, {s.issue.title}")
        elif s.fixed:
            out.append(f"known issue {s.issue.id} looks fixed: its {len(s.passed)} test(s) passed ({s.issue.link})")
    return out


def allure_resolutions(seen: list[Seen]) -> dict[str, Any] | None:
    """Allure 3's resolutions: one "issue" rule per known issue that failed, on the test cases it covered."""
    links: dict[str, Any] = {}
    rules = []
    for s in seen:
        case_ids = sorted({r.test_case_id for r in s.failed if r.test_case_id})
        if not case_ids:
            continue
        # Allure builds the link from a template with one %s and the issue id: split the link at its last / or =
        cut = max(s.issue.link.rfind("/"), s.issue.link.rfind("=")) + 1
        kind, tail = f"known-{len(links)}", s.issue.link[cut:] or s.issue.id
        name = "%s" if tail == s.issue.id else f"{s.issue.id} #%s"
        links[kind] = {"urlTemplate": s.issue.link[:cut] + "%s", "nameTemplate": name}
        issue = {"id": tail, "type": kind}
        rules.append({"resolution": "issue", "issue": issue, "testCaseId": case_ids})
    return {"links": links, "rules": rules} if rules else None
