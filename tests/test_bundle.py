"""What the agent ships to a host: abi, hostsys and agent joined into one Python 3.6 source."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labs.vfio import bundle
from labs.vfio.client import AgentClient

STDLIB = {"base64", "errno", "fcntl", "hashlib", "importlib", "json", "os", "platform", "signal", "struct", "sys",
          "threading", "time"}  # fmt: skip


@pytest.mark.parametrize("name", bundle.SHIPPED)
def test_shipped_modules_import_only_stdlib_and_each_other(name: str) -> None:
    source = bundle.module_path(name).read_text()
    imports = set(re.findall(r"^(?:import|from) ([\w.]+)", source, re.M))
    assert imports <= STDLIB | {f"labs.vfio.{m}" for m in bundle.SHIPPED}


@pytest.mark.skipif(shutil.which("vermin") is None and not Path(".venv/bin/vermin").exists(), reason="no vermin")
def test_bundle_is_python36_compatible(tmp_path: Path) -> None:
    shipped = tmp_path / "labs_agent.py"
    shipped.write_bytes(bundle.bundle_source())
    vermin = shutil.which("vermin") or ".venv/bin/vermin"
    out = subprocess.run([vermin, "-t=3.6-", "--no-tips", "--violations", "--eval-annotations", str(shipped)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_bundle_runs_without_the_labs_package(tmp_path: Path) -> None:
    """The joined source defines main() and all it needs, importing nothing from labs."""
    shipped = tmp_path / "labs_agent.py"
    shipped.write_bytes(bundle.bundle_source())
    assert "from labs" not in shipped.read_text()
    probe = "import runpy; g = runpy.run_path(%r, run_name='labs_agent'); print(g['RealSys']().name)"
    out = subprocess.run([sys.executable, "-I", "-c", probe % str(shipped)], capture_output=True, text=True,
                         check=True, cwd=tmp_path)  # fmt: skip
    assert out.stdout.strip() == "real"


def test_local_agent_runs_the_bundle() -> None:
    with AgentClient.local("bundle") as client:
        assert client.call("ping") == {}


def _fake_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str) -> None:
    (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.setattr(bundle, "_HERE", tmp_path)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ("X = 1\n", "X = 2\n", "'X' is also defined in labs/vfio/a.py"),
        ("import labs.sim.kernel\n", "", "cannot ship 'import labs.sim.kernel'"),
        ("from labs.sim import kernel\n", "", "cannot ship 'from labs.sim import'"),
        ("from . import b\n", "", "cannot ship"),
        ("def f(:\n", "", "invalid syntax"),
    ],
)
def test_bundle_refuses_what_would_break_on_a_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, a: str, b: str, message: str
) -> None:
    _fake_module(tmp_path, monkeypatch, "a", a)
    _fake_module(tmp_path, monkeypatch, "b", b)
    with pytest.raises((bundle.BundleError, SyntaxError), match=re.escape(message)):
        bundle.bundle_source(("a", "b"))


def test_bundle_drops_imports_of_shipped_siblings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_module(tmp_path, monkeypatch, "abi", "import errno\nCODE = errno.EIO\n")
    agent = "from labs.vfio.abi import (\n    CODE,\n)\n\ndef main():\n    return CODE\n"
    _fake_module(tmp_path, monkeypatch, "agent", agent)
    g: dict[str, object] = {}
    exec(compile(bundle.bundle_source(("abi", "agent")), "labs_agent.py", "exec"), g)
    assert g["main"]() == 5  # type: ignore[operator]
