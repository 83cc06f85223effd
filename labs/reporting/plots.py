"""Small PNG plots of migration metrics: per run, and the trend over kept history."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on lab controllers
import matplotlib.pyplot as plt

FIELDS = (
    ("downtime_ms", "downtime (ms)"),
    ("total_ms", "total time (ms)"),
    ("device_data_bytes", "device data (bytes)"),
    ("throughput_mbps", "throughput (MB/s)"),
)


def plot_run(metrics: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """One PNG per subject (device or pair): a bar per scenario for each metric it has."""
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in metrics:
        by_subject[str(m.get("subject", "?"))].append(m)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for subject, recs in sorted(by_subject.items()):
        fields = [(k, label) for k, label in FIELDS if any(isinstance(r.get(k), (int, float)) for r in recs)]
        if not fields:
            continue
        fig, axes = plt.subplots(1, len(fields), figsize=(3.2 * len(fields), 2.8), squeeze=False)
        for ax, (key, label) in zip(axes[0], fields, strict=True):
            names = [str(r.get("scenario", "?")) for r in recs if isinstance(r.get(key), (int, float))]
            values = [float(r[key]) for r in recs if isinstance(r.get(key), (int, float))]
            ax.bar(range(len(values)), values, color="#4c72b0")
            ax.set_xticks(range(len(values)), names, rotation=30, ha="right", fontsize=7)
            ax.set_title(label, fontsize=9)
        fig.suptitle(f"{title}: {subject}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{subject.replace(':', '_').replace('>', '').replace('/', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def append_history(history: Path, run_id: str, metrics: list[dict[str, Any]]) -> None:
    with history.open("a") as f:
        for m in metrics:
            f.write(json.dumps({"run": run_id, "time": time.time(), **m}) + "\n")


def plot_trend(history: Path, out: Path, key: str = "downtime_ms") -> Path | None:
    """Per subject and scenario, the mean of `key` per run over the kept history."""
    if not history.exists():
        return None
    series: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    runs: list[str] = []
    for line in history.read_text().splitlines():
        rec = json.loads(line)
        if isinstance(rec.get(key), (int, float)):
            run = str(rec["run"])
            if run not in runs:
                runs.append(run)
            model = f"{rec['model']} " if "model" in rec else ""
            series[f"{model}{rec.get('subject')} {rec.get('scenario')}"][run].append(float(rec[key]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3))
    for name, per_run in sorted(series.items()):
        xs = [i for i, r in enumerate(runs) if r in per_run]
        ys = [sum(per_run[runs[i]]) / len(per_run[runs[i]]) for i in xs]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xticks(range(len(runs)), [r[-13:] for r in runs], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(key)
    ax.legend(fontsize=6)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
