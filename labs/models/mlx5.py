"""NVIDIA/Mellanox ConnectX VFs behind mlx5_vfio_pci (drivers/vfio/pci/mlx5)."""

from __future__ import annotations

from labs.inventory.models import Capability
from labs.models import DeviceModel

MLX5 = DeviceModel(
    name="mlx5_vfio_pci",
    kind="pci",
    description="ConnectX VF (mlx5_vfio_pci), with device dirty tracking",
    modules=("vfio", "vfio_pci_core", "mlx5_vfio_pci"),
    host_driver="mlx5_vfio_pci",
    hostdev_driver="mlx5_vfio_pci",
    migration_flags=frozenset({Capability.STOP_COPY, Capability.P2P, Capability.DIRTY_LOGGING}),
    optional_flags=frozenset({Capability.PRE_COPY}),  # with the firmware's pre-copy capability
)
