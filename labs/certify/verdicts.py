"""From test results to one verdict per rule, under the certification policy."""

from __future__ import annotations

from dataclasses import dataclass

from labs.certify.policy import Level, RulePolicy
from labs.certify.results import TestResult


@dataclass(frozen=True)
class RuleVerdict:
    rule: str
    level: str
    verdict: str  # pass | fail | not-applicable | not-tested
    reason: str
    tests: tuple[str, ...]

    @property
    def blocks(self) -> bool:
        """Does this verdict fail the certification?"""
        return self.level == Level.MUST and self.verdict in ("fail", "not-tested")


def judge(
    policies: list[RulePolicy], results: list[TestResult], capabilities: set[str], simulated: bool
) -> list[RuleVerdict]:
    out = []
    for policy in policies:
        tests = [r for r in results if policy.rule in r.rules]
        names = tuple(r.name for r in tests)
        if policy.level == Level.SIM_ONLY and not simulated:
            out.append(
                RuleVerdict(policy.rule, policy.level, "not-applicable", "sent only to simulated devices", names)
            )
            continue
        if policy.needs and policy.needs not in capabilities:
            out.append(
                RuleVerdict(
                    policy.rule, policy.level, "not-applicable", f"device lacks capability {policy.needs}", names
                )
            )
            continue
        failed = [r for r in tests if r.status in ("failed", "broken")]
        ran = [r for r in tests if r.status == "passed"]
        if failed:
            first = failed[0]
            out.append(RuleVerdict(policy.rule, policy.level, "fail", f"{first.name}: {first.message[:300]}", names))
        elif ran:
            out.append(RuleVerdict(policy.rule, policy.level, "pass", f"{len(ran)} test(s) passed", names))
        elif tests:
            reason = tests[0].message or "skipped"
            out.append(RuleVerdict(policy.rule, policy.level, "not-applicable", reason[:300], names))
        else:
            out.append(RuleVerdict(policy.rule, policy.level, "not-tested", "no test carries this rule id", names))
    return out
