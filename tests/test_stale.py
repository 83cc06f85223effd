"""An mdev libvirt keeps for a domain it no longer has (labs.virt.stale): found only then, released by name."""

from __future__ import annotations

import libvirt
import pytest

from labs.virt.stale import StaleRecord, held, release, stale_record

MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
REFUSAL = (
    f"Requested operation is not valid: mediated device /sys/bus/mdev/devices/{MDEV} is in use by driver QEMU, "
    "domain labs-x-finish"
)


class _InUse(libvirt.libvirtError):
    def __init__(self) -> None:
        Exception.__init__(self, REFUSAL)
        self.err = (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_NONE, REFUSAL)


class _Dom:
    destroyed = False

    def destroy(self) -> None:
        self.destroyed = True


class _Hv:
    name = "hostB"
    virt_type = "qemu"

    def __init__(self, domains: set[str], held: bool = True) -> None:
        self.conn = self
        self.domains, self.held = domains, held
        self.created: list[str] = []
        self.dom = _Dom()

    def exists(self, name: str) -> bool:
        return name in self.domains

    def createXML(self, xml: str, flags: int) -> _Dom:
        assert flags == libvirt.VIR_DOMAIN_START_PAUSED
        self.created.append(xml)
        if self.held:
            raise _InUse()
        return self.dom


@pytest.mark.parametrize(
    ("error", "domains", "found"),
    [
        (REFUSAL, set(), True),  # held for a domain the host no longer has: stale
        (REFUSAL, {"labs-x-finish"}, False),  # the domain is there (still stopping): not stale
        ("Requested operation is not valid: domain is already running", set(), False),
        (None, set(), False),
    ],
)
def test_a_record_is_stale_only_for_a_domain_the_host_no_longer_has(
    error: str | None, domains: set[str], found: bool
) -> None:
    record = stale_record(_Hv(domains), error)  # type: ignore[arg-type]
    assert (record == StaleRecord("hostB", MDEV, "labs-x-finish")) is found


def test_release_starts_a_domain_of_that_name_with_that_mdev() -> None:
    hv = _Hv(set())
    answer = release(hv, StaleRecord("hostB", MDEV, "labs-x-finish"))  # type: ignore[arg-type]
    assert answer.startswith("refused as expected") and not hv.dom.destroyed
    assert "<name>labs-x-finish</name>" in hv.created[0] and f'uuid="{MDEV}"' in hv.created[0]
    free = _Hv(set(), held=False)
    assert "not held any more" in release(free, StaleRecord("hostB", MDEV, "labs-x-finish"))  # type: ignore[arg-type]
    assert free.dom.destroyed  # a start that went through stops at once


def test_a_held_host_device_names_its_domain_mdev_or_pci() -> None:
    """A held PCI function is waited for like an mdev, never released: the release knows mdevs only."""
    assert held(REFUSAL) == "labs-x-finish"
    pci = "Requested operation is not valid: PCI device 0000:65:00.1 is in use by driver QEMU, domain labs-y"
    assert held(pci) == "labs-y" and stale_record(_Hv(set()), pci) is None  # type: ignore[arg-type]
    assert held("Requested operation is not valid: domain is already running") is None
