"""A lab in use: the inventory plus the live things a run holds (SSH, sim sshds).

Suites, the CLI and the pytest plugin all go through one LabSession, so they
load inventories, start the sim lab and reach hosts the same way.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from labs import models
from labs.errors import ConfigError
from labs.inventory import Inventory, load_inventory
from labs.liveruns import RunMark
from labs.simlab import SimLab
from labs.transport import HostConnection, SSHPool


def open_inventory(file: str | Path, *, check_files: bool = True) -> Inventory:
    """Load and validate; a sim inventory gets its keys generated first (no host is touched)."""

    def provision(inventory: Inventory) -> None:
        if inventory.is_sim:
            SimLab(inventory).provision()

    inventory = load_inventory(file, check_files=check_files, provision=provision)
    check_models(inventory)
    return inventory


def check_models(inventory: Inventory) -> None:
    """Every device's model resolves (bad input is one line: file, key, problem)."""
    for device in inventory.devices:
        try:
            models.model_of(device)
        except ConfigError as exc:
            host_key = device.host.spec.device_model and f"hosts.{device.host.name}.device_model"
            where = "device_model" if device.spec.device_model else host_key or "device model"
            raise ConfigError(f"{inventory.file}: {device.id}: {where}: {exc}") from None


def new_run_id() -> str:
    """Short, sortable, unique: prefixes every VM, file and lock a run creates."""
    return f"labs-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class LabSession:
    def __init__(self, inventory: Inventory, run_id: str | None = None) -> None:
        self.inventory = inventory
        self.run_id = run_id or os.environ.get("LABS_RUN_ID") or new_run_id()
        self.pool = SSHPool(inventory)
        self.sim = SimLab(inventory) if inventory.is_sim else None
        self._started = False
        self._closers: list[Callable[[], None]] = []
        self._mark: RunMark | None = None

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run `closer` when the session closes, before SSH goes away (agents, monitors)."""
        self._closers.append(closer)

    def start(self) -> LabSession:
        if self._mark is None:
            self._mark = RunMark(self.run_id)  # alive: the janitor keeps this run's things
        if self.sim is not None and not self._started:
            self.sim.start()
        self._started = True
        return self

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()
        self.pool.close()
        if self.sim is not None and self._started:
            self.sim.stop()
        self._started = False
        if self._mark is not None:
            self._mark.release()
            self._mark = None

    def __enter__(self) -> LabSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ssh(self, host: str) -> HostConnection:
        return self.pool.get(host)
