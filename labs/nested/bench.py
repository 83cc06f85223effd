"""Figures of the nested lab: build and up times, one live migration, and the framework's overhead.

`lab bench --only nested` (needs `lab nested up`); `--only up` times `up` itself
(restored and booted; needs the lab down). The overhead compares the
framework's migration scenario (`scenarios.migration.migrate_leg`: probe mark,
job monitoring thread, readback of both sides with the device view and the
probe's registers, metrics) and its bare mechanics (`virt.migrate.migrate`:
the job-monitoring thread alone) with the same libvirt calls made bare
(`migrateSetMaxDowntime` + `migrate3` with the same flags and params, on
connections opened beforehand). Legs alternate direction and kind, so both
directions and both kinds share the machine's load.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import libvirt

from labs.errors import InfraError
from labs.nested import lifecycle
from labs.nested.recipe import cache_root


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def build_figures() -> dict[str, Any]:
    """The cached image's build seconds and the last `up`'s seconds, as `up` recorded them."""
    out: dict[str, Any] = {}
    manifests = sorted(cache_root().glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if manifests:
        m = json.loads(manifests[-1].read_text())
        out["cold_build_s"] = m.get("build_seconds")
        out["build_stages_s"] = m.get("stage_seconds")
    up = lifecycle.run_dir() / "up.json"
    if up.is_file():
        out["last_up_s"] = json.loads(up.read_text()).get("seconds")
    return out


def bench_up() -> dict[str, Any]:
    """`up` then `down` three times: as it comes (restores, or boots and saves), restored, booted without snapshots.

    The image is reused, never rebuilt (it is shared); its build seconds come from its manifest.
    """
    if any(st.alive for st in lifecycle.status(check=lambda _vm: False)):
        return {"skipped": "the nested lab is up: `lab nested down` first (this step brings it up and down itself)"}
    out: dict[str, Any] = build_figures()
    runs: dict[str, Any] = {}
    for name, snapshots in (("first", "1"), ("warm", "1"), ("boot", "0")):
        before = os.environ.get("LABS_NESTED_SNAPSHOT")
        os.environ["LABS_NESTED_SNAPSHOT"] = snapshots
        t = time.monotonic()
        try:
            res = lifecycle.up()
            runs[name] = {"wall_s": round(time.monotonic() - t, 1), "how": res.how, "note": res.note, **res.seconds}
        finally:
            lifecycle.down()
            if before is None:
                os.environ.pop("LABS_NESTED_SNAPSHOT", None)
            else:
                os.environ["LABS_NESTED_SNAPSHOT"] = before
    out["runs"] = runs
    return out


def bench_nested(rounds: int = 3) -> dict[str, Any]:
    from labs.inventory import LabPair
    from labs.scenarios import save_resume as sr
    from labs.scenarios.context import Scenario
    from labs.scenarios.migration import migrate_leg
    from labs.session import LabSession, open_inventory
    from labs.virt.migrate import MigrationOptions, _params, migrate

    out: dict[str, Any] = build_figures()
    if not lifecycle.NESTED_INVENTORY.is_file() or not all(st.alive and st.ssh for st in lifecycle.status()):
        out["skipped"] = "the nested lab is not up (`lab nested up`)"
        return out
    inv = open_inventory(lifecycle.NESTED_INVENTORY)
    pair: LabPair = inv.pairs[0]
    downtime = inv.settings.max_downtime_ms
    with LabSession(inv) as session:
        sc = Scenario(session, "bench")
        try:
            vm = sr.start_vm(sc, pair.source, "bench")
            hvs = {
                pair.source.host.name: sc.hv(pair.source.host),
                pair.destination.host.name: sc.hv(pair.destination.host),
            }
            devices = {pair.source.host.name: pair.source, pair.destination.host.name: pair.destination}
            bare_conns = {name: libvirt.open(hv.uri) for name, hv in hvs.items()}
            times: dict[str, list[float]] = {"scenario": [], "mechanics": [], "bare": []}
            first: dict[str, Any] | None = None
            kinds = ["scenario", "bare", "mechanics", "bare"] * rounds
            for kind in kinds:
                here = vm.hv.name
                there = next(n for n in hvs if n != here)
                t0 = time.perf_counter()
                if kind == "scenario":
                    vm, leg = migrate_leg(sc, vm, devices[here], devices[there], scenario="bench")
                    ok, err = leg.result.ok, leg.result.error
                    if first is None and ok:
                        first = leg.result.summary()
                elif kind == "mechanics":
                    opts = MigrationOptions(timeout=inv.settings.timeouts.migration, max_downtime_ms=downtime)
                    result = migrate(vm, hvs[there], opts)
                    ok, err = result.ok, result.error
                    vm = vm.hv.vm(vm.name) if not ok else hvs[there].vm(vm.name)
                else:
                    params, flags = _params(hvs[there], MigrationOptions(timeout=0))
                    dom = bare_conns[here].lookupByName(vm.name)
                    if downtime:
                        dom.migrateSetMaxDowntime(downtime, 0)
                    try:
                        dom.migrate3(bare_conns[there], params, flags)
                        ok, err = True, None
                    except libvirt.libvirtError as exc:
                        ok, err = False, exc.get_error_message()
                    vm = hvs[there].vm(vm.name) if ok else vm
                elapsed = time.perf_counter() - t0
                if not ok:
                    raise InfraError(f"bench {kind} migration {here} -> {there} failed: {err}")
                times[kind].append(elapsed)
            for conn in bare_conns.values():
                conn.close()
        finally:
            sc.cleanup()
    bare = _median(times["bare"])
    out["migration"] = first
    out["wall_s"] = {k: {"median": _median(v), "all": [round(x, 3) for x in v]} for k, v in times.items()}
    for kind in ("scenario", "mechanics"):
        med = _median(times[kind])
        if bare and med:
            out[f"{kind}_overhead_pct"] = round(100 * (med - bare) / bare, 1)
    return out
