"""Which runs are alive on this controller: a run's processes each hold an flock on a mark file.

The kernel drops the lock when the process dies, however it dies (SIGKILL included), so the
janitor can tell a killed run's leftovers from those of a run still working next to it: it only
removes what belongs to runs no live process holds a mark for. xdist workers share a run id and
each hold their own mark.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

RUNS_DIR = Path(tempfile.gettempdir()) / f"labs-runs-{os.getuid()}"
_own: set[str] = set()  # run ids this process holds a mark for


class RunMark:
    """This process works for `run_id` until release() or its death."""

    def __init__(self, run_id: str, runs_dir: Path = RUNS_DIR) -> None:
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.path = runs_dir / f"{run_id}.{os.getpid()}.lock"
        self._fd: int | None = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.run_id = run_id
        _own.add(run_id)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
            _own.discard(self.run_id)


def live_runs(runs_dir: Path = RUNS_DIR) -> set[str]:
    """Run ids another live process holds a mark for (this process's own marks do not count);
    the marks of dead processes are removed on the way."""
    live: set[str] = set()
    for path in runs_dir.glob("*.lock") if runs_dir.exists() else []:
        run_id, _, pid = path.stem.rpartition(".")
        if pid == str(os.getpid()):
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live.add(run_id)
        else:
            path.unlink(missing_ok=True)  # nobody holds it: its process is gone
        finally:
            os.close(fd)
    # a run's other files (labs.hostwatch's health record) go with its last mark
    for path in runs_dir.glob("*.health.json") if runs_dir.exists() else []:
        run_id = path.name.removesuffix(".health.json")
        if run_id not in live and run_id not in _own:
            path.unlink(missing_ok=True)
    return live
