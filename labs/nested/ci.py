"""`python -m labs.nested.ci`: the nested lab's suites in one bounded, self-cleaning run (tox -e nested).

1. Can this machine run the lab? qemu-system-x86_64 and the image tools on
   PATH (or a cached image), root to build, free disk, two CPUs, and a time
   budget that fits a cold build. If not, it prints `nested: SKIPPED: <why>`
   and exits 0: a skip with its reason, never tests reported as passed.
2. `up` (build or reuse the image, boot, mdevs, inventory).
3. pytest in two stages: first, alone, the files that disturb a whole host (its libvirt daemon
   stopped or killed, its kernel made to WARN, its migration link cut or degraded, the host rebooted,
   runs killed and swept: HOST_WIDE) on plain mtty; then the suites on plain mtty, split over its two
   pairs (the save/resume and conformance suites and the rest of tests/nested on the second), beside the
   recovery suite on mtty_faults, the real driver with fault knobs (and the Linux guest there, where
   chosen): three pytest runs at once on different devices, since each TCG host takes one core at most
   and one run left the machine 26-45 % idle (JUnit files and the Allure results under reports/nested/;
   the other runs' output is printed when they end, their logs kept beside them). Every stage runs, after
   a failing one too; the output ends with each failed or erred test, a line each.
   With LABS_NESTED_LABS=2, on a machine with a core and the memory for each of four hosts, a second lab
   (two more hosts restored from the snapshot the first `up` saved: its own run dir, ports and inventory,
   second_lab) takes the second stage, and the host-wide files run beside it on the first lab: alone on
   their hosts, not on the machine.
4. `down`, always, of both labs: after a failure, a timeout, Ctrl-C or SIGTERM too. Then
   nothing the run started is left (QEMUs, overlays, keys, inventories).

Exit status: pytest's, or 2 when the lab could not be brought up (or another
lab is up: it is not this run's to take down; LABS_NESTED_REUSE=1 runs against
it and leaves it up).
Environment: LABS_NESTED_BUDGET (seconds the whole run may take; default 4800,
enough for a cold build on a busy 2-core machine), LABS_NESTED_BOOT_TIMEOUT,
LABS_NESTED_SUITES (space-separated paths instead of the default list), LABS_NESTED_LABS=2 (two labs, the
stages at once, where the machine has room for them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from labs.junit import cases as junit_cases
from labs.lowprio import parent_death_signal
from labs.paths import REPO_ROOT

DEFAULT_SUITES = (
    "tests/nested",
    "suites/smoke",
    "suites/save_resume",
    "suites/migration",
    "suites/conformance",
    "suites/recovery",
)
# Plain mtty runs every suite; mtty_faults (the same driver with fault knobs) only those that need a
# driver failing on command: every other suite would run twice over on it.
PLAIN_DEVICES = "*:mtty-2"  # the companion mtty-1 comes along in the multi-device VM only (its `vm:` group)
# These suites go on the second plain mtty-2 pair (lifecycle.SECOND_NAME), a pytest run of their own beside
# the first: the same driver and type, so no coverage moves, and the hosts' idle core gets work (a single run
# keeps one TCG host busy at a time but for its migrations)
SECOND_DEVICES = "*:mtty-2b"
# so that the runs end together (the stage lasts as long as its longest; measured in docs/nested-findings.md);
# tests/nested's live checks are the hosts', not a device's
SECOND_SUITES = ("suites/save_resume", "suites/conformance", "tests/nested")
KNOB_DEVICES = "*:mtty_faults-*"
KNOB_SUITES = ("suites/recovery",)
# The Linux guest (minutes of boot under nested TCG, 13-19 min for the suite) is not in the default
# selection (LABS_NESTED_SUITES=suites/guest runs it); where chosen it runs on the mtty_faults pair (knobs
# off but in its corruption test), beside the plain run, on devices of its own
GUEST_SUITES = ("suites/guest",)
# the same driver code refuses damaged streams on mtty in the first run: not again on mtty_faults
KNOB_DESELECT = "not test_refused_stream_then_reset"
# what a test beside them would feel (a daemon gone, a WARN in its kernel log, a cut link, its host
# rebooted, its reservation taken by a chaos round): these run before the others, alone
HOST_WIDE = (
    "tests/nested/test_nested_hangs.py",
    "tests/nested/test_nested_kernel.py",
    "tests/nested/test_nested_chaos.py",
    "suites/migration/test_host_faults.py",
)
MIN_DISK_GB = 8.0  # image 1.1 GB + build tree ~3 GB + overlays; generous
MIN_BUDGET_S = 1800.0  # a cold build (~120-230 s), boot (~90 s) and the suites (~20 min) with room
DEFAULT_BUDGET_S = 4800.0
# beside the four hosts' RAM: the controller's pytest runs and the page cache the hosts' disks live in
SECOND_LAB_SPARE_MB = 2048
PYTEST_GRACE_S = 120.0  # after the budget, pytest gets SIGTERM, then this long before SIGKILL


def cannot_run() -> str | None:
    """Why this machine cannot run the nested lab now (None: it can)."""
    from labs.nested.image import find_image
    from labs.nested.recipe import Recipe, cache_root

    if sys.platform != "linux":
        return f"the nested lab needs Linux (this is {sys.platform})"
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed (Debian: qemu-system-x86; `./lab nested up` installs it as root)"
    if not shutil.which("qemu-img"):
        return "qemu-img is not installed (Debian: qemu-utils)"
    if find_image(Recipe()) is None:
        if os.geteuid() != 0:
            return "no cached nested image and building one needs root (debootstrap, chroot)"
        missing = [t for t in ("debootstrap", "mkfs.ext4", "chroot") if not shutil.which(t)]
        if missing:
            return f"no cached nested image and {', '.join(missing)} missing to build one (labs.nested.HOST_PACKAGES)"
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(root).free / 1e9
    if free_gb < MIN_DISK_GB:
        return f"{free_gb:.1f} GB free under {root}, the nested lab needs {MIN_DISK_GB:g} GB"
    if (os.cpu_count() or 1) < 2:
        return "one CPU: two TCG hosts cannot boot in time"
    if budget() < MIN_BUDGET_S:
        return f"LABS_NESTED_BUDGET={budget():g}s is below the {MIN_BUDGET_S:g}s a cold run needs"
    return None


def budget() -> float:
    raw = os.environ.get("LABS_NESTED_BUDGET", "").strip()
    return float(raw) if raw else DEFAULT_BUDGET_S


def suites() -> list[str]:
    raw = os.environ.get("LABS_NESTED_SUITES", "").split()
    chosen = raw or [s for s in DEFAULT_SUITES if (REPO_ROOT / s).exists()]
    return chosen


@dataclass(frozen=True)
class Run:
    devices: str  # --lab-device
    paths: list[str]  # pytest paths and options
    junit: str  # file name under reports/nested
    lab: tuple[tuple[str, str], ...] = ()  # the environment that names another lab than the first (second_lab)


def _within(path: str, suite: str) -> bool:
    return path == suite.rstrip("/") or path.startswith(f"{suite.rstrip('/')}/")


def runs() -> list[list[Run]]:
    """The pytest runs in stages: a stage's runs go at once, on different devices; stages one after the other.

    The host-wide files alone on plain mtty; then plain mtty on the rest, split over its two pairs, beside
    mtty_faults on the recovery suite.
    """
    chosen = suites()
    alone = [f for f in HOST_WIDE if any(_within(f, s) for s in chosen)]
    guest = [s for s in chosen if any(_within(s, g) for g in GUEST_SUITES)]
    rest = [s for s in chosen if s.rstrip("/") not in alone and s not in guest]
    beside = [s for s in rest if any(_within(s, b) for b in SECOND_SUITES)]
    rest = [s for s in rest if s not in beside]
    knobs = [s for s in chosen if any(_within(s, k) for k in KNOB_SUITES)] + guest
    first = [Run(PLAIN_DEVICES, alone, "junit-host-wide.xml")] if alone else []
    ignore = [f"--ignore={f}" for f in alone]  # each host-wide file runs once, alone
    second = [Run(PLAIN_DEVICES, [*rest, *ignore], "junit.xml")] if rest else []
    second += [Run(SECOND_DEVICES, [*beside, *ignore], "junit-second.xml")] if beside else []
    second += [Run(KNOB_DEVICES, [*knobs, "-k", KNOB_DESELECT], "junit-faults.xml")] if knobs else []
    return [stage for stage in (first, second) if stage]


def on_two_labs(stages: list[list[Run]], lab: dict[str, str]) -> list[list[Run]]:
    """The host-wide stage on the first lab beside the second stage on the second lab: one stage.

    The host-wide files must be alone on their hosts, not on the machine: with two hosts of their own they
    go beside the rest (alone they keep about one core busy; they wait on keepalives, stalled jobs, a reboot).
    """
    if len(stages) != 2:
        return stages
    first, second = stages
    return [[*first, *(replace(run, lab=tuple(sorted(lab.items()))) for run in second)]]


def second_lab() -> dict[str, str]:
    """What names the second lab: its own run dir, ports and inventory beside the first one's."""
    from labs.nested import lifecycle

    inv, run = lifecycle.NESTED_INVENTORY, lifecycle.run_dir()
    return {
        "LABS_NESTED_RUN_DIR": str(run.with_name(f"{run.name}-2")),
        "LABS_NESTED_BASE_PORT": str(lifecycle.base_port() + 100),
        "LABS_NESTED_INVENTORY": str(inv.with_name(f"{inv.stem}-2{inv.suffix}")),
    }


def two_labs_asked() -> bool:
    return os.environ.get("LABS_NESTED_LABS", "1").strip() == "2"


def no_second_lab() -> str | None:
    """Why the second stage, asked a lab of its own, does not get one (None: it does)."""
    from labs.nested import lifecycle

    if os.environ.get("LABS_NESTED_REUSE") == "1":
        return "the run reuses a lab (LABS_NESTED_REUSE=1)"
    hosts = 2 * lifecycle.specs()  # both labs' (the same specs, other ports)
    # a TCG host takes a core when busy; on 2 cores four of them doubled every run's time and broke a downtime
    # verdict (docs/nested-findings.md)
    cpus = os.cpu_count() or 1
    if cpus < len(hosts):
        return f"{cpus} CPUs, four TCG hosts need {len(hosts)}"
    # four hosts' RAM, the first two's counted whole: they fill as their VMs run
    need_mb = sum(s.memory_mb for s in hosts) + SECOND_LAB_SPARE_MB
    free_mb = _mem_available_mb()
    if free_mb < need_mb:
        return f"{free_mb} MB of memory available, two labs need {need_mb} MB"
    return None


def _mem_available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


@contextlib.contextmanager
def _lab_env(lab: dict[str, str]) -> Iterator[None]:
    """lifecycle reads the run dir and ports from the environment at each call: point them at `lab` for a while."""
    saved = {k: os.environ.get(k) for k in lab}
    os.environ.update(lab)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _someone_elses(lab: dict[str, str]) -> bool:
    from labs.nested import lifecycle

    with _lab_env(lab):
        if any(st.alive for st in lifecycle.status(check=lambda _vm: False)):
            print(f"nested: a lab is already up in {lab['LABS_NESTED_RUN_DIR']}, not this run's: one lab", flush=True)
            return True
    return False


def _second_up(lab: dict[str, str]) -> bool:
    """Bring the second lab up (a restore of the snapshot the first one saved); False, saying why, if it is not."""
    from labs.nested import lifecycle

    with _lab_env(lab):
        t = time.monotonic()
        try:
            up = lifecycle.up(inventory=Path(lab["LABS_NESTED_INVENTORY"]))
        except Exception as exc:
            print(f"nested: second lab not up, the stages go one after the other: {exc}", flush=True)
            return False
    note = f"; {up.note}" if up.note else ""
    print(f"nested: second lab up in {time.monotonic() - t:.0f}s, {up.how} {up.seconds}{note}", flush=True)
    return True


class _Terminated(Exception):
    pass


def _on_term(signum: int, _frame: FrameType | None) -> None:
    raise _Terminated(f"signal {signum}")


def _together(argvs: list[tuple[list[str], Path | None, dict[str, str]]], deadline: float) -> int:
    """pytest runs at once, each with its arguments, the log its output goes to (None: this terminal) and the
    environment of its lab; the first failing exit status, or 124 when the budget ran out."""
    procs: list[subprocess.Popen[bytes]] = []
    logged: list[tuple[list[str], Path]] = []
    try:
        for args, log, lab in argvs:
            out = log.open("wb") if log else None
            cmd = [sys.executable, "-m", "pytest", *args]
            env = {**os.environ, **lab}
            procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, start_new_session=True, stdout=out, stderr=out, env=env))
            if log and out:
                out.close()  # the child has its own descriptor
                logged.append((args, log))
        rcs = []
        for proc in procs:
            try:
                rcs.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                print(f"nested: the run's budget ({budget():g}s) is spent; stopping pytest", flush=True)
                rcs.append(_stop(proc, 124))
        return next((rc for rc in rcs if rc), 0)
    except BaseException:
        for proc in procs:
            if proc.poll() is None:
                _stop(proc, 1)
        raise
    finally:
        for args, log in logged:
            if log.exists():
                print(f"nested: the output of `pytest {' '.join(args)}` (kept in {log}):", flush=True)
                sys.stdout.buffer.write(log.read_bytes())
                sys.stdout.flush()


def failures(junits: list[Path]) -> list[str]:
    """Each failed or erred test of these JUnit files, a line each: the file, the test, its message's first line."""
    out = []
    for junit in junits:
        if not junit.exists():
            out.append(f"{junit.name}: not written (pytest ended before its report)")
            continue
        for case in junit_cases(junit):
            for bad in case.problems:
                out.append(f"{junit.name}: {bad.kind} {case.nodeid}: {bad.first_line[:300] or '(no message)'}")
    return out


def _stop(proc: subprocess.Popen[bytes], rc: int) -> int:
    # pytest's own teardown removes the VMs it made; give it a moment, then end its whole group
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=PYTEST_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return rc


def main(argv: list[str]) -> int:
    from labs.nested import lifecycle

    reason = cannot_run()
    if reason:
        print(f"nested: SKIPPED: {reason}", flush=True)
        return 0
    start = time.monotonic()
    deadline = start + budget()
    signal.signal(signal.SIGTERM, _on_term)
    reports = REPO_ROOT / "reports" / "nested"
    reports.mkdir(parents=True, exist_ok=True)
    rc = 2
    started = False
    second: dict[str, str] = {}
    second_up = False  # the second lab is this run's to take down
    if any(st.alive for st in lifecycle.status(check=lambda _vm: False)):
        if os.environ.get("LABS_NESTED_REUSE") != "1":
            print(
                "nested: a nested lab is already up and is not this run's: not touching it "
                "(`lab nested down` first, or LABS_NESTED_REUSE=1 to run against it and leave it up)",
                flush=True,
            )
            return 2
        print("nested: reusing the running lab (LABS_NESTED_REUSE=1); it stays up", flush=True)
    try:
        if not started and not any(st.alive for st in lifecycle.status(check=lambda _vm: False)):
            t = time.monotonic()
            started = True
            up = lifecycle.up()
            note = f"; {up.note}" if up.note else ""
            print(f"nested: up in {time.monotonic() - t:.0f}s, {up.how} {up.seconds}{note}", flush=True)
        rc = 0
        first = True
        junits: list[Path] = []
        stages = runs()
        if two_labs_asked():
            why_not = no_second_lab() if len(stages) == 2 else "one stage"
            if why_not is not None:
                print(f"nested: no second lab ({why_not}): the stages go one after the other", flush=True)
            else:
                second = second_lab()
                if not _someone_elses(second):
                    second_up = True  # from here on the second lab is this run's to take down, whatever happens
                    if _second_up(second):
                        stages = on_two_labs(stages, second)
        for stage in stages:
            if time.monotonic() >= deadline:
                print(f"nested: the run's budget ({budget():g}s) is spent; not starting the next stage", flush=True)
                rc = rc or 124
                break
            argvs: list[tuple[list[str], Path | None, dict[str, str]]] = []
            for run in stage:
                lab = dict(run.lab)
                args = [
                    *run.paths,
                    f"--inventory={lab.get('LABS_NESTED_INVENTORY', lifecycle.NESTED_INVENTORY)}",
                    f"--lab-device={run.devices}",
                    "-p",
                    "no:cacheprovider",
                    "-rfEs",  # failures and errors in the short summary as well: `-rs` alone replaces pytest's `fE`
                    "--durations=40",
                    f"--junitxml={reports / run.junit}",
                    # where the time went, by phase: `lab bench --only phases` reads them (tox -e nested runs it after)
                    f"--alluredir={reports / 'allure'}",
                    *(["--clean-alluredir"] if first else []),
                    *argv,
                ]
                first = False
                (reports / run.junit).unlink(missing_ok=True)  # a stale file must not speak for a run that wrote none
                junits.append(reports / run.junit)
                where = f" of the second lab ({lab['LABS_NESTED_RUN_DIR']})" if lab else ""
                print(f"nested: pytest on {run.devices}{where}: {' '.join(run.paths)}", flush=True)
                # one run's output live here, the others' into their logs, printed when they end
                argvs.append((args, reports / run.junit.replace(".xml", ".log") if argvs else None, lab))
            # every stage runs, after a failing one too: its failure is one result, not a reason to lose the rest
            stage_rc = _together(argvs, deadline)
            rc = rc or stage_rc
        # at the end of the output, where a CI log's tail shows it: what failed, in every run
        for line in failures(junits):
            print(f"nested: {line}", flush=True)
        for report in lifecycle.post_mortem():
            print(f"nested: {report}", flush=True)
        if second_up:
            with _lab_env(second):
                for report in lifecycle.post_mortem():
                    print(f"nested: second lab: {report}", flush=True)
    except (KeyboardInterrupt, _Terminated) as exc:
        print(f"nested: interrupted ({exc or 'Ctrl-C'})", flush=True)
        rc = 130
    except Exception as exc:  # the lab did not come up: say why, still take down what started
        print(f"nested: lab not up: {exc}", flush=True)
        rc = 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # both labs down before a word is printed: a print to the output of a killed tox raises
        downs = []
        try:
            if second_up:
                with _lab_env(second):
                    downs.append(("second lab down", lifecycle.down(inventory=Path(second["LABS_NESTED_INVENTORY"]))))
        finally:
            if started:
                downs.append(("down", lifecycle.down()))
        for what, stopped in downs:
            print(f"nested: {what} ({', '.join(stopped) or 'nothing was running'})", flush=True)
        print(f"nested: total {time.monotonic() - start:.0f}s; exit {rc}", flush=True)
    return rc


if __name__ == "__main__":
    # tox killed (not interrupted) leaves its commands running, and the hosts would run on at full CPU: a SIGTERM
    # then, which main turns into both labs' `down`
    parent_death_signal(signal.SIGTERM)
    sys.exit(main(sys.argv[1:]))
