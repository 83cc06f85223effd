"""The FSM oracle of labs.conformance.model: arcs per flag set, and the answers it expects."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from labs.conformance import model
from labs.conformance.checks import CHECKS, blocked_arcs_safe, checks_for, state_inputs
from labs.doctor import FlagsMismatch, Status, check_host
from labs.inventory import LabDevice
from labs.session import LabSession, open_inventory
from labs.vfio import rules, uapi
from tests.conftest import write_sim_inventory

FULL = uapi.SC | uapi.P2P | uapi.PRE_COPY
S = uapi.V2_STATES


def test_arcs_are_the_spec_lists() -> None:
    # spec 3.3: always + with P2P + with PRE_COPY and P2P
    full = {
        ("RESUMING", "STOP"), ("STOP", "RESUMING"), ("STOP", "STOP_COPY"), ("STOP_COPY", "STOP"),
        ("RUNNING", "RUNNING_P2P"), ("RUNNING_P2P", "RUNNING"), ("RUNNING_P2P", "STOP"), ("STOP", "RUNNING_P2P"),
        ("PRE_COPY", "PRE_COPY_P2P"), ("PRE_COPY_P2P", "PRE_COPY"), ("PRE_COPY_P2P", "RUNNING_P2P"),
        ("PRE_COPY_P2P", "STOP_COPY"), ("RUNNING_P2P", "PRE_COPY_P2P"),
        ("RUNNING", "PRE_COPY"), ("PRE_COPY", "RUNNING"),
    }  # fmt: skip
    assert set(model.v2_arcs(FULL)) == full
    sc_only = set(model.v2_arcs(uapi.SC))
    assert sc_only == {("RUNNING", "STOP"), ("STOP", "RUNNING"), ("STOP", "STOP_COPY"), ("STOP_COPY", "STOP"),
                       ("STOP", "RESUMING"), ("RESUMING", "STOP")}  # fmt: skip
    assert set(model.v2_all_arcs()) >= full | sc_only
    assert len(model.v1_arcs()) == 20
    assert model.flags_of(["stop_copy", "pre_copy"]) == uapi.SC | uapi.PRE_COPY


def test_v2_oracle_answers() -> None:
    o = model.V2Oracle(FULL, sim=True)
    assert o.set_state(8) == model.Expect(False, ("RUNNING",), errno.EINVAL)  # V2-R4
    assert o.set_state(S["ERROR"]).errno == errno.EINVAL
    exp = o.set_state(S["STOP_COPY"])  # RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY opens a session
    assert exp.ok and exp.fd and exp.states == ("STOP_COPY",)
    o.commit("STOP_COPY")
    assert o.session == "stopcopy" and o.read() == "data-or-eof"
    assert o.precopy_info().errno == errno.EINVAL  # V2-R11
    assert o.hangs(S["PRE_COPY"]) and o.set_state(S["PRE_COPY"]) == model.Expect(False, ("STOP_COPY",), errno.EINVAL)
    exp = o.set_state(S["RESUMING"])  # STOP_COPY -> STOP -> RESUMING: the saving session ends, a new one opens
    o.commit("RESUMING")
    assert exp.fd and o.session == "resuming" and o.resume_data == "none"
    exp = o.set_state(S["RUNNING"])  # nothing written: a simulator refuses the exit (V2-R14)
    assert exp.ok is False and set(exp.states) == {"RESUMING", "ERROR"}
    o.commit("RESUMING")
    assert o.resume_data == "rejected" and o.session == "resuming"
    o.reset()
    assert (o.state, o.session) == ("RUNNING", None)


def test_v2_oracle_fault_mid_path() -> None:
    o = model.V2Oracle(FULL, sim=True)
    o.arm("STOP", "STOP_COPY", to_error=False)
    exp = o.set_state(S["STOP_COPY"])
    assert exp == model.Expect(False, ("STOP",), errno.EIO)  # the arcs before the failing one ran
    o.commit("STOP")
    assert o.state == "STOP" and o.fault is None and o.session is None
    o.arm("RUNNING", "PRE_COPY", to_error=True)
    o.set_state(S["RUNNING"])
    o.commit("RUNNING")
    assert o.set_state(S["PRE_COPY"]) == model.Expect(False, ("ERROR",), errno.EIO)
    o.commit("ERROR")
    assert o.set_state(S["RUNNING"]).errno == errno.EINVAL  # V2-R15
    assert o.set_state(S["ERROR"]).ok is None  # the drivers' loop never asks the core for ERROR -> ERROR


def test_v1_oracle_answers() -> None:
    o = model.V1Oracle(sim=False)
    assert o.set_state(5) == model.Expect(False, ("RUNNING",), errno.EINVAL)  # V1-R6
    assert o.set_state(uapi.V1_RESUMING).ok
    o.commit("RESUMING")
    assert o.session == "resuming"
    exp = o.set_state(uapi.V1_RUNNING)  # a real device may accept an empty resume
    assert exp.ok is None and set(exp.states) == {"RUNNING", "RESUMING", "ERROR"}
    o.commit("RUNNING")
    assert o.session is None
    o.arm("RUNNING", "STOP_COPY", to_error=True)
    assert o.set_state(uapi.V1_SAVING) == model.Expect(False, ("ERROR",), errno.EIO)  # V1-R8
    o.commit("ERROR")
    assert o.set_state(uapi.V1_RUNNING).ok is False  # V1-R9


def test_every_rule_has_a_check() -> None:
    assert set(CHECKS) == set(rules.RULES)
    assert [c.rule for c in checks_for("v1")] == list(rules.V1_RULES)
    assert [c.rule for c in checks_for("v2")] == list(rules.V2_RULES)


def test_state_values_over_the_whole_field() -> None:
    values = state_inputs()
    assert set(range(16)) <= set(values) and 0xFFFFFFFF in values and max(values) <= 0xFFFFFFFF
    for flags in uapi.FLAG_SETS:
        o = model.V2Oracle(flags, sim=True)
        for v in values:
            exp = o.set_state(v)
            accepted = v < 8 and v != S["ERROR"] and uapi.mig_state_supported(v, flags)
            assert (exp.ok is True) == accepted, (flags, v)
            assert accepted or exp.errno == errno.EINVAL
    v1 = model.V1Oracle(sim=True)
    for v in values:
        assert (v1.set_state(v).ok is True) == (v & 7 in (0, 1, 2, 3, 4)), v


def test_a_refused_resume_leaves_resuming_or_error_only() -> None:
    for o in (model.V2Oracle(uapi.SC, sim=True), model.V2Oracle(FULL, sim=False), model.V1Oracle(sim=True)):
        o.state, o.session, o.resume_data = "RESUMING", "resuming", "partial"
        target = S["RUNNING"] if isinstance(o, model.V2Oracle) else uapi.V1_RUNNING
        exp = o.set_state(target)
        assert exp.ok is False and set(exp.states) == {"RESUMING", "ERROR"}  # never STOP, never RUNNING


def test_a_flags_mismatch_is_a_warning_and_the_devices_tests_run(tmp_path: Path) -> None:
    inventory = open_inventory(write_sim_inventory(tmp_path, devices=True))
    host = inventory.hosts[0]

    def probe(session: LabSession, device: LabDevice) -> str:
        raise FlagsMismatch(f"inventory lists p2p but {device.id} reports flags 5 (STOP_COPY|PRE_COPY)")

    with LabSession(inventory) as session:
        report = check_host(session, host, probe)
    mine = [d for d in inventory.devices if d.host.name == host.name]
    assert mine and all(report.device_problem(d.id) is None for d in mine)  # not skipped
    warned = [c for c in report.checks if c.name == "migration"]
    assert warned and all(c.status == Status.WARN and "flags 5" in c.detail and "-R1 fails" in c.detail for c in warned)


def test_the_blocked_arcs_go_to_simulators_and_to_kernels_known_to_carry_the_fix() -> None:
    def dev(sim: bool, kernel: str) -> Any:
        return SimpleNamespace(is_sim=sim, client=SimpleNamespace(info={"kernel": kernel}))

    assert blocked_arcs_safe(dev(True, "6.1.0"))  # the simulator answers EINVAL whatever the host runs
    assert blocked_arcs_safe(dev(False, "6.12.117+deb13-amd64"))
    assert not blocked_arcs_safe(dev(False, "6.12.95+deb13-amd64"))  # would hang: the check skips it
    assert not blocked_arcs_safe(dev(False, ""))  # an agent that did not say
