"""The lab fixtures: lab, host, ssh, device, pair (parametrized by the plugin's hooks), with the
doctor's skips and device reservations, and the kernel watch around every test that uses them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from labs.attachments import attach
from labs.errors import LabError
from labs.inventory import LabDevice, LabHost, LabPair
from labs.inventory.models import Capability
from labs.models import has_fault_knobs
from labs.plugin.kernels import judge_kernels, watch_kernels
from labs.plugin.state import LAB_FIXTURES, LabState, state_of
from labs.reservations import ReservationBusy, reserve
from labs.session import LabSession
from labs.transport import HostConnection


@pytest.fixture(autouse=True)
def _labs_kernel_watch(request: pytest.FixtureRequest) -> Iterator[None]:
    """Watches the test's hosts' kernels from before its lab fixtures are set up to after they are torn
    down (autouse: set up first, torn down last); the teardown's own lines are judged here."""
    if not any(n in request.fixturenames for n in LAB_FIXTURES):
        yield
        return
    state = state_of(request.config)
    watch_kernels(request.node, state)
    yield
    judge_kernels(request.node, "teardown", None)


# -- skips ---------------------------------------------------------------------
def _skip_unhealthy(state: LabState, host: LabHost) -> None:
    recheck = state.watch.recheck_if_suspect(host.name, state.recheck)
    if recheck is not None:
        attach(f"doctor recheck of {host.name}", str(recheck))
    problem = state.watch.unhealthy(host.name)
    if problem:
        pytest.skip(f"host {host.name} unhealthy after an infrastructure error: {problem}")
    report = state.health_of(host)
    if report is not None and report.problem:
        pytest.skip(f"host {host.name} unhealthy: {report.problem}")


def _skip_device(request: pytest.FixtureRequest, state: LabState, device: LabDevice) -> None:
    _skip_unhealthy(state, device.host)
    report = state.health_of(device.host)
    problem = report.device_problem(device.id) if report else None
    if problem:
        pytest.skip(f"device {device.id} unhealthy: {problem}")
    wanted: list[Capability] = []
    for mark in request.node.iter_markers("requires"):
        wanted.extend(Capability(c) for c in mark.args)
    missing = [c.value for c in wanted if c not in device.capabilities]
    if missing:
        pytest.skip(f"{device.id} lacks capability {', '.join(missing)}")
    if request.node.get_closest_marker("fault_knobs") and not has_fault_knobs(device):
        pytest.skip(f"{device.id}: its driver has no fault knobs (a sim driver, or a model that has them)")
    sim_only = request.node.get_closest_marker("sim_only")
    if sim_only and device.spec.kind != "sim":
        reason = sim_only.args[0] if sim_only.args else "simulated devices only"
        pytest.skip(f"{device.id} is a real device: {reason}")


def _reserve(stack: ExitStack, state: LabState, devices: list[LabDevice]) -> None:
    """Hold each device on its host for the test; sorted, so two pair tests cannot deadlock."""
    t = state.inventory.settings.timeouts
    if state.config.getoption("--lab-no-reserve"):
        return
    wait = float(state.config.getoption("--lab-reserve-wait"))
    session = state.session
    for dev in sorted(devices, key=lambda d: d.id):
        try:
            held = reserve(session.ssh(dev.host.name), dev, session.run_id, wait=wait, expires_in=2 * t.test)
        except ReservationBusy as exc:
            pytest.skip(str(exc))
        stack.callback(held.release)


# -- fixtures ------------------------------------------------------------------
@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> LabSession:
    """The lab in use: inventory, SSH pool, run id (the sim lab is started on first use)."""
    try:
        return state_of(request.config).session
    except LabError as exc:
        pytest.exit(f"lab could not start: {exc}", returncode=3)


@pytest.fixture
def host(request: pytest.FixtureRequest, lab: LabSession) -> LabHost:
    h: LabHost = request.param
    _skip_unhealthy(state_of(request.config), h)
    return h


@pytest.fixture
def ssh(lab: LabSession, request: pytest.FixtureRequest) -> HostConnection:
    """The SSH connection to the test's host (or its device's host)."""
    for name in ("host", "device", "pair"):
        if name in request.fixturenames:
            obj = request.getfixturevalue(name)
            h = obj if isinstance(obj, LabHost) else obj.host if isinstance(obj, LabDevice) else obj.source.host
            return lab.ssh(h.name)
    raise pytest.UsageError("the ssh fixture needs a host, device or pair fixture in the same test")


@pytest.fixture
def device(request: pytest.FixtureRequest, lab: LabSession) -> Iterator[LabDevice]:
    d: LabDevice = request.param
    state = state_of(request.config)
    _skip_device(request, state, d)
    with ExitStack() as stack:
        _reserve(stack, state, [d])
        yield d


@pytest.fixture
def pair(request: pytest.FixtureRequest, lab: LabSession) -> Iterator[LabPair]:
    p: LabPair = request.param
    state = state_of(request.config)
    _skip_device(request, state, p.source)
    _skip_device(request, state, p.destination)
    with ExitStack() as stack:
        _reserve(stack, state, [p.source, p.destination])
        yield p


@pytest.fixture
def pingpong(request: pytest.FixtureRequest) -> int:
    """Round trips for ping-pong scenarios (--lab-pingpong)."""
    return int(request.config.getoption("--lab-pingpong"))
