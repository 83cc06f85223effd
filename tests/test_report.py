"""Allure output: labels, environment, categories, no secrets, and the rendered HTML in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from labs.attachments import REDACTED, redact, register_secret_env

KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----"
)


def test_redact_scrubs_keys_assignments_and_registered_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABS_TEST_PASSPHRASE", "correct-horse-battery")
    register_secret_env(["LABS_TEST_PASSPHRASE"])
    text = f"key:\n{KEY}\npassword=hunter2 token: abc123 ok=1\nsaid correct-horse-battery twice"
    out = redact(text)
    for secret in ("b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ", "hunter2", "abc123", "correct-horse-battery"):
        assert secret not in out
    assert out.count(REDACTED) == 4 and "ok=1" in out


SUITE = """
import os
from labs.attachments import attach

def test_leaky(host):
    secrets = {"key": os.environ["LEAK_KEY"], "pp": os.environ["LEAK_PP"]}
    attach("transcript", {"note": "password=hunter2", **secrets}, "json")
    attach("log", "login with token: s3cr3t-t0ken")
"""


def test_no_secret_reaches_the_results(
    pytester: pytest.Pytester, sim_inventory_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    doc = yaml.safe_load(sim_inventory_file.read_text())
    doc["hosts"]["hostA"]["identity_passphrase_env"] = "LEAK_PP"
    inventory = pytester.path / "lab.yaml"
    inventory.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("LEAK_KEY", KEY)
    monkeypatch.setenv("LEAK_PP", "passphrase-value-42")
    pytester.makepyfile(test_leak=SUITE)
    results = pytester.path / "results"
    result = pytester.runpytest_subprocess(
        "--inventory", str(inventory), f"--alluredir={results}", "--lab-host", "hostA"
    )
    result.assert_outcomes(passed=1)
    blob = "".join(p.read_text(errors="replace") for p in results.iterdir() if p.is_file())
    for secret in ("hunter2", "s3cr3t-t0ken", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ", "passphrase-value-42"):
        assert secret not in blob
    assert REDACTED in blob
    env = (results / "environment.properties").read_text()
    assert "hostA.kernel=" in env and "labs.version=" in env
    categories = json.loads((results / "categories.json").read_text())
    assert [c["name"].split(" ")[0] for c in categories] == ["Host", "Lab", "Driver", "Framework"]
    labels = next(json.loads(p.read_text())["labels"] for p in results.glob("*-result.json"))
    assert {"name": "lab_host", "value": "hostA"} in labels
    assert {"name": "epic", "value": "VFIO device migration"} in labels
    lab = str(doc.get("lab", {}).get("name", "lab"))
    assert {"name": "lab", "value": lab} in labels  # the environment of a report over several labs


def test_rendered_report_shows_the_run_in_chromium(pytester: pytest.Pytester, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (./lab test installs it as root)")
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed (./lab installs it as root)")
    from labs.reporting.render import render

    pytester.makepyfile(
        test_statuses="""
        import pytest
        def test_passes(): pass
        def test_fails(): assert 1 == 2
        @pytest.mark.skip(reason="not applicable here")
        def test_skipped(): pass
        """
    )
    run_dir = tmp_path / "run"
    pytester.runpytest_subprocess(f"--alluredir={run_dir / 'allure-results'}")
    rendered = render(run_dir, "labs report test", history=tmp_path / "history.jsonl")
    dom = _chromium_dom(chromium, rendered.single.as_uri(), tmp_path / "chromium", until=("Passed",))
    assert "labs report test" in dom
    for word in ("Passed", "Failed", "Skipped"):
        assert word in dom, f"{word} not shown in the rendered report"
    from labs.paths import REPORTS

    shot = REPORTS / "report-screenshot.png"
    shot.parent.mkdir(exist_ok=True)
    subprocess.run([chromium, *_chromium_flags(tmp_path / "chromium"), f"--screenshot={shot.resolve()}",
                    rendered.single.as_uri()], capture_output=True, timeout=120)  # fmt: skip
    assert shot.exists() and shot.stat().st_size > 10_000


OPENED = """
import allure

def test_reads_back_the_registers():
    with allure.step("read back the UART scratch register"):
        pass
    allure.attach("<domain/>", name="domain xml of the guest")

def test_migration_fails():
    assert 1 == 2, "the destination refused the stream"
"""


def _chromium_flags(profile: Path) -> list[str]:
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--window-size=1400,1000",
    ]  # fmt: skip


def _chromium_dom(chromium: str, url: str, profile: Path, until: tuple[str, ...] = ()) -> str:
    """The page's DOM once it shows every text in `until`, or the third dump's."""
    flags = _chromium_flags(profile)
    for _ in range(3):  # a loaded machine can dump the page before the report's data has rendered: look again
        dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        if all(text in dom for text in until):
            break
    return dom


def test_report_open_serves_real_content_in_chromium(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """`lab report --open` serves the full report (which needs HTTP) and prints its URL; the page of a
    test shows its name, its step and its attachment; the single file shows the same from file://."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (./lab test installs it as root)")
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed (./lab installs it as root)")
    from labs.reporting.render import render

    pytester.makepyfile(test_opened=OPENED)
    run_dir = tmp_path / "run"
    pytester.runpytest_subprocess(f"--alluredir={run_dir / 'allure-results'}")
    rendered = render(run_dir, "labs open test", history=tmp_path / "history.jsonl")
    ids = {}
    for path in (run_dir / "html" / "awesome" / "data" / "test-results").glob("*.json"):
        doc = json.loads(path.read_text())
        ids[doc["name"]] = doc["id"]
    page = "#/" + ids["test_reads_back_the_registers"]
    # BROWSER=true: the command "opens a browser" that does nothing; chromium below is the browser
    proc = subprocess.Popen(
        [sys.executable, "-m", "labs.cli", "report", "--open", str(run_dir)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "BROWSER": "true"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), line
        url = line.split()[1]
        overview = _chromium_dom(chromium, url, tmp_path / "chromium", until=("test_migration_fails",))
        assert "test_reads_back_the_registers" in overview and "test_migration_fails" in overview
        served = _chromium_dom(chromium, url + page, tmp_path / "chromium", until=("domain xml of the guest",))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)  # Ctrl-C ends it (also when started with SIGINT ignored, as in a background job)
        except subprocess.TimeoutExpired:
            proc.kill()  # nothing left behind; the test still fails
            raise
    single = _chromium_dom(
        chromium, rendered.single.as_uri() + page, tmp_path / "chromium", until=("domain xml of the guest",)
    )
    for dom, how in ((served, "served"), (single, "single file")):
        for text in ("test_reads_back_the_registers", "read back the UART scratch register", "domain xml of the guest"):
            assert text in dom, f"{text!r} not on the {how} page"


def test_two_renders_at_once_install_the_report_tool_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two xdist workers ran `npm ci` together; the second failed with ENOTEMPTY while the first filled node_modules."""
    from labs.reporting import render as rendering

    tools, calls = tmp_path / "report", []
    tools.mkdir()
    monkeypatch.setattr(rendering, "TOOLS", tools)
    monkeypatch.setattr(rendering, "ALLURE_BIN", tools / "node_modules" / ".bin" / "allure")
    monkeypatch.setattr(rendering.shutil, "which", lambda name: f"/usr/bin/{name}")

    def npm_ci(*_a: object, **_k: object) -> subprocess.CompletedProcess[str]:
        calls.append(threading.get_ident())
        time.sleep(0.3)  # the window a second install fell into
        rendering.ALLURE_BIN.parent.mkdir(parents=True)
        rendering.ALLURE_BIN.write_text("")
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(rendering.subprocess, "run", npm_ci)
    with ThreadPoolExecutor(2) as pool:
        found = list(pool.map(lambda _: rendering.ensure_allure(), range(2)))
    assert found == [rendering.ALLURE_BIN] * 2 and len(calls) == 1
