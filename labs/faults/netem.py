"""A degraded migration link: tc netem (delay, loss, rate) on the source's interface toward the destination.

Only the interface the route to the destination's migration address leaves by
is shaped, so on a lab with a separate migration link SSH and libvirt keep their
speed. The job must either complete within its deadline or fail cleanly. Before
the qdisc is added, a record naming the run and the interface is written on the
host (/run/labs/netem/<tag>): `lab janitor` removes the qdisc of a dead run's
record (labs.janitor).
"""

from __future__ import annotations

import shlex

import libvirt

from labs.errors import InfraError
from labs.faults.base import ExpectedError, Fault
from labs.transport import HostConnection

RECORD_DIR = "/run/labs/netem"
NETEM = "delay 40ms 10ms loss 1% rate 4mbit"  # slower than the 1 MiB/s job cap, lossy, jittery


class DegradedLink(Fault):
    name = "degraded-migration-link"
    runs_on = "either"
    stalls = True  # slow enough to outlast the deadline: our abort then ends it, cleanly
    downtime_allowance_ms = None  # the switchover's last pass crawls over the link too
    expected_errors = (ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_OPERATION_FAILED),)

    def __init__(self, ssh: HostConnection, destination_address: str, tag: str, netem: str = NETEM) -> None:
        super().__init__(f"{ssh.name} toward {destination_address} ({netem})")
        self.ssh = ssh
        self.address = destination_address
        self.tag = tag
        self.netem = netem
        self.dev: str | None = None

    def _inject(self) -> None:
        record = shlex.quote(f"{RECORD_DIR}/{self.tag}")
        script = (
            f"dev=$(ip -o route get {shlex.quote(self.address)} | sed -n 's/.* dev \\([^ ]*\\).*/\\1/p'); "
            '[ -n "$dev" ] && [ "$dev" != lo ] || { echo "no interface but lo toward the address" >&2; exit 3; }; '
            f'mkdir -p {RECORD_DIR} && echo "$dev" > {record} && '
            f'tc qdisc replace dev "$dev" root netem {self.netem} && echo "$dev"'
        )
        res = self.ssh.run(script, timeout=30, sudo=True)
        if not res.ok or not res.stdout.strip():
            raise InfraError(f"{self.ssh.name}: netem toward {self.address}: {res.stderr.strip()}")
        self.dev = res.stdout.split()[-1]
        self.note(f"tc qdisc replace dev {self.dev} root netem {self.netem} on {self.ssh.name}")

    def _undo(self) -> None:
        self.ssh.run(remove_script(self.tag), timeout=30, sudo=True, check=True)
        self.note(f"tc qdisc del dev {self.dev} root; record {self.tag} removed")

    def present(self) -> bool:
        """Is the netem qdisc on the interface now (for tests of the undo)?"""
        if self.dev is None:
            return False
        res = self.ssh.run(f"tc qdisc show dev {shlex.quote(self.dev)} root", timeout=15, sudo=True)
        return "netem" in res.stdout


def remove_script(tag: str) -> str:
    """Remove the netem qdisc of the record `tag` and the record (no-op when there is none)."""
    record = shlex.quote(f"{RECORD_DIR}/{tag}")
    return (
        f'dev=$(cat {record} 2>/dev/null); if [ -n "$dev" ] && tc qdisc show dev "$dev" root | grep -q netem; '
        f'then tc qdisc del dev "$dev" root; fi; rm -f {record}'
    )
