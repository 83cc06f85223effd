"""Cut the migration link on the destination with a firewall rule, and put it back.

The rule drops the source's packets to libvirt's QEMU migration ports only
(49152-49215 by default), so SSH and the libvirt connections keep working and
the test can still observe and clean up. nftables is used where `nft` exists
(one table per injection, named after the run, deleted whole in undo); else an
iptables rule tagged with the same name in a comment.
"""

from __future__ import annotations

import re
import shlex

import libvirt

from labs.faults.base import ExpectedError, Fault
from labs.transport import HostConnection

MIGRATION_PORTS = (49152, 49215)  # libvirt qemu.conf migration_port_min/max defaults
NFT_PREFIX = "labs_"  # the janitor removes nft tables and iptables comments starting with this


def rule_tag(run_id: str, suffix: str) -> str:
    """An nft-safe identifier naming the run: `labs_20261124_235501_1a2b3c_cut_1`."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{run_id}_{suffix}")


class CutMigrationLink(Fault):
    name = "cut-migration-link"
    # the job stalls on the dropped packets until the scenario's deadline (on the nested lab the abort then did
    # not return within its grace either); a job that notices the cut itself fails as QEMU's (not measured)
    stalls = True
    expected_errors = (ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_OPERATION_FAILED),)

    def __init__(
        self,
        ssh: HostConnection,
        source_address: str,
        tag: str,
        ports: tuple[int, int] = MIGRATION_PORTS,
    ) -> None:
        super().__init__(f"{ssh.name} from {source_address}")
        self.ssh = ssh
        self.source = source_address
        self.tag = tag
        self.ports = ports
        self.tool: str | None = None

    def _family(self) -> str:
        return "ip6" if ":" in self.source else "ip"

    def _iptables(self) -> str:
        return "ip6tables" if ":" in self.source else "iptables"

    def _iptables_rule(self) -> str:
        lo, hi = self.ports
        return f"INPUT -s {shlex.quote(self.source)} -p tcp --dport {lo}:{hi} -m comment --comment {self.tag} -j DROP"

    def _inject(self) -> None:
        lo, hi = self.ports
        has_nft = self.ssh.run("command -v nft", timeout=15, sudo=True).ok
        self.tool = "nft" if has_nft else self._iptables()
        if has_nft:
            script = (
                f"add table inet {self.tag}\n"
                f"add chain inet {self.tag} input {{ type filter hook input priority -10; }}\n"
                f"add rule inet {self.tag} input {self._family()} saddr {self.source} tcp dport {lo}-{hi} drop\n"
            )
            self.ssh.run("nft -f -", timeout=15, sudo=True, stdin=script.encode(), check=True)
            self.note(f"nft table inet {self.tag}: drop {self.source} -> tcp {lo}-{hi}")
        else:
            self.ssh.run(f"{self.tool} -I {self._iptables_rule()}", timeout=15, sudo=True, check=True)
            self.note(f"{self.tool} -I {self._iptables_rule()}")

    def _undo(self) -> None:
        if self.tool == "nft":
            res = self.ssh.run(f"nft delete table inet {self.tag}", timeout=15, sudo=True)
            if not res.ok and "No such file" not in res.stderr:
                res.check()
            self.note(f"nft delete table inet {self.tag}")
        elif self.tool is not None:
            # -D until it is gone: an inject retried after a lost connection may have added it twice
            self.ssh.run(
                f"while {self.tool} -D {self._iptables_rule()} 2>/dev/null; do :; done",
                timeout=15,
                sudo=True,
                check=True,
            )
            self.note(f"{self.tool} -D {self._iptables_rule()}")

    def present(self) -> bool:
        """Is the rule on the host now (for tests of the undo)?"""
        if self.tool == "nft":
            return self.ssh.run(f"nft list table inet {self.tag}", timeout=15, sudo=True).ok
        if self.tool is not None:
            return self.ssh.run(f"{self.tool} -C {self._iptables_rule()}", timeout=15, sudo=True).ok
        return False
