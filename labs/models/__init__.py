"""Device models: everything the framework knows about one kind of device, in one object per model.

A model says which kernel modules and host driver the device needs, how its
PCI hostdev appears in the domain XML (libvirt's `<driver model=.../>`, managed
mode), the QEMU properties it needs, the migration flags its driver advertises
(the doctor compares them with the inventory), its probe, its seeder and stream
normaliser for content checks, its stream layout for damage recipes, which
peer type must refuse its stream, benign kernel log lines and known issues.

A device gets its model from the inventory key `device_model` (on the device,
or on its host for every device of the model's kind): a registered name or a
dotted path `package.module:ATTRIBUTE`. Names are registered by this package's
modules (one per model) and by other packages through the entry-point group
`labs.device_models`. A device without the key gets the first model whose
`matches` accepts it, else the generic model of its kind.

A simulated device may name any model: the sim driver then stands in for the
real device (flags, QEMU properties, log lines and known issues apply; host
modules and drivers are not looked for).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Literal

from labs.errors import ConfigError
from labs.inventory import LabDevice
from labs.inventory.models import Capability, Device

if TYPE_CHECKING:
    from labs.probes import DeviceProbe
    from labs.vfio.device import DeviceHandle
    from labs.workloads import GuestWorkload

GROUP = "labs.device_models"
Kind = Literal["pci", "mdev", "sim"]
# how to give a real device a distinctive state its stream carries (registers), from a seed string
Seeder = Callable[["DeviceHandle", str], None]
# a stream's first bytes -> the spans (offset, length) of payload to invert
PayloadSpans = Callable[[bytes], list[tuple[int, int]]]


@dataclass(frozen=True)
class StreamLayout:
    """Where a model's migration stream is found in a save image, and header fields safe to damage (spec 5.4)."""

    magic: bytes  # what the stream begins with
    # damage name -> (offset from the magic, bytes written there); the resume must refuse each
    header_damage: Mapping[str, tuple[int, bytes]] = field(default_factory=dict)
    # damage name -> the spans (offset from the magic, length) to invert, from the stream's first bytes; the
    # resume accepts them (content the driver does not validate) and only the guest can notice ([]: nothing there)
    payload_damage: Mapping[str, PayloadSpans] = field(default_factory=dict)
    # the bytes a full save of the device moves, as QEMU counts them off its data_fd (None: it varies with content)
    size: Callable[[Device], int | None] | None = None


@dataclass(frozen=True)
class KnownIssue:
    """One documented wrong outcome of a model, shown as known (xfail), never as a pass."""

    after: str  # the situation: "failed-operation" (a failed incoming migration or restore, a QEMU killed holding it)
    state: str  # the state the device is found in
    reason: str
    link: str


@dataclass(frozen=True, eq=False)
class DeviceModel:
    name: str
    kind: Kind
    description: str = ""
    modules: tuple[str, ...] = ()  # kernel modules the host must have (the doctor looks in /sys/module)
    host_driver: str | None = None  # the driver the PCI function must be bound to (a VFIO variant driver)
    hostdev_driver: str | None = None  # libvirt's <driver model=.../> of the PCI hostdev
    managed: bool = True  # libvirt binds the function to the driver on start and gives it back on stop
    qemu_properties: Mapping[str, str] = field(default_factory=dict)  # of the vfio-pci frontend
    migration_flags: frozenset[Capability] = frozenset({Capability.STOP_COPY})  # always advertised
    optional_flags: frozenset[Capability] = frozenset()  # advertised with some firmware or setting
    pci_ids: tuple[tuple[int, int], ...] = ()  # vendor, device as config space reports them
    matches: Callable[[Device], bool] | None = None  # takes devices that name no model
    probe: DeviceProbe | None = None
    seeder: Seeder | None = None
    normalise: Callable[[bytes], bytes] | None = None  # the stream with its volatile fields blanked
    stream: StreamLayout | None = None
    incompatible: Mapping[str, str] = field(default_factory=dict)  # mdev type -> a type that must refuse it
    kernel_log_allow: tuple[str, ...] = ()  # regular expressions of benign kernel log lines of the driver
    known_issues: tuple[KnownIssue, ...] = ()
    workload: GuestWorkload | None = None  # the guest workload, where the model has one
    fault_knobs: bool = False  # its driver takes the labs fault knobs (DeviceAccess.faults) as a real device

    @property
    def flags(self) -> frozenset[Capability]:
        """Every flag the driver may advertise."""
        return self.migration_flags | self.optional_flags

    def flags_problem(self, listed: frozenset[Capability]) -> tuple[bool, str]:
        """(fatal, what differs) between the inventory's capabilities and the model's flags ("": they agree).
        Listing a flag the driver never advertises is fatal; leaving out one it always does only leaves it untested."""
        over = sorted(c.value for c in listed - self.flags)
        under = sorted(c.value for c in self.migration_flags - listed)
        if over:
            return True, f"inventory lists {', '.join(over)}, which {self.name} does not advertise"
        if under:
            return False, f"{self.name} advertises {', '.join(under)}, which the inventory does not list (untested)"
        return False, ""


# a device no model names: the inventory alone says what it advertises
GENERIC_PCI = DeviceModel(
    "vfio-pci",
    "pci",
    "a PCI function bound to vfio-pci (or a variant driver no model names)",
    ("vfio", "vfio_pci"),
    optional_flags=frozenset(Capability),
)
GENERIC_MDEV = DeviceModel(
    "mdev", "mdev", "a mediated device no model names", ("vfio", "mdev"), optional_flags=frozenset(Capability)
)
GENERIC = {"pci": GENERIC_PCI, "mdev": GENERIC_MDEV}


@cache
def builtin() -> dict[str, str]:
    """The models of this package's modules (one file per model), by name -> dotted path."""
    out: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, DeviceModel):
                out[value.name] = f"{module.__name__}:{attr}"
    return out


def registered() -> dict[str, str]:
    """Model name -> dotted path: the built-in ones, then those other packages register (entry points)."""
    out = dict(builtin())
    for ep in importlib.metadata.entry_points(group=GROUP):
        out.setdefault(ep.name, ep.value)
    return out


@cache
def _import(path: str) -> DeviceModel:
    module, _, attr = path.partition(":")
    try:
        model = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"device model {path}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    if not isinstance(model, DeviceModel):
        raise ConfigError(f"device model {path}: is a {type(model).__name__}, not a labs.models.DeviceModel")
    return model


def load(ref: str) -> DeviceModel:
    """A model by registered name or by `package.module:ATTRIBUTE`."""
    known = registered()
    if ref in known:
        return _import(known[ref])
    if ":" in ref:
        return _import(ref)
    raise ConfigError(f"device model '{ref}': no such model (registered: {', '.join(sorted(known))})")


def available() -> list[DeviceModel]:
    """Every registered model, loaded."""
    return [_import(path) for path in registered().values()]


def model_of(device: LabDevice) -> DeviceModel:
    """The model of an inventory device (ConfigError where its `device_model` is unknown or of another kind)."""
    spec = device.spec
    if spec.device_model:
        model = load(spec.device_model)
        if spec.kind != "sim" and model.kind != spec.kind:
            raise ConfigError(f"{device.id}: device_model {spec.device_model} is for {model.kind} devices")
        return model
    host_ref = device.host.spec.device_model
    if host_ref and (model := load(host_ref)).kind == spec.kind:
        return model
    for model in available():
        if model.matches is not None and model.matches(spec):
            return model
    return load("sim") if spec.kind == "sim" else GENERIC[spec.kind]


def has_fault_knobs(device: LabDevice) -> bool:
    """Can the device's driver be told to fail an arc: a simulated driver, or a real one whose model says so."""
    return device.spec.kind == "sim" or model_of(device).fault_knobs


def model_for_pci_id(pci_id: tuple[int, int]) -> DeviceModel | None:
    """The model whose config space reports this vendor:device (a device opened without an inventory entry)."""
    return next((m for m in available() if pci_id in m.pci_ids), None)


def probe_for(device: LabDevice) -> DeviceProbe | None:
    return model_of(device).probe


def stream_size(device: LabDevice) -> int | None:
    """What a full save of the device moves, where its model knows (a state of fixed size)."""
    layout = model_of(device).stream
    return layout.size(device.spec) if layout is not None and layout.size is not None else None


def probe_named(name: str) -> DeviceProbe | None:
    return next((m.probe for m in available() if m.probe is not None and m.probe.name == name), None)


def workload_for(device: LabDevice) -> GuestWorkload | None:
    return model_of(device).workload


def workload_named(name: str) -> GuestWorkload | None:
    return next((m.workload for m in available() if m.workload is not None and m.workload.name == name), None)


def known_issue(device: LabDevice, after: str, state: str | None) -> KnownIssue | None:
    return next((k for k in model_of(device).known_issues if k.after == after and k.state == state), None)
