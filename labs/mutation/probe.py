"""One worker: its own copy of the tree, a mutant written into it, the conformance checks run against it.

The checks run in this process, as in tests/test_defects.py: a local agent whose sim backend imports
labs from the worker's copy (the mutant is the device under test), and a second agent on the
unmutated snapshot for the peer a check resumes into or saves from. A fresh device-under-test
agent per mutant: the mutated module is imported once per process. The first failing check kills
the mutant; when every check passes, a few model walks (fixed seed) get their turn.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labs.conformance.catalogue import SMALL, device_spec
from labs.conformance.checks import CHECKS, checks_for
from labs.mutation.mutants import Mutant, diff, diff_hash, mutated_source
from labs.sim.defects import CORRECT, Defect
from labs.vfio.client import AgentClient, AgentInfraError, AgentProtocolError, SubprocessDuplex
from labs.vfio.device import DeviceHandle

KILLED, SURVIVED, TIMEOUT = "killed", "survived", "timeout"
# same-second rewrites of one file would reuse a stale .pyc (its key is mtime and size)
AGENT_ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def configs(protocol: str) -> list[Defect]:
    """The correct driver setups a mutant of `protocol` is judged in: v1 with and without pre-copy data;
    v2 with every flag, then bare STOP_COPY."""
    if protocol == "v1":
        return [CORRECT["v1"], CORRECT["v1-no-precopy"]]
    full = CORRECT["v2"]
    bare = tuple((k, v) for k, v in full.options if k not in ("p2p", "pre_copy"))
    return [full, Defect("V2Driver-stop-copy", "", "v2", full.driver, "v2, STOP_COPY only", bare)]


def applicable(config: Defect) -> list[str]:
    caps = set(device_spec(config)["capabilities"])
    return [c.rule for c in checks_for(config.protocol) if set(c.requires) <= caps]


@dataclass
class Verdict:
    id: str
    status: str  # killed | survived | timeout
    by: str = ""  # the rule (or model walk) that failed first
    message: str = ""
    seconds: float = 0.0
    diff: str = ""
    diff_hash: str = ""
    checks_run: int = 0


@dataclass
class Ctx:
    """A CheckContext: the mutant (its own agent) under test, the unmutated driver (another agent) as peer."""

    dut: AgentClient
    peer_client: AgentClient
    tmp: Path
    config: Defect
    opened: list[DeviceHandle] = field(default_factory=list)

    def _open(self, client: AgentClient) -> DeviceHandle:
        n = len(self.opened)
        opts = {**SMALL, **dict(self.config.options)}
        dev = DeviceHandle.open_sim(
            client, self.config.driver, str(self.tmp / f"d{n}"), opts, name=f"d{n}", protocol=self.config.protocol
        )
        self.opened.append(dev)
        return dev

    def open(self) -> DeviceHandle:
        return self._open(self.dut)

    def peer(self) -> DeviceHandle:
        return self._open(self.peer_client)

    def step(self, title: str) -> Any:
        return nullcontext()

    def close(self) -> None:
        for dev in self.opened:
            try:
                dev.close()
            except Exception:  # a broken mutant may not close; its agent goes anyway
                pass


class Worker:
    def __init__(self, snapshot: Path, workdir: Path, timeout: float, walks: int) -> None:
        self.snapshot = snapshot  # the unmutated tree (what the peer imports)
        self.tree = workdir / "tree"  # this worker's copy (what the device under test imports)
        self.scratch = workdir / "devices"
        self.timeout = timeout
        self.walks = walks
        self.peer_client: AgentClient | None = None
        self.checks = itertools.count()
        if not self.tree.exists():
            shutil.copytree(snapshot / "labs", self.tree / "labs", ignore=shutil.ignore_patterns("__pycache__"))

    def agent(self, name: str, root: Path) -> AgentClient:
        timeout = max(2.0, min(10.0, self.timeout / 2))
        return AgentClient(SubprocessDuplex(env=AGENT_ENV), name=name, timeout=timeout, sys_path=[str(root)])

    def peer(self) -> AgentClient:
        if self.peer_client is None or self.peer_client.dead:
            if self.peer_client is not None:
                self.peer_client.kill()
            self.peer_client = self.agent("peer", self.snapshot)
        return self.peer_client

    def close(self) -> None:
        if self.peer_client is not None:
            self.peer_client.close()

    def run(self, mutant: Mutant) -> Verdict:
        start = time.monotonic()
        path = self.tree / mutant.file
        source = (self.snapshot / mutant.file).read_text()
        mutated = mutated_source(source, mutant)
        text = diff(source, mutated, mutant.file)
        path.write_text(mutated)
        try:
            verdict = self.judge(mutant.id, mutant.protocols)
        finally:
            path.write_text(source)
            shutil.rmtree(self.scratch, ignore_errors=True)
        verdict.diff, verdict.diff_hash = text, diff_hash(text)
        verdict.seconds = round(time.monotonic() - start, 2)
        return verdict

    def baseline(self) -> Verdict:
        """The unmutated tree must pass everything, or no verdict below means anything."""
        try:
            return self.judge("baseline (no mutation)", ("v1", "v2"))
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def judge(self, ident: str, protocols: tuple[str, ...]) -> Verdict:
        dut = self.agent("mutant", self.tree)
        ran = 0
        try:
            for protocol in protocols:
                for config in configs(protocol):
                    for rule in applicable(config):
                        ran += 1
                        failure = self.one(dut, config, lambda ctx, rule=rule: CHECKS[rule](ctx))
                        if failure is not None:
                            return Verdict(ident, failure[0], rule, failure[1], checks_run=ran)
                    if self.walks:
                        ran += 1
                        failure = self.one(dut, config, lambda ctx: model_walks(ctx, self.walks))
                        if failure is not None:
                            return Verdict(ident, failure[0], f"model {config.protocol}", failure[1], checks_run=ran)
                    if dut.dead:  # a walk's failure may leave it unusable; nothing failed, so it is not
                        dut = self.agent("mutant", self.tree)
            return Verdict(ident, SURVIVED, checks_run=ran)
        finally:
            dut.kill() if dut.dead else dut.close()

    def one(self, dut: AgentClient, config: Defect, fn: Any) -> tuple[str, str] | None:
        """Run one check; None if it passed, else (killed|timeout, why)."""
        if dut.dead:
            return KILLED, f"the mutant's agent is gone: {dut.dead}"
        tmp = self.scratch / f"c{next(self.checks)}"  # fresh all-zero devices per check, as in tests
        tmp.mkdir(parents=True, exist_ok=True)
        ctx = Ctx(dut, self.peer(), tmp, config)
        try:
            fn(ctx)
            return None
        except AgentInfraError as exc:
            status = KILLED if isinstance(exc, AgentProtocolError) else TIMEOUT if _hung(exc) else KILLED
            return status, _short(exc)
        except Exception as exc:
            return KILLED, _short(exc)
        finally:
            ctx.close()


def _hung(exc: AgentInfraError) -> bool:
    text = str(exc)
    return "no reply for" in text or "made no progress" in text or "watchdog" in text


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return " ".join(text[:3])[:300]


def model_walks(ctx: Ctx, examples: int) -> None:
    """suites/conformance/test_model.py's state machine on the mutant, a fixed seed, no shrinking."""
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.stateful import run_state_machine_as_test

    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.append(root)  # the suites package lives beside labs, not in it
    from suites.conformance import test_model

    base = test_model.V1Machine if ctx.config.protocol == "v1" else test_model.V2Machine
    # the suite's opener wants a lab; each walk gets a fresh mutant device, as on a lab
    test_model.open_dut = lambda stack, lab, device: ctx.open()
    device = type("MutantDevice", (), {"id": "mutant"})()
    machine = type(f"{base.__name__}_mutant", (base,), {"lab": None, "device": device, "saved": None})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=20,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        ),
    )


def serve(conn: Any, snapshot: str, workdir: str, timeout: float, walks: int) -> None:
    """The worker process: its own process group (the runner kills it with its agents on a timeout)."""
    os.setpgid(0, 0)
    worker = Worker(Path(snapshot), Path(workdir), timeout, walks)
    while True:
        item = conn.recv()
        if item is None:
            break
        mutant = Mutant(**item)
        try:
            verdict = worker.run(mutant)
        except Exception:  # the runner reports it as an error of the tool, not a verdict
            verdict = Verdict(mutant.id, "error", message=traceback.format_exc()[-600:])
        conn.send(verdict)
    worker.close()
