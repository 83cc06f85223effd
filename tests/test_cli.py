"""The `lab` command: one-line errors, inventory check, doctor, sim lab lifecycle."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from labs.cli import main
from labs.paths import INVENTORIES, REPO_ROOT
from tests.conftest import FOREVER_S, HANG_S


def lab(*args: str) -> subprocess.CompletedProcess[str]:
    """The real console script, so stderr and exit codes are what a user sees."""
    return subprocess.run([sys.executable, "-m", "labs.cli", *args], capture_output=True, text=True, timeout=120)


def test_inventory_check_ok() -> None:
    result = CliRunner().invoke(main, ["inventory", "check", str(INVENTORIES / "example-ansible.yaml")])
    assert result.exit_code == 0, result.output
    assert "ok (ansible shape): 2 hosts, 2 devices, 2 pairs" in result.output
    assert "pair hostA->hostB:mtty-2" in result.output


def test_inventory_check_bad_is_one_line_on_stderr(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  b:\n    address: 10.0.0.1\n    devices:\n      - {kind: pci, protocol: v2}\n")
    result = lab("inventory", "check", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"error: {bad}:5: hosts.b.devices[0].pci: required key is missing\n"


def test_doctor_on_the_sim_lab(sim_inventory_file: Path) -> None:
    result = lab("doctor", "--inventory", str(sim_inventory_file))
    assert result.returncode == 0, result.stdout + result.stderr
    for word in ("hostA", "hostB", "ssh", "python", "kernel", "libvirt", "all hosts healthy"):
        assert word in result.stdout


def test_sim_up_status_down(tmp_path: Path) -> None:
    from tests.conftest import write_sim_inventory

    inv = str(write_sim_inventory(tmp_path))
    try:
        up = lab("sim", "up", "--inventory", inv)
        assert up.returncode == 0, up.stderr
        assert "hostA: sshd pid" in up.stdout
        status = lab("sim", "status", "--inventory", inv)
        assert "users: cli" in status.stdout and "down" not in status.stdout
    finally:
        down = lab("sim", "down", "--inventory", inv)
    assert down.stdout.strip() == "stopped"
    assert "hostA: down" in lab("sim", "status", "--inventory", inv).stdout


def test_bootstrap_installs_the_nested_host_packages() -> None:
    """`./lab nested ...` installs exactly what labs.nested says the controller needs."""
    from labs.nested import HOST_PACKAGES

    script = (REPO_ROOT / "lab").read_text()
    line = next(ln for ln in script.splitlines() if "qemu-system-x86" in ln)
    listed = line.split("(", 1)[1].rsplit(")", 1)[0].split()
    assert sorted(listed) == sorted(HOST_PACKAGES)


def test_janitor_after_a_clean_lab(sim_inventory_file: Path) -> None:
    result = lab("janitor", "--inventory", str(sim_inventory_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "janitor: nothing left over" in result.stdout


def test_lab_test_runs_the_nested_stage_beside_the_others_at_the_lowest_priority() -> None:
    """`./lab test`: tox p with the nested stage first; every command of the others through labs.lowprio,
    and the tests environment keeps off the lab the nested stage owns."""
    import configparser

    import labs.cli as cli

    assert cli.DEFAULT_TOX[0] == "p" and cli.DEFAULT_TOX[-1].split(",")[0] == "nested"
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(REPO_ROOT / "tox.ini")
    envs = [e for e in cli.DEFAULT_TOX[-1].split(",") if e != "nested"]
    assert sorted(envs) == ["defects", "lint", "tests"]
    for env in envs:
        commands = [c.strip() for c in ini[f"testenv:{env}"]["commands"].splitlines() if c.strip()]
        assert commands and all(c.startswith("python -m labs.lowprio ") for c in commands), env
    assert "LABS_NESTED_LIVE = 0" in ini["testenv:tests"]["setenv"]
    assert "lowprio" not in ini["testenv:nested"]["commands"]


def test_lowprio_runs_the_command_niced_in_a_session_of_its_own(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = f"echo $(nice) $(ps -o sid= -p $$) $$ > {out}; exit 7"
    rc = subprocess.run([sys.executable, "-m", "labs.lowprio", "sh", "-c", script], cwd=REPO_ROOT).returncode
    nice, sid, pid = out.read_text().split()
    assert rc == 7 and nice == "19" and sid == pid  # the command leads its own session (its own autogroup)
    autogroup = Path("/proc/self/autogroup")
    if autogroup.exists():
        probe = subprocess.run(
            [sys.executable, "-m", "labs.lowprio", "cat", "/proc/self/autogroup"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        assert probe.stdout.split()[-1] == "19", probe.stdout


def test_lowprio_passes_a_signal_on_and_says_what_cannot_run() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "labs.lowprio", "sleep", str(FOREVER_S)], cwd=REPO_ROOT)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + HANG_S
    while not children.read_text().strip() and time.monotonic() < deadline:  # its handlers come before the child
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=HANG_S) == 128 + signal.SIGTERM
    res = subprocess.run(
        [sys.executable, "-m", "labs.lowprio", "no-such-command-here"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert res.returncode == 127 and "cannot run no-such-command-here" in res.stderr


def test_lowprio_ends_the_command_when_its_caller_dies_without_a_word(tmp_path: Path) -> None:
    """The command has a session of its own: a caller killed outright (tox SIGKILLed) must not leave it running."""
    pidfile = tmp_path / "pid"
    wrapped = f"{sys.executable} -m labs.lowprio sh -c 'echo $$ > {pidfile}; exec sleep {FOREVER_S}'"
    caller = subprocess.Popen(["sh", "-c", f"{wrapped} & wait"], cwd=REPO_ROOT)
    deadline = time.monotonic() + HANG_S
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    command = int(pidfile.read_text())
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + HANG_S
    try:
        while Path(f"/proc/{command}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{command}").exists(), "the command outlived its caller"
    finally:
        _kill({command}, b"sleep")


def _descendants(pid: int) -> set[int]:
    found, todo = set[int](), [pid]
    while todo:
        try:
            tasks = list(Path(f"/proc/{todo.pop()}/task").iterdir())
        except OSError:  # it exited after its parent named it
            continue
        for task in tasks:
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += kids - found
            found |= kids
    return found


def _sshds(pids: set[int]) -> set[int]:
    """The sim hosts' listening sshds: a connection's sshd, forked by one, has the same command line at first."""

    def cmdline(p: int) -> bytes:
        try:
            return Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            return b""

    sshds = {p for p in pids if b"sshd_config" in cmdline(p)}
    return sshds - set().union(*(_descendants(p) for p in sshds))


def test_sigterm_ends_a_command_with_its_cleanup_no_sim_sshd_left() -> None:
    """`lab defects` killed politely (tox, CI, a lab engineer's `kill`) stops its private sim lab's sshds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "labs.cli", "defects", "V1Accepts101"],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, sshds = time.monotonic() + HANG_S, set[int]()
    while len(sshds) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        sshds = _sshds(_descendants(proc.pid))
    assert len(sshds) == 2, "the private sim lab's two sshds did not start"
    # sshd retitles itself "sshd: /usr/sbin/sshd -D -e -f <work>/sim/hosts/<host>/sshd_config [listener] ..."
    found = re.search(rb"-f (\S+)/sim/hosts/", Path(f"/proc/{min(sshds)}/cmdline").read_bytes())
    assert found, "no sshd_config path on the sim sshd's command line"
    work = Path(found.group(1).decode())
    everything = _descendants(proc.pid)  # the sshds, the pytest runs, their agents
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=HANG_S) == 128 + signal.SIGTERM
    deadline = time.monotonic() + HANG_S
    while any(_running(p) for p in everything) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in sshds if _running(p)], "a sim sshd outlived `lab defects`"
    assert not [p for p in everything if _running(p)], "a process outlived `lab defects`"
    assert not work.exists(), f"{work} outlived `lab defects`"


def _kill(pids: set[int], mark: bytes) -> None:
    """What a failed test leaves running goes down with it: those still running with `mark` on their command line
    (a gone one's pid may be another process's by now)."""
    for pid in pids:
        try:
            if _running(pid) and mark in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:  # gone meanwhile (ProcessLookupError among them)
            pass


def _running(pid: int) -> bool:
    """Alive and not a zombie: a dead child waits for its reaper (init, once reparented), holding nothing."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_sigterm_ends_a_pytest_run_through_its_teardown_no_sim_sshd_left(tmp_path: Path) -> None:
    """pytest SIGTERMed (tox, CI, the nested stage's budget, `lab defects` ending its runs) tears down as after
    Ctrl-C: its sim lab's sshds go with it (by default SIGTERM killed it where it stood, and they stayed)."""
    from tests.conftest import write_sim_inventory

    inventory = write_sim_inventory(tmp_path)
    ready = tmp_path / "ready"
    test = tmp_path / "test_waits.py"
    test.write_text(
        "import pathlib, time\n\n"
        "def test_waits(lab):\n"
        "    lab.ssh('hostA').run('true')\n"
        f"    pathlib.Path({str(ready)!r}).touch()\n"
        f"    time.sleep({FOREVER_S})\n"
    )
    cmd = [sys.executable, "-m", "pytest", str(test), f"--inventory={inventory}", "--lab-no-doctor", "-q"]
    proc = subprocess.Popen(
        [*cmd, "-p", "no:randomly", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + HANG_S
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    sshds = _sshds(_descendants(proc.pid))
    if not ready.exists():
        proc.kill()
        _kill(sshds, b"sshd_config")
        pytest.fail(f"the run never reached its test: {proc.communicate()[0].decode()[-2000:]}")
    try:
        assert len(sshds) == 2, "the sim lab's two sshds are not the run's"
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=HANG_S)[0].decode()
        assert proc.returncode == pytest.ExitCode.INTERRUPTED, out[-2000:]
        deadline = time.monotonic() + HANG_S
        while any(_running(p) for p in sshds) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in sshds if _running(p)], "a sim sshd outlived the SIGTERMed pytest run"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill(sshds, b"sshd_config")
