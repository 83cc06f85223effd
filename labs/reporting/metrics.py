"""Migration metrics: recorded by scenarios as Allure attachments (labs.attachments.record_metrics),
read back here after the run.

A metric record is one JSON object per scenario run: the device (or pair), the
scenario, and numbers such as downtime_ms, total_ms, device_data_bytes and
throughput_mbps. Recording through the attachment keeps them beside the test
that produced them, and needs no shared file between xdist workers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from labs.attachments import METRICS_ATTACHMENT as ATTACHMENT_NAME


def read_run_metrics(results_dir: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(results_dir.glob("*-result.json")):
        data = json.loads(path.read_text())
        for att in _attachments(data):
            if att.get("name") == ATTACHMENT_NAME and (results_dir / att["source"]).exists():
                out.append(json.loads((results_dir / att["source"]).read_text()))
    return out


def _attachments(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = list(node.get("attachments", []))
    for step in node.get("steps", []):
        found += _attachments(step)
    return found
