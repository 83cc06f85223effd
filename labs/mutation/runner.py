"""Run every mutant on N workers, judge the score, write reports/mutants.{json,md}.

Each worker is a process in its own process group with its own copy of the tree
(probe.serve); a mutant that outlives --timeout is "timeout" and its worker,
agents included, is killed and replaced. Mutants listed in the equivalents file
(docs/mutants-equivalent.md) and not killed are "equivalent": out of the score,
which is killed / (total - equivalent). An equivalence entry whose mutant was
killed is stale and reported as such.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from rich.console import Console

from labs.mutation import probe
from labs.mutation.mutants import Mutant, enumerate_mutants, sample
from labs.paths import REPO_ROOT, REPORTS

EQUIVALENT_FILE = REPO_ROOT / "docs" / "mutants-equivalent.md"
_ENTRY = re.compile(r"^- `(?P<id>[^`]+)`\s*(?:—|-|:)\s*(?P<why>\S.*)$")


def load_equivalents(path: Path) -> dict[str, str]:
    """`- \\`id\\` — why` lines of the equivalents file; a line that starts like one but is not, is an error."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.startswith("- `"):
            continue
        m = _ENTRY.match(line)
        if m is None or m["id"].count("::") != 3:
            raise ValueError(f"{path}:{n}: expected - `file::function::operator::k` — why, got {line!r}")
        out[m["id"]] = m["why"].strip()
    return out


@dataclass
class Slot:
    """One worker process and what it is doing."""

    proc: Any
    conn: Connection
    mutant: Mutant | None = None
    deadline: float = 0.0


@dataclass
class Run:
    verdicts: list[probe.Verdict] = field(default_factory=list)
    restarts: int = 0


class Pool:
    def __init__(self, jobs: int, snapshot: Path, work: Path, timeout: float, walks: int) -> None:
        self.ctx = multiprocessing.get_context("spawn")  # no inherited threads or open agents
        self.snapshot, self.work, self.timeout, self.walks = snapshot, work, timeout, walks
        self.slots = [self._start(i) for i in range(jobs)]

    def _start(self, i: int) -> Slot:
        parent, child = self.ctx.Pipe()
        args = (child, str(self.snapshot), str(self.work / f"w{i}"), self.timeout, self.walks)
        proc = self.ctx.Process(target=probe.serve, args=args, name=f"mutants-w{i}", daemon=True)
        proc.start()
        child.close()
        return Slot(proc, parent)

    def _kill(self, i: int) -> None:
        slot = self.slots[i]
        try:
            os.killpg(slot.proc.pid, signal.SIGKILL)  # the worker and the agents it started
        except ProcessLookupError:
            pass
        slot.proc.join(5)
        slot.conn.close()

    def run(self, mutants: list[Mutant], progress: Any) -> Run:
        todo = list(reversed(mutants))
        out = Run()
        while todo or any(s.mutant for s in self.slots):
            for slot in self.slots:
                if slot.mutant is None and todo:
                    slot.mutant = todo.pop()
                    slot.deadline = time.monotonic() + self.timeout
                    slot.conn.send(asdict(slot.mutant))
            busy = [s for s in self.slots if s.mutant is not None]
            soonest = min(s.deadline for s in busy)
            ready = wait([s.conn for s in busy], timeout=max(0.0, soonest - time.monotonic()))
            for i, slot in enumerate(self.slots):
                if slot.mutant is None:
                    continue
                verdict: probe.Verdict | None = None
                if slot.conn in ready:
                    try:
                        verdict = slot.conn.recv()
                    except (EOFError, OSError):  # the worker died: the mutant took it down
                        verdict = probe.Verdict(slot.mutant.id, probe.KILLED, "worker", "the worker process died")
                        self._restart(i, out)
                elif time.monotonic() >= slot.deadline:
                    verdict = probe.Verdict(slot.mutant.id, probe.TIMEOUT, message=f"no verdict in {self.timeout} s")
                    verdict.seconds = self.timeout
                    self._restart(i, out)
                if verdict is not None:
                    out.verdicts.append(verdict)
                    self.slots[i].mutant = None
                    progress(len(out.verdicts), verdict)
        return out

    def _restart(self, i: int, out: Run) -> None:
        self._kill(i)
        self.slots[i] = self._start(i)
        out.restarts += 1

    def close(self) -> None:
        for i, slot in enumerate(self.slots):
            try:
                slot.conn.send(None)
            except OSError:
                pass
            slot.proc.join(10)
            if slot.proc.is_alive():
                self._kill(i)


def snapshot_tree(dest: Path) -> Path:
    """The unmutated tree every worker copies and the peer imports: a run is immune to edits made meanwhile."""
    shutil.copytree(REPO_ROOT / "labs", dest / "labs", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def summarize(
    mutants: list[Mutant], verdicts: list[probe.Verdict], equivalents: dict[str, str], wall: float
) -> dict[str, Any]:
    by_id = {v.id: v for v in verdicts}
    counts = {probe.KILLED: 0, probe.SURVIVED: 0, probe.TIMEOUT: 0, "equivalent": 0, "error": 0}
    stale = []
    for m in mutants:
        v = by_id[m.id]
        if m.id in equivalents:
            if v.status == probe.KILLED:
                stale.append(m.id)
            else:
                v.status = "equivalent"
                v.message = equivalents[m.id]
        counts[v.status] = counts.get(v.status, 0) + 1
    judged = len(mutants) - counts["equivalent"]
    score = 100.0 * counts[probe.KILLED] / judged if judged else 100.0
    return {
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "total": len(mutants),
        **counts,
        "score": round(score, 1),
        "wall_s": round(wall, 1),
        "stale_equivalents": stale,
    }


def markdown(mutants: list[Mutant], verdicts: list[probe.Verdict], summary: dict[str, Any], settings: str) -> str:
    by_id = {v.id: v for v in verdicts}
    s = summary
    lines = [
        "# Mutation testing of the conformance checks",
        "",
        f"`lab mutants` ({settings}), {s['finished']}: {s['total']} mutants of the correct sim drivers, "
        f"{s['killed']} killed, {s['survived']} survived, {s['timeout']} timed out, {s['equivalent']} equivalent; "
        f"score {s['score']} % (killed / (total - equivalent)) in {s['wall_s']} s.",
        "",
        "Every survivor is a change to a correct driver that no check notices: a check to strengthen, "
        "or, with one line why, an entry in docs/mutants-equivalent.md.",
        "",
    ]
    if s["stale_equivalents"]:
        lines += ["Stale equivalents (listed, but killed now): " + ", ".join(f"`{i}`" for i in s["stale_equivalents"])]
        lines.append("")
    for status, title in ((probe.SURVIVED, "Survivors"), (probe.TIMEOUT, "Timed out"), ("error", "Errors")):
        chosen = [m for m in mutants if by_id[m.id].status == status]
        lines += [f"## {title} ({len(chosen)})", ""]
        for m in chosen:
            v = by_id[m.id]
            lines += [f"### `{m.id}` (line {m.line})", ""]
            if v.message:
                lines += [v.message, ""]
            lines += ["```diff", v.diff, "```", ""]
    equivalent = [m for m in mutants if by_id[m.id].status == "equivalent"]
    lines += [f"## Equivalent ({len(equivalent)})", ""]
    lines += [f"- `{m.id}`: {by_id[m.id].message}" for m in equivalent]
    return "\n".join(lines) + "\n"


def run_mutants(
    console: Console,
    only: list[str] | None = None,
    jobs: int | None = None,
    max_mutants: int | None = None,
    timeout: float = 60.0,
    threshold: float = 95.0,
    walks: int = 5,
    report_dir: Path | None = None,
    equivalents_file: Path | None = None,
    mutants: list[Mutant] | None = None,
) -> int:
    """0 when the score reaches `threshold`, 1 below it, 2 when the tool itself failed on a mutant."""
    report_dir = report_dir or REPORTS
    equivalents = load_equivalents(equivalents_file or EQUIVALENT_FILE)
    jobs = jobs or os.cpu_count() or 1
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="labs-mutants-") as tmp:
        snapshot = snapshot_tree(Path(tmp) / "snapshot")
        chosen = mutants if mutants is not None else sample(enumerate_mutants(snapshot, only), max_mutants)
        base = probe.Worker(snapshot, Path(tmp) / "baseline", timeout, walks)
        try:
            verdict = base.baseline()
        finally:
            base.close()
        if verdict.status != probe.SURVIVED:
            console.print(f"[bold red]mutants: the unmutated drivers fail {verdict.by}: {verdict.message}[/]")
            return 2
        console.print(
            f"mutants: {len(chosen)} mutants of the correct sim drivers, {jobs} workers, "
            f"timeout {timeout:g} s, {walks} model walks per survivor of the checks ..."
        )
        pool = Pool(max(1, min(jobs, len(chosen))), snapshot, Path(tmp), timeout, walks)

        def progress(done: int, v: probe.Verdict) -> None:
            if v.status not in (probe.KILLED,) or done % 50 == 0:
                console.print(f"  [{done}/{len(chosen)}] {v.status:8} {v.id} {v.by}".rstrip())

        try:
            result = pool.run(chosen, progress) if chosen else Run()
        finally:
            pool.close()
    summary = summarize(chosen, result.verdicts, equivalents, time.monotonic() - start)
    summary.update(jobs=jobs, timeout_s=timeout, walks=walks, threshold=threshold, worker_restarts=result.restarts)
    settings = f"{jobs} workers, timeout {timeout:g} s, {walks} model walks" + (
        f", a sample of {max_mutants}" if max_mutants else ""
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    by_id = {v.id: v for v in result.verdicts}
    rows = []
    for m in chosen:
        v = by_id[m.id]
        row = {**m.as_dict(), **{k: val for k, val in asdict(v).items() if k != "id"}}
        if v.status == probe.KILLED:
            row.pop("diff")  # survivors keep their diff; a killed mutant is found again by its id
        rows.append(row)
    (report_dir / "mutants.json").write_text(json.dumps({"summary": summary, "mutants": rows}, indent=1) + "\n")
    (report_dir / "mutants.md").write_text(markdown(chosen, result.verdicts, summary, settings))
    s = summary
    console.print(
        f"killed {s['killed']}, survived {s['survived']}, timed out {s['timeout']}, equivalent {s['equivalent']}"
        f"{', errors ' + str(s['error']) if s['error'] else ''}: score {s['score']} % "
        f"(threshold {threshold:g} %), {s['wall_s']} s"
    )
    console.print(f"written: {report_dir / 'mutants.md'}, {report_dir / 'mutants.json'}")
    if s["error"]:
        return 2
    return 0 if s["score"] >= threshold else 1
