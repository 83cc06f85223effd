"""The metric regression gate: a device whose median downtime or total time this run is worse than its
baseline (the median of its last N runs' medians) by more than `lab.gates.regression_pct` fails the run.

Evaluated here: Allure 3's quality-gate rules see one run's results, not the figures of earlier ones.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import median
from typing import Any

from labs.inventory.models import Gates
from labs.reporting.gates import GateFailure
from labs.reporting.trends import TRENDED, completed, series

GATED = ("downtime_ms", "total_ms")
MIN_BASELINE_RUNS = 2  # one earlier run is an anecdote, not a baseline


def _medians(records: list[dict[str, Any]], key: str) -> dict[str, float]:
    values: dict[str, list[float]] = defaultdict(list)
    for rec in filter(completed, records):
        if isinstance(rec.get(key), (int, float)):
            values[series(rec)].append(float(rec[key]))
    return {s: median(v) for s, v in values.items()}


def _run_medians(history: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """Per series, each earlier run's median, oldest first."""
    by_run: dict[str, list[dict[str, Any]]] = {}
    for rec in history:
        by_run.setdefault(str(rec.get("run")), []).append(rec)
    out: dict[str, list[float]] = defaultdict(list)
    for recs in by_run.values():
        for s, m in _medians(recs, key).items():
            out[s].append(m)
    return out


def evaluate(gates: Gates, current: list[dict[str, Any]], history: list[dict[str, Any]]) -> list[GateFailure]:
    """`history`: the lab's earlier runs' records (labs.reporting.trends), without this run's."""
    failures = []
    for key in GATED:
        title, unit = TRENDED[key]
        past = _run_medians(history, key)
        for s, now in sorted(_medians(current, key).items()):
            prior = past.get(s, [])[-gates.regression_runs :]
            if len(prior) < MIN_BASELINE_RUNS:
                continue
            base = median(prior)
            if now - base >= gates.regression_min_ms and now > base * (1 + gates.regression_pct / 100):
                rise = f"+{(now / base - 1) * 100:.0f}%" if base > 0 else "from 0"
                detail = (
                    f"median {title} of {s} is {now:.0f} {unit}, its baseline {base:.0f} {unit} "
                    f"(median of the last {len(prior)} runs): {rise}, at most +{gates.regression_pct:g}%"
                )
                failures.append(GateFailure("regression_pct", detail))
    return failures
