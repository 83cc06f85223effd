"""The doctor's device check: its one-round-trip probe, run by a real shell against a fake sysfs tree."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from labs.doctor import HostReport, Status, _check_device
from labs.inventory import LabDevice, LabHost, load_inventory
from labs.transport.ssh import Result

UUID = "7e8b6c2a-1f1c-4b4e-9a56-2f4f6f1d0a01"
INVENTORY = f"""
hosts:
  a:
    address: 10.0.0.1
    devices:
      - {{kind: mdev, name: m1, model: mtty-2, parent: mtty, type: mtty-2, uuid: {UUID},
         protocol: v2, capabilities: [stop_copy, p2p]}}
"""


def _mdev(tmp_path: Path) -> tuple[LabDevice, Path]:
    """The inventory's mdev and where its sysfs node goes under `tmp_path`."""
    (tmp_path / "inv.yaml").write_text(textwrap.dedent(INVENTORY))
    return load_inventory(tmp_path / "inv.yaml").devices[0], tmp_path / "sys" / "bus" / "mdev" / "devices" / UUID


class LocalShell:
    """Runs the doctor's command in sh here, with /sys/ moved under a temporary tree; keeps what it ran."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.commands: list[str] = []

    def run(self, command: str, timeout: float | None = None, **_kw: object) -> Result:
        self.commands.append(command)
        local = command.replace("/sys/", f"{self.root}/sys/")
        res = subprocess.run(["sh", "-c", local], capture_output=True, text=True, timeout=30)
        return Result("a", command, res.returncode, res.stdout, res.stderr, 0.0)


@pytest.mark.parametrize(
    ("driver", "iommu", "status", "detail"),
    [
        ("mtty", True, Status.OK, "bound to mtty"),
        ("mtty", False, Status.FAIL, "bound to mtty, but has no IOMMU group (no VFIO device)"),
        (None, True, Status.FAIL, "bound to no driver"),
        ("absent", False, Status.FAIL, "does not exist"),
    ],
)
def test_device_check_reads_existence_driver_and_iommu_group_in_one_command(
    tmp_path: Path, driver: str | None, iommu: bool, status: Status, detail: str
) -> None:
    device, node = _mdev(tmp_path)
    if driver != "absent":
        node.mkdir(parents=True)
        if driver:
            (tmp_path / "drivers" / driver).mkdir(parents=True)
            (node / "driver").symlink_to(tmp_path / "drivers" / driver)
        if iommu:
            (node / "iommu_group").mkdir()
    report = HostReport("a")
    _check_device(report, LocalShell(tmp_path), device, (6, 12))  # type: ignore[arg-type]
    (check,) = report.checks
    assert (check.name, check.status) == ("device", status)
    assert detail in check.detail


def test_a_group_missing_at_first_look_and_there_at_the_second_is_a_warning_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a failure, not hidden either: the device check says what the first look saw."""
    import labs.doctor as doctor

    device, node = _mdev(tmp_path)
    node.mkdir(parents=True)
    (tmp_path / "drivers" / "mtty").mkdir(parents=True)
    (node / "driver").symlink_to(tmp_path / "drivers" / "mtty")
    # it appears meanwhile (the doctor's own pause: time.sleep is subprocess's too)
    monkeypatch.setattr(doctor, "_pause", lambda _s: (node / "iommu_group").mkdir())
    report = HostReport("a")
    _check_device(report, LocalShell(tmp_path), device, (6, 12))  # type: ignore[arg-type]
    (check,) = report.checks
    assert check.status == Status.WARN and "no IOMMU group at first, there 1 s later" in check.detail


def test_a_hosts_devices_are_read_in_one_command_each_fact_to_its_own_device(tmp_path: Path) -> None:
    from labs.doctor import _read_devices

    base = tmp_path / "sys" / "bus" / "mdev" / "devices"
    for name, driver, iommu in (("bound", "mtty", True), ("unbound", None, False), ("nogroup", "mtty", False)):
        (base / name).mkdir(parents=True)
        if driver:
            (tmp_path / "drivers" / driver).mkdir(parents=True, exist_ok=True)
            (base / name / "driver").symlink_to(tmp_path / "drivers" / driver)
        if iommu:
            (base / name / "iommu_group").mkdir()
    paths = [f"/sys/bus/mdev/devices/{n}" for n in ("nogroup", "missing", "bound", "unbound")]
    shell = LocalShell(tmp_path)
    facts = _read_devices(shell, paths)  # type: ignore[arg-type]
    assert len(shell.commands) == 1
    assert facts == [
        {"exists": "1", "driver": "mtty"},
        {},
        {"exists": "1", "driver": "mtty", "iommu": "1"},
        {"exists": "1"},
    ]


def test_a_host_check_that_did_not_run_says_so_and_names_no_module_missing(tmp_path: Path) -> None:
    from labs.doctor import _check_modules, _read_host

    class Broken:
        def run(self, command: str, timeout: float | None = None, **_kw: object) -> Result:
            return Result("a", command, 126, "", "sh: cannot execute", 0.0)

    device, _node = _mdev(tmp_path)
    report = HostReport("a")
    _check_modules(report, [device], _read_host(Broken(), "python3", ["mtty"]))  # type: ignore[arg-type]
    (check,) = report.checks
    assert check.status == Status.FAIL and check.detail == "the check exited 126: sh: cannot execute"


@pytest.mark.parametrize(
    ("python", "loaded", "want"),
    [
        ("python3", {"vfio", "mdev", "mtty"}, ("OK", "python3 3.", "OK", "OK", "vfio, mdev, mtty")),
        ("python3", {"vfio", "mdev"}, ("OK", "python3 3.", "OK", "FAIL", "missing mtty")),
        (
            "no-such-python",
            {"vfio", "mdev", "mtty"},
            ("FAIL", "no-such-python does not run: ", "OK", "OK", "vfio, mdev, mtty"),
        ),
    ],
)
def test_a_hosts_interpreter_kernel_and_modules_come_from_one_command(
    tmp_path: Path, python: str, loaded: set[str], want: tuple[str, ...]
) -> None:
    """Run by a real shell: the interpreter's version or its error, the release, the modules loaded."""
    from labs.doctor import _check_kernel, _check_modules, _check_python, _modules_wanted, _read_host

    for module in loaded:
        (tmp_path / "sys" / "module" / module).mkdir(parents=True)
    device, _node = _mdev(tmp_path)
    shell = LocalShell(tmp_path)
    facts = _read_host(shell, python, _modules_wanted([device]))  # type: ignore[arg-type]
    report = HostReport("a")
    _check_python(report, LabHost(device.host.name, device.host.spec.model_copy(update={"python": python})), facts)
    _check_kernel(report, device.host, facts)
    _check_modules(report, [device], facts)
    python_check, kernel, modules = report.checks
    assert len(shell.commands) == 1
    assert (python_check.status.name, kernel.status.name, modules.status.name) == (want[0], want[2], want[3])
    assert python_check.detail.startswith(want[1]) and modules.detail == want[4]
    assert kernel.detail == os.uname().release
