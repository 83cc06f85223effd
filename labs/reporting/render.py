"""Render a run's Allure results to HTML with Allure Report 3 (npm `allure`, no Java).

The npm package is pinned in tools/report/package-lock.json and installed on
first use. Each lab's history accumulates under reports/history/<lab>/ so nightly
trends show (the awesome report's history, the dashboard plugin's charts).
tools/report/generate.mjs is `allure generate` that also fills the quality-gate tab.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from labs.attachments import ENV_LABEL
from labs.errors import InfraError
from labs.paths import REPO_ROOT

TOOLS = REPO_ROOT / "tools" / "report"
ALLURE_BIN = TOOLS / "node_modules" / ".bin" / "allure"
GENERATE = TOOLS / "generate.mjs"
HISTORY_LIMIT = 30  # runs of a lab that its report's history (and trend charts) keep


@dataclass(frozen=True)
class Rendered:
    html: Path  # the multi-file report's index.html
    single: Path  # one self-contained index.html, for mail


def ensure_allure() -> Path:
    # one install at a time (xdist workers, concurrent runs): `npm ci` empties node_modules first, and a second
    # one failed with ENOTEMPTY while the first filled it
    with FileLock(str(TOOLS / ".npm-ci.lock")):
        if ALLURE_BIN.exists():
            return ALLURE_BIN
        npm = shutil.which("npm")
        if npm is None or shutil.which("node") is None:
            raise InfraError("rendering needs Node.js 20+ and npm (./lab installs them when run as root)")
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=TOOLS, capture_output=True, text=True
        )
        if proc.returncode != 0 or not ALLURE_BIN.exists():
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise InfraError(f"npm ci in {TOOLS} failed: {tail}")
        return ALLURE_BIN


def allurerc(config: dict[str, Any], environments: list[str]) -> str:
    """allurerc.mjs: the config as JSON, plus what JSON cannot hold (environment matchers are functions)."""
    body = json.dumps(config, indent=2)
    if not environments:
        return f"export default {body};\n"
    matchers = ",\n".join(
        f"  {json.dumps(env)}: {{ matcher: ({{ labels }}) => labels.some((l) => l.name === {json.dumps(ENV_LABEL)}"
        f" && l.value === {json.dumps(env)}) }}"
        for env in environments
    )
    return f"const config = {body};\nconfig.environments = {{\n{matchers}\n}};\nexport default config;\n"


def render(
    run_dir: Path,
    name: str | None = None,
    history: Path | None = None,
    resolutions: dict[str, Any] | None = None,
    quality_gate: list[dict[str, Any]] | None = None,
    sources: list[Path] | None = None,
    environments: list[str] | None = None,
) -> Rendered:
    """`sources`: the results directories (default: the run's own); `environments`: the lab names that split a
    report of several labs; `history`: the lab's Allure history (None: a report that keeps none)."""
    dirs = sources or [run_dir / "allure-results"]
    for results in dirs:
        if not results.is_dir():
            raise InfraError(f"{results}: no Allure results to render")
    out = run_dir / "html"
    title = name or f"labs {run_dir.name}"
    group_by = ["epic", "feature", "story"]
    awesome = {"reportName": title, "groupBy": group_by}
    config: dict[str, Any] = {
        "name": title,
        "output": str(out),
        "plugins": {
            "awesome": {"options": awesome},
            "single": {"import": "@allurereport/plugin-awesome", "options": {**awesome, "singleFile": True}},
            "dashboard": {"options": {"reportName": title}},
        },
    }
    if history is not None:
        history.parent.mkdir(parents=True, exist_ok=True)
        config |= {"historyPath": str(history), "historyLimit": HISTORY_LIMIT}
    if resolutions:
        config["resolutions"] = resolutions  # known issues (labs.reporting.known)
    (run_dir / "allurerc.json").unlink(missing_ok=True)  # Allure would read it before the module
    (run_dir / "allurerc.mjs").write_text(allurerc(config, environments or []))
    gates_file = ""
    if quality_gate is not None:
        (run_dir / "quality-gate.json").write_text(json.dumps(quality_gate, indent=2))
        gates_file = str(run_dir / "quality-gate.json")
    node = shutil.which("node") or "node"
    ensure_allure()
    cmd = [node, str(GENERATE), str(run_dir), gates_file, *map(str, dirs)]
    proc = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True, timeout=600)
    rendered = Rendered(out / "awesome" / "index.html", out / "single" / "index.html")
    if proc.returncode != 0 or not rendered.html.exists():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise InfraError(f"allure generate {' '.join(map(str, dirs))} failed: {tail}")
    return rendered
