"""Read a run's Allure results back: one record per test, latest attempt wins."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TestResult:
    name: str
    full_name: str
    status: str  # passed | failed | broken | skipped
    message: str
    rules: tuple[str, ...]
    feature: str
    parameters: dict[str, str] = field(default_factory=dict)
    duration_ms: int = 0
    story: str = ""
    devices: tuple[str, ...] = ()  # the lab_device labels: the device under test, known even when skipped
    test_case_id: str = ""


def read_results(results_dir: Path) -> list[TestResult]:
    latest: dict[str, tuple[int, TestResult]] = {}
    for path in sorted(results_dir.glob("*-result.json")):
        data = json.loads(path.read_text())
        labels = data.get("labels", [])
        rules = tuple(str(lb["value"]) for lb in labels if lb.get("name") == "rule")
        feature = next((str(lb["value"]) for lb in labels if lb.get("name") == "feature"), "")
        story = next((str(lb["value"]) for lb in labels if lb.get("name") == "story"), "")
        devices = tuple(str(lb["value"]) for lb in labels if lb.get("name") == "lab_device")
        params = {str(p["name"]): _unquote(str(p["value"])) for p in data.get("parameters", [])}
        result = TestResult(
            name=str(data.get("name", "")),
            full_name=str(data.get("fullName", data.get("name", ""))),
            status=str(data.get("status", "unknown")),
            message=str((data.get("statusDetails") or {}).get("message", "")).strip(),
            rules=rules,
            feature=feature,
            parameters=params,
            duration_ms=int(data.get("stop", 0)) - int(data.get("start", 0)),
            story=story,
            devices=devices,
            test_case_id=str(data.get("testCaseId", "")),
        )
        key = str(data.get("historyId") or result.full_name + json.dumps(params, sort_keys=True))
        stop = int(data.get("stop", 0))
        if key not in latest or latest[key][0] <= stop:
            latest[key] = (stop, result)
    return [r for _, r in sorted(latest.values(), key=lambda x: x[1].full_name)]


def _unquote(value: str) -> str:
    """allure-pytest stores a string parameter as its repr ('hostA:simv2' with the quotes)."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value
