"""pytest plugin: parametrize suites over an inventory's hosts, devices and pairs.

Loaded by the root conftest.py and, from an installed package, through the
pytest11 entry point. Nothing touches an inventory or a host until a test asks
for a lab fixture, so the plugin costs nothing in unrelated test runs.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Generator, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from labs import retries
from labs.doctor import HostReport, Status, check_lab
from labs.errors import LabError
from labs.hostwatch import HostWatch, Recheck, TestTimeout, infra_error, is_pytest_timeout
from labs.inventory import Inventory, LabDevice, LabHost, LabPair
from labs.inventory.models import Capability
from labs.kernelhealth import HostCheck, HostKernelError, KernelWatch, KmsgSource, compile_allow, reason
from labs.models import model_of
from labs.paths import SIM_INVENTORY
from labs.reservations import ReservationBusy, reserve
from labs.runtime import LabSession, new_run_id, open_inventory
from labs.transport import HostConnection

MARKERS = {
    "conformance": "device-level rule checks against the VFIO migration uAPI",
    "save_resume": "save and resume (device level or VM level)",
    "live_migration": "live migration between the hosts of a pair",
    "fault": "induces a failure on purpose",
    "recovery": "drives a device into ERROR and recovers it",
    "destructive": "may leave a device needing a reset or a host needing care",
    "slow": "takes minutes on a real lab",
    "requires(*capabilities)": "skip devices lacking these capabilities (stop_copy, p2p, pre_copy, ...)",
    "protocol(name)": "only parametrize over devices speaking this protocol (v1 or v2)",
    "sim_only(reason)": "only for simulated devices (e.g. requests known to hang real kernels)",
    "rule(*ids)": "the spec rule ids (V1-R*, V2-R*) this test checks",
}
LAB_FIXTURES = ("lab", "host", "device", "pair", "ssh")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("labs", "VFIO migration lab")
    group.addoption("--inventory", default=None, help="inventory YAML (default: $LABS_INVENTORY, else the sim lab)")
    group.addoption(
        "--lab-host", action="append", default=[], metavar="GLOB", help="only hosts matching GLOB (repeatable)"
    )
    group.addoption(
        "--lab-device",
        action="append",
        default=[],
        metavar="GLOB",
        help="only devices whose id matches GLOB, e.g. 'hostA:*' or '*:simv2' (repeatable)",
    )
    group.addoption(
        "--lab-subject",
        default=None,
        metavar="DEVICE",
        help="one device under test (certification): device tests for it only, pair tests with it as the source;"
        " its partners take part as destinations",
    )
    group.addoption(
        "--lab-no-doctor",
        action="store_true",
        help="skip the doctor (it checks each host when its first test comes, and again after an infra error)",
    )
    group.addoption(
        "--lab-no-reserve",
        action="store_true",
        help="do not reserve devices on their hosts (only when nobody else can use the lab)",
    )
    group.addoption(
        "--lab-reserve-wait",
        default=120.0,
        type=float,
        metavar="SECONDS",
        help="how long a test waits for a device another run holds before it is skipped (default 120)",
    )
    group.addoption(
        "--lab-dist",
        choices=("device", "load"),
        default="device",
        help="with -n and a named inventory: 'device' (default) gives each xdist worker whole groups of"
        " devices joined by pairs, so workers never wait on each other's reservations; 'load' is xdist's own",
    )
    group.addoption(
        "--lab-pingpong", type=int, default=2, metavar="N", help="round trips of ping-pong migrations (default 2)"
    )


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    state = LabState(config)
    config.stash[STATE] = state
    from labs.reporting import allure_hooks

    if not config.pluginmanager.is_registered(allure_hooks):
        config.pluginmanager.register(allure_hooks, "labs.reporting.allure_hooks")
    if config.getoption("--inventory"):
        # asked for by name: validate now, so a bad file is one usage-error line, not a collection error
        _ = state.inventory


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: every worker works for the controller's run id (names, janitor, reservations)."""
    node.workerinput["labs_run_id"] = _state(node.config).run_id


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Whole device groups per worker (labs.xdist_groups) when a lab inventory is named."""
    named = config.getoption("--inventory") or os.environ.get("LABS_INVENTORY")
    if config.getvalue("dist") != "load" or config.getoption("--lab-dist") != "device" or not named:
        return None
    from labs.xdist_groups import DeviceScopeScheduling, device_groups

    return DeviceScopeScheduling(config, log, device_groups(_state(config).inventory))


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is not None:
        state.close()


class LabState:
    """Per-process plugin state: the inventory, the live session, the health report."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._inventory: Inventory | None = None
        self._session: LabSession | None = None
        self._health: dict[str, HostReport] | None = None
        # one run id for the whole run: xdist workers get the controller's (pytest_configure_node)
        worker = getattr(config, "workerinput", None)
        self.run_id: str = (worker or {}).get("labs_run_id") or os.environ.get("LABS_RUN_ID") or new_run_id()
        self.watch = HostWatch(self.run_id)
        self.worker_summaries: list[dict[str, Any]] = []  # xdist controller: what each worker saw
        self.kernel_log_errors: dict[str, str] = {}  # host -> why its kernel log could not be read

    @property
    def inventory_path(self) -> Path:
        opt = self.config.getoption("--inventory")
        if opt:
            return Path(opt)
        if os.environ.get("LABS_INVENTORY"):
            return Path(os.environ["LABS_INVENTORY"])
        local = Path(str(self.config.rootpath)) / "inventories" / "sim.yaml"
        return local if local.exists() else SIM_INVENTORY

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            try:
                self._inventory = open_inventory(self.inventory_path)
            except LabError as exc:
                # pytest prints a UsageError as one line, without a traceback
                raise pytest.UsageError(str(exc)) from None
        return self._inventory

    @property
    def session(self) -> LabSession:
        if self._session is None:
            self._session = LabSession(self.inventory, run_id=self.run_id).start()
        return self._session

    def health_of(self, host: LabHost) -> HostReport | None:
        """The doctor's report on `host`, checked when a test first wants the host: an xdist worker
        that only ever gets one pair's devices checks those two hosts, not the whole lab."""
        if self.config.getoption("--lab-no-doctor"):
            return None
        if self._health is None:
            self._health = {}
        if host.name not in self._health:
            from labs.hostagent import migration_probe

            self._health.update(check_lab(self.session, [host], migration_probe))
        return self._health[host.name]

    def recheck(self, host: str) -> str | None:
        """The doctor again on one host (after an infrastructure error there): its problem, or None."""
        from labs.hostagent import agent_pool, migration_probe

        agent_pool(self.session).drop(host)  # an agent that hung there is not lent out again
        report = check_lab(self.session, [self.inventory.host(host)], migration_probe)[host]
        if self._health is not None:
            self._health[host] = report
        return report.problem

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        if not hasattr(self.config, "workerinput"):
            self.watch.remove()  # the run is over (xdist: all workers are done)

    # -- selection ----------------------------------------------------------
    def _host_ok(self, host: LabHost) -> bool:
        globs = self.config.getoption("--lab-host")
        return not globs or any(fnmatch.fnmatchcase(host.name, g) for g in globs)

    def _device_ok(self, device: LabDevice) -> bool:
        globs = self.config.getoption("--lab-device")
        host_ok = self._host_ok(device.host)
        return host_ok and (not globs or any(fnmatch.fnmatchcase(device.id, g) for g in globs))

    def hosts(self) -> list[LabHost]:
        return [h for h in self.inventory.hosts if self._host_ok(h)]

    def devices(self) -> list[LabDevice]:
        subject = self.config.getoption("--lab-subject")
        return [d for d in self.inventory.devices if self._device_ok(d) and subject in (None, d.id)]

    def pairs(self) -> list[LabPair]:
        subject = self.config.getoption("--lab-subject")
        return [
            p
            for p in self.inventory.pairs
            if self._device_ok(p.source) and self._device_ok(p.destination) and subject in (None, p.source.id)
        ]


STATE = pytest.StashKey[LabState]()


def _state(config: pytest.Config) -> LabState:
    return config.stash[STATE]


# -- parametrization ---------------------------------------------------------
def _protocol_filter(metafunc: pytest.Metafunc) -> str | None:
    mark = metafunc.definition.get_closest_marker("protocol")
    return str(mark.args[0]) if mark else None


def _empty(what: str, why: str) -> list[Any]:
    return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {what} in this lab{why}"), id=f"no-{what}")]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    if not any(n in names for n in ("host", "device", "pair")):
        return
    state = _state(metafunc.config)
    protocol = _protocol_filter(metafunc)
    why = f" (inventory {state.inventory_path})"
    if protocol:
        why = f" speaking {protocol}{why}"
    if "pair" in names:
        pairs = [p for p in state.pairs() if protocol in (None, p.source.spec.protocol)]
        params = [pytest.param(p, id=p.id) for p in pairs] or _empty("pair", why)
        metafunc.parametrize("pair", params, indirect=True)
    elif "device" in names:
        devices = [d for d in state.devices() if protocol in (None, d.spec.protocol)]
        params = [pytest.param(d, id=d.id) for d in devices] or _empty("device", why)
        metafunc.parametrize("device", params, indirect=True)
    elif "host" in names:
        params = [pytest.param(h, id=h.name) for h in state.hosts()] or _empty("host", why)
        metafunc.parametrize("host", params, indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = _state(config)
    for item in items:
        if not any(n in getattr(item, "fixturenames", ()) for n in LAB_FIXTURES):
            continue
        if item.get_closest_marker("timeout") is None and state._inventory is not None:
            item.add_marker(pytest.mark.timeout(state.inventory.settings.timeouts.test))
        for mark in item.iter_markers("rule"):
            for rule_id in mark.args:
                item.user_properties.append(("rule", str(rule_id)))


# -- infrastructure errors -----------------------------------------------------------
@contextmanager
def _timeout_is_infra(item: pytest.Item) -> Generator[None]:
    """pytest-timeout ends a hung test with pytest.fail, which reads as a finding: make it an infra error."""
    try:
        yield
    except pytest.fail.Exception as exc:
        if not is_pytest_timeout(exc):
            raise
        mark = item.get_closest_marker("timeout")
        limit = f"{mark.args[0]:g}s " if mark and mark.args else ""
        raise TestTimeout(f"{item.nodeid} ran past its {limit}timeout and was ended (pytest-timeout)") from exc


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None]:
    # a setup that passed is judged with the call; one that skipped or failed is judged here
    with _kernel_verdict(item, "setup", after_success=False), _timeout_is_infra(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None]:
    with _kernel_verdict(item, "call", after_success=True), _timeout_is_infra(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    with _timeout_is_infra(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    exc = call.excinfo.value if report.failed and call.excinfo is not None else None
    # a kernel finding that ended an infrastructure error still has that host rechecked
    err = infra_error(exc.__cause__ if isinstance(exc, HostKernelError) else exc)
    if err is not None:
        from labs.reporting.allure_hooks import subject_of

        hosts = [h.name for h in subject_of(item)[0]]
        _state(item.config).watch.suspect(hosts, item.nodeid, err)
        report.sections.append(("lab infrastructure", f"{type(err).__name__}; hosts to recheck: {hosts}"))
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(STATE, None)
    workeroutput = getattr(session.config, "workeroutput", None)
    if state is not None and workeroutput is not None:
        workeroutput["labs_infra"] = json.dumps(_infra_summary(state))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: keep each worker's infrastructure summary for the terminal."""
    text = getattr(node, "workeroutput", {}).get("labs_infra")
    if text:
        _state(node.config).worker_summaries.append(json.loads(text))


def _infra_summary(state: LabState) -> dict[str, Any]:
    summary = state.watch.summary()
    # only a process that used the lab reports retries: the record is per process, and an in-process
    # pytester run inside the framework's own tests would otherwise show up in the outer run
    summary["retries"] = [str(e) for e in retries.since(0)] if state._session is not None else []
    return summary


# -- host kernel verdict -------------------------------------------------------
KERNEL_WATCHES = pytest.StashKey[list[KernelWatch]]()


def kernel_not_judged(inventory: Inventory, host: LabHost) -> str | None:
    """Why a host's kernel is not judged, or None when it is."""
    if inventory.is_sim:
        return "a sim host is an sshd on this machine: its kernel log is the controller's, shared by every process here"
    return None


def kernel_log_allow(inventory: Inventory, host: LabHost) -> tuple[Any, ...]:
    """The compiled allowlist on `host`: every pattern given for a model that has a device there, and those
    of the device models (labs.models) of its devices."""
    models = {d.model_key for d in host.spec.devices}
    mine = [d for d in inventory.devices if d.host.name == host.name]
    patterns = dict.fromkeys(
        [p for d in inventory.devices if d.spec.model_key in models for p in d.spec.kernel_log_allow]
        + [p for d in mine for p in model_of(d).kernel_log_allow]
    )
    return compile_allow(patterns)


def kmsg_source(session: LabSession, host: str) -> KmsgSource:
    """The host's kernel log and taint through a pooled agent; a host that stopped answering gives nothing."""

    def read(after: int) -> dict[str, Any]:
        from labs.hostagent import agent_for

        try:
            with agent_for(session, host) as agent:
                return dict(agent.call("kmsg", after=after, limit=2000))
        except LabError:
            return {}

    return read


def _watch_kernels(item: pytest.Item, state: LabState) -> None:
    from labs.reporting.allure_hooks import subject_of

    watches = []
    for h in subject_of(item)[0]:
        if kernel_not_judged(state.inventory, h) is None:
            watch = KernelWatch(h.name, kmsg_source(state.session, h.name), kernel_log_allow(state.inventory, h))
            if watch.error:
                state.kernel_log_errors[h.name] = watch.error
            watches.append(watch)
    item.stash[KERNEL_WATCHES] = watches


def _judge_kernels(item: pytest.Item, when: str, failure: BaseException | None) -> None:
    """Attach what each watched host's kernel said; raise HostKernelError when one reported trouble."""
    from labs.reporting.evidence import attach

    checks: list[HostCheck] = [w.check() for w in item.stash.get(KERNEL_WATCHES, [])]
    for c in checks:
        if c.lines:
            attach(f"dmesg {c.host}", "".join(f"{line}\n" for line in c.lines))
        if c.failed:
            attach(f"host kernel {c.host}", c.evidence())
            item.add_report_section(when, f"host kernel {c.host}", c.evidence())
    if not any(c.failed for c in checks):
        return
    message = reason(checks)
    if failure is not None and not isinstance(failure, pytest.skip.Exception):
        first = (str(failure).strip().splitlines() or [""])[0][:200]
        message += f" (the test also failed: {type(failure).__name__}: {first})"
    raise HostKernelError(message) from failure


@contextmanager
def _kernel_verdict(item: pytest.Item, when: str, after_success: bool) -> Generator[None]:
    try:
        yield
    except (KeyboardInterrupt, pytest.exit.Exception):
        raise
    except BaseException as exc:
        _judge_kernels(item, when, exc)
        raise
    else:
        if after_success:
            _judge_kernels(item, when, None)


@pytest.fixture(autouse=True)
def _labs_kernel_watch(request: pytest.FixtureRequest) -> Iterator[None]:
    """Watches the test's hosts' kernels from before its lab fixtures are set up to after they are torn
    down (autouse: set up first, torn down last); the teardown's own lines are judged here."""
    if not any(n in request.fixturenames for n in LAB_FIXTURES):
        yield
        return
    state = _state(request.config)
    _watch_kernels(request.node, state)
    yield
    _judge_kernels(request.node, "teardown", None)


# -- skips ---------------------------------------------------------------------
def _skip_unhealthy(state: LabState, host: LabHost) -> None:
    recheck = state.watch.recheck_if_suspect(host.name, state.recheck)
    if recheck is not None:
        from labs.reporting.evidence import attach

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
        return _state(request.config).session
    except LabError as exc:
        pytest.exit(f"lab could not start: {exc}", returncode=3)


@pytest.fixture
def host(request: pytest.FixtureRequest, lab: LabSession) -> LabHost:
    h: LabHost = request.param
    _skip_unhealthy(_state(request.config), h)
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
    state = _state(request.config)
    _skip_device(request, state, d)
    with ExitStack() as stack:
        _reserve(stack, state, [d])
        yield d


@pytest.fixture
def pair(request: pytest.FixtureRequest, lab: LabSession) -> Iterator[LabPair]:
    p: LabPair = request.param
    state = _state(request.config)
    _skip_device(request, state, p.source)
    _skip_device(request, state, p.destination)
    with ExitStack() as stack:
        _reserve(stack, state, [p.source, p.destination])
        yield p


def pytest_report_header(config: pytest.Config) -> str | None:
    state = config.stash.get(STATE, None)
    if state is None or state._inventory is None:
        return None
    inv = state.inventory
    return f"lab: {inv.name} ({state.inventory_path}), {len(inv.hosts)} hosts, {len(inv.devices)} devices"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is None:
        return
    _infra_section(terminalreporter, state)
    _kernel_section(terminalreporter, state)
    if not state._health:
        return
    bad = [(r.host, c) for r in state._health.values() for c in r.checks if c.status == Status.FAIL]
    if bad:
        terminalreporter.section("lab health")
        for host, c in bad:
            terminalreporter.write_line(f"{host}{' ' + c.device if c.device else ''}: {c.name}: {c.detail}")


def _kernel_section(terminalreporter: Any, state: LabState) -> None:
    """Hosts whose kernel the verdict could not judge (fully or at all), and why."""
    if state._inventory is None:
        return
    off = {h.name: why for h in state.inventory.hosts if (why := kernel_not_judged(state.inventory, h))}
    if not (off or state.kernel_log_errors):
        return
    terminalreporter.section("host kernel")
    for name, why in off.items():
        terminalreporter.write_line(f"not judged on {name}: {why}")
    for name, error in state.kernel_log_errors.items():
        terminalreporter.write_line(f"kernel log of {name} unreadable ({error}): only its taint is judged")


def _infra_section(terminalreporter: Any, state: LabState) -> None:
    """Tests ended by the lab, doctor rechecks and connection retries, over every process of the run."""
    parts = [*state.worker_summaries, _infra_summary(state)]
    ended = [tuple(t) for p in parts for t in p["infra_ended"]]
    rechecks = [Recheck(**r) for p in parts for r in p["rechecks"]]
    retried = [r for p in parts for r in p["retries"]]
    if not (ended or rechecks or retried):
        return
    terminalreporter.section("lab infrastructure")
    for test, error in ended:
        terminalreporter.write_line(f"ended by the lab: {test}: {error}")
    for r in rechecks:
        terminalreporter.write_line(f"doctor recheck of {r.host} after {r.after}: {r.verdict} ({r.seconds:.1f}s)")
    if retried:
        terminalreporter.write_line(f"connection retries: {len(retried)}")
        for line in retried[-10:]:
            terminalreporter.write_line(f"  {line}")


@pytest.fixture
def pingpong(request: pytest.FixtureRequest) -> int:
    """Round trips for ping-pong scenarios (--lab-pingpong)."""
    return int(request.config.getoption("--lab-pingpong"))
