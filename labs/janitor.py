"""Remove what killed runs left behind, found by the run-id prefix (`labs-`).

What a run creates is named after its run id: domains `labs-<date>-<time>-<hex>-...`,
save images in the known image dirs, nft tables / iptables comments
`labs_<date>_<time>_<hex>_...`, host-side records `<run id>.<uuid>` of the mdevs faults
created (labs.faults.mdevs). The janitor removes all of them except the
current session's own and those of runs still alive (a live process on this
controller holds a mark for them, labs.liveruns, or a live holder on the host keeps
a device reservation for them), and returns one line per thing removed. On each
host it also removes reservation records no live holder backs, kills device
agents orphaned by a dead SSH session (on a sim host: of its own sim lab), and
brings back devices no live run holds: an inventory mdev a fault removed is
created again, a device left outside RUNNING is reset.

A `test:///` node lives inside the process that opened it, so from a fresh
process only image files can be left over there; within one process (the
framework's tests) the shared connections are searched too.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from labs.agentpool import open_device
from labs.errors import LabError
from labs.faults import disk, mdevs, netem
from labs.faults.daemon import SWEEP_DAEMONS
from labs.faults.host import power_on
from labs.faults.network import NFT_PREFIX, rule_tag
from labs.inventory import LabDevice, LabHost
from labs.inventory.models import MdevDevice
from labs.liveruns import live_runs
from labs.models import has_fault_knobs
from labs.reservations import ReservationBusy, list_reservations, reserve, sweep_stale
from labs.session import LabSession
from labs.vfio.access import RUNNING_STATES
from labs.vfio.client import AgentOSError
from labs.vfio.device import DeviceHandle
from labs.vfio.hostsys import KNOBS_OFF
from labs.virt.domain import REMOTE_IMAGE_DIR, VM, hypervisor, local_image_dir

RUN_PREFIX = "labs-"


# Orphaned agents: their SSH session is gone (parent 1). `labs_agent[.]py` does not match this script itself.
ORPHAN_AGENTS_SCRIPT = """
for p in $(pgrep -f 'labs_agent[.]py'); do
  [ "$(ps -o ppid= -p "$p" | tr -d ' ')" = 1 ] || continue
  if [ -n "$LABS_SIM_DIR" ]; then
    tr '\\0' '\\n' < /proc/"$p"/environ 2>/dev/null | grep -qxF "LABS_SIM_DIR=$LABS_SIM_DIR" || continue
  fi
  kill "$p" 2>/dev/null && echo "$p"
done
true
"""


def _starts(name: str, run_id: str) -> bool:
    return name.startswith(run_id) or name.startswith(rule_tag(run_id, ""))


def _keep(name: str, session: LabSession, keep_own: bool, held: set[str]) -> bool:
    """Own (unless keep_own is off), or of a live run: one whose reservations are `held` on some host, or
    whose mark a live process holds, asked now (a run that started after the janitor did is alive too)."""
    if keep_own and _starts(name, session.run_id):
        return True
    return any(_starts(name, run) for run in held | live_runs())


def janitor(session: LabSession, *, keep_own: bool = True) -> list[str]:
    """Remove leftovers of other (killed) runs on every host of the inventory; what was removed.
    Hosts are swept in parallel (each is a few SSH round trips), the lines come in host order."""
    live_runs()  # drops the marks dead processes left
    live: set[str] = set()  # runs with live reservation holders
    hosts = session.inventory.hosts
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(hosts)))) as pool:
        # a host a killed run's reboot left down is powered on before anything is asked of it
        removed = [line for lines in pool.map(lambda h: _power_on(session, h), hosts) for line in lines]
        # first every host's live reservation holders: the runs they serve are alive everywhere
        swept = pool.map(lambda h: _host_processes(session, h.name, live), hosts)
        removed += [line for lines in swept for line in lines]
        removed += [line for lines in pool.map(lambda h: _host(session, h, keep_own, live), hosts) for line in lines]
    for image in sorted(local_image_dir().glob(f"{RUN_PREFIX}*")) if local_image_dir().exists() else []:
        if not _keep(image.name, session, keep_own, live):
            image.unlink(missing_ok=True)
            removed.append(f"controller: removed {image}")
    return removed


def _power_on(session: LabSession, host: LabHost) -> list[str]:
    """A host with a power-on command (inventory `reboot.power_on`) that does not answer SSH: run it."""
    reboot = host.spec.reboot
    if reboot is None or not reboot.power_on:
        return []
    try:
        session.ssh(host.name).run("true", timeout=30)
        return []
    except LabError:
        pass
    try:
        said = power_on(host.name, reboot)
    except LabError as exc:
        return [f"{host.name}: did not answer, and powering it on failed: {exc}"]
    return [f"{host.name}: did not answer; powered on ({said or reboot.power_on})"]


def _host(session: LabSession, host: LabHost, keep_own: bool, live: set[str]) -> list[str]:
    """One host: the dead runs' domains, images and firewall rules, then its devices."""
    removed = _daemons(session, host)  # first: a stopped or dead daemon answers nothing that follows
    if host.spec.libvirt_uri:
        hv = hypervisor(session, host)
        try:
            names = [d.name() for d in hv.domains(RUN_PREFIX)]
        except LabError as exc:
            removed.append(f"{host.name}: libvirt unreachable, domains not checked: {exc}")
            names = []
        for name in names:
            if not _keep(name, session, keep_own, live):
                removed += VM(hv, name).remove()
    removed += _remote_leftovers(session, host.name, keep_own, live)
    removed += _netem(session, host.name, keep_own, live)
    removed += _full_filesystems(session, host.name, keep_own, live)
    removed += _mdevs(session, host.name, keep_own, live)  # after the domains: a dead run's QEMU held them
    removed += _devices(session, [d for d in session.inventory.devices if d.host.name == host.name])
    return removed


def _devices(session: LabSession, devices: list[LabDevice]) -> list[str]:
    """Reset devices a killed run left outside RUNNING (a driver may keep its state across opens, spec 5.3).
    A device some live run holds (reserved) is not touched."""
    out: list[str] = []
    for device in devices:
        try:
            ssh = session.ssh(device.host.name)
            held = reserve(ssh, device, session.run_id, wait=0, expires_in=session.inventory.settings.timeouts.test)
        except ReservationBusy:
            continue
        except LabError as exc:
            out.append(f"{device.id}: device not checked: {exc}")
            continue
        try:
            out += _restore_mdev(session, device)
            with open_device(session, device) as dev:
                if device.spec.kind != "sim" and has_fault_knobs(device):
                    out += _disarm(device, dev)
                state = dev.state()
                if state not in RUNNING_STATES:
                    dev.reset()
                    out.append(f"{device.id}: VFIO_DEVICE_RESET (left {state}); now {dev.state()}")
        except (LabError, AgentOSError) as exc:
            out.append(f"{device.id}: device not checked: {exc}")
        finally:
            held.release()
    return out


def _disarm(device: LabDevice, dev: DeviceHandle) -> list[str]:
    """A killed run's DriverArcFailure leaves the real driver's knobs armed (they are its module's: every
    device of the driver on the host shares them)."""
    armed = {k: v for k, v in dev.faults().items() if k in KNOBS_OFF and str(v) != KNOBS_OFF[k]}
    if not armed:
        return []
    dev.faults(clear=True)
    knobs = ", ".join(f"{k}={v}" for k, v in sorted(armed.items()))
    return [f"{device.id}: disarmed its driver's fault knobs ({knobs})"]


def _restore_mdev(session: LabSession, device: LabDevice) -> list[str]:
    """A killed DestinationLacksDevice leaves the inventory's mdev removed: create it again."""
    spec = device.spec
    if not isinstance(spec, MdevDevice):
        return []
    ssh = session.ssh(device.host.name)
    if mdevs.mdev_exists(ssh, spec.uuid):
        return []
    create = shlex.quote(f"/sys/class/mdev_bus/{spec.parent}/mdev_supported_types/{spec.type}/create")
    ssh.run(f"echo {spec.uuid} > {create}", timeout=30, sudo=True, check=True)
    return [f"{device.id}: re-created mdev {spec.uuid} ({spec.type}), the inventory's"]


def _mdevs(session: LabSession, host: str, keep_own: bool, live: set[str]) -> list[str]:
    """The mdevs dead runs' faults created (their records name the run), then the records.
    An inventory device's mdev is never removed, whatever a record says."""
    removed: list[str] = []
    inventory = {d.spec.uuid for d in session.inventory.devices if isinstance(d.spec, MdevDevice)}
    try:
        ssh = session.ssh(host)
        for run, uuid in mdevs.list_records(ssh):
            if _keep(run, session, keep_own, live):
                continue
            if uuid not in inventory and mdevs.remove_mdev(ssh, uuid):
                removed.append(f"{host}: removed mdev {uuid} (run {run})")
            mdevs.drop_record(ssh, run, uuid)
            removed.append(f"{host}: removed mdev record {mdevs.record_name(run, uuid)}")
    except LabError as exc:
        removed.append(f"{host}: mdevs not checked: {exc}")
    return removed


def _daemons(session: LabSession, host: LabHost) -> list[str]:
    """A libvirt daemon a killed StopDaemon/KillDaemon left stopped or dead is brought back (real hosts)."""
    uri = host.spec.libvirt_uri or ""
    if not uri or uri.startswith("test:"):
        return []
    try:
        lines = session.ssh(host.name).run(SWEEP_DAEMONS, timeout=120, sudo=True).stdout.splitlines()
    except LabError as exc:
        return [f"{host.name}: libvirt daemons not checked: {exc}"]
    return [f"{host.name}: {line}" for line in lines if line.strip()]


def _dead_records(
    session: LabSession,
    host: str,
    keep_own: bool,
    live: set[str],
    where: str,
    remove: Callable[[str], str],
    what: str,
) -> list[str]:
    """The run-tagged entries of `where` whose runs are dead, each undone by the script `remove(name)`."""
    removed: list[str] = []
    try:
        ssh = session.ssh(host)
        names = ssh.run(f"ls -1 {where} 2>/dev/null", timeout=30, sudo=True, idempotent=True).stdout.split()
        for name in names:
            if name.startswith(NFT_PREFIX) and not _keep(name, session, keep_own, live):
                ssh.run(remove(name), timeout=30, sudo=True, check=True)
                removed.append(f"{host}: removed {what} {where}/{name}")
    except LabError as exc:
        removed.append(f"{host}: {what} records not checked: {exc}")
    return removed


def _netem(session: LabSession, host: str, keep_own: bool, live: set[str]) -> list[str]:
    """The netem qdiscs of dead runs' DegradedLink records (labs.faults.netem), then the records."""
    return _dead_records(session, host, keep_own, live, netem.RECORD_DIR, netem.remove_script, "netem qdisc of")


def _full_filesystems(session: LabSession, host: str, keep_own: bool, live: set[str]) -> list[str]:
    """The tmpfs mounts of dead runs' FullFilesystem faults (labs.faults.disk), unmounted and removed."""
    return _dead_records(
        session,
        host,
        keep_own,
        live,
        disk.FULL_DIR,
        lambda name: disk.remove_script(f"{disk.FULL_DIR}/{name}"),
        "full-filesystem mount",
    )


def _host_processes(session: LabSession, host: str, live: set[str]) -> list[str]:
    """Stale reservation records and orphaned agents on `host`; adds the runs its live holders serve to `live`."""
    removed: list[str] = []
    try:
        ssh = session.ssh(host)
        for name, record in sweep_stale(ssh):
            removed.append(f"{host}: removed stale reservation {name} (run {record.get('run', '?')})")
        live.update(str(r["run"]) for _, r in list_reservations(ssh) if r.get("run") and r["run"] != session.run_id)
        for pid in ssh.run(ORPHAN_AGENTS_SCRIPT, timeout=30, sudo=True).stdout.split():
            removed.append(f"{host}: killed orphaned agent pid {pid}")
    except LabError as exc:
        removed.append(f"{host}: reservations and agents not checked: {exc}")
    return removed


def _remote_leftovers(session: LabSession, host: str, keep_own: bool, live: set[str]) -> list[str]:
    removed: list[str] = []
    try:
        ssh = session.ssh(host)
        images = ssh.run(f"ls -1 {REMOTE_IMAGE_DIR} 2>/dev/null", timeout=30, idempotent=True).stdout.split()
        for name in images:
            if name.startswith(RUN_PREFIX) and not _keep(name, session, keep_own, live):
                path = f"{REMOTE_IMAGE_DIR}/{name}"
                ssh.run(f"rm -f {shlex.quote(path)}", timeout=30, sudo=True, check=True)
                removed.append(f"{host}: removed {path}")
        if ssh.run("command -v nft", timeout=15, sudo=True).ok:
            tables = ssh.run("nft list tables", timeout=30, sudo=True).stdout.splitlines()
            for line in tables:  # "table inet labs_..."
                parts = line.split()
                if len(parts) == 3 and parts[2].startswith(NFT_PREFIX) and not _keep(parts[2], session, keep_own, live):
                    ssh.run(f"nft delete table {parts[1]} {parts[2]}", timeout=15, sudo=True, check=True)
                    removed.append(f"{host}: removed nft table {parts[1]} {parts[2]}")
        removed += _iptables_leftovers(session, host, keep_own, live)
    except LabError as exc:
        removed.append(f"{host}: not checked: {exc}")
    return removed


def _iptables_leftovers(session: LabSession, host: str, keep_own: bool, live: set[str]) -> list[str]:
    ssh = session.ssh(host)
    removed: list[str] = []
    for tool in ("iptables", "ip6tables"):
        res = ssh.run(f"command -v {tool} >/dev/null && {tool} -S INPUT", timeout=15, sudo=True)
        if not res.ok:
            continue
        for rule in res.stdout.splitlines():
            tag = next((w for w in rule.split() if w.startswith(NFT_PREFIX)), None)
            if rule.startswith("-A INPUT") and tag and not _keep(tag, session, keep_own, live):
                ssh.run(f"{tool} -D {rule[3:]}", timeout=15, sudo=True, check=True)
                removed.append(f"{host}: removed {tool} rule {rule}")
    return removed


def leftovers_dirs() -> list[Path]:
    return [local_image_dir()]
