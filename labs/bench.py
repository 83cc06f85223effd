"""`lab bench`: the figures nightly runs care about, printed and kept in reports/bench.json.

Figures, never asserts: wall time of the sim-lab suites, xdist scaling over 1,
2 and 4 sim host pairs, agent operation latency against one ssh exec per
operation, and controller memory across a 1,000-test run. `--only nested`
adds the nested lab's figures (labs.nested.bench; the lab must be up), `--only mutants`
the checks' mutation score (`lab mutants`).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from labs.nested.phases import phase_rows, time_by_phase
from labs.paths import REPO_ROOT, REPORTS, SIM_INVENTORY, SUITES
from labs.session import open_inventory
from labs.simlab.generate import write_sim_inventory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return int(s.getsockname()[1])


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (/proc/stat's first line)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def proc_cpu_s(pid: int) -> float:
    """A local process's CPU seconds so far, user and system (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sshd_of(pid: int) -> int:
    """The sshd process a local process runs under (its connection's: the one that ciphers its channels)."""
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.index("(") + 1 : stat.rindex(")")].startswith("sshd"):
            return pid
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    raise LookupError("not under an sshd")


class CpuSplit:
    """CPU seconds per GiB moved by process: the controller (all its threads), the agent, its connection's sshd."""

    def __init__(self, agent_pid: int) -> None:
        self.pids = {"agent": agent_pid, "sshd": sshd_of(agent_pid)}

    def now(self) -> dict[str, float]:
        return {"controller": time.process_time(), **{k: proc_cpu_s(p) for k, p in self.pids.items()}}

    @staticmethod
    def per_gib(before: dict[str, float], after: dict[str, float], moved: int) -> dict[str, float]:
        return {k: round((after[k] - before[k]) / (moved / (1 << 30)), 2) for k in before}


def machine_busy(since: tuple[int, int]) -> float:
    """The fraction of all cores' time spent busy since `since` (1.0: every core all the time)."""
    busy, total = _cpu_ticks()
    return round((busy - since[0]) / max(1, total - since[1]), 2)


def _pytest(args: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    start = time.monotonic()
    rc = subprocess.call(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.monotonic() - start, rc


def bench_suite() -> dict[str, Any]:
    """Every suite on the embedded sim lab: one process, then two xdist workers (device groups)."""
    out = {}
    for workers in (0, 2):
        wall, rc = _pytest([str(SUITES), f"--inventory={SIM_INVENTORY}", *(["-n", str(workers)] if workers else [])])
        out["serial" if not workers else f"xdist_{workers}"] = {"wall_s": round(wall, 2), "pytest_exit": rc}
    return out


def bench_scaling(tmp: Path, suites: list[str]) -> dict[str, Any]:
    """The same suites over 1, 2 and 4 independent host pairs, one xdist worker per pair.

    Workers get whole device groups (labs.xdist_groups), so they never wait on each
    other; what is left is the machine: on a 2-core controller that also runs the
    sim hosts, 4 workers share 2 cores.
    """
    out: dict[str, Any] = {}
    for pairs in (1, 2, 4):
        work = tmp / f"pairs{pairs}"
        work.mkdir()
        inv = write_sim_inventory(work / "sim.yaml", work / "sim", _free_port(), pairs, devices=True)
        ticks = _cpu_ticks()
        wall, rc = _pytest([*suites, f"--inventory={inv}", "-n", str(pairs)])
        out[str(pairs)] = {"wall_s": round(wall, 2), "pytest_exit": rc, "machine_busy": machine_busy(ticks)}
        out[str(pairs)]["vs_one_pair"] = round(wall / out["1"]["wall_s"], 2)
    return out


STREAM_ROUNDS = 3


def bench_agent(tmp: Path, ops: int = 200) -> dict[str, Any]:
    """Agent round trips on one channel vs a fresh `ssh exec` per operation, on a private sim lab."""
    from labs.agentpool import agent_for
    from labs.session import LabSession
    from labs.vfio.client import AgentClient

    work = tmp / "agent"
    work.mkdir()
    inv = open_inventory(write_sim_inventory(work / "sim.yaml", work / "sim", _free_port(), 1, devices=True))
    with LabSession(inv) as session:
        ssh = session.ssh(inv.hosts[0].name)
        exec_times = _times(lambda: ssh.run("true"), ops // 4)
        result: dict[str, Any] = {"ssh_exec_per_op_ms": _summary(exec_times)}
        with agent_for(session, inv.hosts[0].name) as agent:
            result["agent_op_ms"] = _summary(_times(agent.ping, ops))
            result["agent_stream_mbps"] = round(agent.frames("blob", length=256 << 20).drain().mbps, 1)
            ticks = _cpu_ticks()
            split = CpuSplit(int(agent.info["pid"]))
            rounds = []
            cpu: dict[str, list[dict[str, float]]] = {"save": [], "raw": []}
            for _ in range(STREAM_ROUNDS):  # one round's ratio ranged 1.0-1.8x on an idle machine
                t0 = split.now()
                saved = _device_save(agent, ssh.name)
                t1 = split.now()
                # the raw copy right after the save, so both meet the same machine load
                rounds.append((saved, _raw_copy_mbps(ssh, 1 << 30)))
                t2 = split.now()
                cpu["save"].append(split.per_gib(t0, t1, saved["bytes"]))
                cpu["raw"].append(split.per_gib(t1, t2, 1 << 30))
            result["stream_machine_busy"] = machine_busy(ticks)
            # where the ratio comes from on a sim lab: every process here shares the controller's cores
            result["stream_cpu_s_per_gib"] = {
                what: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for what, runs in cpu.items()
            }
        result["stream_rounds"] = [{"save_mbps": s["mbps"], "raw_mbps": r} for s, r in rounds]
        result["device_save_1gib"] = {
            "bytes": rounds[0][0]["bytes"],
            "mbps": statistics.median(s["mbps"] for s, _r in rounds),
        }
        result["raw_ssh_copy_mbps"] = statistics.median(r for _s, r in rounds)
        result["stream_ratio"] = round(statistics.median(r / s["mbps"] for s, r in rounds), 2)
        start = time.perf_counter()
        with agent_for(session, inv.hosts[0].name):
            pass
        result["agent_reuse_ms"] = round((time.perf_counter() - start) * 1000, 3)
        fresh = _times(lambda: AgentClient.over_ssh(ssh, timeout=30).close(), 10)
        result["agent_start_ms"] = _summary(fresh)
    return result


def _device_save(agent: Any, host: str, size: int = 1 << 30) -> dict[str, Any]:
    """Save a v2 simulated device of `size` bytes through the agent: the stream the controller carries."""
    from labs.vfio.device import DeviceHandle

    with tempfile.TemporaryDirectory(prefix="labs-bench-") as state:
        dev = DeviceHandle.open_sim(agent, "labs.sim.v2:V2Driver", state, {"content_size": size}, name="bench")
        try:
            start = time.perf_counter()
            stream = dev.save()
            seconds = time.perf_counter() - start
            moved = stream.bytes
            stream.close()
        finally:
            dev.close()
    return {"bytes": moved, "seconds": round(seconds, 2), "mbps": round(moved / 1e6 / seconds, 1)}


def _raw_copy_mbps(ssh: Any, size: int) -> float:
    """The same number of bytes read raw from `head -c` over a channel of the same SSH connection."""
    chan = ssh.exec_channel(f"head -c {size} /dev/zero")
    got, start = 0, time.perf_counter()
    while True:
        data = chan.recv(1 << 20)
        if not data:
            break
        got += len(data)
    chan.close()
    return round(got / 1e6 / (time.perf_counter() - start), 1)


def bench_memory(tmp: Path, tests: int = 1000) -> dict[str, Any]:
    """Controller RSS sampled every 100 tests over a long run against the sim lab.

    Each test goes through what a lab test costs the controller: a device reservation, an agent
    borrowed from the pool, the device opened and its state read, Allure results written.
    """
    suite = tmp / "test_many.py"
    samples = tmp / "rss.jsonl"
    devices = len(open_inventory(SIM_INVENTORY).devices)
    suite.write_text(
        textwrap.dedent(
            f"""
            import pytest
            from labs.agentpool import open_device

            @pytest.mark.parametrize("i", range({-(-tests // devices)}))
            def test_many(lab, device, i):
                with open_device(lab, device) as dev:
                    assert dev.state()
            """
        )
    )
    growth_file = tmp / "growth.json"
    (tmp / "conftest.py").write_text(
        textwrap.dedent(
            f"""
            import json, tracemalloc
            seen = [0]
            warm = []
            def pytest_configure(config):
                tracemalloc.start(1)
            def pytest_runtest_teardown(item):
                seen[0] += 1
                if seen[0] % 100 == 0:
                    rss = int(open("/proc/self/statm").read().split()[1]) * 4096
                    with open({str(samples)!r}, "a") as f:
                        f.write(json.dumps({{"tests": seen[0], "rss_mb": round(rss / 2**20, 1)}}) + "\\n")
                if seen[0] == {tests // 5}:
                    warm.append(tracemalloc.take_snapshot())
            def pytest_sessionfinish(session):
                if not warm:
                    return
                by = {{}}
                for stat in tracemalloc.take_snapshot().compare_to(warm[0], "filename"):
                    name = stat.traceback[0].filename
                    where = next((v for k, v in {GROWTH_GROUPS!r}.items() if k in name), "other")
                    by[where] = by.get(where, 0) + stat.size_diff
                with open({str(growth_file)!r}, "w") as f:
                    json.dump({{k: round(v / 1024, 1) for k, v in by.items()}}, f)
            """
        )
    )
    args = [str(suite), f"--inventory={SIM_INVENTORY}", f"--rootdir={tmp}", f"--alluredir={tmp / 'allure'}"]
    wall, rc = _pytest(args)
    points = [json.loads(line) for line in samples.read_text().splitlines()] if samples.exists() else []
    rss = [p["rss_mb"] for p in points]
    # growth after warm-up (the first samples include imports and the first agents)
    growth = round(rss[-1] - rss[len(rss) // 5], 1) if len(rss) >= 5 else None
    return {
        "tests": len(points) * 100,
        "wall_s": round(wall, 1),
        "pytest_exit": rc,
        "rss_mb": points,
        "growth_after_warmup_mb": growth,
        # where the growth was allocated (tracemalloc, after warm-up): pytest keeps every test's reports
        "growth_kib_by_allocator": json.loads(growth_file.read_text()) if growth_file.exists() else {},
    }


# Allocation sites the memory figure splits growth by (a path containing the key).
GROWTH_GROUPS = {"/labs/": "this framework", "/_pytest/": "pytest", "/pluggy/": "pytest", "/allure": "allure"}


def _times(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _summary(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"p50": round(statistics.median(ms), 2), "p95": round(ms[int(len(ms) * 0.95) - 1], 2), "n": len(ms)}


def bench_up() -> dict[str, Any]:
    """`lab nested up` restored from its snapshot and booted, each followed by `down` (the lab must be down)."""
    from labs.nested.bench import bench_up as run

    return run()


def bench_nested() -> dict[str, Any]:
    """Build/up times, one live migration's libvirt figures, the framework's overhead (needs `lab nested up`)."""
    from labs.nested.bench import bench_nested as run

    return run()


def bench_phases(results: Path | None = None) -> dict[str, Any]:
    """Where the last nested run's time went, by phase and by test file (its Allure results)."""
    results = results or NESTED_ALLURE
    found = time_by_phase(results)
    return found if found["tests"] else {"skipped": f"no Allure results under {results} (tox -e nested writes them)"}


def bench_mutants() -> dict[str, Any]:
    """`lab mutants` in full: the checks' mutation score and its run time (reports/mutants.md lists survivors)."""
    from labs.mutation.runner import run_mutants

    run_mutants(Console(quiet=True), threshold=0)
    summary = json.loads((REPORTS / "mutants.json").read_text())["summary"]
    keys = ("total", "killed", "survived", "timeout", "equivalent", "score", "wall_s", "jobs")
    return {"run": {k: summary[k] for k in keys}}


# up: a few minutes of nested lab ups (the lab down); nested: minutes, and needs `lab nested up`;
# mutants: 10-20 minutes. Only when named with --only.
OPT_IN = ("up", "nested", "mutants")
STEPS = ("suite", "scaling", "agent", "memory", "phases", "up", "nested", "mutants")
NESTED_ALLURE = REPORTS / "nested" / "allure"
# The figures before issue 17's work (README, 2026-11-25/26 and the last CI run), shown beside the new ones.
BASELINES: dict[str, str] = {
    "warm_up": "73-90 s (booted)",
    "cold_up": "191 s (build 109 s + boot 67 s + setup 16 s)",
    "stream": "2.1x (118 vs 251 MB/s)",
    "ci": "2489 s one environment after another (2026-12-04: lint 26, tests 316, defects 137, nested 2010); "
    "1425 s when issue 17 was filed",
}
CI_ENVS = ("lint", "tests", "defects", "nested")


def record_ci(journal: Path, wall_s: float, exit_code: int) -> dict[str, Any]:
    """`./lab test`'s own figures, written into reports/bench.json: its wall time and each tox environment's
    duration from tox's result journal (`--result-json`). `lab bench` cannot time CI itself: CI is that run."""
    try:
        data = json.loads(journal.read_text())
    except (OSError, ValueError):
        data = {}
    envs = {
        name: round(float(env["result"]["duration"]), 1)
        for name, env in (data.get("testenvs") or {}).items()
        if name in CI_ENVS and "duration" in (env.get("result") or {})
    }
    found = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(wall_s, 1)}
    found |= {"exit": exit_code, "envs": envs}
    out = REPORTS / "bench.json"
    before = json.loads(out.read_text()) if out.exists() else {}
    REPORTS.mkdir(exist_ok=True)
    out.write_text(json.dumps({**before, "ci": found}, indent=2))
    return found


def run_bench(console: Console, only: list[str] | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="labs-bench-") as d:
        tmp = Path(d)
        steps: dict[str, Callable[[], Any]] = {
            "suite": bench_suite,
            "scaling": lambda: bench_scaling(tmp, [str(SUITES / s) for s in ("conformance",) if (SUITES / s).is_dir()]
                                             or [str(SUITES / "smoke")]),
            "agent": lambda: bench_agent(tmp),
            "memory": lambda: bench_memory(tmp),
            "phases": bench_phases,
            "up": bench_up,
            "nested": bench_nested,
            "mutants": bench_mutants,
        }  # fmt: skip
        for name, step in steps.items():
            if (only and name not in only) or (name in OPT_IN and not (only and name in only)):
                continue
            console.print(f"bench {name} ...")
            results[name] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **step()}
    REPORTS.mkdir(exist_ok=True)
    out = REPORTS / "bench.json"
    if only and out.exists():
        # --only refreshes some figures: the others stay as they were measured (each step has its date)
        results = {**json.loads(out.read_text()), **results}
    out.write_text(json.dumps(results, indent=2))
    table = Table(title="labs benchmarks (reports/bench.json has every figure)")
    table.add_column("figure")
    table.add_column("value")
    for row in headline(results):
        table.add_row(*row)
    console.print(table)
    return results


def _runs(step: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """A step's runs (its other keys, like the date, are not runs)."""
    return [(k, v) for k, v in (step or {}).items() if isinstance(v, dict)]


def headline(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures a README table shows, one row each."""
    rows: list[tuple[str, str]] = []
    for mode, r in _runs(results.get("suite")):
        rows.append(
            (f"all suites on the sim lab, {mode.replace('_', ' ')}", f"{r['wall_s']:.0f} s (exit {r['pytest_exit']})")
        )
    for pairs, r in _runs(results.get("scaling")):
        busy = f", machine {r['machine_busy']:.0%} busy" if "machine_busy" in r else ""
        rows.append(
            (
                f"conformance over {pairs} sim pair(s), {pairs} worker(s)",
                f"{r['wall_s']:.0f} s ({r['vs_one_pair']}x one pair{busy})",
            )
        )
    agent = results.get("agent")
    if agent:
        a, e = agent["agent_op_ms"], agent["ssh_exec_per_op_ms"]
        rows.append(
            ("agent op p50 / p95 vs one ssh exec per op", f"{a['p50']} / {a['p95']} ms vs {e['p50']} / {e['p95']} ms")
        )
        d = agent["device_save_1gib"]
        rounds = agent.get("stream_rounds") or [d]
        ratio = agent.get("stream_ratio") or round(agent["raw_ssh_copy_mbps"] / d["mbps"], 2)
        rows.append(
            (
                "1 GiB device save through the agent vs raw SSH copy",
                f"{ratio}x ({d['mbps']} vs {agent['raw_ssh_copy_mbps']} MB/s, median of {len(rounds)}); "
                f"before {BASELINES['stream']}",
            )
        )
        split = agent.get("stream_cpu_s_per_gib")
        if split:
            s, r = split["save"], split["raw"]
            rows.append(
                (
                    "CPU-s per GiB, save vs raw copy (controller + agent with the sim device + sshd)",
                    f"{s['controller']} + {s['agent']} + {s['sshd']} = {round(sum(s.values()), 2)} vs "
                    f"{r['controller']} + {r['agent']} + {r['sshd']} = {round(sum(r.values()), 2)}",
                )
            )
    ups: dict[str, Any] = (results.get("up") or {}).get("runs") or {}
    for name, label, base in (("warm", "restored", "warm_up"), ("boot", "booted, no snapshot", "warm_up")):
        u = ups.get(name)
        if u:
            rows.append((f"nested lab `up`, {label}", f"{u['wall_s']} s ({u['how']}); before {BASELINES[base]}"))
    first = ups.get("first")
    if first and first.get("how") == "booted":
        rows.append(("nested lab `up` booted and saved (first after a build)", f"{first['wall_s']} s"))
    ci = results.get("ci")
    if ci:
        envs = ", ".join(f"{k} {v:.0f}" for k, v in ci["envs"].items())
        rows.append(
            (
                "`./lab test` (CI's command)",
                f"{ci['wall_s']:.0f} s ({envs}; exit {ci['exit']}); before {BASELINES['ci']}",
            )
        )
    phases = results.get("phases") or {}
    if phases.get("skipped"):
        rows.append(("time by phase of the last nested run", phases["skipped"]))
    elif phases:
        rows += phase_rows(phases)
    mut = (results.get("mutants") or {}).get("run")
    if mut:
        rows.append(
            (
                f"mutation score of the checks ({mut['total']} mutants, {mut['jobs']} workers)",
                f"{mut['score']} % ({mut['killed']} killed, {mut['survived']} survived, {mut['timeout']} timed out, "
                f"{mut['equivalent']} equivalent) in {mut['wall_s']:.0f} s",
            )
        )
    mem = results.get("memory")
    if mem and mem["rss_mb"]:
        first, last = mem["rss_mb"][0], mem["rss_mb"][-1]
        span = f"{first['rss_mb']} MB at test {first['tests']}, {last['rss_mb']} MB at test {last['tests']}"
        rows.append((f"controller RSS over {mem['tests']} tests", f"{span}, +{mem['growth_after_warmup_mb']} MB"))
        by = mem.get("growth_kib_by_allocator") or {}
        if by:
            rows.append(("growth after warm-up by allocation site", ", ".join(f"{k} {v} KiB" for k, v in by.items())))
    return rows
