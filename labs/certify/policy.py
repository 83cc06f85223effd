"""Which spec rules and which scenarios a device must pass to be certified: the one place this is written down.

MUST rules fail certification when they fail, and leave it INCOMPLETE when
their tests did not run. SHOULD rules are reported but do not fail it.
Capability rules apply only when the device advertises the capability; a rule
that needs something the device lacks is "not applicable".

Required scenarios are VM-level tests every device of a class must have run and
passed: a scenario whose tests all skipped leaves the certificate INCOMPLETE,
naming the skip reason. A scenario is found in the Allure results by its
suite's feature label and its test's story label (labs.plugin.allure_hooks).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Level(StrEnum):
    MUST = "must"
    SHOULD = "should"


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
    # the vfio core's answer, not the driver's (the driver never sees the arc): reported, never a verdict's
    RulePolicy("V2-R12", Level.SHOULD),
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


@dataclass(frozen=True)
class ScenarioPolicy:
    scenario: str  # what the certificate calls it
    feature: str  # the suite's Allure feature label
    story: str  # the test's Allure story label: its name without test_, underscores as spaces
    needs: str | None = None  # a capability without which the scenario does not apply
    needs_reset: bool = False  # only a device that can be reset can be brought back from ERROR


SAVE, LIVE, RECOVERY = "Save and resume", "Live migration", "ERROR recovery"

# the same for every protocol and device kind: both protocols have an ERROR state only RESET leaves
SCENARIOS = [
    ScenarioPolicy("save/restore", SAVE, "save then restore"),
    ScenarioPolicy("managed save", SAVE, "managed save then start"),
    ScenarioPolicy("restore on the other host", SAVE, "restore on other host"),
    ScenarioPolicy("live migration both ways", LIVE, "migrate and back", needs="stop_copy"),
    ScenarioPolicy("fault: migration aborted mid-flight", LIVE, "abort mid flight", needs="stop_copy"),
    ScenarioPolicy("fault: destination QEMU killed", LIVE, "kill destination qemu", needs="stop_copy"),
    ScenarioPolicy("fault: migration link cut", LIVE, "cut migration link", needs="stop_copy"),
    ScenarioPolicy("fault: destination lacks the device", LIVE, "destination lacks device", needs="stop_copy"),
    ScenarioPolicy("fault: corrupt device stream on resume", SAVE, "corrupt resume stream refused"),
    ScenarioPolicy("ERROR recovery by reset", RECOVERY, "refused stream then reset", needs_reset=True),
    ScenarioPolicy("save/restore after recovery", RECOVERY, "vm save restore after recovery", needs_reset=True),
]


def scenarios_for(protocol: str) -> list[ScenarioPolicy]:
    return list(SCENARIOS) if protocol in POLICIES else []
