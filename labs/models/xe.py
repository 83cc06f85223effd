"""Intel Xe GPU VFs (SR-IOV) behind xe_vfio_pci (drivers/vfio/pci/xe)."""

from __future__ import annotations

from labs.inventory.models import Capability
from labs.models import DeviceModel

XE = DeviceModel(
    name="xe_vfio_pci",
    kind="pci",
    description="Intel Xe GPU VF (xe_vfio_pci)",
    modules=("vfio", "vfio_pci_core", "xe_vfio_pci"),
    host_driver="xe_vfio_pci",
    hostdev_driver="xe_vfio_pci",
    # no device dirty tracking: QEMU refuses to migrate it unless told to (the IOMMU may track instead)
    qemu_properties={"enable-migration": "on"},
    migration_flags=frozenset({Capability.STOP_COPY, Capability.P2P}),
)
