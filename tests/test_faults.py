"""Every fault injector undoes itself; the ledger undoes what was injected, also after a failure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from labs.errors import InfraError, LabError
from labs.faults import (
    AbortJob,
    CorruptResumeStream,
    CutMigrationLink,
    DestinationLacksDevice,
    DeviceTransitionFailure,
    IncompatibleDestinationMdev,
    KillDestinationQemu,
    RebootHost,
    mdevs,
)
from labs.faults import host as host_faults
from labs.faults.base import Fault, FaultLedger
from labs.faults.device import damage
from labs.faults.network import rule_tag
from labs.inventory import LabDevice, LabHost
from labs.inventory.models import Host, MdevDevice, PciDevice, Reboot, SimDevice
from labs.janitor import janitor
from labs.session import LabSession
from labs.transport import Result
from labs.vfio.client import AgentInfraError, AgentOSError
from labs.virt.domain import hypervisor
from labs.virt.xml import DomainSpec
from tests.conftest import FOREVER_S, HANG_S

UUID = "0b0c5a3e-7c1d-4c8e-9a57-6d1f0e2b3c4d"
RUN = "labs-20261125-010203-abc123"


class FakeHost:
    """A host's firewall and mdev sysfs, driven by the same commands the faults send over SSH."""

    def __init__(self, name: str = "hostB", nft: bool = True) -> None:
        self.name = name
        self.nft = nft
        self.tables: set[str] = set()
        self.rules: list[str] = []
        self.mdevs: dict[str, str] = {UUID: "mtty-2"}
        self.records: dict[str, dict[str, Any]] = {}  # the host's mdev record directory (labs.faults.mdevs)
        self.reservations: dict[str, dict[str, Any]] = {}  # lock name -> owner record
        self.log: list[str] = []

    def run(self, command: str, timeout: float | None = None, **kw: Any) -> Result:
        self.log.append(command)
        out = self._listing(command)
        status = 0 if out is not None else self._do(command, kw.get("stdin"))
        res = Result(self.name, command, status, out or "", "" if status == 0 else "No such file or directory", 0.0)
        return res.check() if kw.get("check") else res

    def _listing(self, command: str) -> str | None:
        """What the record directory and the reservations list print; None for other commands."""
        if command.startswith(mdevs.RECORD_DIR_SCRIPT) and command.endswith('; ls -1 "$d"'):
            return "".join(f"{name}\n" for name in sorted(self.records))
        if "*.lock.owner" in command and "basename" in command:  # labs.reservations.LIST_SCRIPT
            return "".join(f"{name}\t{json.dumps(rec)}\n" for name, rec in self.reservations.items())
        return None

    def _do(self, command: str, stdin: bytes | None) -> int:
        if command.startswith(mdevs.RECORD_DIR_SCRIPT):
            return self._record(command.removeprefix(mdevs.RECORD_DIR_SCRIPT))
        if command == "command -v nft":
            return 0 if self.nft else 1
        if command == "nft -f -":
            assert stdin is not None
            table = re.search(r"add table inet (\S+)", stdin.decode())
            assert table and "drop" in stdin.decode()
            self.tables.add(table.group(1))
            return 0
        if m := re.fullmatch(r"nft (delete|list) table inet (\S+)", command):
            if m.group(2) not in self.tables:
                return 1
            if m.group(1) == "delete":
                self.tables.remove(m.group(2))
            return 0
        if m := re.fullmatch(r"iptables -([ICD]) (.*)", command):
            rule = m.group(2)
            if m.group(1) == "I":
                self.rules.append(rule)
            elif rule not in self.rules:
                return 1
            elif m.group(1) == "D":
                self.rules.remove(rule)
            return 0
        if m := re.fullmatch(r"while iptables -D (.*) 2>/dev/null; do :; done", command):
            self.rules = [r for r in self.rules if r != m.group(1)]
            return 0
        if m := re.fullmatch(r"echo 1 > /sys/bus/mdev/devices/(\S+)/remove", command):
            return 0 if self.mdevs.pop(m.group(1), None) else 1
        if m := re.fullmatch(r"echo (\S+) > /sys/class/mdev_bus/mtty/mdev_supported_types/(\S+)/create", command):
            if m.group(1) in self.mdevs:
                return 1
            self.mdevs[m.group(1)] = m.group(2)
            return 0
        if m := re.fullmatch(r"test -e /sys/bus/mdev/devices/(\S+)", command):
            return 0 if m.group(1) in self.mdevs else 1
        raise AssertionError(f"unexpected command {command!r}")

    def _record(self, command: str) -> int:
        if m := re.fullmatch(r"""; printf '%s\\n' '(.*)' > "\$d"/(\S+)""", command):
            self.records[m.group(2)] = json.loads(m.group(1))
            return 0
        if m := re.fullmatch(r'; rm -f "\$d"/(\S+)', command):
            self.records.pop(m.group(1), None)
            return 0
        raise AssertionError(f"unexpected record command {command!r}")


def _mdev() -> LabDevice:
    spec = MdevDevice(kind="mdev", parent="mtty", type="mtty-2", uuid=UUID, protocol="v2")
    return LabDevice(LabHost("hostB", Host(address="10.0.0.2", devices=(spec,))), 0, spec)


class Boom(Fault):
    name = "boom"

    def __init__(self, fail_inject: bool = False, fail_undo: bool = False) -> None:
        super().__init__("nowhere")
        self.fail_inject, self.fail_undo = fail_inject, fail_undo
        self.undos = 0

    def _inject(self) -> None:
        self.note("half done")
        if self.fail_inject:
            raise InfraError("inject broke halfway")

    def _undo(self) -> None:
        self.undos += 1
        if self.fail_undo:
            raise InfraError("undo broke")


# -- the ledger -----------------------------------------------------------------
def test_ledger_undoes_in_reverse_and_once() -> None:
    ledger, order = FaultLedger(), []
    a, b = Boom(), Boom()
    a._undo = lambda: order.append("a")  # type: ignore[method-assign]
    b._undo = lambda: order.append("b")  # type: ignore[method-assign]
    ledger.inject(a)
    ledger.inject(b)
    assert a.injected and b.injected and ledger.pending() == [a, b]
    assert ledger.undo_all() == []
    assert order == ["b", "a"] and ledger.pending() == []
    assert ledger.undo_all() == [] and order == ["b", "a"], "undo ran twice"
    assert a.record.injected_at and a.record.undone_at


def test_half_injected_fault_is_undone() -> None:
    ledger, fault = FaultLedger(), Boom(fail_inject=True)
    with pytest.raises(InfraError):
        ledger.inject(fault)
    assert not fault.injected and fault.needs_undo
    assert ledger.undo_all() == [] and fault.undos == 1
    assert fault.record.error == "inject: inject broke halfway"


def test_one_failed_undo_does_not_stop_the_others() -> None:
    ledger, bad, good = FaultLedger(), Boom(fail_undo=True), Boom()
    ledger.inject(good)
    ledger.inject(bad)
    errors = ledger.undo_all()
    assert len(errors) == 1 and "undo broke" in errors[0]
    assert good.undos == 1 and ledger.pending() == [bad]
    bad.fail_undo = False
    assert ledger.undo_all() == [] and ledger.pending() == []


def test_a_never_injected_fault_needs_no_undo() -> None:
    fault = Boom()
    fault.undo()
    assert fault.undos == 0


# -- each injector ----------------------------------------------------------------
@pytest.mark.parametrize("nft", [True, False], ids=["nft", "iptables"])
def test_cut_migration_link_undoes_itself(nft: bool) -> None:
    host = FakeHost(nft=nft)
    tag = rule_tag("labs-20261125-010203-abc123", "cut_1")
    assert tag == "labs_20261125_010203_abc123_cut_1"
    fault = CutMigrationLink(host, "192.168.123.11", tag)  # type: ignore[arg-type]
    ledger = FaultLedger()
    ledger.inject(fault)
    assert fault.present()
    assert host.tables if nft else host.rules, "no rule was added"
    if not nft:
        assert "--dport 49152:49215" in host.rules[0] and "-j DROP" in host.rules[0]
    assert ledger.undo_all() == []
    assert not fault.present() and not host.tables and not host.rules
    assert fault.record.actions[0].startswith("nft table" if nft else "iptables -I")


def test_destination_lacks_mdev_removes_and_recreates_it() -> None:
    host, dev = FakeHost(), _mdev()
    fault = DestinationLacksDevice(host, dev)  # type: ignore[arg-type]
    fault.inject()
    assert UUID not in host.mdevs
    fault.undo()
    assert host.mdevs == {UUID: "mtty-2"}


def test_destination_lacks_pci_or_sim_device_names_an_absent_one() -> None:
    for spec in (
        PciDevice(kind="pci", pci="0000:65:00.0", protocol="v2"),
        SimDevice(kind="sim", name="simv2", driver="labs.sim.v2:V2Driver", protocol="v2"),
    ):
        dev = LabDevice(LabHost("hostB", Host(address="x", devices=(spec,))), 0, spec)
        host = FakeHost()
        fault = DestinationLacksDevice(host, dev)  # type: ignore[arg-type]
        fault.inject()
        fault.undo()
        assert host.log == [], "nothing may be done on the host"
        assert fault.hostdev.address not in ("0000:65:00.0",)


def test_incompatible_mdev_is_removed_on_undo() -> None:
    host, dev = FakeHost(), _mdev()
    fault = IncompatibleDestinationMdev(host, dev, "mtty-1", run_id=RUN)  # type: ignore[arg-type]
    fault.inject()
    assert host.mdevs[fault.uuid] == "mtty-1" and fault.hostdev.address == fault.uuid
    fault.undo()
    assert host.mdevs == {UUID: "mtty-2"}
    assert host.records == {}, "the record outlived its mdev"


def test_incompatible_mdev_is_recorded_on_the_host_before_it_exists() -> None:
    """A kill right after the create still leaves a record naming the run (the janitor's key)."""
    host, dev = FakeHost(), _mdev()
    fault = IncompatibleDestinationMdev(host, dev, "mtty-1", run_id=RUN)  # type: ignore[arg-type]
    fault.inject()
    name = mdevs.record_name(RUN, fault.uuid)
    assert mdevs.parse_record(name) == (RUN, fault.uuid)
    assert host.records[name] | {"since": 0} == {
        "parent": "mtty", "type": "mtty-1", "fault": fault.name, "run": RUN, "uuid": fault.uuid, "since": 0
    }  # fmt: skip
    written = next(i for i, c in enumerate(host.log) if "printf" in c)
    created = next(i for i, c in enumerate(host.log) if c.endswith("/mtty-1/create"))
    assert written < created
    assert mdevs.list_records(host) == [(RUN, fault.uuid)]  # type: ignore[arg-type]


def test_incompatible_mdev_is_recorded_under_the_run_holding_the_device() -> None:
    host, dev = FakeHost(), _mdev()
    host.reservations = {"hostB_other": {"run": "labs-someone-else"}, f"hostB_{dev.name}": {"run": RUN}}
    fault = IncompatibleDestinationMdev(host, dev, "mtty-1")  # type: ignore[arg-type]
    fault.inject()
    assert list(host.records) == [mdevs.record_name(RUN, fault.uuid)]
    fault.undo()
    assert host.records == {}
    host.reservations = {}
    unreserved = IncompatibleDestinationMdev(host, dev, "mtty-1")  # type: ignore[arg-type]
    unreserved.inject()
    assert list(host.records) == [mdevs.record_name(mdevs.UNRESERVED_RUN, unreserved.uuid)]


def test_a_failed_create_leaves_no_record_after_undo() -> None:
    host, dev = FakeHost(), _mdev()
    fault = IncompatibleDestinationMdev(host, dev, "mtty-1", run_id=RUN)  # type: ignore[arg-type]
    host.mdevs[fault.uuid] = "mtty-1"  # the create then fails: a UUID the host already has
    ledger = FaultLedger()
    with pytest.raises(LabError):
        ledger.inject(fault)
    del host.mdevs[fault.uuid]
    assert host.records and ledger.undo_all() == []
    assert host.records == {}


def test_record_names() -> None:
    assert mdevs.parse_record(f"{RUN}.{UUID}") == (RUN, UUID)
    assert mdevs.parse_record("notes.txt") is None
    assert mdevs.parse_record(UUID) is None


class FakeDevice:
    """The device layer's DeviceAccess, as far as the faults use it."""

    def __init__(self) -> None:
        self.st = "RUNNING"
        self.knobs: dict[str, Any] = {}
        self.resets = 0

    def state(self) -> str:
        return self.st

    def faults(self, **knobs: Any) -> dict[str, Any]:
        if knobs.get("clear"):
            self.knobs.clear()
        else:
            self.knobs.update(knobs)
            self.st = "ERROR"  # as if the armed transition already failed into ERROR
        return {"fired": ["STOP->STOP_COPY"]}

    def reset(self) -> None:
        self.resets += 1
        self.st = "RUNNING"

    def resume(self, stream: list[bytes]) -> None:
        self.st = "RESUMING"
        raise AgentOSError("data_write", 22, "EINVAL", f"{sum(map(len, stream))} bytes is a short stream")


class DyingAgentDevice(FakeDevice):
    """The agent dies (watchdog) during the resume: a framework error, never the device's refusal."""

    def resume(self, stream: list[bytes]) -> None:
        raise AgentInfraError("agent watchdog: no reply within 30s")


def test_device_transition_failure_disarms_and_resets() -> None:
    spec = SimDevice(kind="sim", name="simv2", driver="labs.sim.v2:V2Driver", protocol="v2")
    dev = LabDevice(LabHost("hostA", Host(address="x", devices=(spec,))), 0, spec)
    fake = FakeDevice()
    fault = DeviceTransitionFailure(fake, dev, "stop -> stop_copy", errno="EIO", to_error=True)  # type: ignore[arg-type]
    fault.inject()
    assert fake.knobs == {"transitions": [{"from": "STOP", "to": "STOP_COPY", "errno": "EIO", "error": True}]}
    fault.undo()
    assert fake.knobs == {} and fake.st == "RUNNING" and fake.resets == 1


def test_transition_knob_only_where_the_driver_has_knobs() -> None:
    with pytest.raises(InfraError, match="its driver has no transition fault knob"):
        DeviceTransitionFailure(FakeDevice(), _mdev(), "STOP->STOP_COPY")  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["truncate", "bad-magic", "too-long"])
def test_corrupt_stream_is_refused_and_reset(how: str) -> None:
    fake = FakeDevice()
    stream = bytes(range(96))
    fault = CorruptResumeStream(fake, _mdev(), stream, how)  # type: ignore[arg-type]
    fault.inject()
    assert fault.refused and "EINVAL" in fault.refused and fault.state_after == "RESUMING"
    fault.undo()
    assert fake.st == "RUNNING" and fake.resets == 1
    damaged = damage(stream, how)  # type: ignore[arg-type]
    assert damaged != stream
    if how == "bad-magic":
        assert damaged[24:] == stream[24:], "the port payload must never be touched (spec 5.4)"


def test_only_an_errno_from_the_device_is_a_refusal() -> None:
    fault = CorruptResumeStream(DyingAgentDevice(), _mdev(), bytes(range(96)), "truncate")  # type: ignore[arg-type]
    with pytest.raises(AgentInfraError, match="watchdog"):
        fault.inject()
    assert fault.refused is None


def test_kill_destination_qemu_kills_by_pid(sim_session: LabSession, tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", str(FOREVER_S)])
    try:
        (tmp_path / "labs-x-dom.pid").write_text(f"{proc.pid}\n")
        fault = KillDestinationQemu(sim_session.ssh("hostB"), "labs-x-dom", pid_dir=str(tmp_path))
        if os.geteuid() != 0 and sim_session.inventory.host("hostB").spec.sudo:
            pytest.skip("needs to signal our own process without sudo")
        fault.inject()
        assert proc.wait(timeout=HANG_S) == -9
        fault.undo()
        assert fault.record.actions[0] == f"kill -9 {proc.pid} (QEMU of labs-x-dom) on hostB"
        missing = KillDestinationQemu(sim_session.ssh("hostB"), "labs-x-none", pid_dir=str(tmp_path), wait=0.3)
        with pytest.raises(InfraError, match="no QEMU of labs-x-none to kill"):
            missing.inject()
        missing.undo()
    finally:
        proc.kill()
        proc.wait()


def test_abort_job_where_the_driver_cannot(sim_session: LabSession) -> None:
    hv = hypervisor(sim_session, "hostA")
    vm = hv.define(DomainSpec(f"{sim_session.run_id}-abort-{uuid.uuid4().hex[:4]}", virt_type=hv.virt_type))
    ledger = FaultLedger()
    try:
        vm.start()
        with pytest.raises(LabError, match="not supported"):
            ledger.inject(AbortJob(vm))
        assert ledger.undo_all() == []
    finally:
        vm.remove()
    assert janitor(sim_session, keep_own=False) == []


class RebootingHost:
    """A host's SSH as RebootHost sees it: boot ids in turn, None while it does not answer."""

    def __init__(self, answers: list[str | None]) -> None:
        self.name = "hostB"
        self.answers = answers
        self.commands: list[str] = []

    def close(self) -> None:
        pass

    def run(self, command: str, timeout: float | None = None, **kw: Any) -> Result:
        self.commands.append(command)
        if command.startswith(host_faults.BOOT_ID + " && "):
            return Result(self.name, command, 0, "old\n", "", 0.0)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer is None:
            raise InfraError(f"{self.name}: cannot reach it")
        return Result(self.name, command, 0, answer + "\n", "", 0.0)


def test_reboot_host_waits_down_powers_on_and_waits_for_a_new_boot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(host_faults.time, "sleep", lambda _s: None)
    ssh = RebootingHost(["old", None, None, "new"])
    marker = tmp_path / "powered"
    fault = RebootHost(ssh, Reboot(power_on=f"touch {marker}"))  # type: ignore[arg-type]
    fault.inject()
    assert "/proc/sysrq-trigger" in ssh.commands[0]
    fault.after_job()
    assert marker.exists()  # run while the host was down, before it answered again
    assert fault.back and any("boot id new" in a for a in fault.record.actions)
    fault.undo()  # back already: nothing more is asked of the host
    assert ssh.answers == ["new"]


def test_reboot_host_that_never_went_down_is_an_infra_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_faults.time, "sleep", lambda _s: None)
    monkeypatch.setattr(host_faults, "DOWN_WAIT", 0.0)
    fault = RebootHost(RebootingHost(["old"]), Reboot())  # type: ignore[arg-type]
    fault.inject()
    with pytest.raises(InfraError, match="still up"):
        fault.after_job()


def test_a_failing_power_on_names_the_host_and_command() -> None:
    with pytest.raises(InfraError, match=r"^hostB: reboot.power_on `false` exited 1"):
        host_faults.power_on("hostB", Reboot(power_on="false"))
