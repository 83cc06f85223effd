"""A VM with a vIOMMU in front of its VFIO device: QEMU must refuse to migrate it.

QEMU cannot yet track what a device behind a guest IOMMU dirties, so it blocks
the migration of a VFIO device with a vIOMMU (spec 4.2 blockers). Where the
device is forced migratable (`enable-migration=on`), the blocker becomes an
error at device realize and the domain does not start; otherwise the domain
runs and the migration request is refused, the source keeping the VM.
Either refusal is judged by libvirt's error domain and code, never its text.
"""

from __future__ import annotations

from dataclasses import dataclass

import libvirt

from labs.faults.base import ExpectedError, error_name
from labs.inventory import LabPair
from labs.scenarios import migration as mig
from labs.scenarios.context import Scenario
from labs.scenarios.readback import ensure_idle
from labs.virt.xml import spec_for

VIOMMU_MODEL = "intel"
# start: QEMU's realize error for a forced-migratable device behind a vIOMMU, as libvirt reports a failed start;
# migrate: the VFIO migration blocker, as libvirt reports a refused QMP `migrate`
VIOMMU_REFUSALS = {
    "start": (ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_INTERNAL_ERROR),),
    "migrate": (
        ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_INTERNAL_ERROR),
        ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_OPERATION_INVALID),
    ),
}


@dataclass
class Refusal:
    stage: str  # "start", "migrate", or "" when nothing was refused
    error_domain: int | None = None
    error_code: int | None = None
    message: str = ""
    leg: mig.Leg | None = None

    @property
    def error(self) -> str:
        return error_name(self.error_domain, self.error_code)


def try_migrate(sc: Scenario, pair: LabPair, model: str = VIOMMU_MODEL) -> Refusal:
    """Start a VM with a `model` vIOMMU and the pair's source device, then try to migrate it."""
    hv = sc.hv(pair.source.host)
    name = sc.vm_name("viommu")
    sc.track_domain(name)
    with sc.steps.step(f"define {name} on {hv.name} with {pair.source.id} behind a {model} vIOMMU"):
        vm = hv.define(spec_for(name, [pair.source], hv.virt_type, iommu=model))
    ensure_idle(sc.session, pair.source, sc.steps)
    with sc.steps.step(f"start {vm}") as rec:
        try:
            vm.dom.create()
        except libvirt.libvirtError as exc:
            rec.detail = {"refused": error_name(exc.get_error_domain(), exc.get_error_code())}
            return Refusal("start", exc.get_error_domain(), exc.get_error_code(), str(exc.get_error_message()))
    _vm, leg = mig.migrate_leg(
        sc,
        vm,
        pair.source,
        pair.destination,
        scenario="vIOMMU refused",
        timeout=min(sc.timeouts.migration, 300.0),
        hang_is_infra=False,  # a migration that hangs instead of being refused is this scenario's finding
    )
    r = leg.result
    return Refusal("" if r.ok else "migrate", r.error_domain, r.error_code, r.error or "", leg)


def refusal_problems(refusal: Refusal) -> list[str]:
    """A vIOMMU domain must be refused with one of the expected errors; after a refused migration the
    source keeps the one running copy."""
    if not refusal.stage:
        return ["a VM with a VFIO device behind a vIOMMU was migrated (QEMU's vIOMMU blocker did not apply)"]
    out: list[str] = []
    wanted = VIOMMU_REFUSALS[refusal.stage]
    if not any(e.domain == refusal.error_domain and e.code == refusal.error_code for e in wanted):
        out.append(
            f"{refusal.stage} refused with {refusal.error}, not {' or '.join(map(str, wanted))}: {refusal.message}"
        )
    if refusal.leg is not None:
        out += refusal.leg.problems
    return out
