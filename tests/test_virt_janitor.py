"""The janitor: leftovers of a killed run are removed by their run-id prefix, the current run's are kept."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from labs.faults import mdevs
from labs.janitor import _mdevs, _restore_mdev, janitor
from labs.reservations import reserve
from labs.session import LabSession
from labs.transport import HostConnection
from labs.virt.domain import hypervisor, local_image_dir
from labs.virt.xml import DomainSpec
from tests.test_faults import UUID, FakeHost, _mdev

DEAD_RUN = "labs-19991231-235959-dead00"


def test_janitor_removes_a_killed_runs_leftovers(sim_session: LabSession) -> None:
    hv = hypervisor(sim_session, "hostA")
    running = hv.define(DomainSpec(f"{DEAD_RUN}-1abcd-sr-x", virt_type=hv.virt_type))
    running.start()
    saved = hv.define(DomainSpec(f"{DEAD_RUN}-2abcd-ms-x", virt_type=hv.virt_type))
    saved.start()
    saved.managed_save()
    mine = hv.define(DomainSpec(f"{sim_session.run_id}-3abcd-mine", virt_type=hv.virt_type))
    other = hv.define(DomainSpec("not-ours", virt_type=hv.virt_type))
    local_image_dir().mkdir(parents=True, exist_ok=True)
    image = local_image_dir() / f"{DEAD_RUN}-1abcd-sr-x.1.save"
    image.write_bytes(b"x")
    try:
        removed = janitor(sim_session)
        assert f"destroyed hostA/{DEAD_RUN}-1abcd-sr-x" in removed
        assert f"undefined hostA/{DEAD_RUN}-1abcd-sr-x" in removed
        assert f"undefined hostA/{DEAD_RUN}-2abcd-ms-x" in removed
        assert f"controller: removed {image}" in removed
        assert not image.exists()
        assert mine.exists() and other.exists(), "the janitor touched what is not a dead run's"
        assert janitor(sim_session) == []
        # keep_own=False (a janitor run after the run ended) takes the current run's too, never foreign names
        assert janitor(sim_session, keep_own=False) == [f"undefined hostA/{mine.name}"]
        assert other.exists()
    finally:
        for vm in (running, saved, mine, other):
            vm.remove()
        image.unlink(missing_ok=True)


# -- the mdevs faults created (labs.faults.mdevs) ---------------------------------------
LIVE_RUN = "labs-20000101-000000-11fe00"
FOREIGN, OWN_MDEV, LIVE_MDEV = (f"0b0c5a3e-7c1d-4c8e-9a57-6d1f0e2b3c4{c}" for c in "abc")


class StubSession:
    """What the janitor's mdev sweep uses of a session: its run id, inventory devices and SSH."""

    def __init__(self, host: FakeHost) -> None:
        self.run_id = "labs-20261125-010203-0a0a0a"
        self.inventory = SimpleNamespace(devices=[_mdev()])
        self.host = host

    def ssh(self, name: str) -> FakeHost:
        return self.host


def test_janitor_removes_dead_runs_mdevs_only() -> None:
    host = FakeHost()
    session = StubSession(host)
    records = [(DEAD_RUN, FOREIGN), (DEAD_RUN, UUID), (session.run_id, OWN_MDEV), (LIVE_RUN, LIVE_MDEV)]
    for run, uuid in records:
        host.records[mdevs.record_name(run, uuid)] = {"run": run}
        host.mdevs.setdefault(uuid, "mtty-1")
    removed = _mdevs(session, "hostB", True, {LIVE_RUN})  # type: ignore[arg-type]
    assert removed == [
        f"hostB: removed mdev {FOREIGN} (run {DEAD_RUN})",
        f"hostB: removed mdev record {DEAD_RUN}.{FOREIGN}",
        f"hostB: removed mdev record {DEAD_RUN}.{UUID}",
    ]
    assert [c for c in host.log if c.endswith("/remove")] == [f"echo 1 > /sys/bus/mdev/devices/{FOREIGN}/remove"]
    assert set(host.mdevs) == {UUID, OWN_MDEV, LIVE_MDEV}, "an inventory, own or live run's mdev was removed"
    assert sorted(host.records) == sorted(mdevs.record_name(r, u) for r, u in records[2:])
    # once the run is over (keep_own off), its own go too; the live run's stay
    assert _mdevs(session, "hostB", False, {LIVE_RUN}) == [  # type: ignore[arg-type]
        f"hostB: removed mdev {OWN_MDEV} (run {session.run_id})",
        f"hostB: removed mdev record {session.run_id}.{OWN_MDEV}",
    ]
    assert list(host.records) == [mdevs.record_name(LIVE_RUN, LIVE_MDEV)]


def test_janitor_recreates_an_inventory_mdev_a_killed_run_removed() -> None:
    host = FakeHost()
    del host.mdevs[UUID]
    assert _restore_mdev(StubSession(host), _mdev()) == [  # type: ignore[arg-type]
        f"hostB:mtty-2: re-created mdev {UUID} (mtty-2), the inventory's"
    ]
    assert host.mdevs == {UUID: "mtty-2"}
    assert _restore_mdev(StubSession(host), _mdev()) == []  # type: ignore[arg-type]


def test_janitor_sweeps_mdev_records_on_a_sim_host(sim_session: LabSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """The records' real round trip over SSH: a dead run's record goes (with a removal of its mdev asked
    for; a sim host has no /sys/bus/mdev), the current run's and a live reservation holder's stay."""
    ssh = sim_session.ssh("hostB")
    asked: list[str] = []
    real_remove = mdevs.remove_mdev

    def remove_mdev(conn: HostConnection, uuid: str) -> bool:
        asked.append(uuid)
        return real_remove(conn, uuid)

    monkeypatch.setattr(mdevs, "remove_mdev", remove_mdev)
    kept = [(sim_session.run_id, OWN_MDEV), (LIVE_RUN, LIVE_MDEV)]
    for run, uuid in [(DEAD_RUN, FOREIGN), *kept]:
        mdevs.write_record(ssh, run, uuid, {"type": "mtty-1"})
    assert sim_session.sim is not None
    assert (sim_session.sim.host_dir("hostB") / "mdevs" / f"{DEAD_RUN}.{FOREIGN}").is_file()
    held = reserve(ssh, _mdev(), LIVE_RUN, wait=0, expires_in=60)  # the live run: it holds a reservation
    try:
        removed = janitor(sim_session)
        assert f"hostB: removed mdev record {DEAD_RUN}.{FOREIGN}" in removed
        assert asked == [FOREIGN]
        assert sorted(mdevs.list_records(ssh)) == sorted(kept)
    finally:
        held.release()
        for run, uuid in kept:
            mdevs.drop_record(ssh, run, uuid)
    assert mdevs.list_records(ssh) == []
