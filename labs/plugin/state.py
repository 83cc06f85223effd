"""The plugin's per-process state: the inventory, the live session, the doctor's reports, and which
lab things a test is about."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

import pytest

from labs.doctor import HostReport, check_lab
from labs.errors import LabError
from labs.hostwatch import HostWatch
from labs.inventory import Inventory, LabDevice, LabHost, LabPair
from labs.paths import SIM_INVENTORY
from labs.session import LabSession, new_run_id, open_inventory

LAB_FIXTURES = ("lab", "host", "device", "pair", "ssh")


class LabState:
    """Per-process plugin state: the inventory, the live session, the health report."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._inventory: Inventory | None = None
        self._session: LabSession | None = None
        self._health: dict[str, HostReport] | None = None
        # one run id for the whole run: xdist workers get the controller's (pytest_configure_node)
        worker = getattr(config, "workerinput", None)
        self.run_id: str = (worker or {}).get("labs_run_id") or os.environ.get("LABS_RUN_ID") or new_run_id()
        self.watch = HostWatch(self.run_id)
        self.worker_summaries: list[dict[str, Any]] = []  # xdist controller: what each worker saw
        self.kernel_log_errors: dict[str, str] = {}  # host -> why its kernel log could not be read

    @property
    def inventory_path(self) -> Path:
        opt = self.config.getoption("--inventory")
        if opt:
            return Path(opt)
        if os.environ.get("LABS_INVENTORY"):
            return Path(os.environ["LABS_INVENTORY"])
        local = Path(str(self.config.rootpath)) / "inventories" / "sim.yaml"
        return local if local.exists() else SIM_INVENTORY

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            try:
                self._inventory = open_inventory(self.inventory_path)
            except LabError as exc:
                # pytest prints a UsageError as one line, without a traceback
                raise pytest.UsageError(str(exc)) from None
        return self._inventory

    @property
    def session(self) -> LabSession:
        if self._session is None:
            self._session = LabSession(self.inventory, run_id=self.run_id).start()
        return self._session

    def health_of(self, host: LabHost) -> HostReport | None:
        """The doctor's report on `host`, checked when a test first wants the host: an xdist worker
        that only ever gets one pair's devices checks those two hosts, not the whole lab."""
        if self.config.getoption("--lab-no-doctor"):
            return None
        if self._health is None:
            self._health = {}
        if host.name not in self._health:
            from labs.agentpool import migration_probe

            self._health.update(check_lab(self.session, [host], migration_probe))
        return self._health[host.name]

    def recheck(self, host: str) -> str | None:
        """The doctor again on one host (after an infrastructure error there): its problem, or None."""
        from labs.agentpool import agent_pool, migration_probe

        agent_pool(self.session).drop(host)  # an agent that hung there is not lent out again
        report = check_lab(self.session, [self.inventory.host(host)], migration_probe)[host]
        if self._health is not None:
            self._health[host] = report
        return report.problem

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        if not hasattr(self.config, "workerinput"):
            self.watch.remove()  # the run is over (xdist: all workers are done)

    # -- selection ----------------------------------------------------------
    def _host_ok(self, host: LabHost) -> bool:
        globs = self.config.getoption("--lab-host")
        return not globs or any(fnmatch.fnmatchcase(host.name, g) for g in globs)

    def _device_ok(self, device: LabDevice) -> bool:
        globs = self.config.getoption("--lab-device")
        host_ok = self._host_ok(device.host)
        return host_ok and (not globs or any(fnmatch.fnmatchcase(device.id, g) for g in globs))

    def hosts(self) -> list[LabHost]:
        return [h for h in self.inventory.hosts if self._host_ok(h)]

    def devices(self) -> list[LabDevice]:
        subject = self.config.getoption("--lab-subject")
        return [d for d in self.inventory.devices if self._device_ok(d) and subject in (None, d.id)]

    def pairs(self) -> list[LabPair]:
        subject = self.config.getoption("--lab-subject")
        return [
            p
            for p in self.inventory.pairs
            if self._device_ok(p.source) and self._device_ok(p.destination) and subject in (None, p.source.id)
        ]


STATE = pytest.StashKey[LabState]()


def state_of(config: pytest.Config) -> LabState:
    return config.stash[STATE]


def subject_of(item: pytest.Item) -> tuple[list[LabHost], LabDevice | None, LabPair | None]:
    callspec = getattr(item, "callspec", None)
    params: dict[str, Any] = callspec.params if callspec else {}
    pair = params.get("pair") if isinstance(params.get("pair"), LabPair) else None
    device = params.get("device") if isinstance(params.get("device"), LabDevice) else None
    host = params.get("host") if isinstance(params.get("host"), LabHost) else None
    if pair is not None:
        return [pair.source.host, pair.destination.host], pair.source, pair
    if device is not None:
        return [device.host], device, None
    return ([host] if host else []), None, None
