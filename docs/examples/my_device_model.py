"""A device model kept outside labs: a VF behind its VFIO variant driver, registered through an entry point.

The package holding this file declares, in its pyproject.toml:

    [project.entry-points."labs.device_models"]
    acme_vfio_pci = "my_device_model:ACME"

README "Plug in a device model" walks through it.
"""

from __future__ import annotations

from labs.inventory.models import Capability
from labs.models import DeviceModel

ACME = DeviceModel(
    name="acme_vfio_pci",
    kind="pci",
    description="Acme NIC VF behind its VFIO variant driver",
    modules=("vfio", "vfio_pci_core", "acme_vfio_pci"),  # the doctor looks for them in /sys/module
    host_driver="acme_vfio_pci",  # what the VF must be bound to
    hostdev_driver="acme_vfio_pci",  # libvirt binds it on start: <driver model='acme_vfio_pci'/>
    qemu_properties={"enable-migration": "on"},  # no device dirty tracking: QEMU must be told to migrate it
    migration_flags=frozenset({Capability.STOP_COPY, Capability.P2P}),
    optional_flags=frozenset({Capability.PRE_COPY}),  # with firmware 2.0 and later
    kernel_log_allow=(r"^acme_vfio_pci \S+: migration region ready$",),  # benign: printed on every open
)
