"""`lab`: the command a lab engineer types.

Every LabError ends as one line on stderr and exit status 2; a traceback means
a bug in labs itself.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from labs.errors import LabError
from labs.paths import REPO_ROOT, default_inventory

F = TypeVar("F", bound=Callable[..., Any])
console = Console(soft_wrap=True)
err_console = Console(stderr=True)

STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "n/a": "dim", "skipped": "dim"}


def one_line_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LabError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


inventory_option = click.option(
    "--inventory",
    "-i",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="inventory YAML (default: $LABS_INVENTORY, else inventories/sim.yaml)",
)


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """labs: hardware-in-the-loop tests for VFIO device migration."""
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like an error does: a command's cleanup (its sim lab's sshds, VMs, locks) runs on the way out
        previous = signal.signal(signal.SIGTERM, _terminated)
        ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@inventory_option
@click.option("--suites", default=None, help="suite paths (default: suites/)")
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
@one_line_errors
def run(inventory: Path | None, suites: str | None, pytest_args: tuple[str, ...]) -> None:
    """Run the suites against a lab and write Allure results under reports/."""
    from labs.reporting.suiterun import run_suites

    sys.exit(run_suites(inventory or default_inventory(), suites, list(pytest_args), console))


@main.command()
@click.argument("runs", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option("--open", "open_browser", is_flag=True, help="serve the full report on 127.0.0.1 and open a browser")
@click.option("--serve", is_flag=True, help="serve the full report on 127.0.0.1 until Ctrl-C")
@click.option("--port", default=0, type=click.IntRange(0, 65535), help="port to serve on (default: a free one)")
@one_line_errors
def report(runs: tuple[Path, ...], open_browser: bool, serve: bool, port: int) -> None:
    """Render a run's Allure results to HTML (default: reports/latest); several runs (of several labs) make one
    report under reports/merged-*, split by lab; --open/--serve serve it over HTTP."""
    import time
    import webbrowser

    from labs.paths import REPORTS
    from labs.reporting.merge import gate_results_of, merge
    from labs.reporting.render import render
    from labs.reporting.serve import ReportServer
    from labs.session import new_run_id

    if len(runs) > 1:
        run_dir = REPORTS / new_run_id().replace("labs-", "merged-", 1)
        rendered = merge([r.resolve() for r in runs], run_dir)
        console.print(f"single file: {rendered.single}  (opens from disk)", highlight=False)
    else:
        run_dir = (runs[0] if runs else REPORTS / "latest").resolve()
        full = run_dir / "html" / "awesome" / "index.html"
        if not ((open_browser or serve) and full.exists()):
            rendered = render(run_dir, quality_gate=gate_results_of(run_dir))
            console.print(f"single file: {rendered.single}  (opens from disk)", highlight=False)
    if not (open_browser or serve):
        console.print(f"full report: ./lab report --open {run_dir}  (needs HTTP)", highlight=False)
        return
    with ReportServer(run_dir, port) as server:
        console.print(f"serving {server.url}  (Ctrl-C to stop)", highlight=False)
        if open_browser and not webbrowser.open(server.url):
            console.print("no browser found here: open the URL above", highlight=False)
        # a shell's background job inherits SIGINT ignored: Ctrl-C (or the test's SIGINT) must still stop it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("tox_args", nargs=-1, type=click.UNPROCESSED)
def test(tox_args: tuple[str, ...]) -> None:
    """Run the framework's own tests through tox (lint, tests, defect catalogue, nested lab); args go to tox."""
    from labs.bench import record_ci

    args = list(tox_args) or [*DEFAULT_TOX, "--result-json", str(TOX_JOURNAL)]
    tox = Path(sys.executable).with_name("tox")
    os.chdir(REPO_ROOT)
    started = time.monotonic()
    rc = subprocess.call([str(tox), *args])
    if not tox_args:
        ci = record_ci(TOX_JOURNAL, time.monotonic() - started, rc)
        click.echo(f"lab: ./lab test took {ci['wall_s']:.0f} s ({ci['envs']}); reports/bench.json")
    sys.exit(rc)


# The nested stage from the start (its image build, boot and suites are the critical path); the others
# beside it, one after the other, each command at the lowest CPU priority (tox.ini, labs/lowprio.py): on
# two cores the nested hosts leave ~half the machine idle in their host-wide stage (docs/nested-findings.md).
# Live output: nothing printed for half an hour reads as a hung job.
DEFAULT_TOX = ["p", "-p", "2", "--parallel-live", "--parallel-no-spinner", "-e", "nested,lint,tests,defects"]
TOX_JOURNAL = REPO_ROOT / "reports" / "tox-result.json"  # each environment's duration, for reports/bench.json


@main.command()
@inventory_option
@click.option("--host", "hosts", multiple=True, help="only these hosts")
@one_line_errors
def doctor(inventory: Path | None, hosts: tuple[str, ...]) -> None:
    """Preflight every host of an inventory; exit 1 when something fails."""
    from labs.agentpool import migration_probe
    from labs.compat import INCOMPATIBLE
    from labs.doctor import Status, check_lab, check_pairs
    from labs.session import LabSession, open_inventory

    inv = open_inventory(inventory or default_inventory())
    chosen = [h for h in inv.hosts if not hosts or h.name in hosts]
    names = {h.name for h in chosen}
    with LabSession(inv) as session:
        reports = check_lab(session, chosen, migration_probe)
        pairs = [p for p in inv.pairs if {p.source.host.name, p.destination.host.name} <= names]
        compat = check_pairs(session, pairs)
    failed = False
    for report in reports.values():
        table = Table(title=f"{report.host}", title_justify="left", show_lines=False)
        table.add_column("check")
        table.add_column("device")
        table.add_column("status")
        table.add_column("detail", overflow="fold")
        for c in report.checks:
            style = STATUS_STYLE.get(c.status.value, "")
            table.add_row(c.name, c.device or "", f"[{style}]{c.status.value}[/]", c.detail)
            failed |= c.status == Status.FAIL
        console.print(table)
    for pc in compat:
        table = Table(title=f"{pc.pair}: {pc.verdict}", title_justify="left", show_lines=False)
        for column in ("field", "source", "destination", "status", "note"):
            table.add_column(column, overflow="fold")
        for f in pc.fields:
            style = STATUS_STYLE.get(f.status, "")
            table.add_row(f.name, f.source or "?", f.destination or "?", f"[{style}]{f.status}[/]", f.note)
        console.print(table)
        failed |= pc.verdict == INCOMPATIBLE
    console.print("[bold red]doctor: some checks failed[/]" if failed else "[green]doctor: all hosts healthy[/]")
    sys.exit(1 if failed else 0)


@main.group("inventory")
def inventory_group() -> None:
    """Inventory files."""


@inventory_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@one_line_errors
def inventory_check(file: Path) -> None:
    """Validate FILE without touching any host."""
    from labs.session import open_inventory

    inv = open_inventory(file)
    console.print(
        f"{file}: ok ({inv.shape} shape): {len(inv.hosts)} hosts, {len(inv.devices)} devices, {len(inv.pairs)} pairs",
        highlight=False,
    )
    for pair in inv.pairs:
        console.print(f"  pair {pair.id}", highlight=False)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@inventory_option
@click.option("--device", "-d", required=True, help="the device id to certify, e.g. hostA:0000:65:00.0")
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
@one_line_errors
def certify(inventory: Path | None, device: str, pytest_args: tuple[str, ...]) -> None:
    """Certify one device: conformance rules and scenarios -> certification.json/.md/.html."""
    from labs.certify.certification import certify as run_certify

    sys.exit(run_certify(inventory or default_inventory(), device, list(pytest_args), console))


@main.command()
@inventory_option
@click.option("--clear", is_flag=True, help="end every reservation (kills the holders; their locks go with them)")
@one_line_errors
def locks(inventory: Path | None, clear: bool) -> None:
    """List (or clear) device reservations on every host of an inventory."""
    import time

    from labs.reservations import clear_reservations, list_reservations
    from labs.session import LabSession, open_inventory

    inv = open_inventory(inventory or default_inventory())
    with LabSession(inv) as session:
        for host in inv.hosts:
            ssh = session.ssh(host.name)
            if clear:
                for name in clear_reservations(ssh):
                    console.print(f"{host.name}: cleared {name}", highlight=False)
                continue
            for name, rec in list_reservations(ssh):
                until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("expires", 0)))
                console.print(f"{host.name}: {name} held by {rec.get('owner')} run {rec.get('run')} until {until}")


@main.group("sim")
def sim_group() -> None:
    """The embedded sim lab (real sshd on loopback addresses)."""


def _simlab(inventory: Path | None) -> Any:
    from labs.session import open_inventory
    from labs.simlab import SimLab

    return SimLab(open_inventory(inventory or default_inventory()))


@sim_group.command("up")
@inventory_option
@one_line_errors
def sim_up(inventory: Path | None) -> None:
    """Start the sim hosts and keep them up until `lab sim down`."""
    from labs.simlab.lifecycle import CLI_USER

    lab = _simlab(inventory)
    lab.start(CLI_USER)
    for host, pid in lab.status().items():
        console.print(f"{host}: sshd pid {pid}")


@sim_group.command("down")
@inventory_option
@one_line_errors
def sim_down(inventory: Path | None) -> None:
    """Stop the sim hosts (even if a crashed run left them registered)."""
    lab = _simlab(inventory)
    console.print("stopped" if lab.stop(force=True) else "nothing was running")


@sim_group.command("status")
@inventory_option
@one_line_errors
def sim_status(inventory: Path | None) -> None:
    lab = _simlab(inventory)
    for host, pid in lab.status().items():
        console.print(f"{host}: {'sshd pid ' + str(pid) if pid else 'down'}")
    console.print(f"users: {', '.join(lab.users()) or 'none'}")


@main.command()
@inventory_option
@click.option("--all", "everything", is_flag=True, help="also what a run with the current LABS_RUN_ID made")
@one_line_errors
def janitor(inventory: Path | None, everything: bool) -> None:
    """Remove what killed runs left (VMs, save images, firewall rules, stale reservations, orphaned agents,
    devices left outside RUNNING), by run-id prefix; what live runs own is kept."""
    from labs.janitor import janitor as sweep
    from labs.session import LabSession, open_inventory

    inv = open_inventory(inventory or default_inventory())
    with LabSession(inv) as session:
        removed = sweep(session, keep_own=not everything)
    for line in removed:
        console.print(line, highlight=False)
    console.print(f"janitor: {len(removed)} removed" if removed else "janitor: nothing left over")


@main.command()
@click.option(
    "--only",
    multiple=True,
    type=click.Choice(["suite", "scaling", "agent", "memory", "phases", "up", "nested", "mutants"]),
    help="these only (up, nested and mutants run only when named: up needs the nested lab down, nested needs it up)",
)
@one_line_errors
def bench(only: tuple[str, ...]) -> None:
    """Print the sim lab's figures (suite wall time, xdist scaling, agent latency, memory) and where the last
    nested run's time went (phases), to reports/bench.json."""
    from labs.bench import run_bench

    run_bench(console, list(only) or None)


@main.command()
@click.argument("variants", nargs=-1)
@click.option(
    "--driver",
    "drivers",
    multiple=True,
    metavar="MODULE:CLASS|FILE.py:CLASS",
    help="an outside driver model to judge instead of the catalogue (repeatable): a V1Driver/V2Driver subclass",
)
@click.option(
    "--rules",
    default="",
    metavar="V2-R13,...",
    help="the rules the --driver models break (default: their class attribute `breaks`; none: a plain verdict list)",
)
@click.option(
    "--python-path",
    "python_path",
    multiple=True,
    type=click.Path(path_type=Path),
    help="a directory the sim hosts' agents import --driver modules from (repeatable)",
)
@click.option("--workers", default=2, show_default=True, help="pytest processes, over disjoint devices")
@click.option("--examples", default=10, show_default=True, help="model-based test examples per device")
@one_line_errors
def defects(
    variants: tuple[str, ...],
    drivers: tuple[str, ...],
    rules: str,
    python_path: tuple[Path, ...],
    workers: int,
    examples: int,
) -> None:
    """Run the conformance suites on every seeded-defect driver (or the VARIANTS named), or on outside
    --driver models: each must be caught by the rule it breaks (CAUGHT / MISSED / BROKEN), the correct
    drivers must pass. Writes reports/defect-catalogue.{md,json}."""
    from labs.conformance.catalogue import run_catalogue
    from labs.sim.defects import CATALOGUE

    unknown = [v for v in variants if v not in CATALOGUE]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)} (known: {', '.join(sorted(CATALOGUE))})", param_hint="VARIANTS")
    if python_path and not drivers:
        raise click.BadParameter("only applies to --driver models", param_hint="--python-path")
    rc = run_catalogue(
        console,
        list(variants) or None,
        workers=workers,
        examples=examples,
        drivers=list(drivers),
        python_path=list(python_path),
        rules=rules,
    )
    sys.exit(rc)


@main.command()
@click.option("--only", "only", multiple=True, metavar="FILE", help="mutate this file only (e.g. labs/sim/v2.py)")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="workers [default: the machine's cores]")
@click.option("--max", "max_mutants", type=click.IntRange(min=1), default=None, help="a deterministic sample of N")
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True, help="seconds per mutant")
@click.option("--threshold", type=click.FloatRange(0, 100), default=95.0, show_default=True, help="minimum score, %")
@click.option("--walks", type=click.IntRange(min=0), default=5, show_default=True, help="model walks per protocol")
@one_line_errors
def mutants(
    only: tuple[str, ...], jobs: int | None, max_mutants: int | None, timeout: float, threshold: float, walks: int
) -> None:
    """Mutate the correct sim drivers and run the conformance checks on each mutant: prints killed /
    survived / timed out and the score, writes reports/mutants.{md,json}; exit 1 below --threshold."""
    try:
        from labs.mutation.runner import run_mutants
    except ImportError as exc:  # cosmic-ray is a dev extra
        raise click.ClickException(f"lab mutants needs the dev extras (pip install -e '.[dev]'): {exc}") from None
    try:
        rc = run_mutants(console, list(only) or None, jobs, max_mutants, timeout, threshold, walks)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(rc)


@main.group("nested")
def nested_group() -> None:
    """The nested lab: two QEMU hosts running Debian trixie with a real mdev (the kernel's sample UART driver)."""


@nested_group.command("up")
@one_line_errors
def nested_up() -> None:
    """Build (or reuse) the image, boot both hosts, create their mdevs, write inventories/nested.yaml."""
    from labs import nested

    result = nested.up()
    figures = ", ".join(f"{k} {v} s" for k, v in result.seconds.items())
    console.print(f"nested lab up ({figures}); inventory: {result.inventory}", highlight=False)
    console.print(f"next: ./lab run --inventory {result.inventory}", highlight=False)


@nested_group.command("down")
@one_line_errors
def nested_down() -> None:
    """Stop both hosts; drop overlays, keys and the generated inventory (the image stays cached)."""
    from labs import nested

    stopped = nested.down()
    console.print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@nested_group.command("power-on")
@click.argument("host")
@one_line_errors
def nested_power_on(host: str) -> None:
    """Boot HOST again after it went down (a reboot ends its QEMU), on its own disk, and set it up again."""
    from labs import nested

    seconds, crashed = nested.power_on(host)
    figures = ", ".join(f"{k} {v} s" for k, v in seconds.items())
    crash = f"; its last boot crashed: {crashed}" if crashed else ""  # a power-on must not hide a crash
    console.print(f"{host} up again ({figures}){crash}", highlight=False)


@nested_group.command("status")
def nested_status() -> None:
    """Each host's pid, SSH and uptime, with the last build and boot figures."""
    from labs import nested

    console.print(nested.status_table())


if __name__ == "__main__":  # pragma: no cover
    main()
