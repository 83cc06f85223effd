"""Migration metrics across a lab's runs: each run's figures per device model, host pair and device, kept
in the lab's history, and handed to Allure 3 as performance metrics (a `*-perf.json` in the results) so
its report charts them against the runs in its own history.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

from labs.inventory import Inventory

# the metric records' keys that are trended: title and unit
TRENDED = {
    "downtime_ms": ("downtime", "ms"),
    "total_ms": ("total time", "ms"),
    "device_data_bytes": ("device data", "bytes"),
    "guest_stall_ms": ("guest-visible stall", "ms"),
}
PERF_FILE = "labs-migration-perf.json"


def history_dir(reports: Path, lab: str) -> Path:
    """One directory per lab: a nightly of lab A never compares itself with lab B."""
    return reports / "history" / re.sub(r"[^\w.-]", "_", lab)


def series(rec: dict[str, Any]) -> str:
    """What a figure belongs to: "<model> <source>-><destination>:<device>"."""
    return f"{rec.get('model', '?')} {rec.get('subject', '?')}"


def with_models(metrics: list[dict[str, Any]], inv: Inventory | None) -> list[dict[str, Any]]:
    """Each record with its device model: the subject is "<src host>-><dst host>:<device name>"."""
    models = {d.id: d.spec.model_key for d in inv.devices} if inv is not None else {}
    out = []
    for m in metrics:
        pair, _, name = str(m.get("subject", "")).partition(":")
        device_id = f"{pair.partition('->')[0]}:{name}"
        out.append({"model": models.get(device_id, "?"), **m})
    return out


def completed(rec: dict[str, Any]) -> bool:
    """A failed migration's figures say nothing about how long a good one takes."""
    return rec.get("ok", 1) == 1


def read_history(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_allure_metrics(results_dir: Path, metrics: list[dict[str, Any]]) -> Path | None:
    """Allure 3 performance metrics: one key per metric and series, which its history averages per run."""
    now = int(time.time() * 1000)
    samples = []
    for rec in filter(completed, metrics):
        for key, (title, unit) in TRENDED.items():
            value = rec.get(key)
            if isinstance(value, (int, float)):
                name = f"{title}: {series(rec)}"
                samples.append(
                    {
                        "id": str(uuid.uuid4()),
                        "key": name,
                        "value": value,
                        "start": now,
                        "stop": now,
                        "title": name,
                        "unit": unit,
                        "group": series(rec),
                        "better": "lower",
                    }
                )
    if not samples:
        return None
    path = results_dir / PERF_FILE
    path.write_text(json.dumps(samples, indent=2))
    return path
