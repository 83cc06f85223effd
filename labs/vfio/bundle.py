"""The agent as one source for the host: abi, hostsys and agent joined in import order.

A host runs whatever arrives on the agent's stdin with a single exec (labs/vfio/client.py),
and has no `labs` package. So the shipped modules import each other only in the form
`from labs.vfio.<shipped> import name, ...`; here those statements are dropped and the
sources concatenated, which leaves every imported name defined above its use. Anything else
that would not survive the join (another labs import, a name two modules both define) is
refused here, on the controller, instead of failing on a host.
"""

from __future__ import annotations

import ast
from pathlib import Path

SHIPPED = ("abi", "hostsys", "agent")  # dependencies first
_HERE = Path(__file__).resolve().parent


class BundleError(Exception):
    """A shipped module that cannot be joined into one source."""


def module_path(name: str) -> Path:
    return _HERE / f"{name}.py"


def _drop_sibling_imports(name: str, source: str) -> tuple[str, set[str]]:
    """The source without its imports of shipped modules, and the names it defines at top level."""
    tree = ast.parse(source, f"labs/vfio/{name}.py")
    drop: set[int] = set()
    defined: set[str] = set()
    siblings = {f"labs.vfio.{m}" for m in SHIPPED}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level or module == "__future__" or (module.startswith("labs") and module not in siblings):
                raise BundleError(f"labs/vfio/{name}.py:{node.lineno}: cannot ship 'from {module} import'")
            if module in siblings:
                drop.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "labs":
                    raise BundleError(f"labs/vfio/{name}.py:{node.lineno}: cannot ship 'import {alias.name}'")
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    lines = source.splitlines(keepends=True)
    kept = "".join(line for i, line in enumerate(lines, 1) if i not in drop)
    return kept, defined


def bundle_source(names: tuple[str, ...] = SHIPPED) -> bytes:
    """The shipped modules as one Python 3.6-compatible source (its `main()` runs the agent)."""
    parts: list[str] = []
    owner: dict[str, str] = {}
    for name in names:
        kept, defined = _drop_sibling_imports(name, module_path(name).read_text())
        for symbol in sorted(defined):
            if symbol in owner and symbol != "__all__":
                raise BundleError(f"labs/vfio/{name}.py: '{symbol}' is also defined in labs/vfio/{owner[symbol]}.py")
            owner[symbol] = name
        parts.append(f"# ---- labs/vfio/{name}.py ----\n{kept}")
    source = "\n".join(parts)
    compile(source, "labs_agent.py", "exec")  # a syntax slip shows here, not on a host
    return source.encode()
