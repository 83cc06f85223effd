"""Where a run's time went, by kind of step, read from its Allure results: each test's top-level steps
(migrations, VM starts, readbacks...), the rest of its body, and its fixtures' setup and teardown.

Written for the nested suites, whose time is the CI's (any Allure results directory works):
`lab bench --only phases` reads the last nested run's (reports/nested/allure, which `tox -e nested`
writes), so each CI log says where that time went.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

# first match wins; a step's name starts with what the scenario did (labs.scenarios)
PHASES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("migration jobs", r"^migrate "),
        ("VM starts", r"^start "),
        ("VM defines", r"^define "),
        ("readbacks", r"^readback"),
        ("guest reads", r"^guest "),
        ("device probes", r"^probe "),
        ("saves", r"^(managed )?save "),
        ("restores", r"^restore "),
        ("fault inject and undo", r"^(fault |undo )"),
        ("waits", r"^wait "),
    )
)
OTHER_STEPS = "other steps"
OUTSIDE_STEPS = "test bodies outside steps"


def phase_of(step_name: str) -> str:
    return next((name for name, pattern in PHASES if pattern.search(step_name)), OTHER_STEPS)


def _seconds(item: dict[str, Any]) -> float:
    return max(0, int(item.get("stop") or 0) - int(item.get("start") or 0)) / 1000


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a result file cut short by a killed run: the others still count
    return data if isinstance(data, dict) else None


def time_by_phase(results: Path) -> dict[str, Any]:
    """Seconds and counts by phase, by test file, and for fixtures, from one Allure results directory."""
    phases: defaultdict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()
    by_file: defaultdict[str, float] = defaultdict(float)
    starts: list[int] = []
    stops: list[int] = []
    tests = 0
    body = 0.0
    for path in sorted(results.glob("*-result.json")):
        result = _read(path)
        if result is None or "start" not in result:
            continue
        tests += 1
        seconds = _seconds(result)
        body += seconds
        starts.append(int(result["start"]))
        stops.append(int(result.get("stop") or result["start"]))
        by_file[str(result.get("fullName", "?")).split("#")[0]] += seconds
        in_steps = 0.0
        for step in result.get("steps") or []:
            phase, step_s = phase_of(str(step.get("name", ""))), _seconds(step)
            phases[phase] += step_s
            counts[phase] += 1
            in_steps += step_s
        phases[OUTSIDE_STEPS] += max(0.0, seconds - in_steps)
    fixtures = {"setup": 0.0, "teardown": 0.0}
    for path in sorted(results.glob("*-container.json")):
        container = _read(path) or {}
        for key, kind in (("befores", "setup"), ("afters", "teardown")):
            for fixture in container.get(key) or []:
                fixtures[kind] += _seconds(fixture)
    return {
        "results": str(results),
        "tests": tests,
        "wall_s": round((max(stops) - min(starts)) / 1000, 1) if starts else 0.0,
        "test_bodies_s": round(body, 1),
        "fixtures_s": {k: round(v, 1) for k, v in fixtures.items()},
        "phases": {k: {"s": round(v, 1), "count": counts[k]} for k, v in _longest_first(phases)},
        "by_file": {k: round(v, 1) for k, v in _longest_first(by_file)},
    }


def _longest_first(seconds: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(seconds.items(), key=lambda kv: -kv[1])


def phase_rows(found: dict[str, Any], top: int = 6) -> list[tuple[str, str]]:
    """Two table rows: the phases that took longest, and the test files that did."""
    if not found.get("tests"):
        return []
    phases = ", ".join(
        f"{name} {p['s']:.0f} s" + (f" ({p['count']})" if p["count"] else "")
        for name, p in list(found["phases"].items())[:top]
    )
    fx = found["fixtures_s"]
    files = ", ".join(f"{name.rsplit('.', 1)[-1]} {s:.0f} s" for name, s in list(found["by_file"].items())[:top])
    return [
        (
            f"time by phase, {found['tests']} tests in {found['wall_s']:.0f} s ({found['results']})",
            f"{phases}; fixtures: setup {fx['setup']:.0f} s, teardown {fx['teardown']:.0f} s",
        ),
        ("time by test file, same run", files),
    ]
