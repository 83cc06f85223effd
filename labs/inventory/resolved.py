"""The resolved lab: hosts, devices and migration pairs with stable ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from labs.inventory.models import Capability, Device, Host, LabSettings


@dataclass(frozen=True)
class LabHost:
    name: str
    spec: Host

    @property
    def id(self) -> str:
        return self.name

    @property
    def is_local_sim(self) -> bool:
        return any(d.kind == "sim" for d in self.spec.devices)


@dataclass(frozen=True)
class LabDevice:
    host: LabHost
    index: int
    spec: Device

    @property
    def name(self) -> str:
        return self.spec.label

    @property
    def id(self) -> str:
        """`hostA:0000:65:00.0`, `hostA:vgpu-1`, `hostA:simv2`."""
        return f"{self.host.name}:{self.name}"

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset(self.spec.capabilities)


@dataclass(frozen=True)
class LabPair:
    source: LabDevice
    destination: LabDevice

    @property
    def id(self) -> str:
        """`hostA->hostB:vgpu-1`."""
        name = self.source.name if self.source.name == self.destination.name else (
            f"{self.source.name}/{self.destination.name}"
        )
        return f"{self.source.host.name}->{self.destination.host.name}:{name}"

    def reversed(self) -> LabPair:
        return LabPair(self.destination, self.source)


@dataclass(frozen=True)
class Inventory:
    file: Path
    settings: LabSettings
    hosts: tuple[LabHost, ...]
    devices: tuple[LabDevice, ...]
    pairs: tuple[LabPair, ...]
    shape: str = "native"
    env: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def is_sim(self) -> bool:
        return self.settings.sim is not None

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def device(self, device_id: str) -> LabDevice:
        for d in self.devices:
            if d.id == device_id:
                return d
        raise KeyError(device_id)

    def vm_group(self, device: LabDevice) -> tuple[LabDevice, ...]:
        """The devices that share `device`'s VM (same host, same `vm`), in inventory order; alone without a `vm`."""
        if device.spec.vm is None:
            return (device,)
        return tuple(d for d in self.devices if d.host == device.host and d.spec.vm == device.spec.vm)

    def group_pairs(self, pair: LabPair) -> tuple[LabPair, ...]:
        """The pair's VM groups matched member by member (inventory order): what one multi-device VM carries.

        Just the pair itself when either end has no group, the groups differ in size, or the pair's
        devices sit at different places in their groups.
        """
        src, dst = self.vm_group(pair.source), self.vm_group(pair.destination)
        if len(src) != len(dst) or len(src) < 2 or src.index(pair.source) != dst.index(pair.destination):
            return (pair,)
        rest = [LabPair(a, b) for a, b in zip(src, dst, strict=True) if a != pair.source]
        return (pair, *rest)
