"""The nested lab's saved hosts: what the key covers, what `find` accepts, and `up` falling back to a boot."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from labs.errors import InfraError
from labs.nested import image, snapshot
from labs.nested import lifecycle as lab


@pytest.fixture
def base(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> image.BaseImage:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LABS_NESTED_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(snapshot, "qemu_version", lambda: "QEMU emulator version 7.2.22")
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
    monkeypatch.setattr(snapshot, "qemu_version", lambda: "QEMU emulator version 8.2.0")
    assert key(base) != second
    specs = lab.specs()
    assert snapshot.snapshot_key(base, specs, lab.host_setup() + "more") != snapshot.snapshot_key(
        base, specs, lab.host_setup()
    )


def publish(k: str, names: list[str], manifest_key: str | None = None) -> Path:
    d = snapshot.snapshots_root() / k
    (d / "keys").mkdir(parents=True)
    for n in names:
        for f in (f"{n}.state", f"{n}.qcow2", f"{n}.seed.img"):
            (d / f).write_bytes(b"x")
    (d / snapshot.MANIFEST).write_text(json.dumps({"key": manifest_key or k}))
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
    res = subprocess.run(["sh", "-c", lab.setup_script("echo first")], capture_output=True, text=True)
    assert res.returncode == 1 and res.stdout.split() == ["first", "one"]
    assert "failed: ! echo kvm | grep -q kvm" in res.stderr


def test_a_restored_host_runs_the_clock_fix_and_the_probe_not_the_setup_its_ram_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lab, "SETUP_COMMANDS", (("echo one", 1.0), ("echo two", 1.0)))
    monkeypatch.setattr(lab, "MIGRATION_PROBE", "print('probe')")
    restored = subprocess.run(["sh", "-c", lab.setup_script("echo clock", setup=False)], capture_output=True, text=True)
    booted = subprocess.run(["sh", "-c", lab.setup_script("echo clock")], capture_output=True, text=True)
    assert restored.stdout.split() == ["clock", "probe"]
    assert booted.stdout.split() == ["clock", "one", "two", "probe"]


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
