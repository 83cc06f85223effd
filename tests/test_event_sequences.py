"""Expected lifecycle event sequences of migrations, and the leg checks that use them."""

from __future__ import annotations

import libvirt

from labs.faults import DestinationLacksDevice, IncompatibleDestinationMdev
from labs.faults.base import Fault
from labs.scenarios.faulted import expectation
from labs.scenarios.migration import FAILED, MIGRATED, Leg
from labs.scenarios.readback import Readback, SideView
from labs.virt.events import DETAILS, DomainEvent
from labs.virt.migrate import MigrationResult
from labs.virt.sequence import FAILED_DESTINATION, FAILED_SOURCE, MIGRATED_DESTINATION, MIGRATED_SOURCE


def events(host: str, *tokens: str) -> list[DomainEvent]:
    return [DomainEvent(float(i), host, "d", *t.split("/")) for i, t in enumerate(tokens)]


def test_a_completed_migration_pauses_and_stops_the_source_and_resumes_the_destination() -> None:
    assert MIGRATED_SOURCE.matches(events("A", "suspended/migrated", "stopped/migrated"))
    assert MIGRATED_SOURCE.matches(events("A", "suspended/migrated", "undefined/removed", "stopped/migrated"))
    assert not MIGRATED_SOURCE.matches(events("A", "suspended/migrated", "resumed/migrated"))
    assert not MIGRATED_SOURCE.matches(events("A", "stopped/migrated"))
    assert MIGRATED_DESTINATION.matches(events("B", "started/migrated", "resumed/migrated"))
    assert not MIGRATED_DESTINATION.matches(events("B", "started/migrated", "stopped/failed"))


def test_a_failed_migration_leaves_the_source_running_and_stops_the_incoming_domain() -> None:
    assert FAILED_SOURCE.matches([])
    assert FAILED_SOURCE.matches(events("A", "suspended/migrated", "resumed/migrated"))
    assert not FAILED_SOURCE.matches(events("A", "suspended/migrated")), "a source left paused passed"
    assert not FAILED_SOURCE.matches(events("A", "stopped/crashed"))
    assert FAILED_DESTINATION.matches([])
    assert FAILED_DESTINATION.matches(events("B", "started/migrated", "stopped/failed"))
    assert not FAILED_DESTINATION.matches(events("B", "started/migrated")), "an incoming domain left started passed"
    assert not FAILED_DESTINATION.matches(events("B", "started/migrated", "resumed/migrated"))


def _leg(ok: bool, src: list[DomainEvent], dst: list[DomainEvent], fault: Fault | None = None) -> Leg:
    sides = [SideView("A", "absent" if ok else "running"), SideView("B", "running" if ok else "absent")]
    result = MigrationResult("A", "B", "d", ok=ok, error=None if ok else "failed")
    expect = expectation(fault) if fault is not None else None
    return Leg("A", "B", result, Readback("d", sides), expect, {"source": src, "destination": dst})


def test_a_leg_checks_each_sides_events_against_its_expectation() -> None:
    good = _leg(
        True, events("A", "suspended/migrated", "stopped/migrated"), events("B", "started/migrated", "resumed/migrated")
    )
    assert good.expectation is MIGRATED and good.problems == []
    bad = _leg(True, events("A", "suspended/migrated"), events("B", "started/migrated", "resumed/migrated"))
    assert bad.problems == [
        "A (source) delivered lifecycle events suspended/migrated, expected suspended/migrated stopped/migrated"
    ]
    failed = _leg(False, events("A", "suspended/migrated", "resumed/migrated"), events("B", "started/migrated"))
    assert failed.expectation is FAILED
    assert failed.problems == [
        "B (destination) delivered lifecycle events started/migrated, "
        "expected [started/migrated stopped/(failed|crashed|destroyed)]"
    ]
    unobserved = _leg(False, [], [])
    unobserved.events = None  # test:///: nothing was observed, nothing is asserted
    assert unobserved.problems == []


def test_a_faults_own_sequence_is_asserted() -> None:
    lacking = DestinationLacksDevice.__new__(DestinationLacksDevice)  # only its class-level outcome is read
    started = events("B", "started/migrated", "stopped/failed")
    assert _leg(False, [], [], lacking).problems == []
    assert _leg(False, [], started, lacking).problems, "a destination that started QEMU passed a prepare-time refusal"
    incompatible = IncompatibleDestinationMdev.__new__(IncompatibleDestinationMdev)
    assert _leg(False, [], started, incompatible).problems == []
    assert _leg(False, [], [], incompatible).problems, "no incoming QEMU passed a load failure"
    assert incompatible.outcome.errors[0].domain == libvirt.VIR_FROM_QEMU


def test_a_resume_queued_twice_is_one_resume() -> None:
    twice = events("B", "started/migrated", "resumed/migrated", "resumed/migrated")
    assert MIGRATED_DESTINATION.matches(twice)
    assert FAILED_SOURCE.matches(events("A", "suspended/migrated", "resumed/migrated", "resumed/migrated"))
    assert not FAILED_SOURCE.matches(events("A", "resumed/migrated", "suspended/migrated")), "left paused passed"


def test_a_resume_libvirt_lost_to_qemu_passes_as_a_known_issue_of_the_stack() -> None:
    # CI, libvirt 11.3 with QEMU 10.0: libvirt's resume after the failed job was refused, QEMU resumed the guest
    lost = events("A", "suspended/migrated", "suspended/api_error", "resumed/unpaused")
    assert FAILED_SOURCE.matches(lost)
    assert not FAILED_SOURCE.matches(lost[:2]), "a source left paused by the lost resume passed"
    assert not FAILED_SOURCE.matches(events("A", "suspended/api_error", "resumed/unpaused")), "no switchover passed"
    leg = _leg(False, lost, events("B", "started/migrated", "stopped/failed"))
    assert leg.problems == [] and len(leg.stack_issues) == 1 and "api_error" in leg.stack_issues[0]
    assert _leg(False, lost[:1] + lost[2:], []).stack_issues == []
    paused = events("A", "suspended/migrated", "suspended/api_error", "stopped/migrated")
    completed = _leg(True, paused, events("B", "started/migrated", "resumed/migrated"))
    assert [p.split(" delivered")[0] for p in completed.problems] == ["A (source)"], "a completed job's passed"


def test_every_detail_libvirt_delivers_has_its_name() -> None:
    # a source resuming after a failed finish delivers resumed/0: it must read resumed/unpaused
    assert DETAILS[("resumed", 0)] == "unpaused" and DETAILS[("suspended", 0)] == "paused"
    assert DETAILS[("stopped", 5)] == "failed" and DETAILS[("suspended", 7)] == "postcopy"
    assert DETAILS[("started", 3)] == "from_snapshot" and DETAILS[("started", 1)] == "migrated"
    assert FAILED_SOURCE.matches(events("A", "suspended/migrated", f"resumed/{DETAILS[('resumed', 0)]}"))
