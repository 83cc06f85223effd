"""Host-side records of the mdevs faults create, so that `lab janitor` finds them after a killed run.

An mdev a fault creates has a random UUID that nothing else names: if the run is
killed before the fault is undone, no run-id prefix leads to it. So the fault
first writes a record `<run id>.<uuid>` into the host's record directory, then
creates the mdev; undo removes the mdev, then the record. The janitor removes the
mdevs whose record names a dead run (labs.janitor), then the record.

The run is the one holding the device's reservation on that host (the pytest
plugin reserves both devices of a pair before a fault touches them), unless the
caller names it.
"""

from __future__ import annotations

import json
import shlex
import time

from labs.inventory import LabDevice
from labs.reservations import list_reservations, lock_name
from labs.transport import HostConnection

RECORD_DIR = "/run/labs/mdevs"
# A sim host keeps its records in its sim lab's directory, like its reservations (labs.reservations)
RECORD_DIR_SCRIPT = (
    'if [ -n "$LABS_SIM_DIR" ]; then d="$LABS_SIM_DIR/hosts/$LABS_SIM_HOST/mdevs"; '
    f'else d={RECORD_DIR}; fi; mkdir -p "$d"'
)
# Without a reservation (--lab-no-reserve: nobody else uses the lab) no run can be told; the janitor
# takes such a record for a dead run's
UNRESERVED_RUN = "labs-unreserved"
SYSFS_DEVICES = "/sys/bus/mdev/devices"


def record_name(run_id: str, uuid: str) -> str:
    return f"{run_id}.{uuid}"


def parse_record(name: str) -> tuple[str, str] | None:
    """(run id, uuid) of a record's file name; None for a file that is not one."""
    run_id, dot, uuid = name.rpartition(".")
    return (run_id, uuid) if dot and run_id.startswith("labs-") and uuid else None


def holder_run(ssh: HostConnection, device: LabDevice) -> str:
    """The run that holds `device`'s reservation on its host (UNRESERVED_RUN when nobody does)."""
    name = lock_name(device)
    runs = [str(r["run"]) for n, r in list_reservations(ssh) if n == name and r.get("run")]
    return runs[0] if runs else UNRESERVED_RUN


def write_record(ssh: HostConnection, run_id: str, uuid: str, what: dict[str, str]) -> None:
    line = shlex.quote(json.dumps({**what, "run": run_id, "uuid": uuid, "since": time.time()}))
    path = shlex.quote(record_name(run_id, uuid))
    ssh.run(f"{RECORD_DIR_SCRIPT}; printf '%s\\n' {line} > \"$d\"/{path}", timeout=30, sudo=True, check=True)


def drop_record(ssh: HostConnection, run_id: str, uuid: str) -> None:
    path = shlex.quote(record_name(run_id, uuid))
    ssh.run(f'{RECORD_DIR_SCRIPT}; rm -f "$d"/{path}', timeout=30, sudo=True, check=True)


def list_records(ssh: HostConnection) -> list[tuple[str, str]]:
    """(run id, uuid) of every record on the host."""
    res = ssh.run(f'{RECORD_DIR_SCRIPT}; ls -1 "$d"', timeout=30, sudo=True, idempotent=True, check=True)
    return [rec for rec in map(parse_record, res.stdout.split()) if rec is not None]


def mdev_exists(ssh: HostConnection, uuid: str) -> bool:
    return ssh.run(f"test -e {SYSFS_DEVICES}/{shlex.quote(uuid)}", timeout=15).ok


def remove_mdev(ssh: HostConnection, uuid: str) -> bool:
    """Remove the mdev if it exists; whether it did."""
    if not mdev_exists(ssh, uuid):
        return False
    ssh.run(f"echo 1 > {SYSFS_DEVICES}/{shlex.quote(uuid)}/remove", timeout=30, sudo=True, check=True)
    return True
