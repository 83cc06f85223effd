"""`python -m labs.lowprio COMMAND [ARGS...]`: run COMMAND at the lowest CPU priority, for CPU the nested lab leaves.

`./lab test` runs lint, tests and defects beside the nested stage (tox p); their commands go through this.
A process's nice value counts only inside its autogroup (Linux puts each session in one when
`kernel.sched_autogroup_enabled` is on, as on Debian), and every nested host's QEMU daemonizes into a
session of its own: so the command gets a session of its own too, with that autogroup's nice at 19
as well as its own. Where there are no autogroups the process nice does it alone.
Exit status: the command's (128 + signal number when a signal ended it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

LOWEST = 19
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def lowest_priority() -> None:
    """In the child, after its setsid: lowest nice for the process and for its (new) autogroup."""
    os.nice(LOWEST)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(LOWEST))
    except OSError:
        pass  # no autogroups here (or not Linux): the process nice is all there is


def parent_death_signal(signum: int) -> None:
    """Linux: get `signum` when our parent dies (tox ended abruptly), to pass on like any other."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):
        pass  # not Linux: the signals tox sends still come through


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m labs.lowprio COMMAND [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    early: list[int] = []  # signals that came before the command existed, passed on once it does
    procs: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        # the command has its own session: what tox or a Ctrl-C sends us, it must get too
        if not procs:
            early.append(signum)
        for proc in procs:
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    # the command's own session keeps it out of its caller's process group: a caller that dies without a
    # word (tox killed) would leave it running
    parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        return 128 + signal.SIGTERM  # the parent died before the line above: run nothing
    try:
        proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=lowest_priority)
    except OSError as exc:
        print(f"labs.lowprio: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    procs.append(proc)
    for pending in early:
        forward(pending, None)
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
