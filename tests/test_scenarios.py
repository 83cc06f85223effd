"""Scenarios on the sim lab's test:/// hosts: save/restore, managed save, cross-host restore, readback, cleanup."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import libvirt
import pytest
from pydantic import ValidationError

from labs.errors import InfraError
from labs.faults.base import ExpectedError, Fault, FaultNotInjected
from labs.faults.daemon import StopDaemon
from labs.faults.job import MigrationDeadline
from labs.faults.netem import DegradedLink
from labs.hostwatch import infra_error
from labs.inventory import LabDevice, LabPair
from labs.inventory.models import Capability, LabSettings, MdevDevice, SimDevice
from labs.janitor import janitor
from labs.models.mtty import stream_size as mtty_stream_size
from labs.scenarios import held as held_mod
from labs.scenarios import migration as mig
from labs.scenarios import recovery as rc
from labs.scenarios import save_resume as sr
from labs.scenarios.context import Scenario
from labs.scenarios.faulted import (
    LANDING_ATTEMPTS,
    FaultedMigration,
    Trigger,
    check_faulted,
    land_fault,
    migrate_under_fault,
)
from labs.scenarios.known import known_issue, xfail_known
from labs.scenarios.migration import Leg
from labs.scenarios.readback import DeviceView, Readback, SideView
from labs.scenarios.roundtrip import ContentCheck
from labs.scenarios.support import skip_where_no_device
from labs.session import LabSession
from labs.vfio.client import AgentInfraError, AgentOSError
from labs.virt.domain import hypervisor
from labs.virt.migrate import JobSample, MigrationHung, MigrationOptions, MigrationResult
from labs.virt.stale import StaleRecord


def sim_device(session: LabSession, host: str) -> LabDevice:
    """A small simulated v2 device on a host of the private sim lab (its state lives on that host)."""
    spec = SimDevice(
        kind="sim",
        name="scn",
        protocol="v2",
        driver="labs.sim.v2:V2Driver",
        capabilities=(Capability.STOP_COPY,),
        options={"content_size": 65536},
    )
    return LabDevice(session.inventory.host(host), 0, spec)


@pytest.fixture
def scenario(sim_session: LabSession) -> Iterator[Scenario]:
    sc = Scenario(sim_session, "t")
    yield sc
    assert sc.cleanup() == []
    assert sc.leftovers() == []
    assert janitor(sim_session, keep_own=False) == [], "the janitor found leftovers after a clean scenario"


def test_save_restore_reads_back(sim_session: LabSession, scenario: Scenario) -> None:
    dev = sim_device(sim_session, "hostA")
    vm = sr.start_vm(scenario, dev, "save")
    result = sr.save_restore(scenario, vm, dev)
    assert result.image_bytes and result.image_bytes > 0
    after_save, after_restore = result.readbacks
    assert after_save.state_on("hostA") == "shutoff"
    assert after_restore.problems(expect_on="hostA") == []
    # the device view comes from the device layer (the sim device, read through the agent)
    assert [(d.state, d.skipped, d.error) for d in after_restore.devices] == [("RUNNING", None, None)]
    assert [s.title.split()[0] for s in scenario.steps.records] == [
        "define",
        "start",
        "save",
        "readback",
        "restore",
        "readback",
    ]
    assert "test:/// image carries no device state" in scenario.steps.records[2].title


def test_managed_save_start(sim_session: LabSession, scenario: Scenario) -> None:
    dev = sim_device(sim_session, "hostB")
    vm = sr.start_vm(scenario, dev, "msave")
    result = sr.managed_save_start(scenario, vm, dev)
    assert result.final.problems(expect_on="hostB") == []
    assert result.notes and "started" in result.notes[0]


def test_restore_on_the_other_host(sim_session: LabSession, scenario: Scenario) -> None:
    src, dst = sim_device(sim_session, "hostA"), sim_device(sim_session, "hostB")
    vm = sr.start_vm(scenario, src, "move")
    result = sr.restore_on_other_host(scenario, vm, src, dst)
    assert result.vm.hv.name == "hostB"
    assert result.final.running_on == ["hostB"]
    assert result.final.problems(expect_on="hostB") == []
    # test:/// cannot rewrite the hostdev on restore; the scenario says so instead of pretending
    assert any("test:///" in n for n in result.notes)


def test_migration_on_test_driver_fails_cleanly(sim_session: LabSession, scenario: Scenario) -> None:
    src, dst = sim_device(sim_session, "hostA"), sim_device(sim_session, "hostB")
    vm = sr.start_vm(scenario, src, "mig")
    _vm, leg = mig.migrate_leg(scenario, vm, src, dst, scenario="migrate", timeout=10)
    assert not leg.result.ok and not leg.result.timed_out
    assert leg.result.error and "not supported" in leg.result.error
    assert leg.readback.running_on == ["hostA"]
    assert leg.problems == []  # failed: expected on the source, nothing on the destination


def test_a_hung_migration_is_the_labs_once_both_sides_are_read_back(
    sim_session: LabSession, scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libvirt's job aborted at its deadline (test:/// cannot migrate, so the call's outcome is given)."""
    src, dst = sim_device(sim_session, "hostA"), sim_device(sim_session, "hostB")
    vm = sr.start_vm(scenario, src, "hang")

    def aborted_at_deadline(vm: object, dst_hv: object, opts: MigrationOptions, on_progress: object) -> MigrationResult:
        error = f"migration did not return within {opts.timeout:g}s, nor 30s after an abort"
        return MigrationResult("hostA", "hostB", "hang", error=error, timed_out=True, aborted=True)

    monkeypatch.setattr(mig, "migrate", aborted_at_deadline)
    with pytest.raises(MigrationHung, match="hostA -> hostB: migration did not return within 7s") as caught:
        mig.migrate_leg(scenario, vm, src, dst, scenario="migrate", timeout=7)
    assert infra_error(caught.value) is caught.value
    assert any(s.title.startswith("readback after migrate") for s in scenario.steps.records)  # before raising
    _vm, leg = mig.migrate_leg(scenario, vm, src, dst, scenario="migrate", timeout=7, hang_is_infra=False)
    assert leg.result.timed_out and leg.readback.running_on == ["hostA"]


MDEV = "0" * 8 + "-0000-0000-0000-" + "0" * 12


@pytest.mark.parametrize(("kept", "attempts"), [(0, 1), (1, 2), (2, 3)])
def test_a_migration_refused_for_a_kept_mdev_waits_then_releases_it(
    sim_session: LabSession, scenario: Scenario, monkeypatch: pytest.MonkeyPatch, kept: int, attempts: int
) -> None:
    """libvirt 11.3 kept nested-b's mdev for an incoming domain a destroy took away, until its daemon restarted:
    every later migration to it was refused, and CI's run of 5caaa93 failed eight tests on it."""
    src, dst = sim_device(sim_session, "hostA"), sim_device(sim_session, "hostB")
    vm = sr.start_vm(scenario, src, "kept")
    name = vm.name
    refused = f"mediated device /sys/bus/mdev/devices/{MDEV} is in use by driver QEMU, domain {name}"
    calls: list[str] = []
    released: list[StaleRecord] = []

    def job(vm: object, dst_hv: object, opts: MigrationOptions, on_progress: object) -> MigrationResult:
        calls.append("migrate")
        ok = len(calls) > kept
        return MigrationResult("hostA", "hostB", name, ok=ok, error=None if ok else refused)

    def release(_hv: object, record: StaleRecord) -> str:
        released.append(record)
        return "refused as expected"

    monkeypatch.setattr(mig, "migrate", job)
    monkeypatch.setattr(held_mod, "release", release)
    monkeypatch.setattr(held_mod, "RELEASE_WAIT", 0.0)
    _vm, leg = mig.migrate_leg(scenario, vm, src, dst, scenario="migrate", timeout=7)
    assert len(calls) == attempts and leg.result.ok
    # the first refusal may be libvirt still releasing it: a wait and a second try; the second kept it for good
    assert released == ([StaleRecord("hostB", MDEV, vm.name)] if kept == 2 else [])
    assert (leg.released is not None) is (kept == 2)
    assert bool(leg.stack_issues) is (kept == 2) and all("known issue of libvirt" in i for i in leg.stack_issues)


@pytest.mark.parametrize(
    ("refusals", "holder_exists", "calls", "released"),
    [
        (0, False, 1, False),
        (1, False, 2, False),  # libvirt still releasing a failed job's device: the wait covers it
        (2, False, 3, True),  # kept for a gone domain: released by a start under its name
        (2, True, 2, False),  # held by a domain the host has: not ours to take, the refusal stands
    ],
)
def test_a_start_refused_for_a_device_libvirt_holds_waits_then_releases_a_kept_record(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch, refusals: int, holder_exists: bool, calls: int, released: bool
) -> None:
    """A kept record failed every start with the mdev as infrastructure too, not only migrations."""
    refused = f"hostB: start labs-x: mediated device /sys/bus/mdev/devices/{MDEV} is in use by driver QEMU, domain gone"
    hv: Any = SimpleNamespace(name="hostB", exists=lambda _name: holder_exists)
    made: list[int] = []
    drops: list[StaleRecord] = []

    def start() -> str:
        made.append(1)
        if len(made) <= refusals:
            raise InfraError(refused)
        return "running"

    monkeypatch.setattr(held_mod, "RELEASE_WAIT", 0.0)

    def release(_hv: object, record: StaleRecord) -> str:
        drops.append(record)
        return "refused as expected"

    monkeypatch.setattr(held_mod, "release", release)
    if refusals and holder_exists:
        with pytest.raises(InfraError, match="is in use by driver QEMU, domain gone"):
            held_mod.despite_held_device(scenario, hv, start)
    else:
        assert held_mod.despite_held_device(scenario, hv, start) == "running"
    assert len(made) == calls
    assert drops == ([StaleRecord("hostB", MDEV, "gone")] if released else [])
    assert any(t.startswith("release ") for t in scenario.steps.titles()) is released


def test_a_start_refused_for_anything_else_is_not_retried(scenario: Scenario) -> None:
    made: list[int] = []

    def start() -> None:
        made.append(1)
        raise InfraError("hostB: start labs-x: internal error: qemu unexpectedly closed the monitor")

    with pytest.raises(InfraError, match="closed the monitor"):
        held_mod.despite_held_device(scenario, SimpleNamespace(name="hostB"), start)  # type: ignore[arg-type]
    assert made == [1]


class NoteOnly(Fault):
    name = "note-only"

    def _inject(self) -> None:
        self.note("injected")

    def _undo(self) -> None:
        self.note("undone")


def _job(elapsed: float, processed: int, remaining: int) -> JobSample:
    stats = {"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, "data_processed": processed, "data_remaining": remaining}
    return JobSample(elapsed, stats)


@pytest.mark.parametrize(
    ("samples", "lands"),
    [
        ([_job(0.2, 0, 0), _job(0.4, 300_000, 900_000_000)], True),  # data moving, more to send: the fault lands
        ([_job(0.2, 0, 0), _job(0.4, 760_000, 0)], False),  # the pass ended between two polls: QEMU may be done
    ],
)
def test_a_mid_flight_fault_lands_while_data_moves_and_a_missed_window_is_no_verdict(
    sim_session: LabSession,
    scenario: Scenario,
    monkeypatch: pytest.MonkeyPatch,
    samples: list[JobSample],
    lands: bool,
) -> None:
    """test:/// cannot migrate, so the job's samples and outcome are given; the trigger and verdict are real."""
    src, dst = sim_device(sim_session, "hostA"), sim_device(sim_session, "hostB")
    vm = sr.start_vm(scenario, src, "mid")
    faults: list[NoteOnly] = []
    calls: list[MigrationOptions] = []

    def job(vm: object, dst_hv: object, opts: MigrationOptions, on_progress: object) -> MigrationResult:
        calls.append(opts)
        if len(calls) > 1 or on_progress is None:  # the migration after the fault: fails too, kept simple
            return MigrationResult("hostA", "hostB", "mid", error="refused")
        for sample in samples:
            on_progress(sample)  # type: ignore[operator]
        landed = faults[0].attempted
        return MigrationResult(
            "hostA", "hostB", "mid", ok=not landed, error="aborted" if landed else None, duration=0.5, samples=samples
        )

    def make(_vm: object) -> NoteOnly:
        faults.append(NoteOnly("hostA"))
        return faults[0]

    monkeypatch.setattr(mig, "migrate", job)
    _vm, run = migrate_under_fault(scenario, vm, LabPair(src, dst), make, "mid-flight")
    assert faults[0].attempted is lands
    if lands:
        assert run.missed is None
        assert "the migration after note-only failed: refused" in run.problems
    else:
        assert run.missed is not None and "ended by itself in 0.5s" in run.missed
        assert "the first sample with data sent, at 0.4s, had 0 bytes left" in run.missed
        assert len(calls) == 1  # a migration that succeeded needs no following one
    assert calls[0].bandwidth_mib == 1


class TooLate(NoteOnly):
    name = "too-late"

    def too_late(self, job_ok: bool, destination_events: Sequence[str]) -> str | None:
        return "too-late came after the job completed" if job_ok else None


def test_a_fault_that_came_too_late_is_no_verdict_and_nothing_follows(
    sim_session: LabSession, scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destroy reached a destination the job had already resumed: the VM may be gone, so no migration
    follows, and the run is no verdict (it was a crash in the following leg, CI 2026-12-03)."""
    src, dst = sim_device(sim_session, "hostA"), sim_device(sim_session, "hostB")
    vm = sr.start_vm(scenario, src, "late")
    calls: list[MigrationOptions] = []

    def job(vm: object, dst_hv: object, opts: MigrationOptions, on_progress: object) -> MigrationResult:
        calls.append(opts)
        on_progress(_job(0.2, 300_000, 900_000_000))  # type: ignore[operator]
        return MigrationResult("hostA", "hostB", "late", ok=True, duration=0.5)

    monkeypatch.setattr(mig, "migrate", job)
    fault = TooLate("hostB")
    _vm, run = migrate_under_fault(scenario, vm, LabPair(src, dst), lambda _v: fault, "mid-flight")
    assert fault.attempted and run.following is None and len(calls) == 1
    assert run.missed == "too-late came after the job completed"


def _late_then(monkeypatch: pytest.MonkeyPatch, late_jobs: int) -> list[MigrationOptions]:
    """Jobs that complete before the fault reaches them `late_jobs` times, then one the fault fails, then a
    refused following one; test:/// cannot migrate, so the outcomes are given and the retries are real."""
    calls: list[MigrationOptions] = []

    def job(vm: object, dst_hv: object, opts: MigrationOptions, on_progress: object) -> MigrationResult:
        calls.append(opts)
        if on_progress is None:  # the migration after the fault
            return MigrationResult("hostA", "hostB", "late", error="refused")
        on_progress(_job(0.2, 300_000, 900_000_000))  # type: ignore[operator]
        if len(calls) <= late_jobs:
            return MigrationResult("hostA", "hostB", "late", ok=True, duration=0.5)
        return MigrationResult("hostA", "hostB", "late", error="aborted", duration=0.5)

    monkeypatch.setattr(mig, "migrate", job)
    return calls


@pytest.mark.parametrize("late_jobs", [1, 2])
def test_a_fault_that_missed_is_tried_again_on_a_fresh_vm_until_it_lands(
    sim_session: LabSession, scenario: Scenario, monkeypatch: pytest.MonkeyPatch, late_jobs: int
) -> None:
    src, dst = sim_device(sim_session, "hostA"), sim_device(sim_session, "hostB")
    calls = _late_then(monkeypatch, late_jobs)
    faults: list[TooLate] = []

    def make(_vm: object) -> TooLate:
        faults.append(TooLate("hostB"))
        return faults[-1]

    _vm, run = land_fault(scenario, LabPair(src, dst), "late", make, "mid-flight", memory_mib=None)
    assert run.missed is None and run.earlier_misses == ["too-late came after the job completed"] * late_jobs
    assert len(faults) == late_jobs + 1 and all(f.attempted for f in faults)
    assert len(calls) == late_jobs + 2  # each attempt's job, then the one after the fault that landed
    titles = [r.title for r in scenario.steps.records]
    assert sum(t.startswith("start ") for t in titles) == late_jobs + 1
    retries = [r for r in scenario.steps.records if "missed its window" in r.title]
    assert len(retries) == late_jobs
    assert all(any(d.startswith("destroyed") for d in r.detail["removed"]) for r in retries)  # type: ignore[index]


def test_a_fault_that_missed_every_attempt_is_no_verdict_and_says_so(
    sim_session: LabSession, scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = sim_device(sim_session, "hostA"), sim_device(sim_session, "hostB")
    calls = _late_then(monkeypatch, late_jobs=99)
    _vm, run = land_fault(
        scenario, LabPair(src, dst), "late", lambda _v: TooLate("hostB"), "mid-flight", memory_mib=None
    )
    assert len(calls) == LANDING_ATTEMPTS and len(run.earlier_misses) == LANDING_ATTEMPTS - 1
    with pytest.raises(
        pytest.skip.Exception, match=f"missed in each of {LANDING_ATTEMPTS} attempts; the last: too-late"
    ):
        check_faulted(run)


def test_a_migration_the_fault_missed_is_judged_as_a_plain_one(
    sim_session: LabSession, scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job completed before the fault was due, but the VM is not where a completed migration leaves it (on
    test:/// it never moved): that is a failure of the migration, not a missed fault, and no retry hides it."""
    src, dst = sim_device(sim_session, "hostA"), sim_device(sim_session, "hostB")
    calls: list[MigrationOptions] = []

    def job(vm: object, dst_hv: object, opts: MigrationOptions, on_progress: object) -> MigrationResult:
        calls.append(opts)
        return MigrationResult("hostA", "hostB", "plain", ok=True, duration=0.5)

    monkeypatch.setattr(mig, "migrate", job)
    _vm, run = land_fault(scenario, LabPair(src, dst), "plain", lambda _v: NoteOnly("hostB"), "finish", memory_mib=None)
    assert run.never_injected and run.missed is not None and len(calls) == 1
    with pytest.raises(AssertionError, match=r"the migration note-only missed \(judged as a plain one\): .*hostB"):
        check_faulted(run)


def test_readback_problems() -> None:
    rb = Readback("d", [SideView("A", "running"), SideView("B", "shutoff")])
    assert rb.problems(expect_on="A") == ["B keeps a leftover d (shutoff)"]
    rb = Readback("d", [SideView("A", "running"), SideView("B", "running")])
    assert "should run exactly once, on B" in rb.problems(expect_on="B")[0]
    rb = Readback("d", [SideView("A", "absent"), SideView("B", "absent")])
    assert rb.problems(expect_on=None) == []


def test_cleanup_after_a_failure(sim_session: LabSession) -> None:
    sc = Scenario(sim_session, "t")
    dev = sim_device(sim_session, "hostA")
    with pytest.raises(RuntimeError):
        vm = sr.start_vm(sc, dev, "boom")
        sc.image_path(vm.hv, vm.name)
        vm.save(sc.image_path(vm.hv, vm.name))
        raise RuntimeError("the test failed here")
    assert sc.leftovers()
    assert sc.cleanup() == []
    assert sc.leftovers() == []
    assert not sc.steps.records[-1].ok or sc.steps.records[-1].title.startswith("start")


def test_pair_objects_reverse(sim_session: LabSession) -> None:
    pair = LabPair(sim_device(sim_session, "hostA"), sim_device(sim_session, "hostB"))
    assert pair.reversed().source.host.name == "hostB"


def test_device_round_trip_through_the_agent(sim_session: LabSession, scenario: Scenario) -> None:
    src, dst = sim_device(sim_session, "hostA"), sim_device(sim_session, "hostB")
    rt = sr.device_round_trip(scenario, src, dst, why="test:/// saves carry no device state")
    assert rt.stream_bytes > 65536
    assert rt.problems == [] and rt.check is not None and rt.check.undecided is None
    assert rt.check.before != rt.check.source_content == rt.check.after and rt.check.state_after == "RUNNING"
    assert any("through the agent" in s.title for s in scenario.steps.records)


def _recovered(**changes: Any) -> rc.Recovery:
    """A device the knob put in ERROR, every transition refused there, RESET back to RUNNING, the old data_fd
    dead, and a save/resume cycle that carried its content."""
    cycle = ContentCheck("a", "b", "digest", True, source_content="x", before="y", after="x", state_after="RUNNING")
    fields: dict[str, Any] = {
        "entered": "ERROR",
        "entry_error": "AgentOSError: set_state: EIO",
        "refusals": {"STOP": "EINVAL", "RUNNING": "EINVAL"},
        "states_seen": {"STOP": "ERROR", "RUNNING": "ERROR"},
        "after_reset": "RUNNING",
        "old_fd": "EBADF",
        "cycle": [cycle],
        "state_after_cycle": "RUNNING",
    }
    return rc.Recovery("hostA:simv2", "knob", **(fields | changes))


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({}, None),
        ({"entered": None}, "hostA:simv2: the fault (knob) did not run"),
        ({"entered": "STOP", "states_seen": {"STOP": "STOP", "RUNNING": "STOP"}}, "armed to land in ERROR left STOP"),
        ({"entry_error": None}, "the knob fault was accepted; the device is ERROR"),
        ({"entered": "RUNNING", "states_seen": {"STOP": "RUNNING", "RUNNING": "RUNNING"}}, "RUNNING after a refused"),
        ({"refusals": {"STOP": "ACCEPTED"}, "states_seen": {"STOP": "ERROR"}}, "ERROR -> STOP was accepted"),
        ({"states_seen": {"STOP": "STOP", "RUNNING": "ERROR"}}, "ERROR -> STOP refused but the state is now STOP"),
        ({"after_reset": "ERROR"}, "ERROR after VFIO_DEVICE_RESET, not RUNNING"),
        ({"old_fd": "ACCEPTED"}, "the old data_fd still works after the reset"),
        ({"state_after_cycle": "STOP"}, "STOP after the save/resume cycle"),
        ({"cycle": []}, "no save/resume cycle was made after the recovery"),
    ],
)
def test_a_recovery_from_error_is_judged_on_every_step(changes: dict[str, Any], problem: str | None) -> None:
    """Each step of the recovery verdict (V2-R14/R15/R16, V1-R9/R17/R19) fails a device that breaks only it."""
    problems = _recovered(**changes).problems
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_a_stream_refused_into_resuming_is_a_recovery_entry_too() -> None:
    """Only the knob is armed to land in ERROR: a refused stream may leave the device RESUMING."""
    stream = _recovered(entered="RESUMING", states_seen={"STOP": "RESUMING", "RUNNING": "RESUMING"})
    stream.entry = "truncate"
    assert stream.problems == []
    no_cycle_after_a_failed_reset = _recovered(after_reset="ERROR", old_fd="ACCEPTED", cycle=[])
    assert len(no_cycle_after_a_failed_reset.problems) == 1  # the cycle's checks need a device that recovered


def test_recovery_counts_only_an_errno_as_a_refusal() -> None:
    def refuse() -> None:
        raise AgentOSError("mig_set_state", 22, "EINVAL", "arc not allowed")

    def agent_dies() -> None:
        raise AgentInfraError("agent watchdog: no reply within 30s")

    assert rc._outcome(refuse) == "EINVAL"
    assert rc._outcome(lambda: None) == "ACCEPTED"
    with pytest.raises(AgentInfraError):
        rc._outcome(agent_dies)


class FailsToInject(NoteOnly):
    name = "fails-to-inject"
    expected_errors = (ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_OPERATION_ABORTED),)

    def _inject(self) -> None:
        raise InfraError("ssh: connection reset while injecting")


@pytest.mark.parametrize("trigger", ["before", "started"])
def test_a_fault_that_failed_to_inject_makes_the_test_broken(
    sim_session: LabSession, scenario: Scenario, monkeypatch: pytest.MonkeyPatch, trigger: Trigger
) -> None:
    """Old behaviour: the hook's error was recorded and any failed migration then passed as the fault's."""
    src, dst = sim_device(sim_session, "hostA"), sim_device(sim_session, "hostB")
    vm = sr.start_vm(scenario, src, "noinject")

    def job(vm: object, dst_hv: object, opts: MigrationOptions, on_progress: object) -> MigrationResult:
        result = MigrationResult("hostA", "hostB", "x", error="aborted", error_code=78, error_domain=10)
        try:
            on_progress(_job(0.2, 1, 1))  # type: ignore[operator]
        except Exception as exc:  # what labs.virt.migrate does with a hook that raised
            result.hook_error = f"{type(exc).__name__}: {exc}"
        return result

    monkeypatch.setattr(mig, "migrate", job)
    with pytest.raises(FaultNotInjected, match="fails-to-inject could not be injected") as caught:
        migrate_under_fault(scenario, vm, LabPair(src, dst), lambda _v: FailsToInject("hostB"), trigger)
    assert infra_error(caught.value) is caught.value


def _faulted(code: int | None, domain: int | None) -> FaultedMigration:
    fault = FailsToInject("hostB")
    result = MigrationResult("hostA", "hostB", "d", error="operation aborted", error_code=code, error_domain=domain)
    rb = Readback("d", [SideView("hostA", "running"), SideView("hostB", "absent")])
    ok = MigrationResult("hostA", "hostB", "d", ok=True)
    after = Readback("d", [SideView("hostA", "absent"), SideView("hostB", "running")])
    return FaultedMigration(fault, Leg("hostA", "hostB", result, rb), True, Leg("hostA", "hostB", ok, after))


def test_a_faulted_migration_must_fail_with_its_faults_error() -> None:
    assert _faulted(libvirt.VIR_ERR_OPERATION_ABORTED, libvirt.VIR_FROM_QEMU).problems == []
    problems = _faulted(libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_FROM_QEMU).problems
    assert problems == [
        "migration under fails-to-inject (landed before the job) failed with VIR_FROM_QEMU/VIR_ERR_OPERATION_FAILED, "
        "not the fault's (VIR_FROM_QEMU/VIR_ERR_OPERATION_ABORTED): operation aborted"
    ]
    assert _faulted(None, None).problems, "an error without a code matched"


def _leg(ok: bool, completed: dict[str, int], qemu: dict[str, object] | None = None) -> Leg:
    sides = [SideView("hostA", "absent"), SideView("hostB", "running", qemu=qemu)]
    return Leg(
        "hostA", "hostB", MigrationResult("hostA", "hostB", "d", ok=ok, completed=completed), Readback("d", sides)
    )


def test_a_migration_that_moved_no_device_bytes_fails() -> None:
    assert _leg(True, {"vfio_data_transferred": 0}).problems == [
        "the migration moved no device bytes (QEMU reports 0 for the VFIO device)"
    ]
    assert _leg(True, {}, {"status": "completed", "vfio_transferred": 0}).problems
    assert _leg(True, {"vfio_data_transferred": 8192}).problems == []
    assert _leg(True, {}).problems == []  # not reported (test:///, an old QEMU): nothing to assert
    result = sr.SaveResumeResult(vm=None, save_stats={"vfio_data_transferred": 0})  # type: ignore[arg-type]
    assert result.save_problems and not sr.SaveResumeResult(vm=None).save_problems  # type: ignore[arg-type]


def test_a_completed_migration_must_move_the_devices_whole_state() -> None:
    """Old behaviour: only 0 device bytes failed a leg, so a source driver that sent its state 16 bytes short
    passed on the source's side (the destination's load failing was the only other witness)."""

    def leg(moved: int, multifd: bool = False, ok: bool = True) -> Leg:
        out = _leg(ok, {"vfio_data_transferred": moved})
        out.state_bytes, out.multifd = 96, multifd
        return out

    assert leg(96).problems == []
    assert leg(80).problems == ["the migration moved 80 device bytes, not the devices' state of 96"]
    assert leg(112).problems == ["the migration moved 112 device bytes, not the devices' state of 96"]
    assert leg(4252, multifd=True).problems == []  # multifd's packet framing is counted with the bytes
    assert leg(96, multifd=True).problems == []  # exactly the state: nothing framed it, nothing short
    assert leg(80, multifd=True).problems == [
        "the migration moved 80 device bytes over multifd, less than the devices' state (96)"
    ]
    assert leg(24, ok=False).state_bytes_problems == []  # a failed job moves part of it
    mtty = [
        MdevDevice(kind="mdev", parent="mtty", type=t, uuid=str(uuid.uuid4()), protocol="v2")
        for t in ("mtty-1", "mtty-2")
    ]
    assert [mtty_stream_size(spec) for spec in mtty] == [60, 96]  # measured on the nested lab: 96 for every mtty-2 leg


def test_a_completed_migration_over_the_downtime_budget_fails() -> None:
    """Old behaviour: no check compared libvirt's downtime with the inventory's, so a driver that took seconds
    in the switchover passed (the guest's stall is judged against the same downtime)."""

    def leg(ok: bool, completed: dict[str, int], budget: int | None = 5000) -> Leg:
        out = _leg(ok, {"vfio_data_transferred": 8192, **completed})
        out.downtime_budget_ms = budget
        return out

    assert leg(True, {"downtime": 8042}).problems == ["downtime 8042 ms, over the lab's budget of 5000 ms"]
    assert leg(True, {"downtime": 5000}).problems == []
    assert leg(True, {}).problems == [
        "libvirt reported no downtime for the completed migration: its budget (5000 ms) is unjudged"
    ]
    assert leg(False, {"downtime": 8042}).downtime_problems == []  # a failed job has no switchover to judge
    assert leg(True, {"downtime": 8042}, budget=None).problems == []  # a fault that stops the guest: not judged


def test_a_stopped_daemon_may_add_its_hold_to_the_downtime_budget_and_no_more() -> None:
    """Old behaviour: a destination daemon stopped for 5 s at the switchover held the guest's resume as long, and
    the leg failed on a 5173 ms downtime against the lab's 5000 ms, with nothing wrong in the device."""
    fault = StopDaemon(SimpleNamespace(name="hostB"), hold=5.0)  # type: ignore[arg-type]
    assert fault.downtime_allowance_ms == 5000

    def leg(downtime: int) -> Leg:
        out = _leg(True, {"vfio_data_transferred": 8192, "downtime": downtime})
        out.downtime_budget_ms, out.downtime_allowance_ms = 5000, fault.downtime_allowance_ms
        return out

    assert leg(5173).problems == []
    assert leg(10001).problems == [
        "downtime 10001 ms, over the lab's budget of 10000 ms (5000 ms and 5000 ms the fault may add)"
    ]


def test_the_downtime_budget_defaults_to_the_downtime_asked_of_qemu() -> None:
    assert LabSettings().downtime_budget is None
    assert LabSettings(max_downtime_ms=5000).downtime_budget == 5000
    assert LabSettings(max_downtime_ms=300, downtime_budget_ms=1000).downtime_budget == 1000


def test_a_downtime_budget_below_the_target_given_to_qemu_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"downtime_budget_ms \(4000\) is below max_downtime_ms \(5000\)"):
        LabSettings(max_downtime_ms=5000, downtime_budget_ms=4000)
    assert [f.name for f in (DegradedLink, MigrationDeadline) if f.downtime_allowance_ms is None] == [
        DegradedLink.name,
        MigrationDeadline.name,
    ]


def test_the_destination_is_judged_before_the_recovery_reset(sim_session: LabSession) -> None:
    """Old behaviour: a destination left RESUMING was reset, read RUNNING and passed."""
    left = DeviceView("hostB:x", state="RUNNING", recovered_from="RESUMING")
    rb = Readback("d", [SideView("hostA", "running"), SideView("hostB", "absent")], [left])
    assert rb.problems(expect_on="hostA") == ["device hostB:x was left RESUMING by the failed operation (then reset)"]
    mtty = LabDevice(
        sim_session.inventory.host("hostB"),
        0,
        MdevDevice(
            kind="mdev",
            parent="mtty",
            type="mtty-2",
            uuid=str(uuid.uuid4()),
            protocol="v2",
            capabilities=(Capability.STOP_COPY,),
        ),
    )
    issue = known_issue(mtty, "failed-operation", "RESUMING")
    assert issue is not None and "nested-findings" in issue.issue.link
    assert known_issue(mtty, "failed-operation", "ERROR") is None
    # a destination destroyed as it resumed: mtty keeps RUNNING_P2P after the close as it keeps RESUMING
    assert known_issue(mtty, "failed-operation", "RUNNING_P2P") is not None
    assert known_issue(sim_device(sim_session, "hostB"), "failed-operation", "RESUMING") is None
    left.known = issue.describe(mtty.id)
    assert rb.problems(expect_on="hostA") == [] and rb.known_issues == [left.known]
    with pytest.raises(pytest.xfail.Exception, match="known issue of mtty"):
        xfail_known(rb.known_issues)


def test_post_copy_refusal_must_be_the_vfio_blocker() -> None:
    blocker = mig.POSTCOPY_BLOCKER[0]
    leg = _leg(False, {})
    leg.result.error, leg.result.error_code, leg.result.error_domain = "refused", blocker.code, blocker.domain
    assert mig.postcopy_problems(leg) == []
    leg.result.error_code = libvirt.VIR_ERR_OPERATION_ABORTED
    assert "not the VFIO migration blocker" in mig.postcopy_problems(leg)[0]
    assert mig.postcopy_problems(_leg(True, {})) == ["post-copy was accepted for a VM with a VFIO device"]


def test_a_vm_test_on_test_driver_is_a_skip_not_a_pass(sim_session: LabSession) -> None:
    with pytest.raises(pytest.skip.Exception, match="never touched its device"):
        skip_where_no_device(hypervisor(sim_session, "hostA"))


def test_a_hang_is_only_the_outcome_of_a_fault_that_stalls_the_job() -> None:
    run = _faulted(None, None)
    run.failed.result.timed_out, run.failed.result.error = True, "migration did not return within 30s"
    assert run.problems == [
        "migration under fails-to-inject hung until the deadline: migration did not return within 30s"
    ]
    run.fault.stalls = True  # a cut link: the stall is what it does
    assert run.problems == []
