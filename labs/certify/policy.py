"""Which spec rules a device must pass to be certified: the one place this is written down.

MUST rules fail certification when they fail. SHOULD rules are reported but do
not fail it. Capability rules apply only when the device advertises the
capability; a rule that needs something the device lacks is "not applicable".
Simulator-only rules (requests that hang real kernels) never count for a real
device.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Level(StrEnum):
    MUST = "must"
    SHOULD = "should"
    SIM_ONLY = "sim-only"


@dataclass(frozen=True)
class RulePolicy:
    rule: str
    level: Level
    needs: str | None = None  # a capability that makes the rule applicable


V1 = [
    RulePolicy("V1-R1", Level.MUST),
    RulePolicy("V1-R2", Level.SHOULD),  # the spec words it as SHOULD fail
    RulePolicy("V1-R3", Level.MUST),
    RulePolicy("V1-R4", Level.MUST),
    RulePolicy("V1-R5", Level.MUST),
    RulePolicy("V1-R6", Level.MUST),
    RulePolicy("V1-R7", Level.MUST),
    RulePolicy("V1-R8", Level.MUST),
    RulePolicy("V1-R9", Level.MUST),
    RulePolicy("V1-R10", Level.MUST),
    RulePolicy("V1-R11", Level.MUST),
    RulePolicy("V1-R12", Level.MUST),
    RulePolicy("V1-R13", Level.MUST),
    RulePolicy("V1-R14", Level.MUST),
    RulePolicy("V1-R15", Level.MUST),
    RulePolicy("V1-R16", Level.MUST),
    RulePolicy("V1-R17", Level.MUST),
    RulePolicy("V1-R18", Level.MUST),  # checks our own agent: it must keep chunk boundaries
    RulePolicy("V1-R19", Level.SHOULD),  # explicit only in the later clarification text
]

V2 = [
    RulePolicy("V2-R1", Level.MUST),
    RulePolicy("V2-R2", Level.MUST),
    RulePolicy("V2-R3", Level.MUST),
    RulePolicy("V2-R4", Level.MUST),
    RulePolicy("V2-R5", Level.SHOULD),  # derived from the core's loop, not stated
    RulePolicy("V2-R6", Level.MUST),
    RulePolicy("V2-R7", Level.MUST),
    RulePolicy("V2-R8", Level.MUST, needs="pre_copy"),
    RulePolicy("V2-R9", Level.MUST),
    RulePolicy("V2-R10", Level.MUST, needs="pre_copy"),
    RulePolicy("V2-R11", Level.MUST, needs="pre_copy"),
    RulePolicy("V2-R12", Level.SIM_ONLY),
    RulePolicy("V2-R13", Level.MUST),
    RulePolicy("V2-R14", Level.MUST),
    RulePolicy("V2-R15", Level.MUST),
    RulePolicy("V2-R16", Level.MUST),
    RulePolicy("V2-R17", Level.MUST),
    RulePolicy("V2-R18", Level.SHOULD),
    RulePolicy("V2-R19", Level.MUST),
    RulePolicy("V2-R20", Level.MUST, needs="dirty_logging"),
]

POLICIES = {"v1": V1, "v2": V2}


def policy_for(protocol: str) -> list[RulePolicy]:
    return POLICIES[protocol]
