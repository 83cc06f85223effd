"""`lab defects`: the conformance suite against every seeded-defect driver, and what caught each one.

A private sim lab (own directory, own port) gets one device per CATALOGUE
variant plus the correct drivers on hostA, and on hostB a correct driver of the
same name for each: the variant's peer in round trips and the other end of its
pair tests. One
pytest run over suites/conformance (device-level tests on the first host only,
pair tests across both) writes junit; each result carries its device ids and
rule labels as properties. Outside drivers (`--driver module:Class` or
`--driver path/file.py:Class`, subclasses of V1Driver/V2Driver kept outside
this repo) join the same lab through the hosts' `python_path`. A variant is

    CAUGHT  a failing test carries the rule the variant breaks (Defect.rule);
            failures of its documented knock-on rules (Defect.also) are expected
    MISSED  no failing test carries its rule
    BROKEN  it could not be judged: its driver does not import on the host, its
            agent died, or no test ran on it other than into an infrastructure error
    CLEAN   (a correct driver) nothing failed
    DIRTY   (a correct driver) something failed
    PASSED / FAILED  (an outside driver that declares no rule) nothing / something failed

A test that ended in an infrastructure error catches nothing. Failures outside
the rule and its knock-ons are listed as "other" (the model test carries no
rule label: it shows as "model"). The table goes to the console,
reports/defect-catalogue.md and .json; the exit status is non-zero if any
variant is MISSED, BROKEN or FAILED, or a correct driver is DIRTY.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from labs.errors import ConfigError
from labs.hostwatch import infra_exception_names
from labs.inventory.models import DRIVER_RE
from labs.junit import cases as junit_cases
from labs.paths import REPO_ROOT, REPORTS, SUITES
from labs.sim import importcheck
from labs.sim.defects import CATALOGUE, CORRECT, Defect
from labs.simlab.generate import sim_inventory_doc
from labs.vfio.client import agent_sys_path
from labs.vfio.rules import RULES

# small devices: the catalogue is about behaviour, not bandwidth
SMALL = {"content_size": 96 << 10, "record_size": 16 << 10, "window": 8 << 10}
SUITE = SUITES / "conformance"
MODEL_TAG = "model"
# outside drivers run with every flag their protocol has, so every rule's test runs on them
OUTSIDE_OPTIONS: dict[str, dict[str, Any]] = {"v1": {}, "v2": {"pre_copy": True, "p2p": True}}
RULE_RANGE = ", ".join(f"{p}-R1..{p}-R{sum(r.startswith(p) for r in RULES)}" for p in ("V1", "V2"))
# what a failure says when the agent process is gone (EOF, watchdog, no reply, already dead)
AGENT_DEATH = ("agent exited (EOF)", "AgentWatchdogError", "; agent killed", "agent session is gone")


@dataclass(frozen=True)
class OutsideDriver(Defect):
    """A driver from outside the catalogue (`lab defects --driver`); rule "" when it declares none."""


@dataclass
class Verdict:
    variant: str
    protocol: str
    rule: str  # "" for a correct driver (or an outside driver that declares no rule)
    description: str
    status: str  # CAUGHT | MISSED | BROKEN | CLEAN | DIRTY | PASSED | FAILED
    failed_rules: list[str] = field(default_factory=list)  # every rule label of a failing test (and "model")
    caught_by: list[str] = field(default_factory=list)  # the failing tests that carry the variant's rule
    expected: list[str] = field(default_factory=list)  # documented knock-on rules that failed
    other: list[str] = field(default_factory=list)  # failing rules outside rule + knock-ons
    passed_rules: list[str] = field(default_factory=list)  # rules whose tests ran and none failed
    tests: int = 0
    failures: int = 0
    infra: list[str] = field(default_factory=list)  # tests that ended in an infrastructure error
    reason: str = ""  # why it is BROKEN
    driver: str = ""
    failing: list[str] = field(default_factory=list)  # each failing test and its message's first line


@dataclass
class Outcome:
    nodeid: str
    failed: bool
    skipped: bool
    devices: list[str]
    rules: list[str]
    message: str = ""
    infra: bool = False  # failed for an infrastructure reason (the lab, not the device): catches nothing
    agent_died: bool = False

    @property
    def test(self) -> str:
        """The test's name with its parameters, without its file: `test_v2_rule[hostA:x-V2-R3]`."""
        return self.nodeid.rsplit("::", 1)[-1]


def device_spec(defect: Defect) -> dict[str, Any]:
    """An inventory device for a catalogue variant (or a correct driver)."""
    options = {**SMALL, **dict(defect.options)}
    caps = ["stop_copy"]
    if defect.protocol == "v1":
        if options.get("pre_copy", True):
            caps.append("pre_copy")  # v1 has 011 by definition; pre_copy: false offers no data there
    else:
        caps += [c for c in ("p2p", "pre_copy", "dirty_logging") if options.get(c)]
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
    return controls(chosen, every=not names) + chosen


def flag_set(defect: Defect) -> tuple[Any, ...]:
    """What a driver is built to advertise: the protocol and its flag options."""
    opts = dict(defect.options)
    if defect.protocol == "v1":
        return ("v1", bool(opts.get("pre_copy", True)))
    return ("v2", *(bool(opts.get(k)) for k in ("p2p", "pre_copy", "dirty_logging")))


def controls(judged: list[Defect], every: bool = False) -> list[Defect]:
    """The correct drivers to measure against: every one for the whole catalogue, else those of the
    judged drivers' flag sets (the protocol's full one where no correct driver has that set)."""
    if every:
        return list(CORRECT.values())
    wanted = {flag_set(d) for d in judged}
    out = [c for c in CORRECT.values() if flag_set(c) in wanted]
    have = {flag_set(c) for c in out}
    out += [CORRECT[d.protocol] for d in judged if flag_set(d) not in have and CORRECT[d.protocol] not in out]
    return out


# -- outside drivers -------------------------------------------------------------------
@dataclass(frozen=True)
class DriverRef:
    ref: str  # module:Class, as the agent imports it
    given: str  # as the user wrote it
    directory: str | None = None  # a file's directory, added to the hosts' python_path


def parse_driver(text: str) -> DriverRef:
    """`module:Class`, or `path/to/file.py:Class` (its directory joins the python_path)."""
    where, sep, cls = text.rpartition(":")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", cls):
        raise ConfigError(f"--driver {text!r}: not of the form module:Class or path/file.py:Class")
    if not (where.endswith(".py") or "/" in where):
        if not DRIVER_RE.match(text):
            raise ConfigError(f"--driver {text!r}: not of the form module:Class or path/file.py:Class")
        return DriverRef(text, text)
    path = Path(where).expanduser().resolve()
    if path.suffix != ".py" or not path.is_file():
        raise ConfigError(f"--driver {text!r}: {path} is not a Python file")
    module = path.stem
    if not module.isidentifier():
        raise ConfigError(f"--driver {text!r}: {path.name} is not an importable module name")
    if _shadows(module, path):
        raise ConfigError(f"--driver {text!r}: {path.name} would shadow the module {module!r}; rename the file")
    return DriverRef(f"{module}:{cls}", text, str(path.parent))


def _shadows(module: str, path: Path) -> bool:
    """Another module of that name is importable here (stdlib, site-packages, labs): the file would hide it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    return spec is not None and (spec.origin is None or Path(spec.origin).resolve() != path)


def parse_rules(text: str) -> tuple[str, ...]:
    rules = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ConfigError(f"--rules: unknown rule {', '.join(unknown)} (known: {RULE_RANGE})")
    return rules


def outside_defects(
    refs: list[DriverRef], found: dict[str, importcheck.DriverImport], rules: tuple[str, ...], taken: set[str]
) -> tuple[list[Defect], list[Verdict]]:
    """One OutsideDriver per declared rule (`rules`, else the class's `breaks`), or one without a rule; the
    drivers that do not import are BROKEN verdicts. Device names are the class names, made unique."""
    subjects: list[Defect] = []
    broken: list[Verdict] = []
    for ref in refs:
        got = found[ref.ref]
        name = _unique(ref.ref.rsplit(":", 1)[1], taken)
        if not got.ok or not got.protocol:
            why = got.describe() if not got.ok else f"{ref.ref} is neither a V1Driver nor a V2Driver subclass"
            broken.append(
                Verdict(name, got.protocol or "?", ",".join(rules), "", "BROKEN", reason=why, driver=ref.given)
            )
            continue
        declared = rules or got.breaks
        for rule in declared:
            if rule not in RULES:
                raise ConfigError(f"{ref.given}: breaks = {rule!r} is not a rule id (known: {RULE_RANGE})")
            if not rule.lower().startswith(got.protocol):
                raise ConfigError(
                    f"{ref.given}: declares {rule}, a rule of the other protocol (it is a {got.protocol} driver)"
                )
        options = tuple(sorted(OUTSIDE_OPTIONS[got.protocol].items()))
        description = got.doc or f"outside driver {ref.given}"
        subjects += [OutsideDriver(name, r, got.protocol, ref.ref, description, options) for r in declared or ("",)]
    return subjects, broken


def _unique(name: str, taken: set[str]) -> str:
    out, n = name, 1
    while out in taken:
        n += 1
        out = f"{name}-{n}"
    taken.add(out)
    return out


# -- results ---------------------------------------------------------------------------
_INFRA_RE = re.compile(r"\b(" + "|".join(sorted(infra_exception_names(), key=len, reverse=True)) + r"):")


def read_junit(path: Path) -> list[Outcome]:
    out = []
    for case in junit_cases(path):
        bad = case.problems[0] if case.problems else None
        message, text = (bad.message, bad.text) if bad is not None else ("", "")
        said = message + "\n".join(line for line in text.splitlines() if line.startswith("E "))  # not the source
        out.append(
            Outcome(
                nodeid=case.nodeid,
                failed=bad is not None,
                skipped=case.skipped,
                devices=case.values("device"),
                rules=case.values("rule"),
                message=_summary(message, text),
                infra=bad is not None and _INFRA_RE.search(message) is not None,
                agent_died=bad is not None and any(m in said for m in AGENT_DEATH),
            )
        )
    return out


def _summary(message: str, text: str) -> str:
    """The failure's first line, and when the agent died the last line of its stderr (what the driver raised)."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    if "agent stderr:" in text:
        raised = [line[1:].strip() for line in text.split("agent stderr:", 1)[1].splitlines() if line.startswith("E ")]
        if raised and raised[-1] != first:
            first = f"{first} ({raised[-1]})"
    return first[:300]


def judge(defects: list[Defect], outcomes: list[Outcome]) -> list[Verdict]:
    by_name: dict[str, list[Outcome]] = {}
    for o in outcomes:
        for name in {d.split(":", 1)[1] for d in o.devices}:
            by_name.setdefault(name, []).append(o)
    verdicts = []
    for d in defects:
        mine = by_name.get(d.name, [])
        failed = [o for o in mine if o.failed and not o.infra]
        rules = sorted({r for o in failed for r in (o.rules or [MODEL_TAG])}, key=_rule_key)
        ran = sorted({r for o in mine if not o.skipped and not o.infra for r in o.rules}, key=_rule_key)
        verdict = Verdict(
            variant=d.name,
            protocol=d.protocol,
            rule=d.rule,
            description=d.description,
            status=_status(d, rules, bool(failed)),
            failed_rules=rules,
            caught_by=[o.test for o in failed if d.rule and d.rule in o.rules],
            expected=[r for r in rules if r in d.also],
            other=[r for r in rules if r != d.rule and r not in d.also],
            passed_rules=[r for r in ran if r not in rules],
            tests=len(mine),
            failures=len(failed),
            infra=[o.test for o in mine if o.infra],
            driver=d.driver,
            failing=[f"{o.test}: {_first_line(o.message)}" for o in failed],
        )
        reason = _broken(mine)
        if reason:
            verdict.status, verdict.reason = "BROKEN", reason
        verdicts.append(verdict)
    return verdicts


def _broken(mine: list[Outcome]) -> str:
    """Why these results cannot judge the driver, or ""."""
    died = [o for o in mine if o.agent_died]
    if died:
        return f"its agent died in {len(died)} of {len(mine)} tests, first: {_first_line(died[0].message)}"
    ran = [o for o in mine if not o.skipped]
    if not ran:
        return f"no test ran on it ({len(mine)} skipped)" if mine else "no test ran on it"
    if all(o.infra for o in ran):
        return f"every test ended in an infrastructure error, first: {_first_line(ran[0].message)}"
    return ""


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "(no message)"


def _status(defect: Defect, failed_rules: list[str], any_failed: bool) -> str:
    if not defect.rule:
        if isinstance(defect, OutsideDriver):  # declares no rule: the plain verdict
            return "FAILED" if any_failed else "PASSED"
        return "DIRTY" if any_failed else "CLEAN"  # a correct driver
    return "CAUGHT" if defect.rule in failed_rules else "MISSED"


def _rule_key(rule: str) -> tuple[str, int]:
    head, _, num = rule.partition("-R")
    return (head, int(num)) if num.isdigit() else (rule, 0)


BAD = ("MISSED", "DIRTY", "BROKEN", "FAILED")
STYLE = {
    "CAUGHT": "green",
    "CLEAN": "green",
    "PASSED": "green",
    "MISSED": "bold red",
    "DIRTY": "bold red",
    "BROKEN": "bold red",
    "FAILED": "bold red",
}


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
    if v.status == "BROKEN":
        return v.reason
    parts = []
    for r in v.failed_rules:
        if r == v.rule:
            parts.append(f"{r}*")
        elif r in v.expected:
            parts.append(f"{r} (knock-on)")
        else:
            parts.append(r)
    if v.infra:
        parts.append(f"({len(v.infra)} infrastructure errors)")
    return ", ".join(parts)


def why_bad(verdicts: list[Verdict]) -> list[str]:
    """For each MISSED, DIRTY or FAILED verdict, the tests that failed and what they said (a DIRTY correct driver
    is a broken check or a flaky lab until shown otherwise: its report must say which test and why)."""
    return [f"{v.variant} {v.status}: {line}" for v in verdicts if v.status in BAD for line in v.failing]


def plain_lists(verdicts: list[Verdict]) -> list[str]:
    """For each outside driver that declares no rule: the rules its tests failed and passed."""
    return [
        f"{v.variant} ({v.driver}): rules failed: {', '.join(v.failed_rules) or 'none'}; "
        f"rules passed: {', '.join(v.passed_rules) or 'none'}"
        for v in verdicts
        if v.status in ("PASSED", "FAILED")
    ]


def markdown(verdicts: list[Verdict], summary: dict[str, Any]) -> str:
    lines = [
        "# Seeded-defect catalogue",
        "",
        f"`lab defects`, {summary['finished']}: suites/conformance against {summary['variants']} driver variants "
        f"({summary['tests']} test results in {summary['wall_s']} s; pytest exit {summary['pytest_exit']}, "
        "non-zero whenever a defect is caught).",
        "",
        "A variant is CAUGHT when a failing test carries the rule it breaks (marked `*`); "
        "`knock-on` marks documented consequences (`Defect.also`). Correct drivers must be CLEAN. "
        "BROKEN: the variant could not be judged (its driver does not import, its agent died, "
        "or only infrastructure errors).",
        "",
        "| variant | protocol | rule broken | tests that failed (rule ids) | verdict |",
        "|---|---|---|---|---|",
    ]
    for v in verdicts:
        lines.append(f"| {v.variant} | {v.protocol} | {v.rule or '-'} | {_failed_text(v) or '-'} | {v.status} |")
    counts = summary["counts"]
    lines += ["", "Totals: " + ", ".join(f"{k} {counts[k]}" for k in sorted(counts)), ""]
    bad = why_bad(verdicts)
    if bad:
        lines += ["What the failing tests of the bad verdicts said:", "", *[f"- {b}" for b in bad], ""]
    plain = plain_lists(verdicts)
    if plain:
        lines += ["Outside drivers that declare no rule:", "", *[f"- {p}" for p in plain], ""]
    return "\n".join(lines)


def _free_port(address: str = "127.0.0.2") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


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
    extra = list(extra or [])
    given = [*extra, *os.environ.get("PYTEST_ADDOPTS", "").split()]  # the user's own order wins
    if "no:randomly" not in given and not any(a.startswith("--randomly-seed") for a in given):
        seed = random.randrange(1 << 31)
        print(f"defects: random test order, --randomly-seed={seed}", flush=True)
        extra.append(f"--randomly-seed={seed}")
    shares = [names[i::workers] for i in range(max(1, workers))]
    procs, junits = [], []
    for i, share in enumerate(s for s in shares if s):
        junit = work / f"junit-{i}.xml"
        cmd = _pytest_cmd(inventory, junit, share, extra)
        log = (work / f"pytest-{i}.log").open("w")
        procs.append((subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        junits.append(junit)
    rc = 0
    try:
        for proc, _log in procs:
            rc = max(rc, proc.wait())
    finally:
        # interrupted (Ctrl-C, SIGTERM): the runs end with us, not after their sim lab and work dir are gone
        for proc, log in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
    return rc, junits


def _stop_lab(inventory: Path) -> None:
    """The plugin stops the sim sshds when its last user leaves; make sure nothing outlives the run."""
    from labs.session import open_inventory
    from labs.simlab.lifecycle import SimLab

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
    drivers: list[str] | None = None,
    python_path: list[Path] | None = None,
    rules: str = "",
) -> int:
    """Run the catalogue (all variants, or `names`), or judge outside `drivers` (with `names` too, if given);
    print and write the table; 0 iff nothing is MISSED, BROKEN or FAILED and no correct driver is DIRTY.

    `drivers`: `module:Class` (found on `python_path`) or `path/file.py:Class`; `rules`: comma-separated
    rule ids they break, instead of their class attribute `breaks`. The private sim lab lives in a
    temporary directory, or in `workdir` (kept: inventory, junit, pytest logs)."""
    refs = [parse_driver(t) for t in drivers or []]
    declared = parse_rules(rules) if rules else ()
    if declared and not refs:
        raise ConfigError("--rules names the rules --driver models break; no --driver given")
    path = _python_path(python_path or [], refs)
    chosen = [CATALOGUE[n] for n in names] if names else [] if refs else list(CATALOGUE.values())
    # every driver imported as the sim hosts' agents will (same interpreter, same sys.path entries)
    wanted = list(dict.fromkeys([d.driver for d in [*CORRECT.values(), *chosen]] + [r.ref for r in refs]))
    found = importcheck.check_local(sys.executable, agent_sys_path(path), wanted)
    outside, broken = outside_defects(refs, found, declared, {d.name for d in [*CORRECT.values(), *CATALOGUE.values()]})
    judged = [*chosen, *outside]
    subjects = controls(judged, every=not names and not refs) + judged if judged else []
    runnable = [d for d in subjects if found[d.driver].ok]
    broken = [_not_imported(d, found[d.driver]) for d in subjects if not found[d.driver].ok] + broken
    report_dir = report_dir or REPORTS
    report_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rc, outcomes = 0, []
    if runnable:
        console.print(f"defects: suites/conformance against {len(runnable)} driver variants on a private sim lab ...")
        with tempfile.TemporaryDirectory(prefix="labs-defects-") as tmp:
            work = workdir or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            inventory = correct_peers(_write_inventory(work, runnable, path))
            try:
                names_run = list(dict.fromkeys(d.name for d in runnable))
                rc, junits = run_suite(inventory, work, names_run, workers=workers, examples=examples)
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
    verdicts = judge(runnable, outcomes) + broken
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.status] = counts.get(v.status, 0) + 1
    summary = {
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "variants": len(verdicts),
        "tests": len(outcomes),
        "pytest_exit": rc,
        "wall_s": wall,
        "counts": counts,
        "python_path": path,
    }
    console.print(table(verdicts, "outside drivers" if refs and not names else "seeded-defect catalogue"))
    for line in [*why_bad(verdicts), *plain_lists(verdicts)]:
        console.print(line, highlight=False)
    console.print(", ".join(f"{k} {counts[k]}" for k in sorted(counts)) + f" ({len(outcomes)} test results, {wall} s)")
    (report_dir / "defect-catalogue.json").write_text(
        json.dumps({"summary": summary, "variants": [asdict(v) for v in verdicts]}, indent=2) + "\n"
    )
    (report_dir / "defect-catalogue.md").write_text(markdown(verdicts, summary))
    console.print(f"written: {report_dir / 'defect-catalogue.md'}, {report_dir / 'defect-catalogue.json'}")
    return 1 if any(v.status in BAD for v in verdicts) else 0


def _python_path(dirs: list[Path], refs: list[DriverRef]) -> list[str]:
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"--python-path {d}: not a directory")
    return list(dict.fromkeys([str(d.resolve()) for d in dirs] + [r.directory for r in refs if r.directory]))


def _not_imported(defect: Defect, got: importcheck.DriverImport) -> Verdict:
    return Verdict(
        defect.name,
        defect.protocol,
        defect.rule,
        defect.description,
        "BROKEN",
        reason=got.describe(),
        driver=defect.driver,
    )


def _write_inventory(work: Path, subjects: list[Defect], python_path: list[str]) -> Path:
    specs = list({d.name: device_spec(d) for d in subjects}.values())
    doc = sim_inventory_doc(work / "sim", _free_port(), device_specs=specs, name="defect-catalogue")
    for host in doc["hosts"].values():
        if python_path:
            host["python_path"] = python_path
    path = work / "defects.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
