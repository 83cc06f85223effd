"""Faults on a host's libvirt daemon (virtqemud or libvirtd, whichever runs): stopped a while, or killed.

Both bring the daemon back on the host itself: a stopped daemon is continued by
a timer started with the stop (so it comes back even when the run is killed),
a killed one is started again in the same round trip. `lab janitor` continues a
daemon left stopped and starts one left dead (labs.janitor).
"""

from __future__ import annotations

import libvirt

from labs.errors import InfraError
from labs.faults.base import ExpectedError, Fault
from labs.transport import HostConnection
from labs.virt.sequence import ev, opt, seq

DAEMONS = ("virtqemud", "libvirtd")
# The daemon that runs and its main pid, or exit 3
FIND_DAEMON = (
    f'for d in {" ".join(DAEMONS)}; do systemctl is-active --quiet "$d" && '
    'pid=$(systemctl show -p MainPID --value "$d") && [ "$pid" != 0 ] && break; d=; done; [ -n "$d" ] || exit 3'
)
# Continue a daemon left stopped (T), start one left dead (failed: a socket-activated daemon that exited
# idle is inactive, not failed); one line per daemon brought back
SWEEP_DAEMONS = f"""
for d in {" ".join(DAEMONS)}; do
  pid=$(systemctl show -p MainPID --value "$d" 2>/dev/null)
  if [ -n "$pid" ] && [ "$pid" != 0 ] && grep -q '^State:[[:space:]]*T' /proc/"$pid"/status 2>/dev/null; then
    kill -CONT "$pid" && echo "continued $d (pid $pid), left stopped"
  elif systemctl is-failed --quiet "$d" 2>/dev/null; then
    systemctl reset-failed "$d"; systemctl start "$d" && echo "started $d, left dead"
  fi
done
true
"""


class StopDaemon(Fault):
    """SIGSTOP the host's libvirt daemon for `hold` seconds (shorter than the client's keepalive, 5 s x 3):
    the job waits for it and then goes on, completing or failing cleanly (libvirt 11.3, once per side and
    phase, in setup and while RAM moves: completed)."""

    name = "stop-libvirt-daemon"
    runs_on = "either"
    expected_errors = (ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_OPERATION_FAILED),)

    def __init__(self, ssh: HostConnection, hold: float = 5.0) -> None:
        super().__init__(f"{ssh.name} for {hold:g}s")
        self.ssh = ssh
        self.hold = hold
        self.daemon: str | None = None
        self.pid: int | None = None
        # stopped at the switchover, the daemon holds the guest's resume for as long as it is stopped
        self.downtime_allowance_ms = round(hold * 1000)

    def _inject(self) -> None:
        timer = f'setsid -f sh -c "sleep {self.hold:g}; kill -CONT $pid" </dev/null >/dev/null 2>&1'
        res = self.ssh.run(f'{FIND_DAEMON}; kill -STOP "$pid" && {timer}; echo "$d $pid"', timeout=30, sudo=True)
        words = res.stdout.split()
        if not res.ok or len(words) != 2:
            raise InfraError(f"{self.ssh.name}: no libvirt daemon to stop ({res.stderr.strip() or 'none active'})")
        self.daemon, self.pid = words[0], int(words[1])
        self.note(f"kill -STOP {self.pid} ({self.daemon}) on {self.ssh.name}; SIGCONT after {self.hold:g}s")

    def _undo(self) -> None:
        if self.pid is not None:  # the timer has sent it already, unless the job ended first
            self.ssh.run(f"kill -CONT {self.pid} 2>/dev/null; true", timeout=30, sudo=True, check=True)
            self.note(f"kill -CONT {self.pid} ({self.daemon})")


class KillDaemon(Fault):
    """SIGKILL the host's libvirt daemon and start it again at once: the restarted daemon recovers the
    domain's unfinished migration job by cancelling it (the source's) or killing the incoming QEMU (the
    destination's), so the job fails and the source keeps the VM. Measured on libvirt 11.3, once per
    side: the source's kill ends the client's connection (VIR_FROM_RPC/SYSTEM_ERROR), the destination's
    fails the source's job (VIR_FROM_QEMU/OPERATION_FAILED) while RAM moves, and ends the client's
    connection to it (VIR_FROM_RPC/INTERNAL_ERROR) in setup, while its QEMU starts."""

    name = "kill-libvirt-daemon"
    expected_errors = (
        ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_OPERATION_FAILED),
        ExpectedError(libvirt.VIR_FROM_RPC, libvirt.VIR_ERR_SYSTEM_ERROR),
        ExpectedError(libvirt.VIR_FROM_RPC, libvirt.VIR_ERR_INTERNAL_ERROR),
        ExpectedError(libvirt.VIR_FROM_RPC, libvirt.VIR_ERR_AUTH_FAILED),
    )
    # events of the killed daemon's domain after the kill are lost with its connection
    destination_events = seq(opt(ev("started/migrated")), opt(ev("stopped/(failed|crashed|destroyed)")))

    def __init__(self, ssh: HostConnection) -> None:
        super().__init__(ssh.name)
        self.ssh = ssh
        self.daemon: str | None = None

    def _inject(self) -> None:
        script = (  # HUP and PIPE ignored: the daemon is started again even when our connection dies first
            f'trap "" HUP PIPE; {FIND_DAEMON}; kill -KILL "$pid" || exit 4; '
            'for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done; '
            'systemctl reset-failed "$d" 2>/dev/null; systemctl start "$d" && echo "$d $pid"'
        )
        res = self.ssh.run(script, timeout=120, sudo=True)
        words = res.stdout.split()
        if not res.ok or len(words) != 2:
            raise InfraError(f"{self.ssh.name}: libvirt daemon not killed and restarted: {res.stderr.strip()}")
        self.daemon = words[0]
        self.note(f"kill -KILL {words[1]} ({self.daemon}) on {self.ssh.name}, then systemctl start {self.daemon}")

    def _undo(self) -> None:
        res = self.ssh.run(SWEEP_DAEMONS, timeout=120, sudo=True, check=True)
        self.note(res.stdout.strip() or f"{self.daemon} running")
