"""Intel QAT 4xxx VFs behind qat_vfio_pci (drivers/vfio/pci/qat)."""

from __future__ import annotations

from labs.inventory.models import Capability
from labs.models import DeviceModel

QAT = DeviceModel(
    name="qat_vfio_pci",
    kind="pci",
    description="Intel QAT VF (qat_vfio_pci)",
    modules=("vfio", "vfio_pci_core", "qat_vfio_pci"),
    host_driver="qat_vfio_pci",
    hostdev_driver="qat_vfio_pci",
    # no device dirty tracking: QEMU refuses to migrate it unless told to (the IOMMU may track instead)
    qemu_properties={"enable-migration": "on"},
    migration_flags=frozenset({Capability.STOP_COPY, Capability.P2P, Capability.PRE_COPY}),
)
