"""A Linux guest that uses the device while it moves (inventory `lab.guest`), judged by what it sees.

The guest runs qemu-ga; a reading is one `guest-exec` of a shell script (no guest network needed): the
boot id and uptime, the PCI functions bound to drivers, the kernel log's problem lines, and the verdict of
the inventory's `workload` command (one JSON object). After a move the guest is read twice, LATER_S apart:
the same boot, no new Oops/WARN/BUG, every function the inventory names bound to its driver, and the
workload's verdict ok with its progress carried on from before the move and growing after it (the checks
avocado-vt/tp-libvirt run after a migration, here through the agent).

Booting a Linux guest under nested TCG takes minutes, so a suite boots it once per device and host, saves
it (GuestImages) and restores that image for each test.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from labs.attachments import attach, record_metrics
from labs.errors import InfraError
from labs.inventory import LabDevice
from labs.inventory.models import LinuxGuest
from labs.models import known_issue, model_of
from labs.scenarios.context import Scenario
from labs.scenarios.readback import ensure_idle
from labs.session import LabSession
from labs.virt import agent
from labs.virt.domain import REMOTE_IMAGE_DIR, VM

# kernel log lines that mean the guest's kernel saw something go wrong (read with the two lines before each,
# which name what a bare "Call Trace:" is about)
KLOG_PROBLEMS = (
    r"Oops|BUG:|WARNING:|Kernel panic|general protection fault|Call Trace|soft lockup|hung_task"
    r"|nobody cared|Disabling IRQ|detected stall|blocked for more than"
)
WORKLOAD_MARK = "--- labs workload ---"
# builtins where a loop runs: a fork costs a lot in a guest under nested TCG
STATE_SCRIPT = rf"""read boot_id < /proc/sys/kernel/random/boot_id; echo "boot_id $boot_id"
read up _ < /proc/uptime; echo "uptime $up"
for l in /sys/bus/pci/drivers/*/????:??:??.?; do
    [ -e "$l/vendor" ] || continue
    drv=${{l%/*}}; read v < "$l/vendor"; read d < "$l/device"
    echo "bound ${{l##*/}} ${{v#0x}}:${{d#0x}} ${{drv##*/}}"
done
dmesg | grep -E -B2 '{KLOG_PROBLEMS}' | grep -v '^--$' | sed 's/^/klog /'
echo '{WORKLOAD_MARK}'
"""
NOT_OK = "the workload's verdict is not ok"
LATER_S = 10.0  # the second reading after a move: the workload must have moved on by then
READ_TIMEOUT_S = 120.0  # one reading (an exec under nested TCG takes seconds, more right after a restore)


@dataclass
class GuestState:
    host: str
    boot_id: str = ""
    uptime_s: float = 0.0
    bound: dict[str, tuple[str, str]] = field(default_factory=dict)  # PCI address -> (vendor:device, driver)
    klog: list[str] = field(default_factory=list)
    workload: dict[str, Any] | None = None
    workload_error: str | None = None  # the command failed or printed no JSON object
    notes: list[str] = field(default_factory=list)
    read_at: float = 0.0  # time.time()

    @property
    def progress(self) -> int | None:
        value = (self.workload or {}).get("progress")
        return value if isinstance(value, int) else None

    def drivers_of(self, ids: str) -> list[str]:
        return [drv for vd, drv in self.bound.values() if vd == ids]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_state(text: str, host: str) -> GuestState:
    """A reading from STATE_SCRIPT's output followed by the workload's."""
    state = GuestState(host, read_at=time.time())
    head, _, tail = text.partition(WORKLOAD_MARK)
    for line in head.splitlines():
        key, _, rest = line.partition(" ")
        if key == "boot_id":
            state.boot_id = rest.strip()
        elif key == "uptime":
            state.uptime_s = float(rest)
        elif key == "bound":
            addr, ids, driver = rest.split()
            state.bound[addr] = (ids, driver)
        elif key == "klog":
            state.klog.append(rest)
    verdict = next((ln for ln in reversed(tail.splitlines()) if ln.strip().startswith("{")), None)
    if verdict is None:
        state.workload_error = f"the workload printed no JSON object: {tail.strip()[-200:]!r}"
    else:
        try:
            state.workload = json.loads(verdict)
        except json.JSONDecodeError as exc:
            state.workload_error = f"the workload's verdict is not JSON ({exc}): {verdict[:200]!r}"
    return state


def read_state(vm: VM, guest: LinuxGuest, timeout: float = READ_TIMEOUT_S) -> GuestState:
    """The guest as it is now on the host that runs `vm` (AgentError: the agent did not answer)."""
    res = agent.run(vm.dom, STATE_SCRIPT + guest.workload, timeout=timeout)
    state = parse_state(res.out, vm.hv.name)
    if not res.ok:
        why = f"the reading exited {res.exitcode}, stderr {res.err.strip()[-200:]!r}"
        state.workload_error = f"{state.workload_error}; {why}" if state.workload_error else why
    return state


def read_again(vm: VM, guest: LinuxGuest, first: GuestState) -> GuestState:
    """A reading without the workload's verdict taken once more (a workload may fail to answer once, as the
    nested guest's did while its loop rewrote a counter file); the first failure stays in the new reading's notes."""
    if first.workload is not None:
        return first
    again = read_state(vm, guest)
    again.notes.append(f"read again: {first.workload_error}")
    return again


def judge(guest: LinuxGuest, before: GuestState, after: GuestState, later: GuestState) -> list[str]:
    """What the guest saw go wrong across a move: `before` on the old side, `after` and `later` on the new one."""
    problems: list[str] = []
    for state in (after, later):
        if state.boot_id != before.boot_id:
            problems.append(f"the guest rebooted (boot id {before.boot_id} -> {state.boot_id})")
            return problems
    if after.uptime_s < before.uptime_s:
        problems.append(f"the guest's uptime went back ({before.uptime_s:.1f} s -> {after.uptime_s:.1f} s)")
    seen = set(before.klog)
    problems += [f"guest kernel: {line}" for line in later.klog if line not in seen]
    for ids, driver in guest.drivers.items():
        for when, state in (("before", before), ("after", later)):
            if driver not in state.drivers_of(ids):
                got = ", ".join(state.drivers_of(ids)) or "nothing"
                problems.append(f"{ids} is not bound to {driver} {when} the move (bound: {got})")
        if len(later.drivers_of(ids)) < len(before.drivers_of(ids)):
            problems.append(f"{ids}: fewer functions bound after the move than before")
    for when, state in (("before the move", before), ("after it", after), (f"{LATER_S:.0f} s later", later)):
        if state.workload_error:
            problems.append(f"{when}: {state.workload_error}")
    if before.workload is None or after.workload is None or later.workload is None:
        return problems
    if later.workload.get("ok") is not True:
        problems.append(f"{NOT_OK}: {json.dumps(later.workload)[:400]}")
    b, a, z = before.progress, after.progress, later.progress
    if b is None or a is None or z is None:
        problems.append("the workload's verdict has no integer progress")
    elif a < b:
        problems.append(f"the workload's progress went back across the move ({b} -> {a})")
    elif z <= a:
        problems.append(f"the workload made no progress in the {LATER_S:.0f} s after the move (stuck at {a})")
    return problems


# a known issue (labs.models KnownIssue, after "guest") of a device whose guest only saw lines come back late
LATE_ECHO = "late-echo"


def late_echo_only(workload: dict[str, Any] | None) -> bool:
    """Every line that stalled came back later, in order, and none came back wrong: an interrupt that came late,
    not data lost (a workload that counts per port `stalls`, `late` and `mismatches`, as the nested lab's does)."""
    ports = (workload or {}).get("ports")
    if not isinstance(ports, list) or not ports or not all(isinstance(p, dict) for p in ports):
        return False
    resolved = all(p.get("mismatches") == 0 and p.get("stalls") == p.get("late") for p in ports)
    return resolved and any(p.get("stalls") for p in ports)


@dataclass
class GuestCheck:
    title: str
    before: GuestState
    after: GuestState | None = None
    later: GuestState | None = None
    problems: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)  # a device model's known issues the guest saw (an xfail)

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "problems": self.problems,
            "known": self.known,
            "before": self.before.as_dict(),
            "after": self.after.as_dict() if self.after else None,
            "later": self.later.as_dict() if self.later else None,
        }


def mark(sc: Scenario, vm: VM, guest: LinuxGuest) -> GuestState:
    with sc.steps.step(f"guest: read {vm} through its agent") as rec:
        state = read_again(vm, guest, read_state(vm, guest))
        rec.detail = {"uptime_s": state.uptime_s, "workload": state.workload}
    return state


def check(sc: Scenario, vm: VM, guest: LinuxGuest, device: LabDevice, before: GuestState, title: str) -> GuestCheck:
    """The guest read twice on the side that runs `vm` now (holding `device`), judged against `before` (attached
    to the report). A verdict whose only fault is the device model's known late echo is known, not a problem."""
    out = GuestCheck(title, before)
    with sc.steps.step(f"guest check {title}: {vm}") as rec:
        try:
            out.after = read_again(vm, guest, read_state(vm, guest))
            time.sleep(max(0.0, LATER_S - (time.time() - out.after.read_at)))
            out.later = read_again(vm, guest, read_state(vm, guest))
            out.problems = judge(guest, before, out.after, out.later)
            issue = known_issue(device, "guest", LATE_ECHO)
            only_verdict = len(out.problems) == 1 and out.problems[0].startswith(NOT_OK)
            if issue is not None and only_verdict and late_echo_only(out.later.workload):
                out.known = [f"known issue of {model_of(device).name} ({device.id}): {issue.reason} [{issue.link}]"]
                out.problems = []
        except agent.AgentError as exc:
            out.problems = [f"the guest did not answer on {vm.hv.name}: {exc}"]
        workload = out.later.workload if out.later else None
        rec.detail = {"problems": out.problems, "known": out.known, "workload": workload}
    attach(f"guest check {title} on {vm.hv.name} (before/after/later)", out.as_dict(), "json")
    return out


@dataclass
class Booted:
    name: str  # the domain's name: a restore brings it back under it
    image: str  # the saved boot, on the device's host


class GuestImages:
    """One booted guest per device, saved once and restored for each test that asks; removed at close()."""

    def __init__(self, guest: LinuxGuest) -> None:
        self.guest = guest
        self._booted: dict[str, Booted] = {}
        self._files: list[tuple[LabSession, str, str]] = []

    def running(self, sc: Scenario, device: LabDevice) -> VM:
        """A running guest holding `device`: its saved boot restored (booted and saved first, once)."""
        booted = self._booted.get(device.id) or self._boot(sc, device)
        hv = sc.hv(device.host)
        sc.track_domain(booted.name)
        ensure_idle(sc.session, device, sc.steps)
        with sc.steps.step(f"restore the booted guest {booted.name} on {hv.name}"):
            vm = hv.restore(booted.image, booted.name)
            if vm.state() != "running":
                raise InfraError(f"{vm}: {vm.state()} after restore")
        return vm

    def _boot(self, sc: Scenario, device: LabDevice) -> Booted:
        vm = sc.define_vm(device, "guest")
        ensure_idle(sc.session, device, sc.steps)
        t0 = time.monotonic()
        with sc.steps.step(f"boot the Linux guest in {vm} (up to {self.guest.boot_timeout:.0f} s)") as rec:
            vm.start()
            agent_s = agent.wait_for(vm.dom, self.guest.boot_timeout)
            state = read_state(vm, self.guest)
            while not state.progress and time.monotonic() - t0 < self.guest.boot_timeout:
                time.sleep(5)
                state = read_state(vm, self.guest)
            if not state.progress:
                raise InfraError(f"{vm}: the guest's workload made no progress within {self.guest.boot_timeout:.0f} s")
            figures = {"boot_to_agent_s": round(agent_s, 1), "boot_to_workload_s": round(time.monotonic() - t0, 1)}
            rec.detail = {**figures, "uptime_s": state.uptime_s, "workload": state.workload}
        record_metrics(f"{device.host.name}:{device.name}", "linux-guest boot", **figures)
        image = f"{REMOTE_IMAGE_DIR}/{vm.name}.booted.save"
        with sc.steps.step(f"save the booted guest to {image}"):
            sc.prepare_image_dir(device.host.name)
            self._files.append((sc.session, device.host.name, image))
            vm.save(image)
        booted = Booted(vm.name, image)
        self._booted[device.id] = booted
        return booted

    def close(self) -> list[str]:
        """Remove the saved images; what could not be removed."""
        errors: list[str] = []
        for session, host, path in self._files:
            res = session.ssh(host).run(f"rm -f {shlex.quote(path)}", timeout=30, sudo=True)
            if not res.ok:
                errors.append(f"{host}:{path}: {res.stderr.strip()}")
        self._files.clear()
        self._booted.clear()
        return errors
