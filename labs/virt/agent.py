"""The QEMU guest agent through libvirt (`qemuAgentCommand`): commands run in the guest with no guest network.

The ecosystem's convention (avocado-vt, tp-libvirt's guest checks): the guest runs qemu-ga on the virtio port
`org.qemu.guest_agent.0` (labs.virt.xml.AGENT_CHANNEL); `guest-exec` starts a command, `guest-exec-status`
collects its exit code and output.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu


class AgentError(Exception):
    """The guest agent did not answer, or the command it ran did not finish in time."""


@dataclass(frozen=True)
class GuestExec:
    exitcode: int | None
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.exitcode == 0


def command(dom: libvirt.virDomain, execute: str, arguments: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    """One agent command's reply; retried while the agent is unresponsive, which libvirt says before it sends.

    libvirt syncs with the agent before each command and gives the sync 5 s whatever the command's timeout:
    a guest slowed down by nested TCG (more so just after a restore) can miss it.
    """
    doc: dict[str, Any] = {"execute": execute}
    if arguments is not None:
        doc["arguments"] = arguments
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(doc), max(1, int(timeout)), 0)
            return json.loads(reply)["return"]
        except libvirt.libvirtError as e:
            unsent = e.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE
            if not unsent or time.monotonic() > deadline:
                raise AgentError(f"{execute}: {e.get_error_message()}") from e
        time.sleep(1)


def wait_for(dom: libvirt.virDomain, timeout: float) -> float:
    """Seconds until the agent answered a ping (it connects once the guest's init starts it)."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout:
        try:
            command(dom, "guest-ping", timeout=10)
            return time.monotonic() - start
        except AgentError as e:
            last = str(e)
        time.sleep(2)
    raise AgentError(f"the guest agent did not answer within {timeout:.0f} s: {last}")


def run(dom: libvirt.virDomain, script: str, timeout: float = 120, shell: str = "/bin/sh") -> GuestExec:
    """`script` run by the guest's shell; its exit code and output once it ended (AgentError past `timeout`)."""
    deadline = time.monotonic() + timeout
    args = {"path": shell, "arg": ["-c", script], "capture-output": True}
    pid = command(dom, "guest-exec", args, timeout=timeout)["pid"]
    while True:
        status = command(dom, "guest-exec-status", {"pid": pid}, timeout=max(1.0, deadline - time.monotonic()))
        if status.get("exited"):
            return GuestExec(
                status.get("exitcode"),
                base64.b64decode(status.get("out-data", "")).decode(errors="replace"),
                base64.b64decode(status.get("err-data", "")).decode(errors="replace"),
            )
        if time.monotonic() > deadline:
            raise AgentError(f"guest command did not finish within {timeout:.0f} s: {script[:60]!r}")
        time.sleep(0.5)
