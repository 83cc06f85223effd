"""Capability probing, connections and events on libvirt's test:/// driver (the sim lab's hosts)."""

from __future__ import annotations

from labs.session import LabSession
from labs.virt.capabilities import VirtCapability
from labs.virt.domain import hypervisor
from labs.virt.xml import DomainSpec
from tests.conftest import HANG_S


def test_test_driver_saves_but_cannot_migrate(sim_session: LabSession) -> None:
    hv = hypervisor(sim_session, "hostA")
    caps = hv.capabilities(sim_session.run_id)
    assert caps.supported == {VirtCapability.SAVE_RESTORE, VirtCapability.MANAGED_SAVE}
    assert caps.missing_reason(VirtCapability.LIVE_MIGRATION) == (
        "libvirt test:/// cannot migrate (live migration capability missing)"
    )
    # the answers that decided it are kept, for the report
    assert "not supported" in caps.evidence[VirtCapability.LIVE_MIGRATION.value]
    assert "not running" in caps.evidence[VirtCapability.SAVE_RESTORE.value]
    assert hv.domains(sim_session.run_id) == [], "the probe domain was left behind"


def test_one_connection_per_host(sim_session: LabSession) -> None:
    a1, a2, b = (hypervisor(sim_session, h) for h in ("hostA", "hostA", "hostB"))
    assert a1 is a2 and a1 is not b
    assert a1.conn is a2.conn
    assert a1.files_local and a1.is_test_driver and a1.virt_type == "test"


def test_lifecycle_events_are_collected(sim_session: LabSession) -> None:
    hv = hypervisor(sim_session, "hostB")
    name = f"{sim_session.run_id}-events"
    mark = hv.events.mark()
    vm = hv.define(DomainSpec(name, virt_type=hv.virt_type))
    try:
        vm.start()
        assert hv.events.wait_for(name, "started", since=mark, timeout=HANG_S)
        vm.destroy()
        assert hv.events.wait_for(name, "stopped", since=mark, timeout=HANG_S)
    finally:
        vm.remove()
    assert [e.event for e in hv.events.since(mark, name)][:3] == ["defined", "started", "stopped"]
