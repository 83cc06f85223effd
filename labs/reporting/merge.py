"""One report over the runs of several labs (or host pairs, each its own inventory): Allure 3 environments,
one per lab, matched on each result's "lab" label; each run's gates show in its lab's quality-gate tab."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from labs.attachments import ENV_LABEL
from labs.errors import ConfigError
from labs.inventory.models import Gates
from labs.reporting.gates import GateFailure, allure_results
from labs.reporting.render import Rendered, render


def lab_of(run_dir: Path) -> str | None:
    """The lab a run's results name (None: results written before runs were labelled with their lab)."""
    for path in sorted((run_dir / "allure-results").glob("*-result.json")):
        for label in json.loads(path.read_text()).get("labels", []):
            if label.get("name") == ENV_LABEL:
                return str(label["value"])
    return None


def gate_results_of(run_dir: Path, environment: str | None = None) -> list[dict[str, Any]]:
    """The gates `lab run` judged (its gates.json) as Allure quality-gate results; none for a run without."""
    gates_file = run_dir / "gates.json"
    if not gates_file.exists():
        return []
    doc = json.loads(gates_file.read_text())
    failures = [GateFailure(f["gate"], f["detail"]) for f in doc.get("failed", [])]
    return allure_results(Gates.model_validate(doc["gates"]), failures, environment)


def merge(run_dirs: list[Path], out_dir: Path) -> Rendered:
    labs: dict[Path, str] = {}
    for run_dir in run_dirs:
        if not (run_dir / "allure-results").is_dir():
            raise ConfigError(f"{run_dir}: not a run directory (no allure-results)")
        lab = lab_of(run_dir)
        if lab is None:
            raise ConfigError(f"{run_dir}: its results name no lab (label {ENV_LABEL!r}): re-run it to merge it")
        labs[run_dir] = lab
    gate_results = [r for run_dir, lab in labs.items() for r in gate_results_of(run_dir, lab)]
    out_dir.mkdir(parents=True, exist_ok=True)
    envs = sorted(set(labs.values()))
    name = f"labs {', '.join(envs)} ({time.strftime('%Y-%m-%d')})"
    sources = [d / "allure-results" for d in run_dirs]
    return render(out_dir, name, None, None, gate_results, sources, envs)
