"""The nested lab: two QEMU VMs running Debian trixie with the real mtty mdev, libvirtd and sshd.

Public API (wired into `lab nested up | down | status | power-on`):
    up(progress=None) -> UpResult      build/reuse the image, boot, create mdevs, write the inventory
    down() -> list[str]                stop what up started, drop overlays, keys and the inventory
    power_on(name)                     boot a host a reboot took down (its QEMU ended), set it up again
    status() -> list[VmStatus]         per VM: pid, SSH answering, uptime; status_table() renders it
    HOST_PACKAGES                      Debian packages the controller needs (bootstrap installs them)
"""

from labs.nested.lifecycle import NESTED_INVENTORY, UpResult, VmStatus, down, is_up, power_on, status, status_table, up
from labs.nested.recipe import HOST_PACKAGES, Recipe

__all__ = [
    "HOST_PACKAGES",
    "NESTED_INVENTORY",
    "Recipe",
    "UpResult",
    "VmStatus",
    "down",
    "is_up",
    "power_on",
    "status",
    "status_table",
    "up",
]
