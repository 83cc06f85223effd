"""Render a run's Allure results to HTML with Allure Report 3 (npm `allure`, no Java).

The npm package is pinned in tools/report/package-lock.json and installed on
first use. History accumulates in reports/history.jsonl so nightly trends show.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labs.errors import InfraError
from labs.paths import REPO_ROOT, REPORTS

TOOLS = REPO_ROOT / "tools" / "report"
ALLURE_BIN = TOOLS / "node_modules" / ".bin" / "allure"
HISTORY = REPORTS / "history.jsonl"


@dataclass(frozen=True)
class Rendered:
    html: Path  # the multi-file report's index.html
    single: Path  # one self-contained index.html, for mail


def ensure_allure() -> Path:
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


def render(
    run_dir: Path, name: str | None = None, history: Path = HISTORY, resolutions: dict[str, Any] | None = None
) -> Rendered:
    results = run_dir / "allure-results"
    if not results.is_dir():
        raise InfraError(f"{results}: no Allure results to render")
    out = run_dir / "html"
    title = name or f"labs {run_dir.name}"
    group_by = ["epic", "feature", "story"]
    config = {
        "name": title,
        "output": str(out),
        "historyPath": str(history),
        "plugins": {
            "awesome": {"options": {"reportName": title, "groupBy": group_by}},
            "single": {
                "import": "@allurereport/plugin-awesome",
                "options": {"reportName": title, "singleFile": True, "groupBy": group_by},
            },
        },
    }
    if resolutions:
        config["resolutions"] = resolutions  # known issues (labs.reporting.known)
    (run_dir / "allurerc.json").write_text(json.dumps(config, indent=2))
    proc = subprocess.run(
        [str(ensure_allure()), "generate", str(results)], cwd=run_dir, capture_output=True, text=True, timeout=600
    )
    rendered = Rendered(out / "awesome" / "index.html", out / "single" / "index.html")
    if proc.returncode != 0 or not rendered.html.exists():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise InfraError(f"allure generate {results} failed: {tail}")
    return rendered
