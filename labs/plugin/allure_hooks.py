"""What the Allure report knows about each lab test: labels, parameters, environment, categories.

Registered by the labs pytest plugin. Everything here is a no-op when the run
has no --alluredir, except the environment and category files, which are
written only into an Allure results directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import allure
import pytest

import labs
from labs import retries
from labs.attachments import ENV_LABEL, attach, register_secret_env
from labs.hostwatch import infra_exception_names
from labs.plugin import kernels as host_kernels
from labs.plugin.state import LAB_FIXTURES, STATE, subject_of


def categories() -> list[dict[str, Any]]:
    """Allure's categories; "the lab broke" is any exception labs.hostwatch counts as infrastructure.

    Matched on the message, which starts with the type of the exception that ended the test: a
    trace would also match a test whose source merely mentions one of these names.
    """
    return [
        {
            # first: a kernel finding names the test's failure even when the test also failed otherwise
            "name": "Host kernel (Oops, BUG, WARNING, stall, lockup, taint change)",
            "matchedStatuses": ["failed"],
            "messageRegex": "(?s)([\\w.]*\\.)?HostKernelError:.*",
        },
        {
            "name": "Lab infrastructure (SSH, libvirt, timeouts)",
            "matchedStatuses": ["broken", "failed"],
            "messageRegex": f"(?s)([\\w.]*\\.)?({'|'.join(infra_exception_names())}):.*",
        },
        {
            "name": "Driver defect (a rule or readback assertion failed)",
            "matchedStatuses": ["failed"],
        },
        {
            "name": "Framework error (a bug in labs)",
            "matchedStatuses": ["broken"],
        },
    ]


FEATURES = {
    "smoke": "Lab smoke",
    "conformance": "Device conformance",
    "save_resume": "Save and resume",
    "migration": "Live migration",
    "recovery": "ERROR recovery",
    "faults": "Induced failures",
}


def results_dir(config: pytest.Config) -> Path | None:
    value = getattr(config.option, "allure_report_dir", None)
    return Path(value) if value else None


def _label(item: pytest.Item, label_type: str, *values: str) -> None:
    item.add_marker(pytest.mark.allure_label(*values, label_type=label_type))


def static_labels(item: pytest.Item) -> None:
    """Labels known at collection, as allure-pytest markers: a test skipped before it ran gets them too."""
    parts = Path(str(item.path)).parts
    suite = parts[parts.index("suites") + 1] if "suites" in parts and parts.index("suites") + 1 < len(parts) else ""
    _label(item, "epic", "VFIO device migration")
    state = item.config.stash.get(STATE, None)
    if state is not None:
        # the lab's name: a report merging several labs splits by it (Allure environments, labs.reporting.render)
        _label(item, ENV_LABEL, state.inventory.name)
    _label(item, "feature", FEATURES.get(suite, suite or "labs"))
    name = getattr(item, "originalname", item.name)
    _label(item, "story", name.removeprefix("test_").replace("_", " "))
    device = subject_of(item)[1]
    if device is not None:
        # a test skipped before its fixtures ran has only its parameters' repr: this names its device
        _label(item, "lab_device", device.id)
    rule_ids = [str(r) for mark in item.iter_markers("rule") for r in mark.args]
    if rule_ids:
        # allure-pytest tags a test with its markers already (conformance, fault, ...); rule ids join them
        _label(item, "rule", *rule_ids)
        _label(item, "tag", *rule_ids)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(n in getattr(item, "fixturenames", ()) for n in LAB_FIXTURES):
            static_labels(item)


def label_test(item: pytest.Item, kernels: dict[str, str]) -> None:
    """What only a running test knows: its hosts, device, pair, driver and kernels."""
    hosts, device, pair = subject_of(item)
    for h in hosts:
        # "host" is Allure's own label (the controller's hostname)
        allure.dynamic.label("lab_host", h.name)
    if pair is not None:
        allure.dynamic.parameter("pair", pair.id)
    if device is not None:
        spec = device.spec
        allure.dynamic.parameter("device", device.id)
        allure.dynamic.parameter("driver", getattr(spec, "driver", None) or spec.kind)
        allure.dynamic.parameter("protocol", spec.protocol)
    for h in hosts:
        if h.name in kernels:
            allure.dynamic.parameter(f"kernel {h.name}", kernels[h.name])


@pytest.fixture(autouse=True)
def _labs_allure(request: pytest.FixtureRequest) -> Iterator[None]:
    if not any(n in request.fixturenames for n in LAB_FIXTURES):
        yield
        return
    state = request.config.stash[STATE]
    kernels = {}
    for host in subject_of(request.node)[0]:
        report = state.health_of(host)  # the doctor checks a host when its first test comes
        check = report.check("kernel") if report is not None else None
        if check is not None:
            kernels[host.name] = check.detail
    label_test(request.node, kernels)
    retried_from = retries.mark()
    yield
    retried = retries.since(retried_from)
    if retried:
        # a pass that needed a second connection is still a pass, but a host worth watching
        attach("connection retries", "\n".join(map(str, retried)))


def environment_properties(state: Any) -> dict[str, str]:
    env = {"labs.version": labs.__version__}
    if state._inventory is None:
        return env
    inv = state.inventory
    env["inventory"] = f"{inv.name} ({state.inventory_path})"
    for name, report in (state._health or {}).items():
        for c in report.checks:
            if c.device is None and c.name in ("kernel", "libvirt", "python"):
                env[f"{name}.{c.name}"] = c.detail
    for h in inv.hosts:
        why = host_kernels.kernel_not_judged(inv, h)
        env[f"{h.name}.kernel_verdict"] = f"off: {why}" if why else "on"
    for d in inv.devices:
        # Allure 3 splits a key at its first ':' even when escaped: device ids keep their ':' out of keys
        env[f"{d.host.name}.{d.name}.driver"] = getattr(d.spec, "driver", None) or d.spec.kind
    return env


def write_run_files(config: pytest.Config) -> None:
    """environment.properties and categories.json, once per run.

    xdist workers know the hosts (they ran the doctor); the controller does not.
    Each worker leaves its part in the results directory and the controller,
    which finishes last, merges them.
    """
    out = results_dir(config)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    state = config.stash.get(STATE, None)
    env = environment_properties(state) if state is not None else {"labs.version": labs.__version__}
    if hasattr(config, "workerinput"):
        (out / f".labs-env-{os.getpid()}.json").write_text(json.dumps(env))
        return
    for part in out.glob(".labs-env-*.json"):
        env = {**json.loads(part.read_text()), **env}
        part.unlink()
    lines = [f"{k}={_escape(v)}" for k, v in sorted(env.items())]
    (out / "environment.properties").write_text("\n".join(lines) + "\n")
    (out / "categories.json").write_text(json.dumps(categories(), indent=2))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", " ").replace("=", "\\=").replace(":", "\\:")


def pytest_sessionstart(session: pytest.Session) -> None:
    state = session.config.stash.get(STATE, None)
    if state is not None and state._inventory is not None:
        names = [h.spec.identity_passphrase_env for h in state.inventory.hosts]
        register_secret_env(n for n in names if n)


def pytest_sessionfinish(session: pytest.Session) -> None:
    write_run_files(session.config)
