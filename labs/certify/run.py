"""`lab certify`: run every suite for one device and write the certification files.

certification.json carries a sha256 digest of its own canonical content, so a
vendor can show later that the file is the one the lab produced.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

import labs
from labs.certify.policy import policy_for
from labs.certify.results import TestResult, read_results
from labs.certify.verdicts import RuleVerdict, judge
from labs.errors import ConfigError
from labs.inventory import Inventory, LabDevice
from labs.paths import REPO_ROOT, REPORTS, SUITES
from labs.runtime import new_run_id, open_inventory

CERT_SUITES = ("conformance", "save_resume", "migration", "recovery")


def digest(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify(path: Path) -> bool:
    doc = json.loads(path.read_text())
    return bool(doc.get("digest") == digest(doc))


def _find_device(inv: Inventory, device_id: str) -> LabDevice:
    try:
        return inv.device(device_id)
    except KeyError:
        known = ", ".join(d.id for d in inv.devices)
        raise ConfigError(f"{inv.file}: no device '{device_id}' (devices: {known})") from None


def _about_device(result: TestResult, device: LabDevice) -> bool:
    params = result.parameters
    if params.get("device") == device.id:
        return True
    pair = params.get("pair", "")
    return pair.startswith(f"{device.host.name}->") and pair.endswith(f":{device.name}")


def _environment(results_dir: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    path = results_dir / "environment.properties"
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value.replace("\\:", ":").replace("\\=", "=").replace("\\\\", "\\")
    return env


def build_document(device: LabDevice, results: list[TestResult], env: dict[str, str], run_id: str) -> dict[str, Any]:
    mine = [r for r in results if _about_device(r, device)]
    caps = {c.value for c in device.capabilities}
    verdicts = judge(policy_for(device.spec.protocol), mine, caps, simulated=device.spec.kind == "sim")
    scenarios: dict[str, dict[str, int]] = {}
    for r in mine:
        if not r.rules:
            counts = scenarios.setdefault(r.feature or "other", {})
            counts[r.status] = counts.get(r.status, 0) + 1
    host = device.host.name
    spec = device.spec
    identity = {
        "device": device.id,
        "kind": spec.kind,
        "model": spec.model_key,
        "protocol": spec.protocol,
        "capabilities": sorted(caps),
        "address": getattr(spec, "pci", None) or getattr(spec, "uuid", None) or getattr(spec, "driver", None),
        "mdev_type": getattr(spec, "type", None),
        "driver": env.get(f"{host}.{device.name}.driver"),
        "kernel": env.get(f"{host}.kernel"),
        "libvirt": env.get(f"{host}.libvirt"),
    }
    blocking = [v.rule for v in verdicts if v.blocks]
    doc: dict[str, Any] = {
        "format": "labs-certification/1",
        "framework": {"name": "labs", "version": labs.__version__},
        "run": run_id,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": identity,
        "verdict": "fail" if blocking else "pass",
        "blocking_rules": blocking,
        "rules": [v.__dict__ | {"tests": list(v.tests)} for v in verdicts],
        "scenarios": scenarios,
        "metrics": {"tests": len(mine), "duration_s": round(sum(r.duration_ms for r in mine) / 1000, 3)},
    }
    doc["digest"] = digest(doc)
    return doc


def markdown(doc: dict[str, Any]) -> str:
    ident = doc["identity"]
    lines = [
        f"# Certification: {ident['device']} — {doc['verdict'].upper()}",
        "",
        f"run `{doc['run']}`, {doc['date']}, labs {doc['framework']['version']}, digest `{doc['digest'][:16]}…`",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in ident.items()],
        "",
        "| rule | level | verdict | reason |",
        "|---|---|---|---|",
        *[f"| {r['rule']} | {r['level']} | {r['verdict']} | {r['reason'].replace('|', '/')} |" for r in doc["rules"]],
        "",
        "| scenario | results |",
        "|---|---|",
        *[f"| {k} | {', '.join(f'{n} {s}' for s, n in v.items())} |" for k, v in doc["scenarios"].items()],
    ]
    if doc["blocking_rules"]:
        lines += ["", f"Blocking: {', '.join(doc['blocking_rules'])}"]
    return "\n".join(lines) + "\n"


def html_page(doc: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr class='{r['verdict']}'><td>{r['rule']}</td><td>{r['level']}</td><td>{r['verdict']}</td>"
        f"<td>{html.escape(r['reason'])}</td></tr>"
        for r in doc["rules"]
    )
    ident = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in doc["identity"].items())
    return (
        "<!doctype html><meta charset=utf-8><title>certification</title><style>"
        "body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}"
        ".fail{background:#fdd}.pass{background:#dfd}.not-applicable{color:#777}.not-tested{background:#ffd}</style>"
        f"<h1>{html.escape(doc['identity']['device'])}: {doc['verdict'].upper()}</h1>"
        f"<p>run {doc['run']} · {doc['date']} · labs {doc['framework']['version']} · digest {doc['digest']}</p>"
        f"<table>{ident}</table><h2>Rules</h2><table><tr><th>rule<th>level<th>verdict<th>reason</tr>{rows}</table>"
    )


def certify(inventory: Path, device_id: str, pytest_args: list[str], console: Console, reports: Path = REPORTS) -> int:
    inv = open_inventory(inventory)
    device = _find_device(inv, device_id)
    partners = sorted({p.destination.id for p in inv.pairs if p.source.id == device.id})
    run_id = new_run_id()
    run_dir = reports / f"certify-{run_id}"
    results_dir = run_dir / "allure-results"
    run_dir.mkdir(parents=True)
    suites = [str(SUITES / s) for s in CERT_SUITES if (SUITES / s).is_dir()]
    cmd = [
        sys.executable, "-m", "pytest", *suites, f"--inventory={inventory}", f"--lab-subject={device.id}",
        f"--alluredir={results_dir}", f"--junitxml={run_dir / 'junit.xml'}", "-p", "no:cacheprovider", "-q",
        *pytest_args,
    ]  # fmt: skip
    console.print(f"[bold]certifying {device.id}[/] (run {run_id}, partners: {', '.join(partners) or 'none'})")
    subprocess.call(cmd, cwd=REPO_ROOT, env={**os.environ, "LABS_RUN_ID": run_id})
    doc = build_document(device, read_results(results_dir), _environment(results_dir), run_id)
    (run_dir / "certification.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    (run_dir / "certification.md").write_text(markdown(doc))
    (run_dir / "certification.html").write_text(html_page(doc))
    _print_summary(console, doc, run_dir)
    return 1 if doc["blocking_rules"] else 0


def _print_summary(console: Console, doc: dict[str, Any], run_dir: Path) -> None:
    counts: dict[str, int] = {}
    for r in doc["rules"]:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    colour = "green" if doc["verdict"] == "pass" else "red"
    console.print(
        f"[{colour}]certification {doc['verdict'].upper()}[/]: "
        + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())),
        highlight=False,
    )
    for r in doc["rules"]:
        if RuleVerdict(r["rule"], r["level"], r["verdict"], r["reason"], ()).blocks:
            console.print(f"  [red]{r['rule']}[/] {r['verdict']}: {r['reason']}", highlight=False)
    console.print(f"certification: {_shown(run_dir / 'certification.json')}", highlight=False)
    console.print(f"summary:       {_shown(run_dir / 'certification.md')}", highlight=False)


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
