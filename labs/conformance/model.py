"""The FSM as an oracle for model-based tests, built from labs.vfio.uapi.

An oracle knows the state a conforming device is in and, for each request, what
the device must answer: success (with or without a data_fd) or which errno, and
which states a GET may show afterwards. Where the spec allows a choice (a failed
exit from RESUMING may stay or go to ERROR) the oracle lists every allowed state
and `commit()` follows the device's choice.

Also here: the arcs of each protocol, for tests that fail one arc at a time.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from labs.vfio import uapi

V1_VALID = ("STOP", "RUNNING", "STOP_COPY", "PRE_COPY", "RESUMING")
SAVING = ("PRE_COPY", "PRE_COPY_P2P", "STOP_COPY")


def flags_of(capabilities: Iterable[str]) -> int:
    """v2 MIGRATION flags from inventory capability names."""
    caps = {str(c) for c in capabilities}
    flags = uapi.SC
    if "p2p" in caps:
        flags |= uapi.P2P
    if "pre_copy" in caps:
        flags |= uapi.PRE_COPY
    return flags


def v2_arcs(flags: int) -> list[tuple[str, str]]:
    """The single arcs a driver with `flags` executes (spec 3.3): requests that resolve in one step."""
    states = uapi.supported_states(flags)
    out = []
    for cur, new in itertools.product(states, states):
        p = uapi.path(cur, new, flags)
        if cur != new and p is not None and len(p) == 2:
            out.append((uapi.v2_state_name(cur), uapi.v2_state_name(new)))
    return out


def v2_all_arcs() -> list[tuple[str, str]]:
    """Every arc of any defined flag combination (for parametrizing before the device is known)."""
    seen: dict[tuple[str, str], None] = {}
    for flags in uapi.FLAG_SETS:
        seen.update(dict.fromkeys(v2_arcs(flags)))
    return list(seen)


def v1_arcs() -> list[tuple[str, str]]:
    """v1: every transition between the five valid states (spec 2.3: a driver should accept them all)."""
    return [(a, b) for a, b in itertools.product(V1_VALID, V1_VALID) if a != b]


@dataclass(frozen=True)
class Expect:
    ok: bool | None  # None: the spec allows either answer
    states: tuple[str, ...]  # what GET may show afterwards
    errno: int | None = None  # when not ok: the errno (None: any)
    fd: bool | None = None  # when ok: a data_fd (True) or none (False)

    def describe(self) -> str:
        if self.ok is None:
            return f"success or failure, then {'/'.join(self.states)}"
        if self.ok:
            fd = "" if self.fd is None else " with a data_fd" if self.fd else " without a data_fd"
            return f"success{fd}, then {'/'.join(self.states)}"
        code = errno.errorcode.get(self.errno, "an error") if self.errno is not None else "an error"
        return f"{code}, then {'/'.join(self.states)}"


@dataclass
class Fault:
    src: str
    dst: str
    to_error: bool
    errno: int = errno.EIO


@dataclass
class Oracle:
    """Common part: state, session, resume data, an armed fault (sim only)."""

    sim: bool
    state: str = "RUNNING"
    session: str | None = None  # "precopy" | "stopcopy" | "resuming"
    resume_data: str = "none"  # none | partial | complete | rejected (this RESUMING session's writes)
    validating: bool = False  # the last request tried to leave RESUMING
    eof: bool = False  # a STOP_COPY read returned 0
    fault: Fault | None = None
    log: list[str] = field(default_factory=list)

    def end_session(self) -> None:
        self.session = None
        self.resume_data = "none"
        self.eof = False

    def reset(self) -> None:
        self.state = "RUNNING"
        self.end_session()

    def arm(self, src: str, dst: str, to_error: bool) -> None:
        self.fault = Fault(src, dst, to_error)

    def _leave_resuming(self, target: str) -> Expect | None:
        """Leaving RESUMING validates: without a complete stream a sim driver refuses (V1-R17/V2-R14),
        staying in RESUMING or going to ERROR; a real one may accept an empty session."""
        self.validating = True
        if self.resume_data == "complete":
            return None
        if self.sim or self.resume_data == "partial":
            return Expect(False, ("RESUMING", "ERROR"))
        return Expect(None, (target, "RESUMING", "ERROR"))

    def commit(self, observed: str) -> None:
        """Follow the device's choice among the allowed states after a failure."""
        if observed == "RESUMING" and self.validating:
            self.resume_data = "rejected"  # a refused exit breaks the session: only a reset helps
        self.validating = False
        if observed == "ERROR":
            self.end_session()
        self.state = observed


class V2Oracle(Oracle):
    def __init__(self, flags: int, sim: bool) -> None:
        super().__init__(sim)
        self.flags = flags
        self.pending: list[tuple[str, str]] = []  # the arcs of the last SET: session effects on commit

    def supported(self, target: int) -> bool:
        return 0 <= target < uapi.VFIO_DEVICE_STATE_NR and uapi.mig_state_supported(target, self.flags)

    def hangs(self, target: int) -> bool:
        return self.supported(target) and uapi.is_hanging(self.state, target, self.flags)

    def set_state(self, target: int) -> Expect:
        cur = self.state
        self.pending = []
        self.validating = False
        if cur == "ERROR" and target == uapi.V2_STATES["ERROR"]:
            # V2-R15 says every SET fails in ERROR, but the drivers' loop (`while cur != new`, the
            # sample mdev and the simulator alike) never consults the core when the target is the current state
            return Expect(None, (cur,))
        if not self.supported(target) or cur == "ERROR":
            return Expect(False, (cur,), errno.EINVAL)  # V2-R4, V2-R15
        name = uapi.v2_state_name(target)
        if self.hangs(target):
            return Expect(False, (cur,), errno.EINVAL)  # V2-R12 (sent only where it cannot hang)
        p = uapi.path_names(cur, name, self.flags)
        assert p is not None
        if cur == name:
            return Expect(True, (cur,), fd=False)  # V2-R5
        arcs = list(itertools.pairwise(p))
        for i, arc in enumerate(arcs):
            if self.fault is not None and arc == (self.fault.src, self.fault.dst):
                fault, self.fault = self.fault, None
                self.pending = arcs[:i]
                return Expect(False, ("ERROR",) if fault.to_error else (arc[0],), fault.errno)
            if arc == ("RESUMING", "STOP"):
                refused = self._leave_resuming(name)
                if refused is not None:
                    self.pending = arcs if refused.ok is None else []
                    return refused
        self.pending = arcs
        return Expect(True, (name,), fd=uapi.opens_session([uapi.v2_state(s) for s in p]))

    def commit(self, observed: str) -> None:
        """Apply the arcs the SET ran (all on success, those before the failing one otherwise)."""
        if not self.pending or observed in (self.pending[-1][1], "ERROR"):
            for arc in self.pending:
                self._arc(arc)
        self.pending = []
        super().commit(observed)

    def _arc(self, arc: tuple[str, str]) -> None:
        cur, nxt = arc
        if (uapi.v2_state(cur), uapi.v2_state(nxt)) in uapi.SESSION_OPENING_ARCS:
            self.end_session()
            self.session = "resuming" if nxt == "RESUMING" else "stopcopy" if nxt == "STOP_COPY" else "precopy"
        elif cur in SAVING and nxt == "STOP_COPY":
            self.session = "stopcopy"  # the same fd goes on (V2-R8)
        elif cur in SAVING and nxt in SAVING:
            pass  # PRE_COPY <-> PRE_COPY_P2P
        elif cur in SAVING or cur == "RESUMING":
            self.end_session()

    # -- data_fd operations ----------------------------------------------------------------
    def read(self) -> str:
        """What a read of the session fd may give: 'data-or-empty' (pre-copy: data, 0 or ENOMSG),
        'data-or-eof' (stop-copy: data or 0, never ENOMSG), 'eof' (0 again), 'error' (dead or write-only)."""
        if self.session == "precopy":
            return "data-or-empty"
        if self.session == "stopcopy":
            return "eof" if self.eof else "data-or-eof"
        return "error"

    def precopy_info(self) -> Expect:
        if self.session == "precopy":
            return Expect(True, (self.state,))
        if self.session == "stopcopy":
            return Expect(False, (self.state,), errno.EINVAL)  # V2-R11
        return Expect(False, (self.state,))

    def data_size(self) -> Expect:
        return Expect(True, (self.state,))  # V2-R19: every state


class V1Oracle(Oracle):
    VALUES = {name: uapi.v1_state(name) for name in (*V1_VALID, "ERROR")}

    def set_state(self, bits: int) -> Expect:
        cur = self.state
        self.validating = False
        if cur == "ERROR":
            return Expect(False, (cur,))  # V1-R9
        if not uapi.v1_user_writable(bits):
            return Expect(False, (cur,), errno.EINVAL)  # V1-R6
        name = uapi.v1_state_name(bits)
        if self.fault is not None and (cur, name) == (self.fault.src, self.fault.dst):
            fault, self.fault = self.fault, None
            return Expect(False, ("ERROR",) if fault.to_error else (cur,), fault.errno)  # V1-R8
        if cur == "RESUMING" and name != "RESUMING":
            refused = self._leave_resuming(name)
            if refused is not None:
                return refused
        return Expect(True, (name,))

    def commit(self, observed: str) -> None:
        cur, new = self.state, observed
        saving = ("STOP_COPY", "PRE_COPY")
        if new == "RESUMING" and self.validating:
            self.resume_data = "rejected"  # a refused exit breaks the session: only a reset helps
        self.validating = False
        if new == "ERROR":
            self.end_session()
        elif new != cur:
            if cur == "RESUMING" or (cur in saving and new not in saving):
                self.end_session()
            if new in saving and cur not in saving:
                self.end_session()
                self.session = "stopcopy" if new == "STOP_COPY" else "precopy"
            elif new == "STOP_COPY":
                self.session = "stopcopy"
            if new == "RESUMING":
                self.end_session()
                self.session = "resuming"
        self.state = new
