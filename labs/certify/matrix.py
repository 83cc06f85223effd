"""The certificate's source x destination matrix: which host pairs, on which software, migrated the model.

One cell per inventory pair of the certified device's model: the live-migration
tests that ran on it (a there-and-back test moves the VM both ways) and a
verdict; each end's kernel, libvirt and driver as the run's environment
recorded them (labs.plugin.allure_hooks.environment_properties).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from labs.certify.results import TestResult
from labs.certify.verdicts import FAILED
from labs.inventory import LabDevice, LabPair

MIGRATION_FEATURE = "Live migration"
PASS, FAIL, NOT_RUN, UNTESTED = "pass", "fail", "not-run", "untested"


def _software(device: LabDevice, env: dict[str, str]) -> dict[str, str | None]:
    host = device.host.name
    return {
        "kernel": env.get(f"{host}.kernel"),
        "libvirt": env.get(f"{host}.libvirt"),
        "driver": env.get(f"{host}.{device.name}.driver"),
    }


def cell(pair: LabPair, results: Sequence[TestResult], env: dict[str, str]) -> dict[str, Any]:
    """The pair's verdict: fail if any migration test failed, pass if one passed, else not-run (why) or untested."""
    mine = [r for r in results if r.feature == MIGRATION_FEATURE and r.parameters.get("pair") == pair.id]
    counts: dict[str, int] = {}
    for r in mine:
        counts[r.status] = counts.get(r.status, 0) + 1
    failed = [r.name for r in mine if r.status in FAILED]
    reason = ""
    if failed:
        verdict, reason = FAIL, "failed: " + ", ".join(failed)
    elif counts.get("passed"):
        verdict = PASS
    elif mine:
        verdict, reason = NOT_RUN, mine[0].message.splitlines()[0] if mine[0].message else mine[0].status
    else:
        verdict, reason = UNTESTED, "no migration test ran on this pair"
    return {
        "source": pair.source.id,
        "destination": pair.destination.id,
        "model": pair.source.spec.model_key,
        "verdict": verdict,
        "reason": reason,
        "tests": counts,
        "source_software": _software(pair.source, env),
        "destination_software": _software(pair.destination, env),
    }


def matrix(
    device: LabDevice, pairs: Sequence[LabPair], results: Sequence[TestResult], env: dict[str, str]
) -> list[dict[str, Any]]:
    """A cell per pair whose source is of `device`'s model, sorted by source and destination host."""
    model = device.spec.model_key
    chosen = [p for p in pairs if p.source.spec.model_key == model]
    return [cell(p, results, env) for p in sorted(chosen, key=lambda p: (p.source.id, p.destination.id))]


def _sw(sw: dict[str, str | None]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sw.items() if v) or "?"


def markdown_lines(cells: Sequence[dict[str, Any]]) -> list[str]:
    if not cells:
        return ["no migration pair of this model in the inventory"]
    sources = sorted({c["source"] for c in cells})
    destinations = sorted({c["destination"] for c in cells})
    by = {(c["source"], c["destination"]): c["verdict"] for c in cells}
    lines = [
        "| source \\ destination | " + " | ".join(destinations) + " |",
        "|---|" + "---|" * len(destinations),
        *[f"| {s} | " + " | ".join(by.get((s, d), "—") for d in destinations) + " |" for s in sources],
        "",
        "| source | destination | model | verdict | tests | source software | destination software | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        tests = ", ".join(f"{n} {s}" for s, n in sorted(c["tests"].items())) or "none"
        reason = c["reason"].replace("|", "/")
        lines.append(
            f"| {c['source']} | {c['destination']} | {c['model']} | {c['verdict']} | {tests} "
            f"| {_sw(c['source_software'])} | {_sw(c['destination_software'])} | {reason} |"
        )
    return lines
