"""The doctor's source/destination compatibility check: each field's status and the pair's verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from labs.compat import COMPATIBLE, DIFFERENCES, INCOMPATIBLE, DeviceFacts, compare, facts_command, parse_facts
from labs.paths import REPO_ROOT
from tests.conftest import write_sim_inventory

BASE = DeviceFacts("a:vf", "6.12.1", "mlx5_vfio_pci", "abc123", "28.39.1002", "QEMU 9.2.0", "10.10.0")


def _with(**changes: str | None) -> DeviceFacts:
    return DeviceFacts(**{**vars(BASE), **changes, "device": "b:vf"})


def _status(pc: object, name: str) -> str:
    return next(f.status for f in pc.fields if f.name == name)  # type: ignore[attr-defined]


def test_identical_ends_are_compatible() -> None:
    pc = compare("a->b:vf", BASE, _with())
    assert pc.verdict == COMPATIBLE and {f.status for f in pc.fields} == {"ok"}


def test_a_different_driver_is_incompatible() -> None:
    pc = compare("a->b:vf", BASE, _with(driver="vfio-pci"))
    assert pc.verdict == INCOMPATIBLE and _status(pc, "driver") == "fail"


def test_differences_that_a_certification_must_cover() -> None:
    for name, value in (("kernel", "6.13.0"), ("firmware", "28.40.1000"), ("driver_version", "def456")):
        pc = compare("a->b:vf", BASE, _with(**{name: value}))
        assert (pc.verdict, _status(pc, name)) == (DIFFERENCES, "warn"), name


def test_older_destination_qemu_or_libvirt_is_a_difference_newer_is_fine() -> None:
    assert compare("p", BASE, _with(qemu="QEMU 10.0.0")).verdict == COMPATIBLE
    older = compare("p", BASE, _with(qemu="QEMU 8.2.2", libvirt="9.0.0"))
    assert (older.verdict, _status(older, "qemu"), _status(older, "libvirt")) == (DIFFERENCES, "warn", "warn")


def test_unread_fields() -> None:
    pc = compare("p", BASE, _with(kernel=None))
    assert _status(pc, "kernel") == "warn" and pc.verdict == DIFFERENCES
    none = compare("p", _with(firmware=None, driver_version=None), _with(firmware=None, driver_version=None))
    assert (_status(none, "firmware"), _status(none, "driver_version"), none.verdict) == ("n/a", "n/a", COMPATIBLE)


def test_facts_read_from_a_sysfs_tree(tmp_path: Path) -> None:
    """The facts command against a fake sysfs: a VF bound to a variant driver, its module's version."""
    dev = tmp_path / "devices/0000:65:00.1"
    drv = tmp_path / "drivers/mlx5_vfio_pci"
    mod = tmp_path / "module/mlx5_vfio_pci"
    for d in (dev, drv, mod):
        d.mkdir(parents=True)
    (dev / "driver").symlink_to(drv)
    (drv / "module").symlink_to(mod)
    cmd = facts_command(str(dev)).replace("/sys/module/", f"{tmp_path}/module/")
    (mod / "version").write_text("1.2\n")
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=True).stdout
    facts = parse_facts("a:vf", out, qemu=None, libvirt=None)
    assert (facts.driver, facts.driver_version, facts.firmware) == ("mlx5_vfio_pci", "1.2", None)
    assert facts.kernel


def test_doctor_prints_each_pairs_verdict(tmp_path: Path) -> None:
    inventory = write_sim_inventory(tmp_path, devices=True)
    res = subprocess.run(
        [sys.executable, "-m", "labs.cli", "doctor", "--inventory", str(inventory)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    pairs = [line for line in res.stdout.splitlines() if "->" in line]
    assert pairs and all(line.strip().endswith(": compatible") for line in pairs), res.stdout
