"""pytest plugin: parametrize suites over an inventory's hosts, devices and pairs.

The hooks live here; the per-process state in state.py, the lab fixtures in fixtures.py, the
host kernel verdict in kernels.py and the Allure labels and attachments in allure_hooks.py.

Loaded by the root conftest.py and, from an installed package, through the
pytest11 entry point. Nothing touches an inventory or a host until a test asks
for a lab fixture, so the plugin costs nothing in unrelated test runs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import pytest

from labs import retries
from labs.doctor import Status
from labs.hostwatch import Recheck, TestTimeout, infra_error, is_pytest_timeout
from labs.kernelhealth import HostKernelError
from labs.plugin import allure_hooks, kernels
from labs.plugin.state import LAB_FIXTURES, STATE, LabState, state_of, subject_of

pytest_plugins = ("labs.plugin.fixtures",)

MARKERS = {
    "conformance": "device-level rule checks against the VFIO migration uAPI",
    "save_resume": "save and resume (device level or VM level)",
    "live_migration": "live migration between the hosts of a pair",
    "fault": "induces a failure on purpose",
    "recovery": "drives a device into ERROR and recovers it",
    "destructive": "may leave a device needing a reset or a host needing care",
    "slow": "takes minutes on a real lab",
    "linux_guest": "boots the inventory's Linux guest (lab.guest) and judges the device by what it sees",
    "requires(*capabilities)": "skip devices lacking these capabilities (stop_copy, p2p, pre_copy, ...)",
    "protocol(name)": "only parametrize over devices speaking this protocol (v1 or v2)",
    "sim_only(reason)": "only for simulated devices (e.g. fault knobs)",
    "fault_knobs": "only devices whose driver fails on command: simulated drivers and real ones whose model has knobs",
    "rule(*ids)": "the spec rule ids (V1-R*, V2-R*) this test checks",
}


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


SIGTERM_SET = pytest.StashKey[bool]()


def _terminated(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (tox, CI, the nested stage's budget, `lab defects` ending its runs) ends the run as Ctrl-C does,
    # through the teardowns: by default it kills pytest where it stands, its sim sshds, VMs and locks left behind
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
        config.stash[SIGTERM_SET] = True
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    state = LabState(config)
    config.stash[STATE] = state
    if not config.pluginmanager.is_registered(allure_hooks):
        config.pluginmanager.register(allure_hooks, "labs.plugin.allure_hooks")
    if config.getoption("--inventory"):
        # asked for by name: validate now, so a bad file is one usage-error line, not a collection error
        _ = state.inventory


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: every worker works for the controller's run id (names, janitor, reservations)."""
    node.workerinput["labs_run_id"] = state_of(node.config).run_id


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Whole device groups per worker (labs.xdist_groups) when a lab inventory is named."""
    named = config.getoption("--inventory") or os.environ.get("LABS_INVENTORY")
    if config.getvalue("dist") != "load" or config.getoption("--lab-dist") != "device" or not named:
        return None
    from labs.xdist_groups import DeviceScopeScheduling, device_groups

    return DeviceScopeScheduling(config, log, device_groups(state_of(config).inventory))


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is not None:
        state.close()
    if config.stash.get(SIGTERM_SET, False):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
    state = state_of(metafunc.config)
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
    state = state_of(config)
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
    with kernels.kernel_verdict(item, "setup", after_success=False), _timeout_is_infra(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None]:
    with kernels.kernel_verdict(item, "call", after_success=True), _timeout_is_infra(item):
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
        hosts = [h.name for h in subject_of(item)[0]]
        state_of(item.config).watch.suspect(hosts, item.nodeid, err)
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
        state_of(node.config).worker_summaries.append(json.loads(text))


def _infra_summary(state: LabState) -> dict[str, Any]:
    summary = state.watch.summary()
    # only a process that used the lab reports retries: the record is per process, and an in-process
    # pytester run inside the framework's own tests would otherwise show up in the outer run
    summary["retries"] = [str(e) for e in retries.since(0)] if state._session is not None else []
    return summary


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
    off = {h.name: why for h in state.inventory.hosts if (why := kernels.kernel_not_judged(state.inventory, h))}
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
