"""`python -m labs.nested.ci`: the nested lab's suites in one bounded, self-cleaning run (tox -e nested).

1. Can this machine run the lab? qemu-system-x86_64 and the image tools on
   PATH (or a cached image), root to build, free disk, two CPUs, and a time
   budget that fits a cold build. If not, it prints `nested: SKIPPED: <why>`
   and exits 0: a skip with its reason, never tests reported as passed.
2. `up` (build or reuse the image, boot, mdevs, inventory).
3. pytest: tests/nested, then the VM-level and device-level suites against
   inventories/nested.yaml on plain mtty; then the recovery suite on mtty_faults, the real
   driver with fault knobs (JUnit files and the Allure results under reports/nested/).
4. `down`, always: after a failure, a timeout, Ctrl-C or SIGTERM too. Then
   nothing the run started is left (QEMUs, overlays, keys, inventory).

Exit status: pytest's, or 2 when the lab could not be brought up (or another
lab is up: it is not this run's to take down; LABS_NESTED_REUSE=1 runs against
it and leaves it up).
Environment: LABS_NESTED_BUDGET (seconds the whole run may take; default 4800,
enough for a cold build on a busy 2-core machine), LABS_NESTED_BOOT_TIMEOUT,
LABS_NESTED_SUITES (space-separated paths instead of the default list).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from types import FrameType

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
KNOB_DEVICES = "*:mtty_faults-*"
KNOB_SUITES = ("suites/recovery",)
# the same driver code refuses damaged streams on mtty in the first run: not again on mtty_faults
KNOB_DESELECT = "not test_refused_stream_then_reset"
MIN_DISK_GB = 8.0  # image 1.1 GB + build tree ~3 GB + overlays; generous
MIN_BUDGET_S = 1800.0  # a cold build (~120-230 s), boot (~90 s) and the suites (~20 min) with room
DEFAULT_BUDGET_S = 4800.0
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


def runs() -> list[tuple[str, list[str], str]]:
    """(device glob, pytest paths and options, JUnit file name) of each pytest run: plain mtty, then mtty_faults."""
    chosen = suites()
    knobs = [s for s in chosen if any(s.rstrip("/") == k or s.startswith(f"{k}/") for k in KNOB_SUITES)]
    second = [(KNOB_DEVICES, [*knobs, "-k", KNOB_DESELECT], "junit-faults.xml")] if knobs else []
    return [(PLAIN_DEVICES, chosen, "junit.xml"), *second]


class _Terminated(Exception):
    pass


def _on_term(signum: int, _frame: FrameType | None) -> None:
    raise _Terminated(f"signal {signum}")


def _pytest(args: list[str], deadline: float) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=REPO_ROOT, start_new_session=True)
    try:
        return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        print(f"nested: the run's budget ({budget():g}s) is spent; stopping pytest", flush=True)
        return _stop(proc, 124)
    except BaseException:
        _stop(proc, 1)
        raise


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
        for i, (devices, paths, junit) in enumerate(runs()):
            args = [
                *paths,
                f"--inventory={lifecycle.NESTED_INVENTORY}",
                f"--lab-device={devices}",
                "-p",
                "no:cacheprovider",
                "-rs",
                "--durations=40",
                f"--junitxml={reports / junit}",
                # where the time went, by phase: `lab bench --only phases` reads them (tox -e nested runs it after)
                f"--alluredir={reports / 'allure'}",
                *(["--clean-alluredir"] if i == 0 else []),
                *argv,
            ]
            print(f"nested: pytest on {devices}: {' '.join(paths)}", flush=True)
            got = _pytest(args, deadline)
            rc = rc or got
        for report in lifecycle.post_mortem():
            print(f"nested: {report}", flush=True)
    except (KeyboardInterrupt, _Terminated) as exc:
        print(f"nested: interrupted ({exc or 'Ctrl-C'})", flush=True)
        rc = 130
    except Exception as exc:  # the lab did not come up: say why, still take down what started
        print(f"nested: lab not up: {exc}", flush=True)
        rc = 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if started:
            stopped = lifecycle.down()
            print(f"nested: down ({', '.join(stopped) or 'nothing was running'})", flush=True)
        print(f"nested: total {time.monotonic() - start:.0f}s; exit {rc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
