"""Which mutants exist: the files and functions in scope, the operators (cosmic-ray's), a stable id each.

Scope is the driver model, not the plumbing (docs/mutation-testing.md says why for each part):
    labs/sim/v1.py      V1Driver (every method) and _fmt
    labs/sim/v2.py      DataFile and V2Driver (every method)
    labs/sim/base.py    StreamSource and StreamSink (the stream a driver saves and resumes), and the
                        migration side of SimDriver (model id, device flags, content writes that
                        dirty pre-copy, the feature fallback)
    labs/sim/kernel.py  the VFIO core's device-facing part: device ioctls, region info, the
                        VFIO_DEVICE_FEATURE checks, region and data-fd I/O
Out: module-level constants, option parsing (__init__), the content store and fault knobs (the
checks' own readback and injection tools), sim_control, SimDriver's BAR and config-space access
and its reset counter (no migration rule reads them), and the kernel's fd table, group and
container plumbing (a mutant there breaks opening, which every check "kills" for free).

A mutant id is `file::function::operator::k`, k counting that operator's sites inside the
function: ids survive edits elsewhere in the file (docs/mutants-equivalent.md names mutants by it).
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cosmic_ray.plugins
import parso.tree
from cosmic_ray.ast import ast_nodes, get_ast
from cosmic_ray.mutating import mutate_code

SCOPE: dict[str, tuple[str, ...]] = {
    "labs/sim/v1.py": ("V1Driver.*", "_fmt"),
    "labs/sim/v2.py": ("DataFile.*", "V2Driver.*"),
    "labs/sim/base.py": (
        "StreamSource.*",
        "StreamSink.*",
        "SimDriver.model_crc",
        "SimDriver.device_flags",
        "SimDriver.num_regions",
        "SimDriver.write_content",
        "SimDriver.feature",
    ),
    "labs/sim/kernel.py": (
        "SimKernel.cloexec",
        "SimKernel._ioctl_device",
        "SimKernel._ioctl_data",
        "SimKernel._region_info",
        "SimKernel._feature",
        "SimKernel._region_io",
        "SimKernel.pread",
        "SimKernel.pwrite",
        "SimKernel.read",
        "SimKernel.write",
    ),
}

# A reduced set of cosmic-ray's core operators: each binary/comparison operator gets its one or
# two telling replacements (a + b -> a - b, a < b -> a <= b / a >= b), not all eleven, which
# would mostly add mutants that crash at once and inflate the score.
_BINARY = {
    "Add": ("Sub",), "Sub": ("Add",), "Mul": ("FloorDiv",), "Div": ("Mul",), "FloorDiv": ("Mul",),
    "Mod": ("FloorDiv",), "Pow": ("Mul",), "LShift": ("RShift",), "RShift": ("LShift",),
    "BitOr": ("BitAnd",), "BitAnd": ("BitOr",), "BitXor": ("BitOr",),
}  # fmt: skip
_COMPARE = {
    "Lt": ("LtE", "GtE"), "LtE": ("Lt", "Gt"), "Gt": ("GtE", "LtE"), "GtE": ("Gt", "Lt"),
    "Eq": ("NotEq",), "NotEq": ("Eq",), "Is": ("IsNot",), "IsNot": ("Is",),
}  # fmt: skip
OPERATORS: tuple[str, ...] = (
    *(f"ReplaceBinaryOperator_{a}_{b}" for a, bs in _BINARY.items() for b in bs),
    *(f"ReplaceComparisonOperator_{a}_{b}" for a, bs in _COMPARE.items() for b in bs),
    "ReplaceUnaryOperator_Delete_Not",
    "ReplaceUnaryOperator_Delete_USub",
    "ReplaceUnaryOperator_Delete_Invert",
    "AddNot",
    "ReplaceTrueWithFalse",
    "ReplaceFalseWithTrue",
    "ReplaceAndWithOr",
    "ReplaceOrWithAnd",
    "ReplaceBreakWithContinue",
    "ReplaceContinueWithBreak",
    "ExceptionReplacer",
    "NumberReplacer",
    "ZeroIterationForLoop",
)
# ExceptionReplacer names an exception nothing raises; the agent has no cosmic-ray to define it
_NEVER_RAISED = "\n\nclass CosmicRayTestingException(Exception):\n    pass\n"


@dataclass(frozen=True)
class Mutant:
    file: str  # repo-relative, e.g. labs/sim/v2.py
    function: str  # qualified name, e.g. V2Driver.mig_set_state
    operator: str  # cosmic-ray operator name without the "core/" provider
    k: int  # this operator's k-th site inside the function
    occurrence: int  # cosmic-ray's occurrence index in the whole file (what mutate_code takes)
    line: int

    @property
    def id(self) -> str:
        return f"{self.file}::{self.function}::{self.operator}::{self.k}"

    @property
    def protocols(self) -> tuple[str, ...]:
        """The protocols whose checks judge this mutant: a driver's own, or both for shared code."""
        name = Path(self.file).name
        return ("v1",) if name == "v1.py" else ("v2",) if name == "v2.py" else ("v1", "v2")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "file": self.file, "function": self.function, "operator": self.operator,
                "k": self.k, "occurrence": self.occurrence, "line": self.line}  # fmt: skip


def operator(name: str) -> Any:
    return cosmic_ray.plugins.get_operator(f"core/{name}")()


def qualname(node: parso.tree.NodeOrLeaf) -> str:
    """The enclosing def/class names of a node, outermost first ("" at module level)."""
    names = []
    parent = node.parent
    while parent is not None:
        if parent.type in ("funcdef", "classdef"):
            names.append(parent.name.value)  # type: ignore[attr-defined]
        parent = parent.parent
    return ".".join(reversed(names))


def in_annotation(node: parso.tree.NodeOrLeaf) -> bool:
    """Inside a type annotation: never evaluated here (postponed annotations), so never a behaviour change."""
    child, parent = node, node.parent
    while parent is not None:
        if parent.type in ("tfpdef", "annassign", "funcdef"):
            prev = child.get_previous_sibling()
            mark = "->" if parent.type == "funcdef" else ":"
            if prev is not None and prev.type == "operator" and prev.value == mark:
                return True
        child, parent = parent, parent.parent
    return False


def in_scope(file: str, function: str) -> bool:
    if not function or function.endswith("__init__"):
        return False  # module level and option parsing: the device's configuration, not its behaviour
    return any(fnmatch.fnmatchcase(function, p) for p in SCOPE.get(file, ()))


def enumerate_file(root: Path, file: str) -> list[Mutant]:
    tree = get_ast((root / file).read_text())
    out = []
    for name in OPERATORS:
        op = operator(name)
        counts: dict[str, int] = {}
        occurrence = 0
        for node in ast_nodes(tree):
            for start, _end in op.mutation_positions(node):
                function = qualname(node)
                if in_scope(file, function) and not in_annotation(node):
                    k = counts.get(function, 0)
                    counts[function] = k + 1
                    out.append(Mutant(file, function, name, k, occurrence, start[0]))
                occurrence += 1
    return sorted(out, key=lambda m: (m.file, m.line, m.operator, m.k))


def enumerate_mutants(root: Path, only: list[str] | None = None) -> list[Mutant]:
    """Every mutant in scope under `root` (a copy of the repo), optionally of some files only."""
    files = list(SCOPE)
    if only:
        unknown = [f for f in only if f not in SCOPE]
        if unknown:
            raise ValueError(f"--only {unknown[0]}: not a mutated file (one of {', '.join(SCOPE)})")
        files = [f for f in files if f in only]
    return [m for f in files for m in enumerate_file(root, f)]


def sample(mutants: list[Mutant], n: int | None) -> list[Mutant]:
    """A deterministic sample of n mutants (the same n give the same sample), in file order."""
    if n is None or n >= len(mutants):
        return mutants
    picked = set(random.Random(0).sample(range(len(mutants)), n))
    return [m for i, m in enumerate(mutants) if i in picked]


def mutated_source(source: str, mutant: Mutant) -> str:
    code = mutate_code(source, operator(mutant.operator), mutant.occurrence)
    if code is None:
        raise ValueError(f"{mutant.id}: no such mutation site (occurrence {mutant.occurrence})")
    return str(code) + (_NEVER_RAISED if mutant.operator == "ExceptionReplacer" else "")


def diff(source: str, mutated: str, file: str) -> str:
    lines = difflib.unified_diff(source.splitlines(), mutated.splitlines(), f"a/{file}", f"b/{file}", lineterm="", n=1)
    return "\n".join(lines)


def diff_hash(text: str) -> str:
    """A short hash of a diff's changed lines (no line numbers: stable when code moves)."""
    changed = [ln for ln in text.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    return hashlib.sha256("\n".join(changed).encode()).hexdigest()[:12]
