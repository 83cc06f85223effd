"""The nested lab's saved hosts: what the key covers, what `find` accepts, and `up` falling back to a boot."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.progress import Progress

from labs import doctor, session
from labs.errors import InfraError
from labs.nested import image, snapshot
from labs.nested import lifecycle as lab


@pytest.fixture
def base(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> image.BaseImage:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LABS_NESTED_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(snapshot, "qemu_version", lambda *_: "QEMU emulator version 7.2.22")
    d = tmp_path / "img" / "0123456789abcdef"
    d.mkdir(parents=True)
    for name in ("base.qcow2", "vmlinuz", "initrd.img"):
        (d / name).write_bytes(b"x")
    (d / image.MANIFEST).write_text(json.dumps({"kernel_version": "6.12.1-amd64"}))
    return image.BaseImage(d, d / "base.qcow2", d / "vmlinuz", d / "initrd.img", {})


def key(img: image.BaseImage, port: int = 22300, **change: Any) -> str:
    specs = [dataclasses.replace(s, **change) for s in lab.specs(port)]
    return snapshot.snapshot_key(img, specs, lab.host_setup())


def test_key_ignores_ports_and_run_dir(base: image.BaseImage, monkeypatch: pytest.MonkeyPatch) -> None:
    first = key(base)
    monkeypatch.setenv("LABS_NESTED_RUN_DIR", "/elsewhere")
    assert key(base, port=22400) == first  # both nested-slot run dirs and port ranges share one snapshot


@pytest.mark.parametrize("change", [{"memory_mb": 2048}, {"cpus": 1}, {"accel": "kvm"}])
def test_key_follows_what_the_saved_state_holds(base: image.BaseImage, change: dict[str, Any]) -> None:
    assert key(base, **change) != key(base)


def test_key_follows_the_image_bytes_qemu_and_setup(base: image.BaseImage, monkeypatch: pytest.MonkeyPatch) -> None:
    first = key(base)
    base.disk.write_bytes(b"rebuilt")  # same recipe, other bytes under the saved disk
    second = key(base)
    assert second != first
    monkeypatch.setattr(snapshot, "qemu_version", lambda *_: "QEMU emulator version 8.2.0")
    assert key(base) != second
    specs = lab.specs()
    assert snapshot.snapshot_key(base, specs, lab.host_setup() + "more") != snapshot.snapshot_key(
        base, specs, lab.host_setup()
    )


PROBE = {"migration_flags": 5}


def publish(k: str, names: list[str], manifest_key: str | None = None, probes: list[str] | None = None) -> Path:
    d = snapshot.snapshots_root() / k
    (d / "keys").mkdir(parents=True)
    for n in names:
        for f in (f"{n}.state", f"{n}.qcow2", f"{n}.seed.img"):
            (d / f).write_bytes(b"x")
    probed = {n: PROBE for n in (names if probes is None else probes)}
    (d / snapshot.MANIFEST).write_text(json.dumps({"key": manifest_key or k, "probes": probed}))
    return d


def test_find_needs_a_complete_snapshot_of_its_key(base: image.BaseImage) -> None:
    names = list(lab.HOST_NAMES)
    k = key(base)
    assert snapshot.find(k, names) is None
    d = publish(k, names)
    assert snapshot.find(k, names) == snapshot.Saved(d)
    (d / "nested-b.state").unlink()
    assert snapshot.find(k, names) is None  # half a snapshot
    publish("fedcba9876543210", names, manifest_key="0000000000000000")
    assert snapshot.find("fedcba9876543210", names) is None  # a manifest of another key
    # a restore writes the inventory's device flags from the saved probes: a host without one is no snapshot
    publish("0123012301230123", names, probes=names[:1])
    assert snapshot.find("0123012301230123", names) is None


def test_prune_drops_snapshots_of_a_gone_or_rebuilt_image(base: image.BaseImage) -> None:
    names = list(lab.HOST_NAMES)
    stat = base.disk.stat()
    good = publish("1111111111111111", names)
    inputs = {"image_disk": [str(base.disk), stat.st_size, stat.st_mtime_ns]}
    for d, disk in ((good, inputs), (publish("2222222222222222", names), {"image_disk": ["/gone", 1, 1]})):
        (d / snapshot.MANIFEST).write_text(json.dumps({"key": d.name, "inputs": disk}))
    kept = publish("3333333333333333", names)
    stale = {"image_disk": [str(base.disk), stat.st_size + 1, stat.st_mtime_ns]}
    (kept / snapshot.MANIFEST).write_text(json.dumps({"key": kept.name, "inputs": stale}))
    removed = snapshot.prune(keep="3333333333333333")
    assert sorted(p.name for p in removed) == ["2222222222222222"]
    assert good.is_dir() and kept.is_dir()
    snapshot.prune(keep="1111111111111111")
    assert not kept.exists()  # its image was rebuilt: nothing can restore it


def test_setup_script_stops_at_the_first_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        lab, "SETUP_COMMANDS", (("echo one", 1.0), ("! echo kvm | grep -q kvm", 1.0), ("echo three", 1.0))
    )
    monkeypatch.setattr(lab, "MIGRATION_PROBE", "")
    res = subprocess.run(["sh", "-c", lab.setup_script()], capture_output=True, text=True)
    assert res.returncode == 1 and res.stdout.split() == ["one"]
    assert "failed: ! echo kvm | grep -q kvm" in res.stderr


class AnsweringVm:
    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def pid(self) -> int | None:
        return 1

    def ssh_banner(self) -> bool:
        return True

    def start(self, *_a: Any) -> None:
        pass


def test_a_restored_host_gets_its_clock_fix_as_its_first_ssh_command_and_no_setup_or_probe(
    base: image.BaseImage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sent: list[tuple[str, str]] = []

    def ssh(spec: Any, _keys: Any, command: str, timeout: float = 0) -> subprocess.CompletedProcess[str]:
        sent.append((spec.name, command))
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(lab, "ssh", ssh)
    monkeypatch.setattr(lab, "Restore", lambda *a: a)
    monkeypatch.setattr(snapshot, "resume", lambda _vm: None)
    monkeypatch.setattr(lab.Keys, "adopt", lambda *_a: None)
    monkeypatch.setattr(lab, "write_known_hosts", lambda *_a: None)
    names = list(lab.HOST_NAMES)
    saved = snapshot.Saved(publish(key(base), names))
    run = lab.run_dir()
    run.mkdir(parents=True)
    rep = lab.RichReporter(Progress())
    vms: list[Any] = [AnsweringVm(s) for s in lab.specs()]
    probes = lab._restore(vms, saved, base, lab.Keys(tmp_path), rep, {})
    assert probes == {n: PROBE for n in names}
    assert sorted(host for host, _ in sent) == sorted(names)  # one command each: no setup, no probe after it
    assert all(command.startswith("date -u -s @") for _, command in sent)
    assert json.loads((run / "nested-a.probe.json").read_text()) == PROBE


@pytest.mark.parametrize(("rc", "answers"), [(0, True), (lab.SSH_FAILED, False)])
def test_ssh_answers_when_the_command_ran(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rc: int, answers: bool
) -> None:
    monkeypatch.setattr(lab, "ssh", lambda *_a, **_k: subprocess.CompletedProcess([], rc, "", ""))
    assert lab._ssh_answers(lab.specs()[0], lab.Keys(tmp_path), "date") is answers


def test_a_command_that_ran_and_failed_is_not_a_host_still_booting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(lab, "ssh", lambda *_a, **_k: subprocess.CompletedProcess([], 1, "", "date: bad"))
    with pytest.raises(InfraError, match=r"nested-a: `date -s x` failed \(1\): date: bad"):
        lab._ssh_answers(lab.specs()[0], lab.Keys(tmp_path), "date -s x")


class FakeVm:
    stopped: list[str] = []

    def __init__(self, spec: Any, _run_dir: Path) -> None:
        self.spec = spec

    def pid(self) -> None:
        return None

    def stop(self) -> bool:
        FakeVm.stopped.append(self.spec.name)
        return False


@pytest.fixture
def fake_up(base: image.BaseImage, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    calls: dict[str, list[str]] = {"boot": [], "restore": [], "save": [], "doctor": []}
    FakeVm.stopped = []
    monkeypatch.setattr(lab, "Vm", FakeVm)
    monkeypatch.setattr(lab, "ensure_image", lambda _recipe, _rep: base)
    monkeypatch.setattr(lab, "prune_images", lambda _recipe: [])

    def boot(*_a: Any) -> dict[str, list[str]]:
        calls["boot"].append("boot")
        return {}

    monkeypatch.setattr(lab, "_boot", boot)
    monkeypatch.setattr(lab, "_doctor", lambda inv: calls["doctor"].append(str(inv)))
    monkeypatch.setattr(snapshot, "save", lambda vms, k, *_a: calls["save"].append(k))
    return calls


def test_up_boots_and_saves_without_a_snapshot(fake_up: dict[str, list[str]], tmp_path: Path) -> None:
    res = lab.up(recipe=lab.Recipe(), inventory=tmp_path / "nested.yaml")
    assert (res.how, fake_up["boot"], len(fake_up["save"])) == ("booted", ["boot"], 1)
    assert res.note.startswith("no snapshot ")


def test_up_restores_a_matching_snapshot(
    fake_up: dict[str, list[str]], base: image.BaseImage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    publish(key(base), list(lab.HOST_NAMES))

    def restore(_vms: Any, saved: snapshot.Saved, *_a: Any) -> dict[str, list[str]]:
        fake_up["restore"].append(saved.dir.name)
        return {}

    monkeypatch.setattr(lab, "_restore", restore)
    res = lab.up(recipe=lab.Recipe(), inventory=tmp_path / "nested.yaml")
    assert (res.how, fake_up["restore"], fake_up["boot"], fake_up["save"]) == ("restored", [key(base)], [], [])
    assert fake_up["doctor"] == [str(tmp_path / "nested.yaml")]  # a restored lab is checked before use


@pytest.mark.parametrize("failing", ["_restore", "_doctor"])
def test_up_falls_back_to_a_boot_when_the_restore_fails(
    failing: str, fake_up: dict[str, list[str]], base: image.BaseImage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    saved = publish(key(base), list(lab.HOST_NAMES))
    monkeypatch.setattr(lab, "_restore", lambda *_a: {})

    def fail(*_a: Any) -> None:
        raise InfraError("nested-a: no SSH after 90s")

    monkeypatch.setattr(lab, failing, fail)
    res = lab.up(recipe=lab.Recipe(), inventory=tmp_path / "nested.yaml")
    assert (res.how, fake_up["boot"]) == ("booted", ["boot"])
    assert "failed, booting: nested-a: no SSH after 90s" in res.note
    assert sorted(FakeVm.stopped) == sorted(lab.HOST_NAMES)  # the half-restored hosts went first
    # a snapshot that failed once is replaced by the boot's, or every later `up` would wait for it to fail again
    assert not saved.exists() and fake_up["save"] == [key(base)]


def test_snapshots_off_always_boots(
    fake_up: dict[str, list[str]], base: image.BaseImage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    publish(key(base), list(lab.HOST_NAMES))
    monkeypatch.setenv("LABS_NESTED_SNAPSHOT", "0")
    res = lab.up(recipe=lab.Recipe(), inventory=tmp_path / "nested.yaml")
    assert (res.how, fake_up["boot"], fake_up["save"]) == ("booted", ["boot"], [])


def test_a_slow_login_while_booting_is_not_up_yet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def slow(*_a: Any, **_k: Any) -> None:
        raise InfraError("nested-a: ssh command timed out after 30s: true")

    monkeypatch.setattr(lab, "ssh", slow)
    assert lab._ssh_answers(lab.specs()[0], lab.Keys(tmp_path)) is False


@pytest.mark.parametrize(
    ("statuses", "sent"),
    [
        (["inmigrate", "paused"], ["cont"]),  # saved paused, so it arrives paused: a restore must run it
        (["running"], []),
        (["inmigrate", "shutdown"], None),
    ],
)
def test_resume_runs_a_host_that_arrives_paused(
    statuses: list[str], sent: list[str] | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    commands: list[str] = []

    class FakeQmp:
        def __init__(self, _path: Path) -> None:
            pass

        def __enter__(self) -> FakeQmp:
            return self

        def __exit__(self, *_a: object) -> None:
            pass

        def command(self, name: str) -> dict[str, str]:
            if name == "query-status":
                return {"status": statuses.pop(0)}
            commands.append(name)
            return {}

    monkeypatch.setattr(snapshot, "Qmp", FakeQmp)
    machine = lab.Vm(lab.specs()[0], tmp_path)
    if sent is None:
        with pytest.raises(InfraError, match="QEMU is shutdown after the restore"):
            snapshot.resume(machine)
    else:
        snapshot.resume(machine)
        assert commands == sent


@pytest.mark.parametrize(
    ("status", "fails"), [(doctor.Status.WARN, True), (doctor.Status.OK, False), (doctor.Status.SKIPPED, False)]
)
def test_a_restored_device_whose_flags_differ_from_the_saved_probe_fails_the_restore(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, status: doctor.Status, fails: bool
) -> None:
    report = doctor.HostReport("nested-a")
    report.add("migration", status, "device says stop_copy, the inventory says stop_copy, p2p", "nested-a:mtty-2")
    monkeypatch.setattr(session, "open_inventory", lambda _p: SimpleNamespace(hosts=[]))
    monkeypatch.setattr(session, "LabSession", lambda _inv: contextlib.nullcontext())
    monkeypatch.setattr(doctor, "check_lab", lambda *_a: {"nested-a": report})
    if fails:
        with pytest.raises(InfraError, match="nested-a: migration: device says stop_copy"):
            lab._doctor(tmp_path / "nested.yaml")
    else:
        lab._doctor(tmp_path / "nested.yaml")


class DeadVm(AnsweringVm):
    """Dies while the other host is being waited for."""

    looks = 0

    def pid(self) -> int | None:
        self.looks += 1
        return 1 if self.looks < 3 else None

    def ssh_banner(self) -> bool:
        return False

    def console_tail(self) -> str:
        return "Kernel panic"


class SilentVm(AnsweringVm):
    def ssh_banner(self) -> bool:
        return False


@pytest.mark.timeout(60)
def test_one_host_dead_ends_the_wait_for_the_other(tmp_path: Path) -> None:
    # without it the wait for the silent host would run to its hour-long deadline before the failure is told
    a, b = lab.specs()[:2]
    vms: list[Any] = [DeadVm(a), SilentVm(b)]
    with pytest.raises(InfraError, match="nested-a died while booting; console:\nKernel panic"):
        lab._wait_for_ssh(vms, lab.Keys(tmp_path), lab.RichReporter(Progress()), 3600)
