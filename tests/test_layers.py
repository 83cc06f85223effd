"""The import contracts in pyproject.toml ([tool.importlinter]): layers point down, the agent ships alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


@pytest.mark.skipif(not Path(LINT_IMPORTS).exists(), reason="import-linter not installed (pip install -e .[dev])")
def test_import_contracts_are_kept() -> None:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
