"""One test per spec rule and device: the checks of labs.conformance.checks on the lab's devices.

A v1 rule is generated for v1 devices only (and v2 likewise); a rule that needs
a capability skips devices lacking it, naming the capability; a rule that needs
fault knobs runs on simulated devices only, and one that sends a request that
hangs real kernels without FIX-2026 (V2-R12) skips a real device whose kernel is
not known to carry the fix, naming the kernel. The test id and the `rule` label
carry the rule id.
"""

from __future__ import annotations

import pytest

from labs.conformance.checks import Check, checks_for
from suites.conformance.conftest import LabCheckContext

pytestmark = [pytest.mark.conformance]


def _params(protocol: str) -> list[object]:
    out: list[object] = []
    for check in checks_for(protocol):
        marks = [pytest.mark.rule(check.rule)]
        if check.sim:
            marks.append(pytest.mark.sim_only(check.sim))
        if check.requires:
            marks.append(pytest.mark.requires(*check.requires))
        out.append(pytest.param(check, id=check.rule, marks=marks))
    return out


@pytest.mark.protocol("v1")
@pytest.mark.parametrize("check", _params("v1"))
def test_v1_rule(ctx: LabCheckContext, check: Check) -> None:
    check(ctx)


@pytest.mark.protocol("v2")
@pytest.mark.parametrize("check", _params("v2"))
def test_v2_rule(ctx: LabCheckContext, check: Check) -> None:
    check(ctx)
