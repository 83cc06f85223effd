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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

import labs
from labs.certify.matrix import markdown_lines as matrix_markdown
from labs.certify.matrix import matrix
from labs.certify.policy import policy_for, scenarios_for
from labs.certify.results import TestResult, read_results
from labs.certify.verdicts import FAILED, judge, judge_scenarios
from labs.errors import ConfigError
from labs.inventory import Inventory, LabDevice, LabPair
from labs.inventory.models import ResetMethod
from labs.paths import REPO_ROOT, REPORTS, SUITES
from labs.session import new_run_id, open_inventory

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
    if result.devices:
        return device.id in result.devices
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


def build_document(
    device: LabDevice,
    results: list[TestResult],
    env: dict[str, str],
    run_id: str,
    pairs: Sequence[LabPair] = (),
) -> dict[str, Any]:
    mine = [r for r in results if _about_device(r, device)]
    caps = {c.value for c in device.capabilities}
    spec = device.spec
    verdicts = judge(policy_for(spec.protocol), mine, caps)
    required = scenarios_for(spec.protocol)
    scenario_verdicts = judge_scenarios(required, mine, caps, resettable=spec.reset != ResetMethod.NONE)
    in_required = {(p.feature, p.story) for p in required}
    others = [r for r in mine if not r.rules and (r.feature, r.story) not in in_required]
    scenarios: dict[str, dict[str, int]] = {}
    for r in others:
        counts = scenarios.setdefault(r.feature or "other", {})
        counts[r.status] = counts.get(r.status, 0) + 1
    host = device.host.name
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
    failed_scenarios = [v.scenario for v in scenario_verdicts if v.blocks]
    # a failing test outside every rule and required scenario is still a driver failing in a VM
    failed_tests = [r.name for r in others if r.status in FAILED]
    not_run = [{"what": v.rule, "verdict": v.verdict, "reason": v.reason} for v in verdicts if v.missing] + [
        {"what": v.scenario, "verdict": v.verdict, "reason": v.reason} for v in scenario_verdicts if v.missing
    ]
    if blocking or failed_scenarios or failed_tests:
        verdict = "fail"
    elif not_run:
        verdict = "incomplete"
    else:
        verdict = "pass"
    doc: dict[str, Any] = {
        "format": "labs-certification/2",
        "framework": {"name": "labs", "version": labs.__version__},
        "run": run_id,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": identity,
        "verdict": verdict,
        "blocking_rules": blocking,
        "failed_scenarios": failed_scenarios,
        "failed_tests": failed_tests,
        "not_run": not_run,
        "rules": [v.__dict__ | {"tests": list(v.tests)} for v in verdicts],
        "required_scenarios": [v.__dict__ | {"tests": list(v.tests)} for v in scenario_verdicts],
        "scenarios": scenarios,
        "metrics": {"tests": len(mine), "duration_s": round(sum(r.duration_ms for r in mine) / 1000, 3)},
        "matrix": matrix(device, pairs, results, env),
    }
    doc["digest"] = digest(doc)
    return doc


EXIT = {"pass": 0, "fail": 1, "incomplete": 3}  # 2 is any lab error (labs.cli)


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
        "| required scenario | verdict | reason |",
        "|---|---|---|",
        *[f"| {r['scenario']} | {r['verdict']} | {r['reason'].replace('|', '/')} |" for r in doc["required_scenarios"]],
        "",
        "| other tests | results |",
        "|---|---|",
        *[f"| {k} | {', '.join(f'{n} {s}' for s, n in v.items())} |" for k, v in doc["scenarios"].items()],
    ]
    lines += ["", "## Source x destination", "", *matrix_markdown(doc.get("matrix", []))]
    lines += ["", *_verdict_lines(doc)]
    return "\n".join(lines) + "\n"


def _verdict_lines(doc: dict[str, Any]) -> list[str]:
    """Why the certificate is not PASS, one line per rule, scenario or test."""
    lines = [f"failed: {rule} (MUST rule)" for rule in doc["blocking_rules"]]
    lines += [f"failed: {name} (required scenario)" for name in doc["failed_scenarios"]]
    lines += [f"failed: {name}" for name in doc["failed_tests"]]
    lines += [f"not run: {n['what']}: {n['reason']}" for n in doc["not_run"]]
    return lines


def html_page(doc: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr class='{r['verdict']}'><td>{r['rule']}</td><td>{r['level']}</td><td>{r['verdict']}</td>"
        f"<td>{html.escape(r['reason'])}</td></tr>"
        for r in doc["rules"]
    )
    scenario_rows = "".join(
        f"<tr class='{r['verdict']}'><td>{html.escape(r['scenario'])}</td><td>{r['verdict']}</td>"
        f"<td>{html.escape(r['reason'])}</td></tr>"
        for r in doc["required_scenarios"]
    )
    why = "".join(f"<li>{html.escape(line)}</li>" for line in _verdict_lines(doc))
    ident = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in doc["identity"].items())
    matrix_rows = "".join(
        f"<tr class='{c['verdict']}'><td>{html.escape(c['source'])}</td><td>{html.escape(c['destination'])}</td>"
        f"<td>{html.escape(c['model'])}</td><td>{c['verdict']}</td><td>{html.escape(c['reason'])}</td></tr>"
        for c in doc.get("matrix", [])
    )
    return (
        "<!doctype html><meta charset=utf-8><title>certification</title><style>"
        "body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}"
        ".fail{background:#fdd}.pass{background:#dfd}.not-applicable{color:#777}"
        ".not-tested,.not-run{background:#ffd}</style>"
        f"<h1>{html.escape(doc['identity']['device'])}: {doc['verdict'].upper()}</h1>"
        f"<p>run {doc['run']} · {doc['date']} · labs {doc['framework']['version']} · digest {doc['digest']}</p>"
        f"<ul>{why}</ul>"
        f"<table>{ident}</table><h2>Rules</h2><table><tr><th>rule<th>level<th>verdict<th>reason</tr>{rows}</table>"
        f"<h2>Required scenarios</h2><table><tr><th>scenario<th>verdict<th>reason</tr>{scenario_rows}</table>"
        "<h2>Source x destination</h2><table><tr><th>source<th>destination<th>model<th>verdict<th>reason</tr>"
        f"{matrix_rows}</table>"
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
    doc = build_document(device, read_results(results_dir), _environment(results_dir), run_id, inv.pairs)
    (run_dir / "certification.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    (run_dir / "certification.md").write_text(markdown(doc))
    (run_dir / "certification.html").write_text(html_page(doc))
    _print_summary(console, doc, run_dir)
    return EXIT[doc["verdict"]]


def _print_summary(console: Console, doc: dict[str, Any], run_dir: Path) -> None:
    counts: dict[str, int] = {}
    for r in doc["rules"]:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    scenario_counts: dict[str, int] = {}
    for r in doc["required_scenarios"]:
        scenario_counts[r["verdict"]] = scenario_counts.get(r["verdict"], 0) + 1
    colour = {"pass": "green", "incomplete": "yellow"}.get(doc["verdict"], "red")
    console.print(
        f"[{colour}]certification {doc['verdict'].upper()}[/]: rules "
        + ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
        + "; required scenarios "
        + ", ".join(f"{n} {v}" for v, n in sorted(scenario_counts.items())),
        highlight=False,
    )
    for line in _verdict_lines(doc):
        console.print(f"  [{'red' if line.startswith('failed') else 'yellow'}]{line}[/]", highlight=False)
    for c in doc["matrix"]:
        colour = {"pass": "green", "fail": "red"}.get(c["verdict"], "yellow")
        why = f": {c['reason']}" if c["reason"] else ""
        where = f"{c['source']} -> {c['destination']} ({c['model']})"
        console.print(f"  {where}: [{colour}]{c['verdict']}[/]{why}", highlight=False)
    console.print(f"certification: {_shown(run_dir / 'certification.json')}", highlight=False)
    console.print(f"summary:       {_shown(run_dir / 'certification.md')}", highlight=False)


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
