"""Pooled agents over the sim lab's real sshd: reuse, exclusivity, dead agents dropped, the doctor's probe."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labs.agentpool import agent_for, agent_pool, migration_probe, open_device
from labs.session import LabSession, open_inventory
from tests.conftest import write_sim_inventory


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSession]:
    inventory = open_inventory(write_sim_inventory(tmp_path_factory.mktemp("agents"), devices=True))
    with LabSession(inventory) as session:
        yield session


def test_an_agent_is_lent_to_one_borrower_and_reused(lab: LabSession) -> None:
    pool = agent_pool(lab)
    pool.drop("hostA")  # idle agents of tests that ran before (in random order) would be lent first
    before = pool.started
    with agent_for(lab, "hostA") as first, agent_for(lab, "hostA") as second:
        assert first is not second  # a stream on one channel cannot interleave with another caller
    with agent_for(lab, "hostA") as again:
        assert again in (first, second)
    assert pool.started - before == 2


def test_an_agent_over_ssh_sends_through_a_pipe_a_frame_wide(lab: LabSession) -> None:
    """sshd hands the agent a pipe (not a socket): widened, a frame waits there while the next is read."""
    from labs.vfio import agent

    with agent_for(lab, "hostA") as client:
        assert client.info["pipe_bytes"] == agent.PIPE_BYTES


def test_a_dead_agent_is_not_lent_again(lab: LabSession) -> None:
    with agent_for(lab, "hostB") as client:
        client.kill()
    with agent_for(lab, "hostB") as fresh:
        assert fresh is not client
        fresh.ping()


def test_an_idle_agent_whose_connection_ended_is_not_lent(lab: LabSession) -> None:
    pool = agent_pool(lab)
    pool.drop("hostA")
    with agent_for(lab, "hostA") as idle:
        idle.ping()
    lab.ssh("hostA").close()  # what a test or a recheck that reconnects does under the pooled agent
    with agent_for(lab, "hostA") as fresh:
        assert fresh is not idle
        fresh.ping()


def test_open_device_reads_the_state_and_closes(lab: LabSession) -> None:
    device = next(d for d in lab.inventory.devices if d.spec.protocol == "v2")
    with open_device(lab, device) as dev:
        assert dev.state() == "RUNNING"
        handle = dev.handle
    with agent_for(lab, device.host.name) as client:
        assert handle not in [h["handle"] for h in client.call("handles")]


def test_migration_probe_names_the_flags(lab: LabSession) -> None:
    by_protocol = {d.spec.protocol: d for d in lab.inventory.devices}
    assert "v1 region" in migration_probe(lab, by_protocol["v1"])
    assert "STOP_COPY" in migration_probe(lab, by_protocol["v2"])
