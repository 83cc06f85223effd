"""Where a run's time went, from its Allure results: by phase, by test file, fixtures apart."""

from __future__ import annotations

import json
from pathlib import Path

from labs.bench import bench_phases, headline
from labs.nested.phases import OTHER_STEPS, OUTSIDE_STEPS, phase_of, time_by_phase


def _step(name: str, start: int, seconds: float) -> dict[str, object]:
    return {"name": name, "start": start, "stop": start + int(seconds * 1000)}


def _write(d: Path) -> None:
    steps = [_step("start nested-a/labs-x", 0, 6), _step("migrate labs-x nested-a -> nested-b", 6000, 16),
             _step("readback after migrate: labs-x", 22000, 2), _step("note the seed", 24000, 1)]  # fmt: skip
    test = {"fullName": "suites.migration.test_live_migration#test_migrate", "start": 0, "stop": 30000, "steps": steps}
    (d / "a-result.json").write_text(json.dumps(test))
    (d / "b-result.json").write_text(
        json.dumps({"fullName": "tests.nested.test_nested_chaos#test_chaos", "start": 40000, "stop": 100000})
    )
    (d / "c-result.json").write_text('{"start": 1')  # cut short by a killed run: skipped, not fatal
    (d / "d-container.json").write_text(
        json.dumps({"befores": [_step("pair", 0, 1.5)], "afters": [_step("scenario::1", 0, 3)]})
    )


def test_time_goes_to_phases_by_step_name_and_the_rest_is_outside_steps(tmp_path: Path) -> None:
    _write(tmp_path)
    found = time_by_phase(tmp_path)
    assert found["tests"] == 2 and found["wall_s"] == 100.0 and found["test_bodies_s"] == 90.0
    phases = found["phases"]
    assert phases["migration jobs"] == {"s": 16.0, "count": 1}
    assert phases["VM starts"] == {"s": 6.0, "count": 1}
    assert phases["readbacks"] == {"s": 2.0, "count": 1}
    assert phases[OTHER_STEPS] == {"s": 1.0, "count": 1}
    assert phases[OUTSIDE_STEPS]["s"] == 65.0  # 5 s of the migration test outside its steps, the chaos test's 60 s
    assert next(iter(phases)) == OUTSIDE_STEPS  # longest first
    assert found["by_file"] == {"tests.nested.test_nested_chaos": 60.0, "suites.migration.test_live_migration": 30.0}
    assert found["fixtures_s"] == {"setup": 1.5, "teardown": 3.0}
    assert phase_of("start labs-x again on nested-a: kill-source-qemu took it down") == "VM starts"
    assert phase_of("managed save nested-a/labs-x") == "saves"


def test_bench_prints_the_last_nested_runs_phases_or_says_why_not(tmp_path: Path) -> None:
    missing = bench_phases(tmp_path / "none")
    assert "no Allure results under" in missing["skipped"]
    assert dict(headline({"phases": missing}))["time by phase of the last nested run"] == missing["skipped"]
    _write(tmp_path)
    rows = dict(headline({"phases": bench_phases(tmp_path)}))
    by_phase = next(v for k, v in rows.items() if k.startswith("time by phase, 2 tests in 100 s"))
    assert by_phase.startswith("test bodies outside steps 65 s, migration jobs 16 s (1), VM starts 6 s (1)")
    assert by_phase.endswith("fixtures: setup 2 s, teardown 3 s")
    assert rows["time by test file, same run"] == "test_nested_chaos 60 s, test_live_migration 30 s"
