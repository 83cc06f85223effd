"""Quality gates: what makes a run red besides pytest's exit status, from the inventory's `lab.gates`.

Evaluated here from the run's Allure results rather than by Allure's own
quality gate: `allure generate` (3.18) does not evaluate it, `allure
quality-gate` only prints, and it has no rule for "no test passed", for a
failing MUST rule without a JS filter, or for the run's wall time (its
maxDuration is per test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from labs.certify.policy import POLICIES, Level
from labs.certify.results import TestResult
from labs.inventory.models import Gates

FAILED = ("failed", "broken")
# the keys that are gates of their own (the other regression_* keys tune regression_pct)
GATE_KEYS = ("min_passed", "min_tests", "max_failures", "must_rules", "max_duration_s", "regression_pct")
MUST_RULES = frozenset(p.rule for rules in POLICIES.values() for p in rules if p.level == Level.MUST)


@dataclass(frozen=True)
class GateFailure:
    gate: str  # the lab.gates key
    detail: str

    def line(self) -> str:
        return f"gate lab.gates.{self.gate} failed: {self.detail}"


def evaluate(
    gates: Gates, results: list[TestResult], seconds: float, known: list[TestResult] | None = None
) -> list[GateFailure]:
    """`known`: failures a known issue covers (labs.reporting.known); they fail no gate."""
    passed = sum(r.status == "passed" for r in results)
    failed = [r for r in results if r.status in FAILED and r not in (known or [])]
    out = []
    if passed < gates.min_passed:
        skipped = sum(r.status == "skipped" for r in results)
        detail = f"{passed} passed of {len(results)} ({skipped} skipped), at least {gates.min_passed} required"
        out.append(GateFailure("min_passed", detail))
    if len(results) < gates.min_tests:
        out.append(GateFailure("min_tests", f"{len(results)} tests, the lab expects at least {gates.min_tests}"))
    if len(failed) > gates.max_failures:
        detail = f"{len(failed)} failed or broken outside known issues, at most {gates.max_failures} allowed"
        out.append(GateFailure("max_failures", detail))
    if gates.must_rules:
        broken_rules: dict[str, str] = {}
        for r in failed:
            for rule in r.rules:
                if rule in MUST_RULES:
                    broken_rules.setdefault(rule, r.name)
        if broken_rules:
            shown = ", ".join(f"{rule} ({name})" for rule, name in sorted(broken_rules.items()))
            out.append(GateFailure("must_rules", f"MUST rule failing: {shown}"))
    if gates.max_duration_s is not None and seconds > gates.max_duration_s:
        detail = f"the run took {seconds:.0f} s, at most {gates.max_duration_s:.0f} s allowed"
        out.append(GateFailure("max_duration_s", detail))
    return out


def allure_results(gates: Gates, failures: list[GateFailure], environment: str | None = None) -> list[dict[str, Any]]:
    """Every gate the lab sets, passed or failed, as Allure 3 quality-gate results (its report's tab)."""
    failed: dict[str, list[str]] = {}
    for f in failures:
        failed.setdefault(f.gate, []).append(f.detail)
    settings = gates.model_dump()
    # a minimum of 0 and a switched-off or unset gate check nothing
    active = {k: settings[k] for k in GATE_KEYS if settings[k] is not None and settings[k] is not False}
    active = {k: v for k, v in active.items() if not (k.startswith("min_") and v == 0)}
    out = []
    for key, expected in active.items():
        details = failed.pop(key, [])
        message = "; ".join(details) or "passed"
        rec: dict[str, Any] = {"success": not details, "rule": f"lab.gates.{key}", "expected": expected}
        rec |= {"actual": message, "message": message, "testResults": []}
        out.append(rec | ({"environment": environment} if environment else {}))
    return out
