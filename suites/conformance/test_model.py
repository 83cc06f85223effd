"""Model-based test: random walks over the migration FSM against an oracle, shrunk on failure.

Hypothesis drives a state machine whose rules are device requests (transitions,
including invalid targets; data reads and writes; PRECOPY_INFO; MIG_DATA_SIZE;
reset; on simulated devices, armed transition faults). labs.conformance.model
says what a conforming device answers; every step is checked against it and the
state is read back after every step. A failing walk is shrunk to a short one.

Requests that hang real kernels (uapi.is_hanging) are sent to simulated devices, and to real ones
only where the kernel is known to carry the fix (uapi.blocked_arc_fixed).

Knobs (environment): LABS_MODEL_EXAMPLES (default 25), LABS_MODEL_STEPS (20),
LABS_MODEL_SHRINK=0 to report the first failing walk unshrunk (the catalogue runner does).
"""

from __future__ import annotations

import errno
import os
from contextlib import ExitStack
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from labs.attachments import attach, step
from labs.conformance import model
from labs.conformance.checks import blocked_arcs_safe, state_inputs, stream_limit
from labs.inventory import LabDevice
from labs.session import LabSession
from labs.vfio import uapi
from labs.vfio.client import AgentOSError
from labs.vfio.device import DeviceHandle
from suites.conformance.conftest import open_dut

pytestmark = [pytest.mark.conformance]


def model_settings() -> settings:
    phases = list(Phase)
    if os.environ.get("LABS_MODEL_SHRINK", "1") == "0":
        phases = [p for p in Phase if p not in (Phase.shrink, Phase.explain)]
    return settings(
        max_examples=int(os.environ.get("LABS_MODEL_EXAMPLES", "25")),
        stateful_step_count=int(os.environ.get("LABS_MODEL_STEPS", "20")),
        deadline=None,
        database=None,  # nothing written under the working directory
        phases=phases,
        suppress_health_check=list(HealthCheck),
    )


class DeviceMachine(RuleBasedStateMachine):
    """The parts both protocols share: the device, the oracle, the session fd, the saved stream."""

    lab: ClassVar[LabSession]
    device: ClassVar[LabDevice]
    saved: ClassVar[list[bytes] | None] = None  # a complete stream of this device (v1: its chunks)
    oracle: model.Oracle
    arcs: list[tuple[str, str]]  # the arcs a fault may be armed on

    def __init__(self) -> None:
        super().__init__()
        self.stack = ExitStack()
        self.dev: DeviceHandle = open_dut(self.stack, self.lab, self.device)
        self.fd: int | None = None
        self.dead: list[int] = []
        if type(self).saved is None:
            with self.step("save a stream to resume from"):
                type(self).saved = list(self.dev.save().chunks())
                self.dev.set_state("RUNNING")
        self.sim = self.dev.is_sim
        self.blocked_arcs = blocked_arcs_safe(self.dev)  # V2-R12's requests, where they cannot hang

    def step(self, what: str) -> Any:
        return step(f"{self.device.id}: {what}")

    def teardown(self) -> None:
        try:
            for fd in [*self.dead, *([self.fd] if self.fd is not None else [])]:
                self.dev.close_fd(fd)
            if not self.sim:
                self.dev.reset()  # a real device keeps its state across opens
        finally:
            self.stack.close()

    def session_changed(self, had_session: str | None, new_fd: int | None) -> None:
        """After the oracle moved: the old fd is dead when its session ended or another began."""
        if self.fd is not None and (self.oracle.session is None or new_fd is not None):
            self.dead.append(self.fd)
            self.fd = None
        if new_fd is not None:
            self.fd = new_fd

    @invariant()
    def state_reads_back(self) -> None:
        state = self.dev.state()
        assert state == self.oracle.state, f"GET/read-back shows {state}, the model expects {self.oracle.state}"

    @rule()
    def reset(self) -> None:
        with self.step(f"VFIO_DEVICE_RESET in {self.oracle.state}"):
            self.dev.reset()
            self.oracle.reset()
            self.session_changed(None, None)

    @precondition(lambda self: bool(self.dead))
    @rule()
    def io_on_dead_fd(self) -> None:
        fd = self.dead.pop()
        with self.step("I/O on a data_fd whose session ended must fail (V2-R16)"):
            try:
                self.dev.client.call("fd_read", fd=fd, length=16)
                failed = False
            except AgentOSError:
                failed = True
            self.dev.close_fd(fd)
            assert failed, "a read of a dead data_fd succeeded"

    def check_refusal(self, exp: model.Expect, exc: AgentOSError | None) -> None:
        if exc is None:
            assert exp.ok is not False, f"accepted; the model expects {exp.describe()}"
        else:
            assert exp.ok is not True, f"refused ({exc}); the model expects {exp.describe()}"
            assert exp.errno is None or exc.errno == exp.errno, f"{exc}; the model expects {exp.describe()}"

    @precondition(lambda self: self.sim and self.oracle.fault is None)
    @rule(index=st.integers(min_value=0, max_value=100), to_error=st.booleans())
    def arm_fault(self, index: int, to_error: bool) -> None:
        src, dst = self.arcs[index % len(self.arcs)]
        with self.step(f"arm a one-shot failure of {src} -> {dst}{' into ERROR' if to_error else ''}"):
            self.dev.faults(transitions=[{"from": src, "to": dst, "errno": "EIO", "error": to_error, "times": 1}])
            self.oracle.arm(src, dst, to_error)


class V2Machine(DeviceMachine):
    def __init__(self) -> None:
        super().__init__()
        self.oracle: model.V2Oracle = model.V2Oracle(self.dev.mig_flags, self.sim)
        self.arcs = model.v2_arcs(self.dev.mig_flags)

    @rule(value=st.sampled_from(state_inputs()))
    def set_state(self, value: int) -> None:
        target = value
        cur, name = self.oracle.state, uapi.v2_state_name(target)
        if self.oracle.hangs(target) and not self.blocked_arcs:
            return  # never on a kernel that may hang on it (spec 3.4)
        had = self.oracle.session
        exp = self.oracle.set_state(target)
        with self.step(f"SET {name} in {cur}: expect {exp.describe()}"):
            fd: int | None = None
            exc: AgentOSError | None = None
            try:
                fd = self.dev.call("mig_set_state", state=target)["data_fd"]
            except AgentOSError as e:
                exc = e
            if fd is not None:
                fd = int(fd)
            self.check_refusal(exp, exc)
            if exc is not None:
                assert exc.detail.get("buffer", {}).get("data_fd", -1) == -1, "data_fd in a failed SET (V2-R17)"
            elif exp.fd is not None:
                assert (fd is not None) == exp.fd, f"data_fd {fd}: the model expects {exp.describe()} (V2-R7)"
            observed = self.dev.state()
            assert observed in exp.states, f"GET shows {observed}; the model expects {exp.describe()}"
            self.oracle.commit(observed)
            if fd is not None and self.oracle.session is None:
                self.dead.append(fd)  # an fd the model did not expect; already reported above
                fd = None
            self.session_changed(had, fd)

    @precondition(lambda self: self.fd is not None and self.oracle.session in ("precopy", "stopcopy"))
    @rule(length=st.sampled_from([1, 100, 4096, 65536]))
    def read(self, length: int) -> None:
        kind = self.oracle.read()
        with self.step(f"read({length}) in {self.oracle.state}: expect {kind}"):
            try:
                got = int(self.dev.client.call("fd_read", fd=self.fd, length=length)["length"])
            except AgentOSError as exc:
                assert kind == "data-or-empty" and exc.errno == errno.ENOMSG, f"{exc} ({kind} expected)"
                return
            assert got <= length
            if kind == "eof":
                assert got == 0, f"{got} bytes after the end of the STOP_COPY stream (V2-R9)"
            elif kind == "data-or-eof" and got == 0:
                self.oracle.eof = True

    @precondition(lambda self: self.fd is not None and self.oracle.session == "stopcopy")
    @rule()
    def drain(self) -> None:
        assert self.fd is not None
        with self.step("read STOP_COPY to its end"):
            result, _ = self.dev.client.read_stream(self.fd, limit=stream_limit(self.dev))
            assert result.end == "eof", f"the STOP_COPY stream ended with {result.end} (V2-R9)"
            self.oracle.eof = True

    @precondition(
        lambda self: self.fd is not None and self.oracle.session == "resuming" and self.oracle.resume_data == "none"
    )
    @rule(complete=st.booleans(), size=st.sampled_from([4096, 65536, 1 << 20]))
    def write_stream(self, complete: bool, size: int) -> None:
        assert self.fd is not None and self.saved is not None
        data = b"".join(self.saved)
        if not complete:
            data = data[: len(data) // 2]
        with self.step(f"write {'the whole' if complete else 'half the'} stream ({len(data)} bytes) in {size}s"):
            self.dev.client.write_stream(self.fd, (data[i : i + size] for i in range(0, len(data), size)))
            self.oracle.resume_data = "complete" if complete else "partial"

    @precondition(lambda self: self.fd is not None)
    @rule()
    def precopy_info(self) -> None:
        exp = self.oracle.precopy_info()
        with self.step(f"PRECOPY_INFO in {self.oracle.state}: expect {exp.describe()}"):
            try:
                info = self.dev.precopy_info(self.fd)  # type: ignore[arg-type]
                exc = None
            except AgentOSError as e:
                exc, info = e, None
            self.check_refusal(exp, exc)
            if info is not None:
                assert info["initial_bytes"] >= 0 and info["dirty_bytes"] >= 0

    @rule()
    def data_size(self) -> None:
        with self.step(f"MIG_DATA_SIZE in {self.oracle.state} (V2-R19)"):
            try:
                assert self.dev.data_size() >= 0
            except AgentOSError:
                if self.oracle.state != "ERROR":  # the spec is silent on ERROR
                    raise


class V1Machine(DeviceMachine):
    def __init__(self) -> None:
        super().__init__()
        self.oracle: model.V1Oracle = model.V1Oracle(self.sim)
        self.arcs = model.v1_arcs()

    @rule(bits=st.sampled_from(state_inputs()))
    def set_state(self, bits: int) -> None:
        cur, name = self.oracle.state, uapi.v1_state_name(bits)
        exp = self.oracle.set_state(bits)
        with self.step(f"write device_state bits {bits:#x} ({name}) in {cur}: expect {exp.describe()}"):
            exc: AgentOSError | None = None
            try:
                self.dev.set_state(bits)  # read-modify-write, reserved bits kept
            except AgentOSError as e:
                exc = e
            self.check_refusal(exp, exc)
            observed = self.dev.state()
            assert observed in exp.states, f"device_state reads {observed}; the model expects {exp.describe()}"
            self.oracle.commit(observed)

    @precondition(lambda self: self.oracle.session in ("precopy", "stopcopy"))
    @rule()
    def pending(self) -> None:
        with self.step(f"read pending_bytes in {self.oracle.state}"):
            value = self.dev.v1_read("pending_bytes")
            if self.oracle.eof and self.oracle.session == "stopcopy":
                assert value == 0, f"pending_bytes {value} after the stream ended (V1-R15)"

    @precondition(lambda self: self.oracle.session == "stopcopy")
    @rule()
    def drain(self) -> None:
        with self.step("iterate stop-and-copy until pending_bytes reads 0"):
            reader = self.dev.client.frames("v1_save", dev=self.dev.handle, max_bytes=stream_limit(self.dev))
            result = reader.drain()
            assert result.end == "done", f"the save loop ended with {result.end} (V1-R15)"
            if self.oracle.eof:
                assert result.bytes == 0, f"{result.bytes} bytes after the stream ended (V1-R15)"
            self.oracle.eof = True

    @precondition(lambda self: self.oracle.session == "resuming" and self.oracle.resume_data == "none")
    @rule(complete=st.booleans())
    def write_stream(self, complete: bool) -> None:
        assert self.saved is not None
        chunks = self.saved if complete else self.saved[: len(self.saved) // 2]
        with self.step(f"resume {'every' if complete else 'half the'} chunk ({len(chunks)}), boundaries kept"):
            self.dev.client.send_frames("v1_resume", chunks, dev=self.dev.handle)
            self.oracle.resume_data = "complete" if complete else "partial"


def _run(machine: type[DeviceMachine], lab: LabSession, device: LabDevice) -> None:
    cls = type(f"{machine.__name__}_{device.id}", (machine,), {"lab": lab, "device": device, "saved": None})
    s = model_settings()
    attach("model settings", {"max_examples": s.max_examples, "steps": s.stateful_step_count}, "json")
    run_state_machine_as_test(cls, settings=s)


@pytest.mark.protocol("v1")
def test_v1_model(lab: LabSession, device: LabDevice) -> None:
    _run(V1Machine, lab, device)


@pytest.mark.protocol("v2")
def test_v2_model(lab: LabSession, device: LabDevice) -> None:
    _run(V2Machine, lab, device)
