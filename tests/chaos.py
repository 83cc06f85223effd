"""What the chaos tests share: the seed, run ids, a run's environment, and a kill of a whole pytest run.

A chaos test starts a pytest run in a process group of its own, waits until it is working,
SIGKILLs the group at a random point, and then looks for what `lab janitor` left of it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from labs.liveruns import RUNS_DIR
from labs.paths import REPO_ROOT

LAB = str(Path(sys.executable).with_name("lab"))


def chaos_seed() -> int:
    """LABS_CHAOS_SEED replays a failing sequence; otherwise a fresh one (put it in every assertion message)."""
    return int(os.environ.get("LABS_CHAOS_SEED") or random.randrange(1 << 30))


def chaos_run_id(rng: random.Random) -> str:
    return f"labs-{time.strftime('%Y%m%d-%H%M%S')}-{rng.getrandbits(24):06x}"


def images_dir(inventory: Path) -> Path:
    """The runs' own save-image directory: a janitor elsewhere on the machine must not race this one."""
    return inventory.parent / "images"


def chaos_env(run_id: str | None, images: Path) -> dict[str, str]:
    """A child's environment: nothing of the pytest running us (run id, xdist, addopts) leaks into it;
    controller-side save images go to `images`."""
    env = {k: v for k, v in os.environ.items() if k not in ("LABS_RUN_ID", "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}
    env["LABS_IMAGE_DIR"] = str(images)
    if run_id:
        env["LABS_RUN_ID"] = run_id
    return env


def run_marks(run_id: str) -> list[str]:
    return [f"run mark {p.name}" for p in RUNS_DIR.glob(f"{run_id}.*")] if RUNS_DIR.exists() else []


def kill_when(
    args: list[str],
    env: dict[str, str],
    log: Path,
    ready: Callable[[], bool],
    delay: float,
    *,
    wait: float = 60.0,
    poll: float = 0.1,
) -> str:
    """Start pytest with `args` in a session of its own, wait until `ready()` (at most `wait` seconds),
    then `delay` more seconds, then SIGKILL the whole group: pytest and whatever it started in it.
    What happened, for the assertion messages."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = time.monotonic()
    try:
        seen = False
        while time.monotonic() < started + wait and proc.poll() is None and not seen:
            seen = ready()
            time.sleep(0 if seen else poll)
        waited = time.monotonic() - started
        time.sleep(delay)
        finished = proc.poll() is not None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if finished:
        return "finished before the kill"
    return f"killed, ready after {waited:.0f}s" if seen else f"killed, not ready within {waited:.0f}s"


def log_shows_a_result(log: Path) -> Callable[[], bool]:
    """pytest -q writes one character per finished test."""
    return lambda: any(c in log.read_text(errors="replace") for c in ".FEs")
