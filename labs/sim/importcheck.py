"""Does a sim driver import where the agent will import it?

The agent's sim backend imports a device's driver (`module:Class`) when the
device is opened, with the agent's sys.path entries (the `labs` checkout and
the host's inventory `python_path`). This module runs the same import in a
separate interpreter on the host (over SSH for `lab doctor`, locally for the
private sim lab of `lab defects`) and answers one JSON object per driver: did
it import, from which file, which protocol it implements, which spec rules it
declares it breaks (a class attribute `breaks = "V2-R13"` or a tuple of ids).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

# run by the host's interpreter: argv[1] the sys.path entries, argv[2] the driver references
BOOT = (
    "import json, sys; sys.path[0:0] = [p for p in json.loads(sys.argv[1]) if p not in sys.path]; "
    "from labs.sim.importcheck import main; main(json.loads(sys.argv[2]))"
)


@dataclass(frozen=True)
class DriverImport:
    ref: str
    ok: bool
    error: str = ""  # "ModuleNotFoundError: No module named 'acme'"
    file: str = ""
    protocol: str = ""  # "v1" | "v2" | "" (neither a V1Driver nor a V2Driver subclass)
    breaks: tuple[str, ...] = ()
    doc: str = ""  # the class docstring's first paragraph

    def describe(self) -> str:
        return f"{self.ref} imports ({self.file})" if self.ok else f"{self.ref} cannot be imported: {self.error}"


def command(python: str, sys_path: list[str], refs: list[str]) -> list[str]:
    """The argv that checks `refs` with the interpreter `python` and these sys.path entries."""
    return [python, "-c", BOOT, json.dumps(sys_path), json.dumps(refs)]


def shell_command(python: str, sys_path: list[str], refs: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in command(python, sys_path, refs))


def parse(refs: list[str], stdout: str, failure: str) -> dict[str, DriverImport]:
    """One DriverImport per ref; `failure` (why the check itself did not answer) for refs it did not answer."""
    found: dict[str, DriverImport] = {}
    for line in stdout.splitlines():
        try:
            raw = json.loads(line)
            item = DriverImport(**{**raw, "breaks": tuple(raw.get("breaks") or ())})
        except (ValueError, TypeError):
            continue  # a driver module that prints at import time
        found[item.ref] = item
    return {r: found.get(r) or DriverImport(r, False, failure or "the import check gave no answer") for r in refs}


def check_local(python: str, sys_path: list[str], refs: list[str], timeout: float = 120.0) -> dict[str, DriverImport]:
    """Check `refs` in a local interpreter (a sim lab's hosts share this machine's files and interpreter)."""
    try:
        res = subprocess.run(command(python, sys_path, refs), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return parse(refs, "", f"importing took longer than {timeout:g} s")
    tail = res.stderr.strip().splitlines()[-1:] if res.returncode else []
    return parse(refs, res.stdout, f"import check exited {res.returncode}: {' '.join(tail)}")


def _protocol(cls: type) -> str:
    from labs.sim.v1 import V1Driver
    from labs.sim.v2 import V2Driver

    return "v1" if issubclass(cls, V1Driver) else "v2" if issubclass(cls, V2Driver) else ""


def _one(ref: str) -> dict[str, Any]:
    from labs.sim.kernel import load_driver_class

    out: dict[str, Any] = {"ref": ref, "ok": False}
    try:
        cls = load_driver_class(ref)
    except BaseException as exc:  # a driver module may raise anything at import, SystemExit included
        if isinstance(exc, KeyboardInterrupt):
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        out["error"] = f"{type(exc).__name__}: {message}".rstrip(": ")
        return out
    breaks = getattr(cls, "breaks", ())
    out.update(
        ok=True,
        file=getattr(sys.modules.get(cls.__module__), "__file__", "") or "",
        protocol=_protocol(cls),
        breaks=[breaks] if isinstance(breaks, str) else [str(b) for b in breaks or ()],
        doc=" ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()),
    )
    return out


def main(refs: list[str]) -> None:
    for ref in refs:
        print(json.dumps(_one(ref)), flush=True)
