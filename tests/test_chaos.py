"""Killed runs leave nothing behind that `lab janitor` does not remove; the next run passes.

Each round starts the save_resume and recovery suites on a private sim lab, SIGKILLs the
whole process group at a random point once tests are running, runs `lab janitor` and then
looks for anything of the killed run: domains and save images named after its run id,
reservation records and held locks, agents, sshd and any other process of the sim lab,
firewall rules with its tag, its run marks. A final normal run must pass.

LABS_CHAOS_SEED=<int> replays a failing sequence (the seed is in every assertion message).
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest
import yaml

from labs.faults.network import rule_tag
from labs.paths import REPO_ROOT, SUITES
from labs.virt.domain import REMOTE_IMAGE_DIR
from tests.chaos import LAB, chaos_env, chaos_run_id, chaos_seed, images_dir, kill_when, log_shows_a_result, run_marks
from tests.conftest import write_sim_inventory

ROUNDS = 3
SUITE_ARGS = [str(SUITES / "save_resume"), str(SUITES / "recovery"), "-p", "no:cacheprovider", "-q"]

pytestmark = pytest.mark.slow


def _lab_processes(sim_dir: Path) -> list[str]:
    """Every process that serves this sim lab: sshd (its config is in the sim dir) and whatever
    runs under it (agents, reservation holders: the sim sshd gives them LABS_SIM_DIR)."""
    out = []
    marker = str(sim_dir).encode()
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker in cmdline or b"LABS_SIM_DIR=" + marker + b"\0" in environ + b"\0":
            args = cmdline.replace(b"\0", b" ").decode(errors="replace")
            out.append(f"pid {proc.name}: {args[:120]}")
    return out


def _held(lock: Path) -> bool:
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _firewall(tag: str) -> list[str]:
    out = []
    if os.geteuid() == 0 and shutil.which("nft"):
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        out += [f"nft {line}" for line in tables.splitlines() if tag in line]
    for tool in ("iptables", "ip6tables"):
        if os.geteuid() == 0 and shutil.which(tool):
            rules = subprocess.run([tool, "-S", "INPUT"], capture_output=True, text=True).stdout
            out += [f"{tool} {line}" for line in rules.splitlines() if tag in line]
    return out


def leftovers(inventory: Path, sim_dir: Path, run_id: str) -> list[str]:
    out = [f"process {p}" for p in _lab_processes(sim_dir)]
    out += [f"reservation record {o.name}" for o in sim_dir.glob("hosts/*/locks/*.owner")]
    out += [f"held lock {lk.name}" for lk in sim_dir.glob("hosts/*/locks/*.lock") if _held(lk)]
    for images in (images_dir(inventory), Path(REMOTE_IMAGE_DIR)):
        out += [f"image {p}" for p in images.glob(f"{run_id}*")] if images.exists() else []
    out += run_marks(run_id)
    for name, host in yaml.safe_load(inventory.read_text())["hosts"].items():
        conn = libvirt.open(host["libvirt_uri"])
        try:
            out += [f"domain {name}/{d.name()}" for d in conn.listAllDomains() if d.name().startswith(run_id)]
        finally:
            conn.close()
    out += [f"firewall {r}" for r in _firewall(rule_tag(run_id, ""))]
    return out


def test_killed_runs_leave_nothing_the_janitor_misses(tmp_path: Path) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    inventory = write_sim_inventory(tmp_path, devices=True)
    sim_dir = tmp_path / "sim"
    try:
        for n in range(ROUNDS):
            run_id = chaos_run_id(rng)
            delay = rng.uniform(0.0, 5.0)
            what = f"seed {seed}, round {n + 1}, run {run_id}, killed {delay:.1f}s after the first test"
            log = tmp_path / f"round{n + 1}.log"
            args = [*SUITE_ARGS, "--inventory", str(inventory)]
            outcome = kill_when(args, chaos_env(run_id, images_dir(inventory)), log, log_shows_a_result(log), delay)
            janitor = subprocess.run(
                [LAB, "janitor", "--inventory", str(inventory)],
                env=chaos_env(None, images_dir(inventory)),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert janitor.returncode == 0, f"{what}: lab janitor failed: {janitor.stdout}{janitor.stderr}"
            assert "janitor:" in janitor.stdout, janitor.stdout
            left = leftovers(inventory, sim_dir, run_id)
            assert not left, f"{what} ({outcome}); janitor said:\n{janitor.stdout}\nleft: {left}"
        final = subprocess.run(
            [sys.executable, "-m", "pytest", *SUITE_ARGS, "--inventory", str(inventory), "--lab-device", "*:simv2"],
            cwd=REPO_ROOT,
            env=chaos_env(None, images_dir(inventory)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert final.returncode == 0, f"seed {seed}: the run after the kills failed:\n{final.stdout[-4000:]}"
        assert not _lab_processes(sim_dir), "a normal run left processes of the sim lab"
    finally:
        down = [LAB, "sim", "down", "--inventory", str(inventory)]
        subprocess.run(down, env=chaos_env(None, images_dir(inventory)), capture_output=True)
