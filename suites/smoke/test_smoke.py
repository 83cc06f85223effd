"""Smoke: the lab itself answers. Runs first; everything else stands on it."""

from __future__ import annotations

import pytest

from labs.doctor import Status, check_host
from labs.inventory import LabHost
from labs.session import LabSession
from labs.transport import HostConnection
from labs.virt.connection import probe


def test_host_answers_over_ssh(host: LabHost, ssh: HostConnection) -> None:
    result = ssh.run("echo ready; uname -sr", idempotent=True)
    assert result.ok, result.stderr
    assert result.stdout.splitlines()[0] == "ready"


def test_libvirt_connection(host: LabHost) -> None:
    if not host.spec.libvirt_uri:
        pytest.skip(f"{host.name} has no libvirt_uri in the inventory")
    info = probe(host.spec.libvirt_uri, host.name)
    assert info.lib_version


def test_doctor_green(lab: LabSession, host: LabHost) -> None:
    from labs.agentpool import migration_probe

    report = check_host(lab, host, migration_probe)
    failed = [f"{c.name} {c.device or ''}: {c.detail}" for c in report.checks if c.status == Status.FAIL]
    assert not failed, "; ".join(failed)
