"""AMD/Pensando DSC VFs behind pds_vfio_pci (drivers/vfio/pci/pds)."""

from __future__ import annotations

from labs.inventory.models import Capability
from labs.models import DeviceModel

PDS = DeviceModel(
    name="pds_vfio_pci",
    kind="pci",
    description="Pensando DSC VF (pds_vfio_pci), with device dirty tracking",
    modules=("vfio", "vfio_pci_core", "pds_vfio_pci"),
    host_driver="pds_vfio_pci",
    hostdev_driver="pds_vfio_pci",
    migration_flags=frozenset({Capability.STOP_COPY, Capability.P2P, Capability.DIRTY_LOGGING}),
)
