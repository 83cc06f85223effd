"""virtio-net VFs behind virtio_vfio_pci (drivers/vfio/pci/virtio), live migration through the admin queue."""

from __future__ import annotations

from labs.inventory.models import Capability
from labs.models import DeviceModel

VIRTIO = DeviceModel(
    name="virtio_vfio_pci",
    kind="pci",
    description="virtio-net VF (virtio_vfio_pci)",
    modules=("vfio", "vfio_pci_core", "virtio_vfio_pci"),
    host_driver="virtio_vfio_pci",
    hostdev_driver="virtio_vfio_pci",
    # no device dirty tracking: QEMU refuses to migrate it unless told to (the IOMMU may track instead)
    qemu_properties={"enable-migration": "on"},
    migration_flags=frozenset({Capability.STOP_COPY, Capability.P2P}),
)
