"""Expected lifecycle event sequences, matched against what one connection delivered for one domain.

A sequence is a pattern over `event/detail` tokens of the run-state events
(started, suspended, resumed, stopped, crashed), matched whole: `ev` is one
token (a regular expression over its name, `stopped/(failed|crashed)`), `opt`
an optional group, `many` one or more, `seq` a concatenation. Definition events (defined,
undefined) say nothing about where the VM runs and are left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from labs.virt.events import DomainEvent

RUN_STATE_EVENTS = ("started", "suspended", "resumed", "stopped", "crashed")


@dataclass(frozen=True)
class EventPattern:
    regex: str  # over tokens each followed by ";"
    text: str  # for messages

    def __str__(self) -> str:
        return self.text or "no events"

    def matches(self, events: Sequence[DomainEvent]) -> bool:
        return re.fullmatch(self.regex, "".join(f"{t};" for t in tokens(events))) is not None


def tokens(events: Sequence[DomainEvent]) -> list[str]:
    return [f"{e.event}/{e.detail}" for e in events if e.event in RUN_STATE_EVENTS]


def ev(token: str) -> EventPattern:
    return EventPattern(f"(?:{token});", token)


def seq(*parts: EventPattern) -> EventPattern:
    return EventPattern("".join(p.regex for p in parts), " ".join(p.text for p in parts if p.text))


def opt(*parts: EventPattern) -> EventPattern:
    inner = seq(*parts)
    return EventPattern(f"(?:{inner.regex})?", f"[{inner.text}]")


def many(*parts: EventPattern) -> EventPattern:
    """One or more times (libvirt may queue a resume both from QEMU's RESUME event and from its own job)."""
    inner = seq(*parts)
    return EventPattern(f"(?:{inner.regex})+", f"({inner.text})+")


NOTHING = EventPattern("", "")

# A completed live migration: the source pauses for the switchover and stops as migrated; the destination's
# incoming QEMU starts (paused) and resumes
MIGRATED_SOURCE = seq(ev("suspended/migrated"), ev("stopped/migrated"))
MIGRATED_DESTINATION = seq(ev("started/migrated"), many(ev("resumed/migrated")))
# libvirt's resume of a failed job's source can reach QEMU while it still finishes the job ("Migration is not
# finalized yet"): libvirt marks the guest paused by an API error, then QEMU's own restart resumes it
LOST_RESUME = "suspended/api_error"
# A failed one that the source survives: paused for the switchover at most, then resumed; the incoming
# QEMU, if it was started, is stopped again (never resumed)
FAILED_SOURCE = opt(ev("suspended/migrated"), opt(ev(LOST_RESUME)), many(ev("resumed/(migrated|unpaused)")))
FAILED_DESTINATION = opt(ev("started/migrated"), ev("stopped/(failed|crashed|destroyed)"))
