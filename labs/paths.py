"""Where things are: the checkout, its inventories and reports."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
INVENTORIES = REPO_ROOT / "inventories"
SIM_INVENTORY = INVENTORIES / "sim.yaml"
SUITES = REPO_ROOT / "suites"
REPORTS = REPO_ROOT / "reports"


def default_inventory() -> Path:
    env = os.environ.get("LABS_INVENTORY")
    return Path(env) if env else SIM_INVENTORY
