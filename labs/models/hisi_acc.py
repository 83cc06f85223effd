"""HiSilicon accelerator VFs (ZIP, SEC, HPRE) behind hisi_acc_vfio_pci (drivers/vfio/pci/hisilicon)."""

from __future__ import annotations

from labs.inventory.models import Capability
from labs.models import DeviceModel

HISI_ACC = DeviceModel(
    name="hisi_acc_vfio_pci",
    kind="pci",
    description="HiSilicon ACC VF (hisi_acc_vfio_pci)",
    modules=("vfio", "vfio_pci_core", "hisi_acc_vfio_pci"),
    host_driver="hisi_acc_vfio_pci",
    hostdev_driver="hisi_acc_vfio_pci",
    # no device dirty tracking: QEMU refuses to migrate it unless told to (the IOMMU may track instead)
    qemu_properties={"enable-migration": "on"},
    migration_flags=frozenset({Capability.STOP_COPY, Capability.PRE_COPY}),
)
