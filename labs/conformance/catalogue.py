"""`lab defects`: the conformance suite against every seeded-defect driver, and what caught each one.

A private sim lab (own directory, own port) gets one device per CATALOGUE
variant plus the correct drivers on hostA, and on hostB a correct driver of the
same name for each: the variant's peer in round trips and the other end of its
pair tests. One
pytest run over suites/conformance (device-level tests on the first host only,
pair tests across both) writes junit; each result carries its device ids and
rule labels as properties. A variant is

    CAUGHT  a failing test carries the rule the variant breaks (Defect.rule);
            failures of its documented knock-on rules (Defect.also) are expected
    MISSED  no failing test carries its rule
    CLEAN   (a correct driver) nothing failed
    DIRTY   (a correct driver) something failed

Failures outside the rule and its knock-ons are listed as "other" (the model
test carries no rule label: it shows as "model").
The table goes to the console, reports/defect-catalogue.md and .json; the exit
status is non-zero if any variant is MISSED or a correct driver is DIRTY.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from labs.paths import REPO_ROOT, REPORTS, SUITES
from labs.sim.defects import CATALOGUE, CORRECT, Defect
from labs.simlab.generate import write_sim_inventory

# small devices: the catalogue is about behaviour, not bandwidth
SMALL = {"content_size": 96 << 10, "record_size": 16 << 10, "window": 8 << 10}
SUITE = SUITES / "conformance"
MODEL_TAG = "model"


@dataclass
class Verdict:
    variant: str
    protocol: str
    rule: str  # "" for a correct driver
    description: str
    status: str  # CAUGHT | MISSED | CLEAN | DIRTY
    failed_rules: list[str] = field(default_factory=list)  # every rule label of a failing test (and "model")
    caught_by: list[str] = field(default_factory=list)  # the failing tests that carry the variant's rule
    expected: list[str] = field(default_factory=list)  # documented knock-on rules that failed
    other: list[str] = field(default_factory=list)  # failing rules outside rule + knock-ons
    tests: int = 0
    failures: int = 0


@dataclass
class Outcome:
    nodeid: str
    failed: bool
    skipped: bool
    devices: list[str]
    rules: list[str]
    message: str = ""


def device_spec(defect: Defect) -> dict[str, Any]:
    """An inventory device for a catalogue variant (or a correct driver)."""
    options = {**SMALL, **dict(defect.options)}
    caps = ["stop_copy"]
    if defect.protocol == "v1":
        caps.append("pre_copy")  # v1 has 011 by definition
    else:
        caps += [c for c in ("p2p", "pre_copy") if options.get(c)]
    return {
        "kind": "sim",
        "name": defect.name,
        "model": f"catalogue-{defect.name}",  # one model per variant: its hostB copy pairs with it alone
        "protocol": defect.protocol,
        "driver": defect.driver,
        "capabilities": caps,
        "options": options,
    }


def correct_peers(inventory: Path) -> Path:
    """hostB's copy of every variant runs the correct driver: a variant's peer (its pair partner)
    and the other end of its pair tests are then correct, so each judges the variant alone."""
    doc = yaml.safe_load(inventory.read_text())
    hostb = doc["hosts"]["hostB"]
    hostb["devices"] = [{**d, "driver": CORRECT[d["protocol"]].driver} for d in hostb["devices"]]  # not hostA's
    inventory.write_text(yaml.safe_dump(doc, sort_keys=False))
    return inventory


def variants(names: list[str] | None = None) -> list[Defect]:
    """The correct drivers first, then the chosen catalogue variants (all by default)."""
    chosen = [CATALOGUE[n] for n in names] if names else list(CATALOGUE.values())
    protocols = {d.protocol for d in chosen} or {"v1", "v2"}
    return [CORRECT[p] for p in ("v1", "v2") if p in protocols] + chosen


def _free_port(address: str = "127.0.0.2") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def read_junit(path: Path) -> list[Outcome]:
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        props = [(p.get("name", ""), p.get("value", "")) for p in case.iter("property")]
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        nodeid = f"{case.get('classname', '')}::{case.get('name', '')}"
        out.append(
            Outcome(
                nodeid=nodeid,
                failed=bad is not None,
                skipped=case.find("skipped") is not None,
                devices=sorted({v for k, v in props if k == "device"}),
                rules=sorted({v for k, v in props if k == "rule"}),
                message=(bad.get("message", "") if bad is not None else "")[:300],
            )
        )
    return out


def judge(defects: list[Defect], outcomes: list[Outcome]) -> list[Verdict]:
    by_name: dict[str, list[Outcome]] = {}
    for o in outcomes:
        for name in {d.split(":", 1)[1] for d in o.devices}:
            by_name.setdefault(name, []).append(o)
    verdicts = []
    for d in defects:
        mine = by_name.get(d.name, [])
        failed = [o for o in mine if o.failed]
        rules = sorted({r for o in failed for r in (o.rules or [MODEL_TAG])}, key=_rule_key)
        status = _status(d, rules, bool(failed))
        verdicts.append(
            Verdict(
                variant=d.name,
                protocol=d.protocol,
                rule=d.rule,
                description=d.description,
                status=status,
                failed_rules=rules,
                caught_by=[o.nodeid.rsplit("::", 1)[-1] for o in failed if d.rule and d.rule in o.rules],
                expected=[r for r in rules if r in d.also],
                other=[r for r in rules if r != d.rule and r not in d.also],
                tests=len(mine),
                failures=len(failed),
            )
        )
    return verdicts


def _status(defect: Defect, failed_rules: list[str], any_failed: bool) -> str:
    if not defect.rule:  # a correct driver
        return "DIRTY" if any_failed else "CLEAN"
    return "CAUGHT" if defect.rule in failed_rules else "MISSED"


def _rule_key(rule: str) -> tuple[str, int]:
    head, _, num = rule.partition("-R")
    return (head, int(num)) if num.isdigit() else (rule, 0)


STYLE = {"CAUGHT": "green", "CLEAN": "green", "MISSED": "bold red", "DIRTY": "bold red"}


def table(verdicts: list[Verdict], title: str = "seeded-defect catalogue") -> Table:
    t = Table(title=title)
    for col in ("variant", "protocol", "rule broken", "tests that failed (rule ids)", "verdict"):
        t.add_column(col)
    for v in verdicts:
        t.add_row(
            v.variant,
            v.protocol,
            v.rule or "-",
            _failed_text(v) or "-",
            f"[{STYLE[v.status]}]{v.status}[/]",
        )
    return t


def _failed_text(v: Verdict) -> str:
    parts = []
    for r in v.failed_rules:
        if r == v.rule:
            parts.append(f"{r}*")
        elif r in v.expected:
            parts.append(f"{r} (knock-on)")
        else:
            parts.append(r)
    return ", ".join(parts)


def markdown(verdicts: list[Verdict], summary: dict[str, Any]) -> str:
    lines = [
        "# Seeded-defect catalogue",
        "",
        f"`lab defects`, {summary['finished']}: suites/conformance against {summary['variants']} driver variants "
        f"({summary['tests']} test results in {summary['wall_s']} s; pytest exit {summary['pytest_exit']}, "
        "non-zero whenever a defect is caught).",
        "",
        "A variant is CAUGHT when a failing test carries the rule it breaks (marked `*`); "
        "`knock-on` marks documented consequences (`Defect.also`). Correct drivers must be CLEAN.",
        "",
        "| variant | protocol | rule broken | tests that failed (rule ids) | verdict |",
        "|---|---|---|---|---|",
    ]
    for v in verdicts:
        lines.append(f"| {v.variant} | {v.protocol} | {v.rule or '-'} | {_failed_text(v) or '-'} | {v.status} |")
    counts = summary["counts"]
    lines += ["", "Totals: " + ", ".join(f"{k} {counts[k]}" for k in sorted(counts)), ""]
    return "\n".join(lines)


def _pytest_cmd(inventory: Path, junit: Path, names: list[str], extra: list[str]) -> list[str]:
    devices = [f"--lab-device={host}:{name}" for name in names for host in ("hostA", "hostB")]
    return [
        sys.executable, "-m", "pytest", str(SUITE), f"--inventory={inventory}", f"--junitxml={junit}",
        "-p", "no:cacheprovider", "-q", "--lab-no-reserve", "--lab-no-doctor",
        "-k", "not hostB or across_hosts", "-o", "junit_logging=no", *devices, *extra,
    ]  # fmt: skip


def run_suite(
    inventory: Path, work: Path, names: list[str], workers: int = 2, examples: int = 10, extra: list[str] | None = None
) -> tuple[int, list[Path]]:
    """pytest over suites/conformance for the devices `names`: device tests on hostA only (hostB's
    copies exist for the pair tests), in `workers` processes over disjoint devices.

    Not xdist: a device must stay with one process, and `--dist loadgroup` does not group with
    pytest 9 (xdist 3.8 renames `item._nodeid`, which pytest 9 no longer reads). The lab is ours
    alone and the processes share no device, so neither reservations nor the doctor are needed."""
    env = {
        **os.environ,
        "LABS_MODEL_EXAMPLES": str(examples),
        "LABS_MODEL_SHRINK": "0",  # a defect's first failing walk is evidence enough; shrinking costs minutes
    }
    shares = [names[i::workers] for i in range(max(1, workers))]
    procs, junits = [], []
    for i, share in enumerate(s for s in shares if s):
        junit = work / f"junit-{i}.xml"
        cmd = _pytest_cmd(inventory, junit, share, extra or [])
        log = (work / f"pytest-{i}.log").open("w")
        procs.append((subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        junits.append(junit)
    rc = 0
    for proc, log in procs:
        rc = max(rc, proc.wait())
        log.close()
    return rc, junits


def _stop_lab(inventory: Path) -> None:
    """The plugin stops the sim sshds when its last user leaves; make sure nothing outlives the run."""
    from labs.runtime import open_inventory
    from labs.simlab.lab import SimLab

    try:
        SimLab(open_inventory(inventory)).stop(force=True)
    except Exception as exc:  # best effort after the run; the run's result stands
        print(f"defects: could not stop the sim lab of {inventory}: {exc}", file=sys.stderr)


def run_catalogue(
    console: Console,
    names: list[str] | None = None,
    report_dir: Path | None = None,
    workers: int = 2,
    examples: int = 10,
    workdir: Path | None = None,
) -> int:
    """Run the catalogue (all variants, or `names`); print and write the table; 0 iff nothing is MISSED or DIRTY.

    The private sim lab lives in a temporary directory, or in `workdir` (kept: inventory, junit, pytest logs)."""
    defects = variants(names)
    report_dir = report_dir or REPORTS
    report_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="labs-defects-") as tmp:
        work = workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        inventory = correct_peers(
            write_sim_inventory(
                work / "defects.yaml",
                work / "sim",
                _free_port(),
                device_specs=[device_spec(d) for d in defects],
                name="defect-catalogue",
            )
        )
        console.print(f"defects: suites/conformance against {len(defects)} driver variants on a private sim lab ...")
        try:
            rc, junits = run_suite(inventory, work, [d.name for d in defects], workers=workers, examples=examples)
        finally:
            _stop_lab(inventory)
        missing = [j for j in junits if not j.exists()]
        if missing:
            console.print(f"[bold red]defects: pytest wrote no results (exit {rc})[/]")
            for log in sorted(work.glob("pytest-*.log")):
                console.print(log.read_text()[-3000:])
            return 2
        outcomes = [o for j in junits for o in read_junit(j)]
    wall = round(time.monotonic() - start, 1)
    verdicts = judge(defects, outcomes)
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.status] = counts.get(v.status, 0) + 1
    summary = {
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "variants": len(defects),
        "tests": len(outcomes),
        "pytest_exit": rc,
        "wall_s": wall,
        "counts": counts,
    }
    console.print(table(verdicts))
    console.print(", ".join(f"{k} {counts[k]}" for k in sorted(counts)) + f" ({len(outcomes)} test results, {wall} s)")
    (report_dir / "defect-catalogue.json").write_text(
        json.dumps({"summary": summary, "variants": [asdict(v) for v in verdicts]}, indent=2) + "\n"
    )
    (report_dir / "defect-catalogue.md").write_text(markdown(verdicts, summary))
    console.print(f"written: {report_dir / 'defect-catalogue.md'}, {report_dir / 'defect-catalogue.json'}")
    bad = [v for v in verdicts if v.status in ("MISSED", "DIRTY")]
    return 1 if bad else 0
