"""`lab run`: the suites against one lab, results under reports/<run-id>/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from labs.certify.results import read_results
from labs.errors import InfraError
from labs.inventory import Inventory
from labs.paths import REPO_ROOT, REPORTS, SUITES
from labs.reporting import known, regression, trends
from labs.reporting.gates import GateFailure, allure_results, evaluate
from labs.reporting.metrics import read_run_metrics
from labs.reporting.plots import append_history, plot_run, plot_trend
from labs.reporting.render import render
from labs.session import new_run_id, open_inventory


@dataclass(frozen=True)
class Totals:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def junit_totals(junit: Path) -> Totals:
    if not junit.exists():
        return Totals()
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    t = [0, 0, 0, 0]
    secs = 0.0
    for s in suites:
        for i, key in enumerate(("tests", "failures", "errors", "skipped")):
            t[i] += int(s.get(key, 0))
        secs += float(s.get("time", 0))
    return Totals(t[0], t[1], t[2], t[3], secs)


def _link_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    tmp.replace(latest)


def plot_metrics(run_dir: Path, run_id: str, metrics: list[dict[str, Any]], history: Path) -> list[Path]:
    """This run's figures, then the lab's trend of each trended figure (the run joins the history first)."""
    if not metrics:
        return []
    history.parent.mkdir(parents=True, exist_ok=True)
    append_history(history, run_id, metrics)
    written = plot_run(metrics, run_dir / "plots", run_id)
    for key in trends.TRENDED:
        trend = plot_trend(history, run_dir / "plots" / f"trend-{key.removesuffix('_ms')}.png", key)
        written += [trend] if trend else []
    return written


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def check_gates(
    run_dir: Path,
    inv: Inventory,
    issues: list[known.KnownIssue],
    seconds: float,
    regressions: list[GateFailure] | None = None,
) -> tuple[list[GateFailure], list[known.Seen]]:
    """`regressions`: the metric regression gate's findings (labs.reporting.regression), judged beforehand."""
    results_dir = run_dir / "allure-results"
    results = read_results(results_dir) if results_dir.is_dir() else []
    seen = known.classify(issues, results, inv)
    gates = inv.settings.gates
    failures = evaluate(gates, results, seconds, known.known_failures(seen)) + (regressions or [])
    doc = {
        "gates": gates.model_dump(),
        "seconds": round(seconds, 1),
        "failed": [f.__dict__ for f in failures],
        "known_issues": {s.issue.id: {"failed": [r.name for r in s.failed], "fixed": s.fixed} for s in seen},
    }
    (run_dir / "gates.json").write_text(json.dumps(doc, indent=2))
    return failures, seen


def run_suites(
    inventory: Path, suites: str | None, pytest_args: list[str], console: Console, reports: Path = REPORTS
) -> int:
    inv = open_inventory(inventory)  # a bad inventory stops here, in one line, before pytest starts
    issues = known.for_inventory(inv)
    run_id = new_run_id()
    run_dir = reports / run_id
    results = run_dir / "allure-results"
    junit = run_dir / "junit.xml"
    run_dir.mkdir(parents=True)
    paths = suites.split() if suites else [str(SUITES)]
    cmd = [
        sys.executable, "-m", "pytest", *paths,
        f"--inventory={inventory}", f"--alluredir={results}", f"--junitxml={junit}",
        "-o", "junit_family=xunit2", "-p", "no:cacheprovider", *pytest_args,
    ]  # fmt: skip
    console.print(f"[bold]run {run_id}[/] on lab [bold]{inv.name}[/] ({inventory})", highlight=False)
    started = time.monotonic()
    rc = subprocess.call(cmd, cwd=REPO_ROOT, env={**os.environ, "LABS_RUN_ID": run_id})
    seconds = time.monotonic() - started
    _link_latest(run_dir)
    t = junit_totals(junit)
    metrics = trends.with_models(read_run_metrics(results), inv) if results.is_dir() else []
    history = trends.history_dir(reports, inv.name)
    regressions = regression.evaluate(inv.settings.gates, metrics, trends.read_history(history / "metrics.jsonl"))
    failed_gates, seen = check_gates(run_dir, inv, issues, seconds, regressions)
    # pytest's 1 means "tests failed", which the gates judge; anything else (interrupted, usage) stands
    status = rc if rc not in (0, 1) else (1 if failed_gates else 0)
    colour = "green" if status == 0 else "red"
    console.print(
        f"[{colour}]run {run_id}: {t.passed} passed, {t.failures} failed, {t.errors} errors, "
        f"{t.skipped} skipped in {t.seconds:.1f}s (pytest exit {rc})[/]",
        highlight=False,
    )
    for line in known.lines(seen):
        console.print(f"[yellow]{line}[/]", highlight=False)
    for gate in failed_gates:
        console.print(f"[red]{gate.line()}[/]", highlight=False)
    console.print(f"allure results: {_shown(results)}", highlight=False)
    console.print(f"junit:          {_shown(junit)}", highlight=False)
    console.print(f"latest run:     {_shown(reports / 'latest')} -> {run_id}", highlight=False)
    if results.is_dir():
        for png in plot_metrics(run_dir, run_id, metrics, history / "metrics.jsonl"):
            console.print(f"plot:           {_shown(png)}", highlight=False)
        trends.write_allure_metrics(results, metrics)
        try:
            resolutions = known.allure_resolutions(seen)
            gate_results = allure_results(inv.settings.gates, failed_gates)
            name = f"labs {inv.name} {run_id}"
            rendered = render(run_dir, name, history / "allure.jsonl", resolutions, gate_results)
        except InfraError as exc:
            console.print(f"[yellow]report not rendered: {exc}[/]", highlight=False)
        else:
            single = f"report (file):  {_shown(rendered.single)}  (one file: opens from disk)"
            console.print(single, highlight=False)
            served = f"full report:    ./lab report --open {_shown(run_dir)}  (needs HTTP: served on 127.0.0.1)"
            console.print(served, highlight=False)
    return status
