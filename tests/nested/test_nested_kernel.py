"""The host kernel verdict on a real kernel: a WARNING during a test fails it, category "Host kernel".

An inner pytest run against the nested inventory: one test makes nested-a's kernel WARN through
labs_warn.ko (built into the image beside mtty.ko; each write to its `warn` parameter WARNs), one
does nothing to the kernel. Skips (with the reason) unless `lab nested up` has the lab running.
"""

from __future__ import annotations

import json
import re

import pytest

from labs.nested import lifecycle
from tests import allure_results
from tests.nested.test_nested_smoke import nested_hosts  # noqa: F401  (the fixture, used by name)

HOST = lifecycle.HOST_NAMES[0]

INNER = """
import pytest


def test_clean(host, ssh):
    ssh.run("uname -r", timeout=300, check=True)


@pytest.mark.destructive
def test_deliberate_warn(host, ssh):
    # taints the host W (once per boot) and logs a WARNING each time
    ssh.run("modprobe labs_warn && echo 1 > /sys/module/labs_warn/parameters/warn", timeout=300, check=True)
"""


@pytest.mark.destructive
@pytest.mark.usefixtures("nested_hosts")  # skips unless the lab is up; module scope: before pytester moves HOME
def test_a_kernel_warning_fails_the_test_and_a_clean_test_passes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # the short summary's lines in full
    pytester.makepyfile(test_inner_kernel=INNER)
    results = pytester.path / "results"
    run = pytester.runpytest_subprocess(
        f"--inventory={lifecycle.NESTED_INVENTORY}",
        f"--lab-host={HOST}",
        "--lab-no-doctor",  # the doctor's probes are not what this shows, and take minutes under TCG
        f"--alluredir={results}",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        "-rA",
    )
    out = run.stdout.str()
    print(out[-4000:])
    run.assert_outcomes(passed=1, failed=1)
    assert f"FAILED test_inner_kernel.py::test_deliberate_warn[{HOST}] - " in out
    assert f"HostKernelError: host kernel: {HOST}: WARNING: CPU: " in out

    tests = allure_results.results(results)
    assert tests[f"test_clean[{HOST}]"]["status"] == "passed"
    warned = tests[f"test_deliberate_warn[{HOST}]"]
    assert warned["status"] == "failed"
    categories = json.loads((results / "categories.json").read_text())
    assert categories[0]["name"].startswith("Host kernel")
    assert re.fullmatch(categories[0]["messageRegex"], warned["statusDetails"]["message"])
    attached = {a["name"]: (results / a["source"]).read_text() for a in warned.get("attachments", [])}
    evidence = attached[f"host kernel {HOST}"]
    # "at FILE:LINE FUNC+off/len" with CONFIG_DEBUG_BUGVERBOSE (Debian's), "at FUNC+off/len" without
    assert re.search(r"\] WARNING: CPU: \d+ PID: \d+ at .*labs_warn_set\+", evidence), evidence
    assert "labs_warn: deliberate warning" in attached[f"dmesg {HOST}"]
