"""Device reservations held on the device's host, by a lock agent on our SSH connection.

A reservation is an flock on a file under /run/labs/locks on the host, held by
one small agent process per connection (labs/vfio/agent.py, ops lock/unlock)
whose stdin is our SSH channel. When we release, or our process dies, or the
connection drops, the agent unlocks or exits and the kernel drops the lock: a
dead owner never leaves a lock behind. A sidecar `.owner` file says who holds
it, for which run, and until when; a holder past its expiry (a controller that
hangs but keeps its connection) is killed by the next claimant.

One agent per connection rather than a shell per reservation: a reservation
then costs one round trip on an open channel, not an exec (0.3-0.5 s per test
on a busy lab host). The agent does nothing else, so no device operation's
watchdog can take a run's reservations with it.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from labs.errors import InfraError
from labs.inventory import LabDevice
from labs.transport import HostConnection
from labs.vfio.client import AgentClient, AgentInfraError, AgentOSError

# A sim host (its sshd sets LABS_SIM_DIR and LABS_SIM_HOST) keeps its locks in its own directory of
# its sim lab: two sim labs on one machine have hosts and devices of the same names.
LOCK_DIR_SCRIPT = (
    'if [ -n "$LABS_SIM_DIR" ]; then d="$LABS_SIM_DIR/hosts/$LABS_SIM_HOST/locks"; mkdir -p "$d"; '
    'else d=/run/labs/locks; { mkdir -p "$d" && [ -w "$d" ]; } 2>/dev/null '
    '|| { d="${TMPDIR:-/tmp}/labs-locks-$(id -u)"; mkdir -p "$d"; }; fi'
)

# An agent that exits removes its records; one killed outright cannot: an owner record whose lock
# nobody holds is stale.
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
    }


# One lock agent per connection (the client serializes its requests on the channel).
_lockers: WeakKeyDictionary[HostConnection, AgentClient] = WeakKeyDictionary()
_lockers_lock = threading.Lock()


def locker(ssh: HostConnection) -> AgentClient:
    with _lockers_lock:
        found = _lockers.get(ssh)
        if found is None or found.dead:
            found = AgentClient.over_ssh(ssh, python=ssh.spec.python, timeout=ssh.connect_timeout)
            _lockers[ssh] = found
        return found


@dataclass
class Reservation:
    device: LabDevice
    locker: AgentClient
    name: str
    owner: dict[str, Any]

    def release(self) -> None:
        try:
            self.locker.call("unlock", name=self.name)
        except (AgentInfraError, AgentOSError, OSError):
            pass  # the agent is gone; so is its flock


def _try_once(ssh: HostConnection, device: LabDevice, owner: dict[str, Any]) -> Reservation | dict[str, Any]:
    name = lock_name(device)
    try:
        agent = locker(ssh)
        got = agent.call("lock", name=name, owner=owner)
    except (AgentInfraError, AgentOSError, OSError) as exc:
        raise InfraError(f"{device.id}: reservation failed: {exc}") from exc
    if got.get("locked"):
        return Reservation(device, agent, name, {**owner, "holder": got.get("holder")})
    try:
        return dict(json.loads(str(got.get("owner") or "").strip() or "{}"))
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
    # SIGTERM: the agent removes its records on the way out; its children (if any) go too
    ssh.run(f"pkill -P {int(holder)} 2>/dev/null; kill {int(holder)} 2>/dev/null; true", timeout=15)
