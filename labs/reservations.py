"""Device reservations held on the device's host, over the SSH connection.

A reservation is an flock on a file under /run/labs/locks on the host, held by
a small shell process whose stdin is our SSH channel. When we release, or our
process dies, or the connection drops, the channel closes, the holder exits
and the kernel drops the lock: a dead owner never leaves a lock behind. A
sidecar `.owner` file says who holds it, for which run, and until when; a
holder past its expiry (a controller that hangs but keeps its connection) is
killed by the next claimant.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import socket
import time
from dataclasses import dataclass
from typing import Any

import paramiko

from labs.errors import InfraError
from labs.inventory import LabDevice
from labs.transport import HostConnection

# A sim host (its sshd sets LABS_SIM_DIR and LABS_SIM_HOST) keeps its locks in its own directory of
# its sim lab: two sim labs on one machine have hosts and devices of the same names.
LOCK_DIR_SCRIPT = (
    'if [ -n "$LABS_SIM_DIR" ]; then d="$LABS_SIM_DIR/hosts/$LABS_SIM_HOST/locks"; mkdir -p "$d"; '
    'else d=/run/labs/locks; { mkdir -p "$d" && [ -w "$d" ]; } 2>/dev/null '
    '|| { d="${TMPDIR:-/tmp}/labs-locks-$(id -u)"; mkdir -p "$d"; }; fi'
)

HOLD_SCRIPT = """
{lockdir}
f="$d/{name}.lock"
exec 9>>"$f"
if ! flock -n 9; then echo BUSY; cat "$f.owner" 2>/dev/null; echo; exit 3; fi
trap 'rm -f "$f.owner"; exit 1' HUP INT TERM PIPE
printf '%s\\n' {owner} | sed "s/@HOLDER@/$$/" > "$f.owner"
echo LOCKED
cat >/dev/null
rm -f "$f.owner"
"""

# A hung-up holder (sshd sends SIGHUP when the controller dies) removes its record (the trap); one
# killed outright cannot: an owner record whose lock nobody holds is stale.
SWEEP_SCRIPT = """
{lockdir}
for o in "$d"/*.lock.owner; do
  [ -e "$o" ] || continue
  f="${{o%.owner}}"
  if flock -n "$f" true; then printf '%s\\t' "$(basename "$f" .lock)"; cat "$o"; echo; rm -f "$o"; fi
done
true
"""

LIST_SCRIPT = """
{lockdir}
for o in "$d"/*.lock.owner; do [ -e "$o" ] && {{ printf '%s\\t' "$(basename "$o" .lock.owner)"; cat "$o"; }}; done
true
"""


class ReservationBusy(InfraError):
    def __init__(self, device: str, owner: dict[str, Any]) -> None:
        until = time.strftime("%H:%M:%S", time.localtime(owner.get("expires", 0)))
        super().__init__(
            f"{device} is reserved by {owner.get('owner', '?')} (run {owner.get('run', '?')}, until {until})"
        )
        self.owner = owner


def lock_name(device: LabDevice) -> str:
    # the sim lab's hosts share one machine: the host name keeps their locks apart
    return f"{device.host.name}_{device.name}".replace("/", "_").replace(":", "_")


def owner_record(run_id: str, expires_in: float) -> dict[str, Any]:
    return {
        "owner": f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}",
        "run": run_id,
        "since": time.time(),
        "expires": time.time() + expires_in,
        "holder": "@HOLDER@",
    }


@dataclass
class Reservation:
    device: LabDevice
    channel: paramiko.Channel
    owner: dict[str, Any]

    def release(self) -> None:
        try:
            self.channel.shutdown_write()  # the holder's `cat` sees EOF, cleans up and exits
            self.channel.recv_exit_status()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the connection is gone; so is the holder, and with it the lock
        finally:
            self.channel.close()


def _try_once(ssh: HostConnection, device: LabDevice, owner: dict[str, Any]) -> Reservation | dict[str, Any]:
    script = HOLD_SCRIPT.format(lockdir=LOCK_DIR_SCRIPT, name=lock_name(device), owner=shlex.quote(json.dumps(owner)))
    chan = ssh.exec_channel(f"sh -c {shlex.quote(script)}")
    chan.settimeout(ssh.connect_timeout)
    first = b""
    try:
        while not first.endswith(b"\n"):
            data = chan.recv(1)
            if not data:
                break
            first += data
    except (OSError, paramiko.SSHException) as exc:
        chan.close()
        raise InfraError(f"{device.id}: reservation failed: {exc}") from exc
    if first.strip() == b"LOCKED":
        chan.settimeout(None)
        return Reservation(device, chan, owner)
    rest = b""
    while not chan.exit_status_ready() or chan.recv_ready():
        data = chan.recv(4096)
        if not data:
            break
        rest += data
    chan.close()
    if first.strip() != b"BUSY":
        raise InfraError(f"{device.id}: reservation failed: {(first + rest).decode(errors='replace').strip()}")
    try:
        return dict(json.loads(rest.decode().strip() or "{}"))
    except json.JSONDecodeError:
        return {}  # the holder is between taking the lock and writing its record


def reserve(
    ssh: HostConnection, device: LabDevice, run_id: str, *, wait: float, expires_in: float, poll: float = 0.5
) -> Reservation:
    """Reserve `device`; wait up to `wait` seconds for another owner, taking over an expired one."""
    owner = owner_record(run_id, expires_in)
    deadline = time.monotonic() + wait
    while True:
        got = _try_once(ssh, device, owner)
        if isinstance(got, Reservation):
            return got
        holder = got.get("holder")
        if got.get("expires", float("inf")) < time.time() and str(holder).isdigit():
            _kill_holder(ssh, str(holder))
            continue
        if time.monotonic() >= deadline:
            raise ReservationBusy(device.id, got)
        time.sleep(poll)


def list_reservations(ssh: HostConnection) -> list[tuple[str, dict[str, Any]]]:
    res = ssh.run(LIST_SCRIPT.format(lockdir=LOCK_DIR_SCRIPT), timeout=30, idempotent=True)
    return _records(res.stdout)


def _records(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, record = line.partition("\t")
        try:
            out.append((name, dict(json.loads(record))))
        except json.JSONDecodeError:
            out.append((name, {"owner": record}))
    return out


def sweep_stale(ssh: HostConnection) -> list[tuple[str, dict[str, Any]]]:
    """Remove owner records no live holder backs (their lock is free); returns the records removed."""
    res = ssh.run(SWEEP_SCRIPT.format(lockdir=LOCK_DIR_SCRIPT), timeout=30, idempotent=True)
    return _records(res.stdout)


def clear_reservations(ssh: HostConnection) -> list[str]:
    """Kill every holder on the host (their locks go with them); returns the lock names."""
    cleared = []
    for name, record in list_reservations(ssh):
        holder = str(record.get("holder", ""))
        if holder.isdigit():
            _kill_holder(ssh, holder)
        cleared.append(name)
    return cleared


def _kill_holder(ssh: HostConnection, holder: str) -> None:
    # the shell's `cat` child shares the locked descriptor: it must go too
    ssh.run(f"pkill -P {int(holder)} 2>/dev/null; kill {int(holder)} 2>/dev/null; true", timeout=15)
