"""The `lab` command: one-line errors, inventory check, doctor, sim lab lifecycle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from labs.cli import main
from labs.paths import INVENTORIES


def lab(*args: str) -> subprocess.CompletedProcess[str]:
    """The real console script, so stderr and exit codes are what a user sees."""
    return subprocess.run([sys.executable, "-m", "labs.cli", *args], capture_output=True, text=True, timeout=120)


def test_inventory_check_ok() -> None:
    result = CliRunner().invoke(main, ["inventory", "check", str(INVENTORIES / "example-ansible.yaml")])
    assert result.exit_code == 0, result.output
    assert "ok (ansible shape): 2 hosts, 2 devices, 2 pairs" in result.output
    assert "pair hostA->hostB:mtty-2" in result.output


def test_inventory_check_bad_is_one_line_on_stderr(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  b:\n    address: 10.0.0.1\n    devices:\n      - {kind: pci, protocol: v2}\n")
    result = lab("inventory", "check", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"error: {bad}:5: hosts.b.devices[0].pci: required key is missing\n"


def test_doctor_on_the_sim_lab(sim_inventory_file: Path) -> None:
    result = lab("doctor", "--inventory", str(sim_inventory_file))
    assert result.returncode == 0, result.stdout + result.stderr
    for word in ("hostA", "hostB", "ssh", "python", "kernel", "libvirt", "all hosts healthy"):
        assert word in result.stdout


def test_sim_up_status_down(tmp_path: Path) -> None:
    from tests.conftest import write_sim_inventory

    inv = str(write_sim_inventory(tmp_path))
    try:
        up = lab("sim", "up", "--inventory", inv)
        assert up.returncode == 0, up.stderr
        assert "hostA: sshd pid" in up.stdout
        status = lab("sim", "status", "--inventory", inv)
        assert "users: cli" in status.stdout and "down" not in status.stdout
    finally:
        down = lab("sim", "down", "--inventory", inv)
    assert down.stdout.strip() == "stopped"
    assert "hostA: down" in lab("sim", "status", "--inventory", inv).stdout


def test_bootstrap_installs_the_nested_host_packages() -> None:
    """`./lab nested ...` installs exactly what labs.nested says the controller needs."""
    from labs.nested import HOST_PACKAGES
    from labs.paths import REPO_ROOT

    script = (REPO_ROOT / "lab").read_text()
    line = next(ln for ln in script.splitlines() if "qemu-system-x86" in ln)
    listed = line.split("(", 1)[1].rsplit(")", 1)[0].split()
    assert sorted(listed) == sorted(HOST_PACKAGES)


def test_janitor_after_a_clean_lab(sim_inventory_file: Path) -> None:
    result = lab("janitor", "--inventory", str(sim_inventory_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "janitor: nothing left over" in result.stdout


def test_lab_test_builds_the_nested_image_beside_the_other_environments(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only where the nested stage would build one: the machine can run the lab and no image is cached."""
    import labs.cli as cli
    import labs.nested.ci as nested_ci
    import labs.nested.image as nested_image

    started: list[list[str]] = []

    class Started:
        def __init__(self, argv: list[str], **kw: object) -> None:
            started.append(argv)
            assert kw["preexec_fn"] is cli._lowest_priority  # only the CPU the other stages leave idle

    monkeypatch.setattr(cli.subprocess, "Popen", Started)
    monkeypatch.setattr(cli, "EARLY_IMAGE_LOG", tmp_path / "image-build.log")
    monkeypatch.setattr(nested_ci, "cannot_run", lambda: None)
    monkeypatch.setattr(nested_image, "find_image", lambda _recipe: None)
    assert isinstance(cli._build_nested_image_early(), Started)
    assert started == [[sys.executable, "-c", cli.EARLY_IMAGE_BUILD]]
    monkeypatch.setenv("LABS_NESTED_EARLY_IMAGE", "0")
    assert cli._build_nested_image_early() is None
    monkeypatch.delenv("LABS_NESTED_EARLY_IMAGE")
    monkeypatch.setattr(nested_image, "find_image", lambda _recipe: object())  # cached: nothing to build
    assert cli._build_nested_image_early() is None
    monkeypatch.setattr(nested_image, "find_image", lambda _recipe: None)
    monkeypatch.setattr(nested_ci, "cannot_run", lambda: "no qemu")  # the nested stage skips: so does this
    assert cli._build_nested_image_early() is None
    assert len(started) == 1
