"""Infrastructure errors end a test, send its hosts back to the doctor, and the run goes on.

A run on a private sim lab where, on hostA, an agent operation hangs (the agent's
watchdog ends it), a remote command hangs (its timeout kills it) and a test hangs
(pytest-timeout ends it); an assertion fails; then hostB goes down for good. Each
hang is an infrastructure error in the report, the next test on hostA runs only
after the doctor passed it again, an assertion is a finding run once, and hostB's
remaining tests are skipped with the doctor's reason while hostA's pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from labs.hostwatch import HostWatch
from labs.paths import REPO_ROOT
from tests import allure_results
from tests.conftest import write_sim_inventory

SUITE = '''
import time
import pytest
from labs.agentpool import agent_for

RAN = {ran!r}


def test_a_agent_hangs(host, lab):
    if host.name == "hostA":
        with agent_for(lab, "hostA") as agent:
            agent.call("sleep", seconds=60, timeout=1)


def test_b_after_agent(host):
    pass


def test_c_command_hangs(host, ssh):
    if host.name == "hostA":
        ssh.run("sleep 60", timeout=1)


@pytest.mark.timeout(3)
def test_d_test_hangs(host):
    if host.name == "hostA":
        time.sleep(60)


def test_e_assertion(host):
    with open(RAN, "a") as f:
        f.write(host.name + "\\n")
    assert host.name != "hostA", "a finding, not the lab"


def test_f_host_goes_down(host, lab):
    if host.name == "hostB":
        next(s for s in lab.sim.sshds() if s.host == "hostB").stop()
        lab.ssh("hostB").close()
        lab.ssh("hostB").run("true")


def test_g_after_down(host):
    pass
'''


@pytest.mark.slow
def test_infra_errors_recheck_hosts_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "lab").mkdir()
    inventory = write_sim_inventory(tmp_path / "lab")
    ran = tmp_path / "ran.txt"
    suite = tmp_path / "test_infra_suite.py"
    suite.write_text(textwrap.dedent(SUITE.format(ran=str(ran))))
    alluredir = tmp_path / "allure"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS", "LABS_RUN_ID")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(suite), f"--inventory={inventory}", f"--alluredir={alluredir}",
         "-p", "no:cacheprovider", "-p", "no:randomly", "-rs", f"--rootdir={tmp_path}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout
    (tmp_path / "run.log").write_text(out + proc.stderr)
    try:
        results = allure_results.results(alluredir)
        attachments = {name: found[1] for name, found in allure_results.evidence(alluredir).items()}
        status = {name: r["status"] for name, r in results.items()}
        broken = [f"test_{x}[hostA]" for x in ("a_agent_hangs", "c_command_hangs", "d_test_hangs")]
        assert [status[t] for t in broken] == ["broken"] * 3, (status, out[-3000:])
        assert status["test_e_assertion[hostA]"] == "failed"
        assert status["test_f_host_goes_down[hostB]"] == "broken"
        passed = ["test_b_after_agent[hostA]", "test_g_after_down[hostA]", "test_a_agent_hangs[hostB]"]
        assert all(status[t] == "passed" for t in passed), status
        assert status["test_g_after_down[hostB]"] == "skipped", status
        skip = results["test_g_after_down[hostB]"]["statusDetails"]["message"]
        assert "host hostB unhealthy after an infrastructure error" in skip and "ssh" in skip, skip
        # messages say which kind of hang it was
        messages = [str(results[t]["statusDetails"]["message"]) for t in broken]
        assert "AgentWatchdogError" in messages[0] and "CommandTimeout" in messages[1], messages
        assert "TestTimeout" in messages[2] and "ran past its 3s timeout" in messages[2], messages
        # the next test on hostA came after a doctor recheck, each time
        for t in ("test_b_after_agent[hostA]", "test_e_assertion[hostA]"):
            assert "doctor recheck of hostA" in attachments[t], t
        assert "doctor recheck of hostA" not in attachments["test_f_host_goes_down[hostA]"]
        assert "connection retries" in attachments["test_f_host_goes_down[hostB]"]
        # an assertion is a finding: run once, never retried, no recheck
        assert ran.read_text().split() == ["hostA", "hostB"]
        categories = json.loads((alluredir / "categories.json").read_text())
        infra = [c for c in categories if c["name"].startswith("Lab infrastructure")]
        assert infra and "TestTimeout" in infra[0]["messageRegex"]
        # the terminal's account of it
        assert "lab infrastructure" in out
        assert "doctor recheck of hostB after test_infra_suite.py::test_f_host_goes_down[hostB]: unhealthy" in out
        assert "connection retries: " in out
        assert proc.returncode == 1
    finally:
        down = [str(Path(sys.executable).with_name("lab")), "sim", "down", "--inventory", str(inventory)]
        subprocess.run(down, env=env, capture_output=True)


def test_a_suspect_is_rechecked_once_per_incident_across_processes(tmp_path: Path) -> None:
    """Two workers of one run share the record: one of them rechecks, both see the verdict."""
    gw0, gw1 = HostWatch("labs-x", tmp_path), HostWatch("labs-x", tmp_path)
    assert gw1.recheck_if_suspect("hostA", lambda h: "never called") is None  # no file: nothing to do
    gw0.suspect(["hostA", "hostB"], "t::one", TimeoutError("hung"))
    calls: list[str] = []

    def doctor(host: str) -> str | None:
        calls.append(host)
        return "ssh: refused" if host == "hostB" else None

    first = gw1.recheck_if_suspect("hostA", doctor)
    assert first is not None and first.problem is None and first.after == "t::one"
    assert gw0.recheck_if_suspect("hostA", doctor) is None  # already claimed by gw1
    assert gw0.recheck_if_suspect("hostB", doctor) is not None
    assert calls == ["hostA", "hostB"]
    assert gw1.unhealthy("hostB") == "ssh: refused (after t::one)"
    assert gw1.unhealthy("hostA") is None
    gw0.remove()
    assert not gw0.path.exists()
