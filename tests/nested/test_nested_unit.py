"""The nested lab without VMs: recipe hashing, command lines, seed files, the inventory shape."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from labs import models
from labs.errors import InfraError
from labs.inventory.loader import load_inventory
from labs.inventory.models import InventoryDoc
from labs.nested import image, lifecycle, outer, recipe, vm
from suites.conformance.conftest import peer_of
from tests.conftest import FOREVER_S


def test_digest_is_stable_and_short() -> None:
    assert recipe.Recipe().digest() == recipe.Recipe().digest()
    assert len(recipe.Recipe().digest()) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"suite": "forky"},
        {"kernel_series": "6.13"},
        {"packages": (*recipe.GUEST_PACKAGES, "strace")},
        {"boot_modules": ("vfio", "mtty")},
        {"never_modules": ()},
        {"sshd_config": ("PermitRootLogin yes",)},
        {"builder_version": 99},
    ],
)
def test_digest_changes_with_what_shapes_the_image(change: dict[str, object]) -> None:
    assert dataclasses.replace(recipe.Recipe(), **change).digest() != recipe.Recipe().digest()  # type: ignore[arg-type]


def test_the_image_never_loads_kvm() -> None:
    """KVM on TCG's emulated SVM is unstable, and a libvirt that saw /dev/kvm may keep offering kvm domains."""
    assert {"kvm", "kvm_amd", "kvm_intel"} <= set(recipe.Recipe().never_modules)
    assert not set(recipe.Recipe().boot_modules) & set(recipe.Recipe().never_modules)
    assert any("test ! -e /dev/kvm" in command for command, _ in lifecycle.setup_commands())


def test_digest_ignores_the_mirror() -> None:
    a = dataclasses.replace(recipe.Recipe(), mirror="http://one.example/debian")
    b = dataclasses.replace(recipe.Recipe(), mirror="http://two.example/debian")
    assert a.digest() == b.digest()


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = recipe.Recipe()
    assert recipe.image_dir(r) == tmp_path / "labs" / "nested" / r.digest()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert recipe.cache_root() == Path.home() / ".cache" / "labs" / "nested"


def test_mirror_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABS_NESTED_MIRROR", "http://mirror.example/debian/")
    assert recipe.default_mirror() == "http://mirror.example/debian"


def test_find_image_needs_a_complete_manifest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = recipe.Recipe()
    d = recipe.image_dir(r)
    d.mkdir(parents=True)
    assert image.find_image(r) is None
    for name in ("base.qcow2", "vmlinuz", "initrd.img"):
        (d / name).write_bytes(b"x")
    assert image.find_image(r) is None  # no manifest: an interrupted build
    (d / image.MANIFEST).write_text(json.dumps({"kernel_version": "6.12.1-amd64"}))
    found = image.find_image(r)
    assert found is not None and found.kernel_version == "6.12.1-amd64"


def fake_image(tmp_path: Path) -> image.BaseImage:
    return image.BaseImage(tmp_path, tmp_path / "base.qcow2", tmp_path / "vmlinuz", tmp_path / "initrd.img", {})


def test_specs_pair_the_link_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABS_NESTED_BASE_PORT", "30000")
    a, b = lifecycle.specs()
    assert (a.ssh_port, b.ssh_port) == (30001, 30002)
    assert a.link_port == b.peer_link_port and b.link_port == a.peer_link_port
    assert (a.link_ip, b.link_ip) == ("192.168.123.1", "192.168.123.2")
    assert a.mgmt_mac != b.mgmt_mac and a.link_mac != b.link_mac
    assert a.accel == "tcg"


def test_qemu_argv_tcg(tmp_path: Path) -> None:
    spec = vm.VmSpec("nested-a", 1, ssh_port=30001, link_port=30011, peer_link_port=30012)
    paths = vm.VmPaths(tmp_path / "nested-a")
    argv = vm.qemu_argv(spec, fake_image(tmp_path), paths)
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    # one TCG thread: multi-threaded TCG let the guest run a live patch's stale int3 (vm.qemu_argv)
    assert argv[argv.index("-accel") + 1].startswith("tcg,thread=single")
    # no CMPXCHG16B: TCG's left the guest's EFLAGS garbage, a double fault in SLUB's fast path (vm.qemu_argv)
    assert argv[argv.index("-cpu") + 1] == "max,cx16=off"
    assert "hostfwd=tcp:127.0.0.1:30001-:22" in joined
    assert "udp=127.0.0.1:30012,localaddr=127.0.0.1:30011" in joined
    assert f"-pidfile {paths.pidfile}" in joined and f"unix:{paths.qmp}" in joined
    assert f"file:{paths.console}" in joined
    assert "-enable-kvm" not in argv
    # every path the VM uses is under its run dir, so `pid()` can recognise the process
    assert str(paths.dir) in joined
    assert "labs.host=nested-a" in argv[argv.index("-append") + 1]


def test_the_hosts_run_under_the_images_own_qemu_where_the_build_copied_it(tmp_path: Path) -> None:
    spec = vm.VmSpec("nested-a", 1, ssh_port=1, link_port=2, peer_link_port=3)
    paths = vm.VmPaths(tmp_path / "nested-a")
    outer_dir = tmp_path / outer.OUTER_DIR
    (outer_dir / "lib").mkdir(parents=True)
    (outer_dir / outer.BINARY).write_text("")
    assert vm.qemu_argv(spec, fake_image(tmp_path), paths)[0] == "qemu-system-x86_64", "no loader: the controller's"
    (outer_dir / "lib" / outer.LOADER).write_text("")
    argv = vm.qemu_argv(spec, fake_image(tmp_path), paths)
    # the image's loader runs the image's binary on the image's libraries, with the image's firmware first
    assert argv[:5] == [str(outer_dir / "lib" / outer.LOADER), "--library-path", str(outer_dir / "lib"),
                        str(outer_dir / outer.BINARY), "-L"]  # fmt: skip
    assert argv[5] == str(outer_dir / "share") and argv[6:8] == ["-name", "nested-a,process=labs-nested-a"]


def test_qemu_argv_kvm(tmp_path: Path) -> None:
    spec = vm.VmSpec("nested-a", 1, ssh_port=1, link_port=2, peer_link_port=3, accel="kvm")
    argv = vm.qemu_argv(spec, fake_image(tmp_path), vm.VmPaths(tmp_path))
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"


def test_pid_ignores_foreign_processes(tmp_path: Path) -> None:
    spec = vm.VmSpec("nested-a", 1, ssh_port=1, link_port=2, peer_link_port=3)
    machine = vm.Vm(spec, tmp_path)
    assert machine.pid() is None
    machine.paths.dir.mkdir(parents=True)
    machine.paths.pidfile.write_text("1\n")  # pid 1 is alive, but it is not our QEMU
    assert machine.pid() is None
    assert machine.stop() is False


def test_power_on_boots_the_last_command_line_without_its_restore(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    machine = vm.Vm(vm.VmSpec("nested-b", 2, ssh_port=1, link_port=2, peer_link_port=3), tmp_path)
    with pytest.raises(InfraError, match="never started here"):
        machine.power_on()
    machine.paths.dir.mkdir(parents=True)
    argv = ["qemu-system-x86_64", "-name", "nested-b", "-incoming", "exec:cat state", "-daemonize"]
    machine.paths.started.write_text(json.dumps({"pid": 1, "time": 0, "argv": argv}))
    machine.paths.console.write_text("sysrq: Resetting\n")
    launched: list[list[str]] = []

    def launch(_self: vm.Vm, argv: list[str]) -> int:
        launched.append(argv)
        return 4242

    monkeypatch.setattr(vm.Vm, "_launch", launch)
    assert machine.power_on() == 4242
    assert launched == [["qemu-system-x86_64", "-name", "nested-b", "-daemonize"]]  # its own disk, no restore
    assert (machine.paths.dir / "console.prev.log").read_text() == "sysrq: Resetting\n"


def test_crash_report_starts_at_the_oops(tmp_path: Path) -> None:
    machine = vm.Vm(vm.VmSpec("nested-a", 1, ssh_port=1, link_port=2, peer_link_port=3), tmp_path)
    assert machine.crash_report() == ""
    machine.paths.dir.mkdir(parents=True)
    boot = [f"[    1.{i:06d}] booting {i}" for i in range(100)]
    machine.paths.console.write_text("\n".join(boot) + "\n")
    assert machine.crash_report(lines=3).splitlines() == boot[-3:]
    crash = [
        "[  537.964633] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
        "[  537.965433] RIP: 0010:get_page_from_freelist+0xd8/0x15f0",
        "[  537.973430] Kernel panic - not syncing: Fatal exception in interrupt",
    ]
    machine.paths.console.write_text("\n".join(boot + crash) + "\n")
    assert machine.crash_report().splitlines() == crash


def test_crash_headline_keeps_what_a_cut_log_would_lose(tmp_path: Path) -> None:
    machine = vm.Vm(vm.VmSpec("nested-a", 1, ssh_port=1, link_port=2, peer_link_port=3), tmp_path)
    machine.paths.dir.mkdir(parents=True)
    machine.paths.console.write_text("[    1.000000] RIP: 0010:boot_noise+0x1/0x2\n[    2.000000] booted\n")
    assert machine.crash_headline() == ""
    crash = [
        "[ 1608.388001] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
        "[ 1608.388100] CPU: 1 UID: 0 PID: 4242 Comm: python3 Not tainted 6.12.117+deb13-amd64 #1  Debian",
        "[ 1608.388200] RIP: 0010:get_page_from_freelist+0xd8/0x15f0",
        *[f"[ 1608.39{i:04d}] trace line {i}" for i in range(60)],
        "[ 1608.400000] RIP: 0033:0x7f5761f643a7",
        "[ 1608.410000] Kernel panic - not syncing: Fatal exception",
    ]
    with machine.paths.console.open("a") as f:
        f.write("\n".join(crash) + "\n")
    assert machine.crash_headline() == (
        "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI | RIP: 0010:get_page_from_freelist+0xd8/0x15f0"
        " | PID: 4242 Comm: python3 | Kernel panic - not syncing: Fatal exception"
    )


def test_ssh_argv_is_strict(tmp_path: Path) -> None:
    keys = lifecycle.Keys(tmp_path)
    spec = vm.VmSpec("nested-a", 1, ssh_port=30001, link_port=2, peer_link_port=3)
    argv = lifecycle.ssh_argv(spec, keys, "true")
    assert "StrictHostKeyChecking=yes" in argv and f"UserKnownHostsFile={keys.known_hosts}" in argv
    assert argv[argv.index("-p") + 1] == "30001" and argv[-1] == "true"


def test_seed_and_inventory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LABS_NESTED_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("LABS_NESTED_BASE_PORT", "30000")
    all_specs = lifecycle.specs()
    keys = lifecycle.Keys(tmp_path / "keys")
    keys.regenerate([s.name for s in all_specs])
    keys.known_hosts.write_text("")  # up pins the keys here; the loader only needs the file
    machine = vm.Vm(all_specs[1], tmp_path / "run")
    lifecycle.write_seed(machine, all_specs, keys)
    seed = machine.paths.seed_dir
    assert (seed / "hostname").read_text().strip() == "nested-b"
    assert "LINK_CIDR=192.168.123.2/24" in (seed / "net.env").read_text()
    assert "192.168.123.1 nested-a" in (seed / "hosts").read_text()
    assert (seed / "ssh_host_ed25519_key").read_text() == keys.host("nested-b").read_text()
    assert len((seed / "known_hosts").read_text().splitlines()) == 2

    doc = lifecycle.inventory_doc(all_specs, keys, {"nested-a": ["stop_copy", "p2p", "pre_copy"]})
    path = tmp_path / "nested.yaml"
    lifecycle.write_inventory(path, doc)
    assert yaml.safe_load(path.read_text())["hosts"]["nested-b"]["migration_address"] == "192.168.123.2"
    inv = load_inventory(path)
    # one direction each (there-and-back covers the other): plain mtty twice (a second run goes on the second
    # pair), the knob driver, its own model (labs.models); the CI stage's runs at once start VMs on both hosts
    assert [p.id for p in inv.pairs] == [
        "nested-a->nested-b:mtty-2",
        "nested-b->nested-a:mtty-2b",
        "nested-b->nested-a:mtty_faults-2",
    ]
    # conformance on the second pair round-trips within that pair: nested-a's mtty-2 is held by the run beside it
    peers = [peer_of(inv, inv.device(f"{h}:mtty-2b")) for h in ("nested-a", "nested-b")]
    assert [p.id if p else None for p in peers] == ["nested-b:mtty-2b", "nested-a:mtty-2b"]
    # the companion mtty-1 is in mtty-2's `vm:` group, not a pair of its own
    names = [(d.name, models.model_of(d).name) for d in inv.devices if d.host.name == "nested-a"]
    assert names == [("mtty-2", "mtty"), ("mtty-1", "mtty"), ("mtty-2b", "mtty"), ("mtty_faults-2", "mtty_faults")]
    knobs = [models.has_fault_knobs(d) for d in inv.devices if d.host.name == "nested-a"]
    assert knobs == [False, False, False, True]
    create = lifecycle.setup_commands()[0][0]
    assert "modprobe mtty_faults" in create
    assert f"{lifecycle.SECOND_UUID} > /sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2" in create
    assert f"{lifecycle.FAULTS_UUID} > /sys/class/mdev_bus/mtty_faults/mdev_supported_types/mtty_faults-2" in create
    uri = doc["hosts"]["nested-a"]["libvirt_uri"]
    assert uri.startswith("qemu+ssh://root@127.0.0.1:30001/system?") and f"command={keys.ssh_command}" in uri
    wrapper = keys.ssh_command.read_text()
    assert f"UserKnownHostsFile={keys.known_hosts}" in wrapper and "StrictHostKeyChecking=yes" in wrapper
    device = doc["hosts"]["nested-a"]["devices"][0]
    assert device["qemu_properties"] == {"enable-migration": "on", "x-device-dirty-page-tracking": "off"}
    assert inv.settings.max_downtime_ms == lifecycle.MAX_DOWNTIME_MS
    assert inv.settings.downtime_budget == lifecycle.DOWNTIME_BUDGET_MS > lifecycle.MAX_DOWNTIME_MS
    # a reboot ends a nested host's QEMU: its power-on boots it again in this run dir, whatever the caller's env
    reboot = inv.host("nested-b").spec.reboot
    assert reboot is not None and reboot.power_on is not None
    assert reboot.power_on.endswith(" nested power-on nested-b")
    assert f"LABS_NESTED_RUN_DIR={tmp_path / 'run'}" in reboot.power_on
    assert "LABS_NESTED_BASE_PORT=30000" in reboot.power_on


def test_example_inventory_is_valid() -> None:
    """The committed sample matches the model (its key files exist only on a machine where the lab is up)."""
    example = Path(__file__).resolve().parents[2] / "inventories" / "nested.example.yaml"
    doc = InventoryDoc.model_validate(yaml.safe_load(example.read_text()))
    assert set(doc.hosts) == set(lifecycle.HOST_NAMES)
    for host in doc.hosts.values():
        plain, faults = host.devices
        assert plain.kind == faults.kind == "mdev" and plain.protocol == faults.protocol == "v2"
        assert (plain.parent, faults.parent) == (lifecycle.MTTY_PARENT, lifecycle.FAULTS_PARENT)


def test_down_removes_only_a_generated_inventory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LABS_NESTED_RUN_DIR", str(tmp_path / "run"))
    generated = tmp_path / "generated.yaml"
    lifecycle.write_inventory(generated, {"hosts": {}})
    handwritten = tmp_path / "mine.yaml"
    handwritten.write_text("hosts: {}\n")
    assert lifecycle.down(generated) == [] and not generated.exists()
    assert lifecycle.down(handwritten) == [] and handwritten.exists()


def test_two_labs_in_one_checkout_never_take_each_others_inventory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A second lab's `up` overwrote the running lab's inventory and the first lab's `down` deleted it."""
    monkeypatch.setenv("LABS_NESTED_RUN_DIR", str(tmp_path / "other"))
    inventory = tmp_path / "nested.yaml"
    lifecycle.write_inventory(inventory, {"hosts": {}})
    assert lifecycle.inventory_owner(inventory) == tmp_path / "other"
    # the other lab's nested-a QEMU: a process naming its directory, as vm.Vm.pid() checks
    other = vm.Vm(lifecycle.specs()[0], tmp_path / "other")
    other.paths.dir.mkdir(parents=True)
    # it writes its own pidfile, as QEMU's -pidfile does: right after Popen returns, /proc/PID/cmdline can still
    # be empty (exec has not set up the new argv yet), so a pidfile written by the parent can name no lab
    stand_in = (
        "import os, sys, time; open(sys.argv[2], 'w').write(f'{os.getpid()}\\n'); print(flush=True); "
        "time.sleep(int(sys.argv[3]))"
    )
    qemu = subprocess.Popen(
        [sys.executable, "-c", stand_in, str(other.paths.dir), str(other.paths.pidfile), str(FOREVER_S)],
        stdout=subprocess.PIPE,
    )
    try:
        assert qemu.stdout is not None and qemu.stdout.readline() == b"\n", "the stand-in QEMU did not start"
        assert other.pid() == qemu.pid, f"the stand-in QEMU is not running (exit status {qemu.poll()})"
        monkeypatch.setenv("LABS_NESTED_RUN_DIR", str(tmp_path / "mine"))
        # past the check, up would build and boot a real lab
        monkeypatch.setattr(lifecycle, "ensure_image", lambda *_a, **_k: pytest.fail("up went past the check"))
        with pytest.raises(InfraError, match=f"{inventory}: belongs to the nested lab running from {tmp_path}/other"):
            lifecycle.up(inventory=inventory)
        assert lifecycle.down(inventory) == [] and lifecycle.inventory_owner(inventory) == tmp_path / "other"
    finally:
        qemu.kill()
        qemu.communicate()


def test_status_when_down(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LABS_NESTED_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    statuses = lifecycle.status()
    assert [s.name for s in statuses] == list(lifecycle.HOST_NAMES)
    assert not any(s.alive or s.ssh for s in statuses)
    assert not lifecycle.is_up(tmp_path / "nested.yaml")
    assert lifecycle.status_table(statuses).row_count == 2
    assert "image not built" in lifecycle.figures_line()


def test_prune_keeps_the_current_image_and_the_run_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = recipe.Recipe()
    root = recipe.cache_root()
    for name in (r.digest(), "0123456789abcdef", "run"):
        (root / name).mkdir(parents=True)
    (root / "0123456789abcdef.lock").write_text("")
    assert image.prune_images(r) == [root / "0123456789abcdef"]
    assert sorted(p.name for p in root.iterdir()) == sorted([r.digest(), "run"])


def test_prune_spares_an_image_another_lab_uses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Another lab's QEMU holds its (older) base image open; another up may be building one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = recipe.Recipe()
    root = recipe.cache_root()
    booted, building = root / "0123456789abcdef", root / "fedcba9876543210"
    for d in (booted, building):
        d.mkdir(parents=True)
    (booted / "base.qcow2").write_text("")
    with (booted / "base.qcow2").open(), FileLock(str(building) + ".lock"):  # open here as in a QEMU
        assert image.prune_images(r) == []
    assert image.prune_images(r) == [booted, building]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_remove_tree_unmounts_what_a_killed_build_left_mounted(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "dev").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "dev")], check=True)
    (root / "dev" / "null-stand-in").write_text("must not be followed by rmtree while mounted")
    try:
        assert image.mounts_under(root) == [root / "dev"]
        image.remove_tree(root)
        assert not root.exists() and image.mounts_under(root) == []
    finally:
        subprocess.run(["umount", "-l", str(root / "dev")], capture_output=True)
