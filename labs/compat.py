"""Can a pair's source migrate to its destination? Kernel, driver, firmware, QEMU and libvirt side by side.

What each end runs is read once per device (one SSH command, one libvirt
probe); `compare` gives each field a status and the pair a verdict:
different drivers cannot read each other's streams (incompatible); other
differences are allowed but are what a certification must have covered
(compatible, with differences); a destination QEMU or libvirt older than the
source's may lack the source's machine type or features (a difference too).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from labs.errors import LabError
from labs.inventory import LabDevice
from labs.inventory.models import MdevDevice, PciDevice, SimDevice
from labs.session import LabSession
from labs.virt.connection import probe as probe_libvirt

FIELDS = ("kernel", "driver", "driver_version", "firmware", "qemu", "libvirt")
COMPATIBLE, DIFFERENCES, INCOMPATIBLE = "compatible", "compatible, with differences", "incompatible"


@dataclass(frozen=True)
class DeviceFacts:
    device: str
    kernel: str | None = None
    driver: str | None = None
    driver_version: str | None = None
    firmware: str | None = None
    qemu: str | None = None
    libvirt: str | None = None
    errors: tuple[str, ...] = ()  # what could not be read


@dataclass(frozen=True)
class FieldVerdict:
    name: str
    source: str | None
    destination: str | None
    status: str  # ok | warn | fail | n/a (labs.doctor.Status values)
    note: str = ""


@dataclass
class PairCompat:
    pair: str
    fields: list[FieldVerdict] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        statuses = {f.status for f in self.fields}
        return INCOMPATIBLE if "fail" in statuses else DIFFERENCES if "warn" in statuses else COMPATIBLE


def _sysfs_path(device: LabDevice) -> str | None:
    spec = device.spec
    if isinstance(spec, PciDevice):
        return f"/sys/bus/pci/devices/{spec.pci}"
    if isinstance(spec, MdevDevice):
        return f"/sys/bus/mdev/devices/{spec.uuid}"
    return None


def facts_command(path: str) -> str:
    """key=value lines: the kernel, the bound driver's module and its version, the (parent) function's firmware."""
    p = shlex.quote(path)
    return "; ".join(
        [
            'echo "kernel=$(uname -r)"',
            f'drv=$(basename "$(readlink -f {p}/driver 2>/dev/null)" 2>/dev/null)',
            'echo "driver=$drv"',
            f'mod=$(basename "$(readlink -f {p}/driver/module 2>/dev/null)" 2>/dev/null)',
            '[ -n "$mod" ] && echo "driver_version=$(cat /sys/module/$mod/version 2>/dev/null'
            ' || cat /sys/module/$mod/srcversion 2>/dev/null)"',
            # a VF's firmware is its physical function's, as its network interface reports it
            f"pf={p}; [ -e {p}/physfn ] && pf=$(readlink -f {p}/physfn)",
            'for n in "$pf"/net/*; do [ -e "$n" ] && ethtool -i "$(basename "$n")" 2>/dev/null'
            " | sed -n 's/^firmware-version: */firmware=/p'; done | head -n 1",
            "true",
        ]
    )


def parse_facts(device: str, text: str, **known: str | None) -> DeviceFacts:
    values: dict[str, str | None] = dict.fromkeys(("kernel", "driver", "driver_version", "firmware"))
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in values and value.strip():
            values[key] = value.strip()
    return DeviceFacts(device, **values, **known)  # type: ignore[arg-type]


def gather(session: LabSession, device: LabDevice) -> DeviceFacts:
    """What `device`'s end runs (unread fields stay None, with the reason in `errors`)."""
    errors: list[str] = []
    qemu = libvirt = None
    uri = device.host.spec.libvirt_uri
    if uri:
        try:
            info = probe_libvirt(uri, device.host.name)
            qemu, libvirt = f"{info.driver} {info.hv_version}", info.lib_version
        except LabError as exc:
            errors.append(f"libvirt: {exc}")
    path = _sysfs_path(device)
    command = facts_command(path) if path else 'echo "kernel=$(uname -r)"'
    text = ""
    try:
        res = session.ssh(device.host.name).run(command, timeout=60, idempotent=True)
        text = res.stdout
    except LabError as exc:
        errors.append(f"ssh: {exc}")
    facts = parse_facts(device.id, text, qemu=qemu, libvirt=libvirt)
    if isinstance(device.spec, SimDevice):
        facts = DeviceFacts(**{**vars(facts), "driver": device.spec.driver})
    return DeviceFacts(**{**vars(facts), "errors": tuple(errors)})


def _version(text: str | None) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()


def compare(pair: str, src: DeviceFacts, dst: DeviceFacts) -> PairCompat:
    out = PairCompat(pair)
    for name in FIELDS:
        a, b = getattr(src, name), getattr(dst, name)
        if a is None and b is None:
            # no firmware, or an in-tree module without a version: nothing to compare
            status, note = ("n/a", "") if name in ("firmware", "driver_version") else ("warn", "not read on either end")
        elif a is None or b is None:
            status, note = "warn", f"not read on the {'source' if a is None else 'destination'}"
        elif a == b:
            status, note = "ok", ""
        elif name == "driver":
            status, note = "fail", "different drivers cannot read each other's migration streams"
        elif name in ("qemu", "libvirt") and _version(b) >= _version(a):
            status, note = "ok", "destination newer"
        elif name in ("qemu", "libvirt"):
            status, note = "warn", "destination older: the source's machine type and features may be missing there"
        else:
            status, note = "warn", "differs: migrations across it must have been certified"
        out.fields.append(FieldVerdict(name, a, b, status, note))
    return out
