"""The pytest plugin, driven through pytester: ids, filters, skips, options."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

REAL_LAB = """
lab: {name: plugin-test, timeouts: {connect: 2}}
hosts:
  hostA:
    address: 127.0.0.1
    port: 1
    devices:
      - {kind: pci, pci: "0000:65:00.0", model: nic, protocol: v2, capabilities: [stop_copy, p2p]}
      - {kind: mdev, name: mtty-2, parent: mtty, type: mtty-2, uuid: 7e8b6c2a-1f1c-4b4e-9a56-2f4f6f1d0a01,
         protocol: v2, capabilities: [stop_copy, p2p, pre_copy]}
  hostB:
    address: 127.0.0.1
    port: 1
    devices:
      - {kind: pci, pci: "0000:65:00.0", model: nic, protocol: v1}
      - {kind: mdev, name: mtty-2, parent: mtty, type: mtty-2, uuid: 7e8b6c2a-1f1c-4b4e-9a56-2f4f6f1d0a02,
         protocol: v2, capabilities: [stop_copy, p2p, pre_copy]}
"""

SUITE = """
import pytest

def test_host(host):
    pass

def test_device(device):
    pass

def test_pair(pair):
    pass

@pytest.mark.requires("pre_copy")
def test_needs_precopy(device):
    pass

@pytest.mark.protocol("v1")
def test_v1_only(device):
    pass
"""


@pytest.fixture
def real_lab(pytester: pytest.Pytester) -> Path:
    path = pytester.path / "lab.yaml"
    path.write_text(textwrap.dedent(REAL_LAB))
    pytester.makepyfile(test_suite=SUITE)
    return path


def collected_ids(result: pytest.RunResult) -> list[str]:
    return [line.split("::", 1)[1] for line in result.outlines if "::" in line]


def test_ids_are_readable(pytester: pytest.Pytester, real_lab: Path) -> None:
    result = pytester.runpytest("--inventory", str(real_lab), "--collect-only", "-q")
    ids = collected_ids(result)
    assert "test_host[hostA]" in ids
    assert "test_device[hostA:0000:65:00.0]" in ids
    assert "test_device[hostA:mtty-2]" in ids
    assert "test_pair[hostA->hostB:mtty-2]" in ids
    assert "test_pair[hostB->hostA:mtty-2]" in ids
    # v1 and v2 functions of one PCI address do not pair up
    assert not any(i.startswith("test_pair[hostA->hostB:0000") for i in ids)
    assert [i for i in ids if i.startswith("test_v1_only")] == ["test_v1_only[hostB:0000:65:00.0]"]


def test_host_and_device_filters(pytester: pytest.Pytester, real_lab: Path) -> None:
    result = pytester.runpytest("--inventory", str(real_lab), "--collect-only", "-q", "--lab-device", "*:mtty-2")
    ids = collected_ids(result)
    assert [i for i in ids if i.startswith("test_device")] == ["test_device[hostA:mtty-2]", "test_device[hostB:mtty-2]"]
    result = pytester.runpytest("--inventory", str(real_lab), "--collect-only", "-q", "--lab-host", "hostB")
    ids = collected_ids(result)
    assert [i for i in ids if i.startswith("test_host")] == ["test_host[hostB]"]
    assert not [i for i in ids if i.startswith("test_pair[") and "no-pair" not in i]
    assert "test_pair[no-pair]" in ids


def test_subject_keeps_one_device_and_its_pairs_as_source(pytester: pytest.Pytester, real_lab: Path) -> None:
    result = pytester.runpytest("--inventory", str(real_lab), "--collect-only", "-q", "--lab-subject", "hostA:mtty-2")
    ids = collected_ids(result)
    assert [i for i in ids if i.startswith("test_device")] == ["test_device[hostA:mtty-2]"]
    assert [i for i in ids if i.startswith("test_pair")] == ["test_pair[hostA->hostB:mtty-2]"]


def test_missing_capability_is_a_skip_naming_it(pytester: pytest.Pytester, real_lab: Path) -> None:
    args = ["--inventory", str(real_lab), "--lab-no-doctor", "--lab-no-reserve", "-rs", "-k", "precopy"]
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines(
        ["*hostA:0000:65:00.0 lacks capability pre_copy*", "*hostB:0000:65:00.0 lacks capability pre_copy*"]
    )


def test_unhealthy_host_skips_its_tests_with_the_reason(pytester: pytest.Pytester, real_lab: Path) -> None:
    result = pytester.runpytest("--inventory", str(real_lab), "-rs", "-k", "test_host")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        ["*lab health*", "hostA: ssh: cannot reach*", "*host hostA unhealthy: ssh: cannot reach root@127.0.0.1:1*"]
    )


def test_empty_selection_is_one_visible_skip(pytester: pytest.Pytester, real_lab: Path) -> None:
    result = pytester.runpytest(
        "--inventory", str(real_lab), "--lab-no-doctor", "-rs", "-k", "v1_only", "--lab-host", "hostA"
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no device in this lab speaking v1*"])


def test_bad_inventory_is_one_line_usage_error(pytester: pytest.Pytester) -> None:
    bad = pytester.path / "bad.yaml"
    bad.write_text("hosts:\n  a:\n    address: 10.0.0.1\n    devices:\n      - {kind: pci, protocol: v2}\n")
    pytester.makepyfile(test_x="def test_device(device):\n    pass\n")
    result = pytester.runpytest("--inventory", str(bad))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {bad}:5: hosts.a.devices[0].pci: required key is missing"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_plugin_stays_out_of_unrelated_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "lab:" not in result.stdout.str()


def test_markers_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    for marker in ("conformance", "save_resume", "live_migration", "fault", "recovery", "destructive", "slow"):
        result.stdout.fnmatch_lines([f"@pytest.mark.{marker}:*"])


def test_sim_lab_is_started_and_stopped_by_the_plugin(pytester: pytest.Pytester, tmp_path: Path) -> None:
    from tests.conftest import write_sim_inventory

    inventory = write_sim_inventory(tmp_path)
    pytester.makepyfile(
        test_sim="""
        def test_ssh(host, ssh):
            assert ssh.run("echo $LABS_SIM_HOST").stdout.strip() == host.name
        """
    )
    result = pytester.runpytest_subprocess("--inventory", str(inventory), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    from labs.session import open_inventory
    from labs.simlab import SimLab

    lab = SimLab(open_inventory(inventory))
    assert all(pid is None for pid in lab.status().values()), "the plugin left sim sshd running"
