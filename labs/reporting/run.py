"""`lab run`: the suites against one lab, results under reports/<run-id>/."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from labs.errors import InfraError
from labs.paths import REPO_ROOT, REPORTS, SUITES
from labs.reporting.metrics import read_run_metrics
from labs.reporting.plots import append_history, plot_run, plot_trend
from labs.reporting.render import render
from labs.runtime import new_run_id, open_inventory


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


def plot_metrics(run_dir: Path, run_id: str) -> list[Path]:
    metrics = read_run_metrics(run_dir / "allure-results")
    if not metrics:
        return []
    history = REPORTS / "metrics-history.jsonl"
    append_history(history, run_id, metrics)
    written = plot_run(metrics, run_dir / "plots", run_id)
    trend = plot_trend(history, run_dir / "plots" / "trend-downtime.png")
    return [*written, *([trend] if trend else [])]


def run_suites(inventory: Path, suites: str | None, pytest_args: list[str], console: Console) -> int:
    inv = open_inventory(inventory)  # a bad inventory stops here, in one line, before pytest starts
    run_id = new_run_id()
    run_dir = REPORTS / run_id
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
    rc = subprocess.call(cmd, cwd=REPO_ROOT, env={**os.environ, "LABS_RUN_ID": run_id})
    _link_latest(run_dir)
    t = junit_totals(junit)
    colour = "green" if rc == 0 else "red"
    console.print(
        f"[{colour}]run {run_id}: {t.passed} passed, {t.failures} failed, {t.errors} errors, "
        f"{t.skipped} skipped in {t.seconds:.1f}s (pytest exit {rc})[/]",
        highlight=False,
    )
    console.print(f"allure results: {results.relative_to(REPO_ROOT)}", highlight=False)
    console.print(f"junit:          {junit.relative_to(REPO_ROOT)}", highlight=False)
    console.print(f"latest run:     {(REPORTS / 'latest').relative_to(REPO_ROOT)} -> {run_id}", highlight=False)
    if results.is_dir():
        for png in plot_metrics(run_dir, run_id):
            console.print(f"plot:           {png.relative_to(REPO_ROOT)}", highlight=False)
        try:
            rendered = render(run_dir, f"labs {inv.name} {run_id}")
        except InfraError as exc:
            console.print(f"[yellow]report not rendered: {exc}[/]", highlight=False)
        else:
            console.print(f"html report:    {rendered.html.relative_to(REPO_ROOT)}", highlight=False)
            console.print(f"single file:    {rendered.single.relative_to(REPO_ROOT)}", highlight=False)
    return rc
