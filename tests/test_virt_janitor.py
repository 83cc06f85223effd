"""The janitor: leftovers of a killed run are removed by their run-id prefix, the current run's are kept."""

from __future__ import annotations

from labs.runtime import LabSession
from labs.virt.domain import hypervisor, local_image_dir
from labs.virt.janitor import janitor
from labs.virt.xml import DomainSpec

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
