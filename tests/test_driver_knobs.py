"""A real driver's fault knobs, tested without the kernel: the agent's module-parameter writes on a fake
sysfs, the fault that arms them through a fake agent, the model that declares them, the marker that
selects their devices, and the nested CI stage's second run on them."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from labs import janitor, models
from labs.errors import InfraError
from labs.faults.driver import DriverArcFailure, DriverSlowArc, DriverStreamCut, DriverStreamFlip
from labs.inventory import LabDevice, LabHost
from labs.inventory.models import Host, MdevDevice, SimDevice
from labs.nested import ci
from labs.vfio import hostsys

UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa2001"


def _sysfs(tmp_path: Path, knobs: bool = True) -> Path:
    """/sys/bus/mdev/devices/<uuid> -> driver -> module -> parameters, as the kernel links them."""
    module = tmp_path / "module" / "mtty_faults"
    (module / "parameters").mkdir(parents=True)
    if knobs:
        for name, value in {**hostsys.KNOBS_OFF, "fired": "0"}.items():
            (module / "parameters" / name).write_text(value + "\n")
    driver = tmp_path / "drivers" / "mtty_faults"
    driver.mkdir(parents=True)
    (driver / "module").symlink_to(module)
    dev = tmp_path / "devices" / UUID
    dev.mkdir(parents=True)
    (dev / "driver").symlink_to(driver)
    return dev


def _params(dev: Path) -> dict[str, str]:
    params = dev.resolve() / "driver" / "module" / "parameters"
    return {p.name: p.read_text().strip() for p in params.resolve().iterdir()}


def test_an_arc_is_armed_as_the_kernel_numbers_its_states(tmp_path: Path) -> None:
    dev = _sysfs(tmp_path)
    arc = {"from": "PRE_COPY_P2P", "to": "STOP_COPY", "errno": "EIO", "error": True, "times": 1}
    hostsys.driver_faults(str(dev), {"transitions": [arc]})
    got = _params(dev)
    assert (got["fail_from"], got["fail_to"], got["fail_errno"], got["fail_error"], got["fail_times"]) == (
        "7",
        "3",
        str(errno.EIO),
        "Y",
        "1",
    )
    hostsys.driver_faults(str(dev), {"transitions": [{"from": "*", "to": "STOP_COPY", "errno": 0, "stall_ms": 40}]})
    got = _params(dev)
    assert (got["fail_from"], got["fail_errno"], got["fail_times"], got["stall_ms"]) == ("-2", "0", "-1", "40")


def test_clear_disarms_and_reports_how_often_the_arc_failed(tmp_path: Path) -> None:
    dev = _sysfs(tmp_path)
    hostsys.driver_faults(str(dev), {"transitions": [{"from": "RESUMING", "to": "STOP"}], "stream_cut": 8})
    params = dev.resolve() / "driver" / "module" / "parameters"
    (params.resolve() / "fired").write_text("1\n")  # the driver failed the arc once
    out = hostsys.driver_faults(str(dev), {"clear": True})
    assert out["fired"] == 1
    assert {k: v for k, v in _params(dev).items() if k != "fired"} == hostsys.KNOBS_OFF
    assert _params(dev)["fired"] == "0"


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ({"transitions": [{"from": "STOP", "to": "STOP_COPY"}, {"from": "RUNNING", "to": "STOP"}]}, "EINVAL"),
        ({"transitions": [{"from": "STOPPED", "to": "STOP_COPY"}]}, "EINVAL"),
        ({"transitions": [{"from": "STOP", "to": "STOP_COPY", "errno": "ENOPE"}]}, "EINVAL"),
    ],
    ids=["two-arcs", "unknown-state", "unknown-errno"],
)
def test_what_the_knobs_cannot_do_is_refused(tmp_path: Path, spec: dict[str, Any], code: str) -> None:
    dev = _sysfs(tmp_path)
    with pytest.raises(OSError) as refused:
        hostsys.driver_faults(str(dev), spec)
    assert refused.value.errno == getattr(errno, code)
    assert _params(dev)["fail_from"] == "-1"  # nothing half-armed


def test_a_driver_without_knobs_says_so(tmp_path: Path) -> None:
    with pytest.raises(OSError) as refused:
        hostsys.driver_faults(str(_sysfs(tmp_path, knobs=False)), {"clear": True})
    assert refused.value.errno == errno.EOPNOTSUPP and "no labs fault knobs" in str(refused.value)


def _device(parent: str, type_: str) -> LabDevice:
    spec = MdevDevice(kind="mdev", parent=parent, type=type_, uuid=UUID, protocol="v2")
    return LabDevice(LabHost("nested-a", Host(address="127.0.0.1", devices=(spec,))), 0, spec)


def test_only_the_knob_model_and_sim_drivers_have_knobs() -> None:
    faults, plain = _device("mtty_faults", "mtty_faults-2"), _device("mtty", "mtty-2")
    assert models.model_of(faults).name == "mtty_faults" and models.has_fault_knobs(faults)
    assert models.model_of(plain).name == "mtty" and not models.has_fault_knobs(plain)
    assert models.model_of(faults).incompatible == {"mtty_faults-1": "mtty_faults-2", "mtty_faults-2": "mtty_faults-1"}
    sim = SimDevice(kind="sim", protocol="v2", driver="labs.sim.v2:V2Driver")
    assert models.has_fault_knobs(LabDevice(LabHost("h", Host(address="x", devices=(sim,))), 0, sim))


class FakeAgent:
    """The agent's driver_faults on a driver whose one-shot knobs fired (`fired` arcs, the cut consumed)."""

    def __init__(self, fired: int = 1) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fired = fired

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.calls.append({"op": op, **args})
        return {"fired": self.fired, "stream_cut": "0", "fail_from": "-1"}

    @contextmanager
    def borrow(self) -> Iterator[Any]:
        yield self


def test_the_fault_arms_one_arc_by_the_device_address_and_undo_reads_fired() -> None:
    agent = FakeAgent()
    device = _device("mtty_faults", "mtty_faults-2")
    fault = DriverArcFailure(agent.borrow, device, "resuming -> stop", runs_on="destination", errors=())
    fault.inject()
    fault.undo()
    armed, read, cleared = agent.calls
    assert armed["op"] == "driver_faults" and armed["kind"] == "mdev" and armed["address"] == UUID
    arc = {"from": "RESUMING", "to": "STOP", "errno": "EIO", "error": True, "times": 1}
    assert armed["spec"] == {"clear": True, "transitions": [arc]}
    assert read["spec"] == {} and cleared["spec"] == {"clear": True} and fault.fired == 1
    assert fault.outcome.runs_on == "destination"
    with pytest.raises(InfraError, match="no real driver with fault knobs"):
        DriverArcFailure(agent.borrow, _device("mtty", "mtty-2"), "STOP->STOP_COPY", runs_on="source", errors=())


def test_a_slow_arc_stalls_once_and_then_succeeds(tmp_path: Path) -> None:
    agent = FakeAgent()
    fault = DriverSlowArc(agent.borrow, _device("mtty_faults", "mtty_faults-2"), "* -> stop_copy", 8000)
    fault.inject()
    spec = agent.calls[0]["spec"]
    assert spec["transitions"] == [{"from": "*", "to": "STOP_COPY", "errno": None, "stall_ms": 8000, "times": 1}]
    assert fault.outcome.runs_on == "destination" and fault.outcome.errors == ()
    dev = _sysfs(tmp_path)
    hostsys.driver_faults(str(dev), {k: v for k, v in spec.items() if k != "clear"})
    got = _params(dev)
    assert (got["fail_from"], got["fail_to"], got["fail_errno"], got["stall_ms"], got["fail_times"]) == (
        "-2",
        "3",
        "0",  # no errno: the driver goes on with the arc after the stall
        "8000",
        "1",
    )


def test_a_stream_cut_says_whether_a_save_met_it() -> None:
    agent = FakeAgent(fired=0)
    fault = DriverStreamCut(agent.borrow, _device("mtty_faults", "mtty_faults-2"), 16, runs_on="source", errors=())
    fault.inject()
    assert agent.calls[0]["spec"] == {"clear": True, "stream_cut": 16}
    fault.undo()
    assert fault.landed
    agent.call = lambda op, **args: {"fired": 0, "stream_cut": "16"}  # type: ignore[method-assign]
    missed = DriverStreamCut(agent.borrow, _device("mtty_faults", "mtty_faults-2"), 16, runs_on="source", errors=())
    missed.inject()
    missed.undo()
    assert not missed.landed


def test_a_stream_flip_says_whether_a_save_met_it() -> None:
    agent = FakeAgent(fired=0)
    agent.call = lambda op, **args: {"fired": 0, "stream_flip": "-1"}  # type: ignore[method-assign]
    fault = DriverStreamFlip(
        agent.borrow, _device("mtty_faults", "mtty_faults-2"), 31, runs_on="destination", errors=()
    )
    assert fault.spec == {"stream_flip": 31}
    fault.inject()
    fault.undo()
    assert fault.landed
    agent.call = lambda op, **args: {"fired": 0, "stream_flip": "31"}  # type: ignore[method-assign]
    missed = DriverStreamFlip(
        agent.borrow, _device("mtty_faults", "mtty_faults-2"), 31, runs_on="destination", errors=()
    )
    missed.inject()
    missed.undo()
    assert not missed.landed


def test_the_nested_stage_runs_the_recovery_suites_again_on_the_knob_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABS_NESTED_SUITES", raising=False)
    (alone,), (plain, second, knobs) = ci.runs()
    assert alone == ci.Run(ci.PLAIN_DEVICES, list(ci.HOST_WIDE), "junit-host-wide.xml")
    assert plain.devices == ci.PLAIN_DEVICES and "suites/recovery" in plain.paths and "suites/smoke" in plain.paths
    ignored = [f"--ignore={f}" for f in ci.HOST_WIDE]
    assert set(ignored) <= set(plain.paths)  # each host-wide file runs once, alone
    # the plain driver's second pair takes whole suites off the first run: each suite runs once, on mtty-2 or mtty-2b
    assert second == ci.Run(ci.SECOND_DEVICES, ["tests/nested", *ci.SECOND_SUITES[:2], *ignored], "junit-second.xml")
    assert not set(ci.SECOND_SUITES) & set(plain.paths)
    assert knobs == ci.Run(ci.KNOB_DEVICES, ["suites/recovery", "-k", ci.KNOB_DESELECT], "junit-faults.xml")
    monkeypatch.setenv("LABS_NESTED_SUITES", "suites/smoke suites/recovery suites/guest")
    ((chosen_plain, chosen_knobs),) = ci.runs()
    assert "suites/guest" not in chosen_plain.paths  # the Linux guest, where chosen, runs on the knob pair only
    assert chosen_knobs.paths[:2] == ["suites/recovery", "suites/guest"]
    monkeypatch.setenv("LABS_NESTED_SUITES", "suites/smoke tests/nested")
    alone_stage, (smoke, nested) = ci.runs()
    assert [r.devices for r in alone_stage] == [ci.PLAIN_DEVICES]
    assert (smoke.devices, nested.devices) == (ci.PLAIN_DEVICES, ci.SECOND_DEVICES)
    assert nested.paths == ["tests/nested", *(i for i in ignored if "tests/nested/" in i)]
    monkeypatch.setenv("LABS_NESTED_SUITES", "suites/save_resume/test_vm_faults.py")
    assert ci.runs() == [[ci.Run(ci.SECOND_DEVICES, ["suites/save_resume/test_vm_faults.py"], "junit-second.xml")]]
    monkeypatch.setenv("LABS_NESTED_SUITES", "suites/recovery/test_driver_failures.py")
    (only,) = ci.runs()
    assert [r.paths[0] for r in only] == ["suites/recovery/test_driver_failures.py"] * 2
    monkeypatch.setenv("LABS_NESTED_SUITES", "suites/migration/test_host_faults.py")
    assert ci.runs() == [[ci.Run(ci.PLAIN_DEVICES, ["suites/migration/test_host_faults.py"], "junit-host-wide.xml")]]


def test_the_nested_stage_runs_a_stage_at_once_and_prints_the_logged_run(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    passing, failing = tmp_path / "passing.py", tmp_path / "failing.py"
    passing.write_text("def test_ok():\n    pass\n")
    failing.write_text("def test_bad():\n    assert False\n")
    log = tmp_path / "second.log"
    quiet = ["-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    argvs = [([str(passing), *quiet], None, {}), ([str(failing), *quiet], log, {"LABS_NESTED_LIVE": "0"})]
    rc = ci._together(argvs, time.monotonic() + 120)
    assert rc == 1  # the failing run's status, though the other passed
    out = capfd.readouterr().out
    assert f"(kept in {log})" in out and "1 failed" in out and "1 failed" in log.read_text()


def test_the_nested_stage_runs_its_second_stage_after_a_failing_first_and_reports_the_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One failing host-wide test must not cost the other runs' results (nor print runs that never started)."""
    from types import SimpleNamespace

    from labs.nested import lifecycle

    started: list[list[str]] = []

    def together(argvs: list[tuple[list[str], Path | None, dict[str, str]]], _deadline: float) -> int:
        started.append([args[0] for args, _log, _lab in argvs])
        if len(started) == 1:  # the first run fails a test; the second ends without its report
            (junit,) = [Path(a.split("=", 1)[1]) for args, _, _ in argvs for a in args if a.startswith("--junitxml=")]
            bad = '<failure message="AssertionError: boom&#10;more">tb</failure>'
            junit.write_text(
                f'<testsuites><testsuite><testcase classname="m" name="t">{bad}</testcase></testsuite></testsuites>'
            )
        return 1 if len(started) == 1 else 0

    monkeypatch.setattr(ci, "cannot_run", lambda: None)
    monkeypatch.setattr(ci, "_together", together)
    monkeypatch.setattr(
        ci, "runs", lambda: [[ci.Run("*:a", ["first"], "j1.xml")], [ci.Run("*:b", ["second"], "j2.xml")]]
    )
    monkeypatch.setattr(ci, "REPO_ROOT", tmp_path)  # its reports/nested
    monkeypatch.setattr(lifecycle, "status", lambda check: [])
    monkeypatch.setattr(lifecycle, "up", lambda: SimpleNamespace(how="restore", seconds="", note=""))
    monkeypatch.setattr(lifecycle, "down", lambda: ["nested-a"])
    monkeypatch.setattr(lifecycle, "post_mortem", lambda: [])
    (tmp_path / "reports" / "nested").mkdir(parents=True)
    (tmp_path / "reports" / "nested" / "j2.xml").write_text("<stale/>")  # from an earlier run: not this one's
    assert ci.main([]) == 1
    assert started == [["first"], ["second"]]
    tail = capsys.readouterr().out.splitlines()[-4:]
    # what failed is named at the end, where a CI log's tail shows it; the stale report does not speak for the second
    assert tail[:3] == [
        "nested: j1.xml: failure m::t: AssertionError: boom",
        "nested: j2.xml: not written (pytest ended before its report)",
        "nested: down (nested-a)",
    ]
    assert "exit 1" in tail[-1]


def test_asked_for_a_second_lab_the_host_wide_stage_goes_beside_the_others_and_both_labs_go_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    from labs.nested import lifecycle

    monkeypatch.setenv("LABS_NESTED_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("LABS_NESTED_BASE_PORT", "30000")
    monkeypatch.setenv("LABS_NESTED_LABS", "2")
    monkeypatch.setattr(ci.os, "cpu_count", lambda: 4)
    lab = ci.second_lab()
    assert lab["LABS_NESTED_RUN_DIR"] == str(tmp_path / "run-2") and lab["LABS_NESTED_BASE_PORT"] == "30100"
    assert Path(lab["LABS_NESTED_INVENTORY"]).name == f"{lifecycle.NESTED_INVENTORY.stem}-2.yaml"
    started: list[list[tuple[str, str, str]]] = []
    ups: list[tuple[str, str]] = []
    downs: list[tuple[str, str]] = []

    def together(argvs: list[tuple[list[str], Path | None, dict[str, str]]], _deadline: float) -> int:
        started.append(
            [
                (args[0], next(a for a in args if a.startswith("--inventory=")), env.get("LABS_NESTED_RUN_DIR", ""))
                for args, _, env in argvs
            ]
        )
        return 0

    def up(inventory: Path = lifecycle.NESTED_INVENTORY) -> SimpleNamespace:
        ups.append((os.environ["LABS_NESTED_RUN_DIR"], str(inventory)))
        return SimpleNamespace(how="restored", seconds="", note="")

    def down(inventory: Path = lifecycle.NESTED_INVENTORY) -> list[str]:
        downs.append((os.environ["LABS_NESTED_RUN_DIR"], str(inventory)))
        return ["nested-a"]

    monkeypatch.setattr(ci, "cannot_run", lambda: None)
    monkeypatch.setattr(ci, "_together", together)
    monkeypatch.setattr(ci, "_mem_available_mb", lambda: 64 * 1024)
    monkeypatch.setattr(
        ci,
        "runs",
        lambda: [[ci.Run("*:a", ["wide"], "j1.xml")], [ci.Run("*:b", ["b"], "j2.xml"), ci.Run("*:c", ["c"], "j3.xml")]],
    )
    monkeypatch.setattr(ci, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(lifecycle, "status", lambda check: [])
    monkeypatch.setattr(lifecycle, "up", up)
    monkeypatch.setattr(lifecycle, "down", down)
    monkeypatch.setattr(lifecycle, "post_mortem", lambda: [])
    assert ci.main([]) == 0
    first, second = str(tmp_path / "run"), str(tmp_path / "run-2")
    one, two = f"--inventory={lifecycle.NESTED_INVENTORY}", f"--inventory={lab['LABS_NESTED_INVENTORY']}"
    # one stage: the host-wide run on the first lab, the others on the second
    assert started == [[("wide", one, ""), ("b", two, second), ("c", two, second)]]
    assert ups == [(first, str(lifecycle.NESTED_INVENTORY)), (second, lab["LABS_NESTED_INVENTORY"])]
    assert sorted(downs) == sorted(ups)
    assert os.environ["LABS_NESTED_RUN_DIR"] == first  # the second lab's environment was only lent
    # not enough memory for four hosts: the stages one after the other, on one lab, saying why
    monkeypatch.setattr(ci, "_mem_available_mb", lambda: 4096)
    started.clear()
    assert ci.main([]) == 0
    assert [[r[0] for r in stage] for stage in started] == [["wide"], ["b", "c"]]
    assert "two labs need" in capsys.readouterr().out
    # two cores: four TCG hosts slow each other past the fault windows
    monkeypatch.setattr(ci, "_mem_available_mb", lambda: 64 * 1024)
    monkeypatch.setattr(ci.os, "cpu_count", lambda: 2)
    started.clear()
    assert ci.main([]) == 0
    assert [[r[0] for r in stage] for stage in started] == [["wide"], ["b", "c"]]
    assert "2 CPUs, four TCG hosts need 4" in capsys.readouterr().out
    monkeypatch.delenv("LABS_NESTED_LABS")  # not asked: one lab, nothing said
    monkeypatch.setattr(ci.os, "cpu_count", lambda: 8)
    started.clear()
    assert ci.main([]) == 0
    assert len(started) == 2 and "second lab" not in capsys.readouterr().out


class KnobDevice:
    """A device handle whose driver's knobs are as `knobs` says (DeviceHandle.faults)."""

    def __init__(self, **knobs: str) -> None:
        self.knobs = {**hostsys.KNOBS_OFF, **knobs, "fired": 0}
        self.cleared = 0

    def faults(self, **spec: Any) -> dict[str, Any]:
        if spec.get("clear"):
            self.knobs = {**hostsys.KNOBS_OFF, "fired": 0}
            self.cleared += 1
        return dict(self.knobs)


def test_the_janitor_disarms_only_knobs_left_armed() -> None:
    device = _device("mtty_faults", "mtty_faults-2")
    armed = KnobDevice(fail_from="4", fail_to="1", fail_error="Y")
    assert janitor._disarm(device, armed) == [  # type: ignore[arg-type]
        f"{device.id}: disarmed its driver's fault knobs (fail_error=Y, fail_from=4, fail_to=1)"
    ]
    assert armed.cleared == 1 and armed.knobs["fail_from"] == "-1"
    idle = KnobDevice()
    assert janitor._disarm(device, idle) == [] and idle.cleared == 0  # type: ignore[arg-type]
