"""`lab mutants` on two hand-picked mutants: killed and survived told apart, reports written, the threshold exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from labs.mutation.mutants import Mutant, enumerate_mutants, sample
from labs.mutation.runner import load_equivalents, run_mutants
from labs.paths import REPO_ROOT

# V1-R3: the reserved field reads 0; the mutant reads 1
KILLED = "labs/sim/v1.py::V1Driver.read_field::NumberReplacer::0"
# the spec lets an exhausted pre-copy read give ENOMSG or 0 (V2-R10): flipping the choice breaks nothing
SURVIVES = "labs/sim/v2.py::V2Driver.precopy_exhausted::AddNot::0"


@pytest.fixture(scope="module")
def every() -> dict[str, Mutant]:
    return {m.id: m for m in enumerate_mutants(REPO_ROOT)}


def test_scope_leaves_out_plumbing_and_annotations(every: dict[str, Mutant]) -> None:
    assert {m.file for m in every.values()} == {f"labs/sim/{f}.py" for f in ("base", "kernel", "v1", "v2")}
    functions = {m.function for m in every.values()}
    assert not any(f.endswith("__init__") or f.startswith(("ContentStore", "Faults")) for f in functions)
    assert "SimKernel._feature" in functions and "SimKernel.plug" not in functions
    # `-> DataFile | None` is an annotation, never evaluated: no BitOr mutant in v2.py
    assert not [m for m in every.values() if m.file.endswith("v2.py") and "BitOr" in m.operator]
    picked = sample(list(every.values()), 7)
    assert picked == sample(list(every.values()), 7) and len(picked) == 7


def test_equivalents_file_lines(tmp_path: Path) -> None:
    good = tmp_path / "eq.md"
    good.write_text(f"# header\n\n- `{SURVIVES}` — the spec allows both answers\nprose\n")
    assert load_equivalents(good) == {SURVIVES: "the spec allows both answers"}
    bad = tmp_path / "bad.md"
    bad.write_text("- `labs/sim/v2.py::f` — too short an id\n")
    with pytest.raises(ValueError, match=r"bad\.md:1: expected"):
        load_equivalents(bad)
    assert load_equivalents(REPO_ROOT / "docs" / "mutants-equivalent.md")  # the repo's own file parses


def test_killed_survived_reports_and_threshold(every: dict[str, Mutant], tmp_path: Path) -> None:
    assert KILLED in every and SURVIVES in every, "the hand-picked mutants moved: pick two again"
    chosen = [every[KILLED], every[SURVIVES]]
    console = Console(file=(tmp_path / "console.txt").open("w"), width=200)
    none = tmp_path / "none.md"

    rc = run_mutants(console, jobs=2, timeout=60, threshold=60, walks=0, report_dir=tmp_path / "a",
                     equivalents_file=none, mutants=chosen)  # fmt: skip
    assert rc == 1, "a score of 50 % is below a 60 % threshold"
    report = json.loads((tmp_path / "a" / "mutants.json").read_text())
    status = {m["id"]: m for m in report["mutants"]}
    assert status[KILLED]["status"] == "killed" and status[KILLED]["by"] == "V1-R3"
    assert status[SURVIVES]["status"] == "survived"
    assert (report["summary"]["killed"], report["summary"]["survived"], report["summary"]["score"]) == (1, 1, 50.0)
    md = (tmp_path / "a" / "mutants.md").read_text()
    assert f"`{SURVIVES}`" in md and "```diff" in md and f"`{KILLED}`" not in md

    eq = tmp_path / "eq.md"
    eq.write_text(f"- `{SURVIVES}` — ENOMSG and 0 are both allowed (V2-R10)\n")
    rc = run_mutants(console, jobs=1, timeout=60, threshold=100, walks=0, report_dir=tmp_path / "b",
                     equivalents_file=eq, mutants=chosen)  # fmt: skip
    assert rc == 0, "the equivalent mutant leaves the score: 1 killed of 1"
    summary = json.loads((tmp_path / "b" / "mutants.json").read_text())["summary"]
    assert (summary["equivalent"], summary["score"]) == (1, 100.0)
