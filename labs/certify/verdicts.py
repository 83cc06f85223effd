"""From test results to one verdict per rule and per required scenario, under the certification policy."""

from __future__ import annotations

from dataclasses import dataclass

from labs.certify.policy import Level, RulePolicy, ScenarioPolicy
from labs.certify.results import TestResult

FAILED = ("failed", "broken")


@dataclass(frozen=True)
class RuleVerdict:
    rule: str
    level: str
    verdict: str  # pass | fail | not-run | not-applicable | not-tested
    reason: str
    tests: tuple[str, ...]

    @property
    def blocks(self) -> bool:
        """Does this verdict fail the certification?"""
        return self.level == Level.MUST and self.verdict == "fail"

    @property
    def missing(self) -> bool:
        """Does this verdict leave the certification incomplete?"""
        return self.level == Level.MUST and self.verdict in ("not-run", "not-tested")


@dataclass(frozen=True)
class ScenarioVerdict:
    scenario: str
    verdict: str  # pass | fail | not-run | not-applicable | not-tested
    reason: str
    tests: tuple[str, ...]

    @property
    def blocks(self) -> bool:
        return self.verdict == "fail"

    @property
    def missing(self) -> bool:
        return self.verdict in ("not-run", "not-tested")


def _skip_reasons(tests: list[TestResult]) -> str:
    reasons: dict[str, int] = {}
    for r in tests:
        reason = (r.message or "skipped").removeprefix("Skipped: ").splitlines()[0][:200]
        reasons[reason] = reasons.get(reason, 0) + 1
    return "; ".join(f"{n} skipped: {why}" for why, n in reasons.items())


def judge(policies: list[RulePolicy], results: list[TestResult], capabilities: set[str]) -> list[RuleVerdict]:
    out = []
    for policy in policies:
        tests = [r for r in results if policy.rule in r.rules]
        names = tuple(r.name for r in tests)
        if policy.needs and policy.needs not in capabilities:
            out.append(
                RuleVerdict(
                    policy.rule, policy.level, "not-applicable", f"device lacks capability {policy.needs}", names
                )
            )
            continue
        failed = [r for r in tests if r.status in FAILED]
        ran = [r for r in tests if r.status == "passed"]
        if failed:
            first = failed[0]
            out.append(RuleVerdict(policy.rule, policy.level, "fail", f"{first.name}: {first.message[:300]}", names))
        elif ran:
            out.append(RuleVerdict(policy.rule, policy.level, "pass", f"{len(ran)} test(s) passed", names))
        elif tests:
            out.append(RuleVerdict(policy.rule, policy.level, "not-run", _skip_reasons(tests), names))
        else:
            out.append(RuleVerdict(policy.rule, policy.level, "not-tested", "no test carries this rule id", names))
    return out


def judge_scenarios(
    policies: list[ScenarioPolicy], results: list[TestResult], capabilities: set[str], resettable: bool
) -> list[ScenarioVerdict]:
    """A required scenario passes only when every one of its tests ran and passed."""
    out = []
    for policy in policies:
        tests = [r for r in results if r.feature == policy.feature and r.story == policy.story]
        names = tuple(r.name for r in tests)
        failed = [r for r in tests if r.status in FAILED]
        skipped = [r for r in tests if r.status not in FAILED and r.status != "passed"]
        if policy.needs and policy.needs not in capabilities:
            verdict, reason = "not-applicable", f"device lacks capability {policy.needs}"
        elif policy.needs_reset and not resettable:
            verdict, reason = "not-applicable", "device cannot be reset (reset: none), so it cannot leave ERROR"
        elif failed:
            verdict, reason = "fail", f"{failed[0].name}: {failed[0].message[:300]}"
        elif skipped:
            verdict, reason = "not-run", _skip_reasons(skipped)
        elif tests:
            verdict, reason = "pass", f"{len(tests)} test(s) passed"
        else:
            verdict, reason = "not-tested", f"no test labelled {policy.feature} / {policy.story} in the results"
        out.append(ScenarioVerdict(policy.scenario, verdict, reason, names))
    return out
