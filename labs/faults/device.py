"""Faults on the device: missing or incompatible on the destination, failing transitions, bad streams.

Host-side faults (mdev removed or created) act over SSH on sysfs. Device-level
faults act through the device layer (`DeviceAccess`): on simulated drivers a
fault knob; on real devices the spec's recipes (section 5.4): a truncated
stream, or a header with a flipped magic. A payload only where the model names
content spans the driver accepts (never an index: a corrupted one may make the
driver write past a buffer in host kernel memory).
"""

from __future__ import annotations

import json
import shlex
import uuid
from typing import Any, Literal

import libvirt

from labs.errors import InfraError
from labs.faults import mdevs
from labs.faults.base import ExpectedError, Fault
from labs.inventory import LabDevice
from labs.inventory.models import MdevDevice, PciDevice
from labs.models import StreamLayout, has_fault_knobs
from labs.transport import HostConnection
from labs.vfio.access import RUNNING_STATES, DeviceAccess
from labs.vfio.client import AgentOSError
from labs.virt.sequence import NOTHING, ev, seq
from labs.virt.xml import Hostdev, hostdev_for

ABSENT_PCI = "0000:fe:1f.7"  # a function no lab host has; the destination XML points there


class DestinationLacksDevice(Fault):
    """The destination has no such device.

    mdev: remove the destination's mdev over sysfs (undo creates it again with
    the same UUID and type). PCI and simulated devices: the destination XML
    names a device the host does not have (nothing on the host to undo).
    """

    name = "destination-lacks-device"
    # "device not found: mediated device '<uuid>' not found" from the destination's prepare (measured, libvirt
    # 11.3, mdev); an absent PCI function is reported by the same code path family (not measured)
    expected_errors = (ExpectedError(libvirt.VIR_FROM_NONE, libvirt.VIR_ERR_DEVICE_MISSING),)
    # refused in the destination's prepare, before its QEMU starts and before the source sends anything
    source_events = NOTHING
    destination_events = NOTHING

    def __init__(self, ssh: HostConnection, device: LabDevice) -> None:
        super().__init__(device.id)
        self.ssh = ssh
        self.device = device
        self.hostdev: Hostdev = hostdev_for(device)

    def _inject(self) -> None:
        spec = self.device.spec
        if isinstance(spec, MdevDevice):
            path = shlex.quote(f"/sys/bus/mdev/devices/{spec.uuid}/remove")
            self.ssh.run(f"echo 1 > {path}", timeout=30, sudo=True, check=True)
            self.note(f"removed mdev {spec.uuid} on {self.ssh.name}")
        elif isinstance(spec, PciDevice):
            self.hostdev = Hostdev("pci", ABSENT_PCI)
            self.note(f"destination XML names absent PCI function {ABSENT_PCI}")
        else:
            self.hostdev = Hostdev("mdev", str(uuid.uuid4()))
            self.note(f"destination XML names absent mdev {self.hostdev.address}")

    def _undo(self) -> None:
        spec = self.device.spec
        if isinstance(spec, MdevDevice):
            if self.ssh.run(f"test -e /sys/bus/mdev/devices/{spec.uuid}", timeout=15).ok:
                self.note(f"mdev {spec.uuid} already present")
                return
            create = f"/sys/class/mdev_bus/{spec.parent}/mdev_supported_types/{spec.type}/create"
            self.ssh.run(f"echo {spec.uuid} > {shlex.quote(create)}", timeout=30, sudo=True, check=True)
            self.note(f"re-created mdev {spec.uuid} ({spec.type}) on {self.ssh.name}")
        else:
            self.note("nothing to restore on the host")


class IncompatibleDestinationMdev(Fault):
    """An mdev of another type on the destination (the model's `incompatible` type): resume must refuse it.

    The mdev is recorded on the host before it is created (labs.faults.mdevs), under `run_id` or else
    the run holding the device's reservation there: `lab janitor` removes it after a killed run.
    """

    name = "incompatible-destination-device"
    # "operation failed: job 'migration in' failed: load of migration failed: Bad address" (measured, libvirt 11.3)
    expected_errors = (ExpectedError(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_OPERATION_FAILED),)
    # the incoming QEMU starts, then fails to load the device's state and is stopped
    destination_events = seq(ev("started/migrated"), ev("stopped/(failed|crashed|destroyed)"))

    def __init__(self, ssh: HostConnection, device: LabDevice, other_type: str, run_id: str | None = None) -> None:
        super().__init__(f"{device.id} as {other_type}")
        if not isinstance(device.spec, MdevDevice):
            raise InfraError(f"{device.id}: an incompatible mdev needs an mdev device")
        self.ssh = ssh
        self.device = device
        self.spec: MdevDevice = device.spec
        self.other_type = other_type
        self.run_id = run_id
        self.uuid = str(uuid.uuid4())
        self.hostdev = Hostdev("mdev", self.uuid)
        self.created = False

    def _inject(self) -> None:
        self.run_id = self.run_id or mdevs.holder_run(self.ssh, self.device)
        what = {"parent": self.spec.parent, "type": self.other_type, "fault": self.name}
        mdevs.write_record(self.ssh, self.run_id, self.uuid, what)
        create = f"/sys/class/mdev_bus/{self.spec.parent}/mdev_supported_types/{self.other_type}/create"
        self.ssh.run(f"echo {self.uuid} > {shlex.quote(create)}", timeout=30, sudo=True, check=True)
        self.created = True
        self.note(f"created mdev {self.uuid} of type {self.other_type} on {self.ssh.name} (run {self.run_id})")

    def _undo(self) -> None:
        if mdevs.remove_mdev(self.ssh, self.uuid):
            self.note(f"removed mdev {self.uuid}")
        if self.run_id:  # None: inject failed before the record was written
            mdevs.drop_record(self.ssh, self.run_id, self.uuid)


class DeviceTransitionFailure(Fault):
    """The driver fails one transition (fault knob through the device layer); undo disarms it.

    A simulated driver, or a real one patched with the knobs (the nested lab builds one).

    `arc` is "SRC->DST" in state names; `to_error` makes the failure land in
    ERROR instead of leaving the device where it was.
    """

    name = "device-transition-failure"

    def __init__(
        self, dev: DeviceAccess, device: LabDevice, arc: str, errno: str = "EIO", to_error: bool = False
    ) -> None:
        super().__init__(f"{device.id} {arc} -> {errno}{' (ERROR)' if to_error else ''}")
        if not has_fault_knobs(device):
            raise InfraError(
                f"{device.id}: its driver has no transition fault knob (simulated drivers have one, and real "
                "drivers whose model declares them); on other real devices use CorruptResumeStream (spec 5.4)"
            )
        src, dst = (part.strip().upper() for part in arc.split("->"))
        self.dev = dev
        self.knob = {"from": src, "to": dst, "errno": errno, "error": to_error}

    def _inject(self) -> None:
        self.dev.faults(transitions=[self.knob])
        self.note(f"armed transition fault {self.knob}")

    def _undo(self) -> None:
        fired = self.dev.faults(clear=True).get("fired")
        self.note(f"cleared fault knobs (fired: {fired})")
        state = self.dev.state()
        if state not in RUNNING_STATES:
            self.dev.reset()
            self.note(f"VFIO_DEVICE_RESET (was {state}); now {self.dev.state()}")


StreamDamage = Literal["truncate", "bad-magic", "too-long"]


def damage(stream: bytes, how: StreamDamage) -> bytes:
    """The spec's safe recipes (5.4): never the port payload."""
    if how == "truncate":
        return stream[: max(1, len(stream) // 2)]
    if how == "bad-magic":
        return bytes(b ^ 0xFF for b in stream[:8]) + stream[8:]
    return stream + b"\0" * 64


def _split_like(data: bytes, chunks: list[bytes]) -> list[bytes]:
    """`data` cut at the boundaries of `chunks`; what is left over (a too-long stream) is one more chunk."""
    out, at = [], 0
    for chunk in chunks:
        if at >= len(data):
            break
        out.append(data[at : at + len(chunk)])
        at += len(chunk)
    return out + ([data[at:]] if at < len(data) else [])


class CorruptResumeStream(Fault):
    """Resume a damaged stream into the device (device level); it must refuse, and undo resets it.

    `refused` tells whether the device layer reported the refusal; the state the
    device is left in is recorded for the readback.
    """

    name = "corrupt-resume-stream"

    def __init__(self, dev: DeviceAccess, device: LabDevice, stream: bytes | list[bytes], how: StreamDamage) -> None:
        """`stream` as bytes is resumed in one write; as the chunks it was saved in, in those chunks
        (v1 replays the source's chunk boundaries, V1-R18: one chunk larger than the data window is
        refused for its size, whatever its content)."""
        data = stream if isinstance(stream, bytes) else b"".join(stream)
        super().__init__(f"{device.id} ({how}, {len(data)} bytes)")
        self.name = f"corrupt-resume-stream:{how}"
        self.record.name = self.name
        self.dev = dev
        self.stream = damage(data, how)
        self.chunks = [self.stream] if isinstance(stream, bytes) else _split_like(self.stream, stream)
        self.refused: str | None = None
        self.state_after: str | None = None

    def _inject(self) -> None:
        try:
            self.dev.resume(self.chunks)
        except AgentOSError as exc:  # only an errno from the device is a refusal; a framework error propagates
            self.refused = f"{type(exc).__name__}: {exc}"
        self.state_after = self.dev.state()
        self.note(f"resumed {len(self.stream)} damaged bytes: {self.refused or 'ACCEPTED'}; state {self.state_after}")

    def _undo(self) -> None:
        self.dev.reset()
        self.note(f"VFIO_DEVICE_RESET; state {self.dev.state()}")


# Runs on the host (stdlib only): how often `needle` is in the file, and its bytes from the first one on.
_READ_STREAM = r"""
import sys, json
path, needle, size = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
with open(path, "rb") as f:
    data = f.read()
at = data.find(needle)
print(json.dumps({"count": data.count(needle), "at": at, "head": data[at:at + size].hex() if at >= 0 else ""}))
"""
# Runs on the host: write [offset, hex] spans, print what was there.
_WRITE_SPANS = r"""
import sys, json
old = []
with open(sys.argv[1], "r+b") as f:
    for offset, new in json.loads(sys.argv[2]):
        f.seek(offset); was = f.read(len(new) // 2)
        f.seek(offset); f.write(bytes.fromhex(new))
        old.append([offset, was.hex()])
print(json.dumps(old))
"""


def _scan_stream(ssh: HostConnection, python: str, path: str, magic: bytes, size: int) -> dict[str, Any]:
    cmd = " ".join(shlex.quote(x) for x in (python, "-c", _READ_STREAM, path, magic.hex(), str(size)))
    res = ssh.run(cmd, timeout=60, sudo=True)
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1]) if res.ok and res.stdout.strip() else None
    except ValueError:
        out = None
    if not isinstance(out, dict):
        raise InfraError(f"{ssh.name}: reading {path}: {res.stderr.strip() or 'nothing printed'}")
    return out


def find_stream(ssh: HostConnection, python: str, path: str, magic: bytes, size: int) -> tuple[int, bytes]:
    """Where the device stream that begins with `magic` is in `path` on the host (it must be there once), and
    its first `size` bytes."""
    out = _scan_stream(ssh, python, path, magic, size)
    if out["count"] != 1:
        raise InfraError(f"{ssh.name}: reading {path}: device stream signature found {out['count']} times")
    return int(out["at"]), bytes.fromhex(out["head"])


def count_streams(ssh: HostConnection, python: str, path: str, magic: bytes) -> int:
    """How many device streams that begin with `magic` the file `path` on the host holds."""
    return int(_scan_stream(ssh, python, path, magic, 0)["count"])


def write_spans(ssh: HostConnection, python: str, path: str, spans: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Write each (file offset, hex bytes) into `path` on the host; returns what each span held."""
    cmd = " ".join(shlex.quote(x) for x in (python, "-c", _WRITE_SPANS, path, json.dumps(spans)))
    res = ssh.run(cmd, timeout=60, sudo=True, check=True)
    return [(int(o), str(h)) for o, h in json.loads(res.stdout.strip().splitlines()[-1])]


ImageDamage = Literal["bad-magic", "bad-version", "bad-ports"]


class CorruptSaveImage(Fault):
    """Damage the device's stream inside a saved VM image (libvirt save file), so that restore must fail.

    The device stream is found by its signature (the model's StreamLayout:
    the bytes its stream begins with) and damaged only in its header, by the
    spec's safe recipes (5.4): the magic flipped, or a header field the layout
    names (a version, a count) set to a value no device has; never the payload.
    QEMU writes the damaged header to the destination's RESUMING data fd,
    which refuses it, and the restore fails. Undo writes the original bytes back.
    """

    name = "corrupt-save-image"

    def __init__(
        self, ssh: HostConnection, path: str, layout: StreamLayout, how: ImageDamage, python: str = "python3"
    ) -> None:
        super().__init__(f"{ssh.name}:{path} ({how})")
        self.name = f"corrupt-save-image:{how}"
        self.record.name = self.name
        self.ssh = ssh
        self.path = path
        self.magic = layout.magic
        if how != "bad-magic" and how not in layout.header_damage:
            raise InfraError(f"{ssh.name}: the device's stream layout names no field for {how}")
        self.layout = layout
        self.how = how
        self.python = python
        self.patched: dict[str, object] | None = None

    def _patch(self, delta: int, new: bytes | None) -> dict[str, object]:
        at, _head = find_stream(self.ssh, self.python, self.path, self.magic, len(self.magic))
        where, patch = (at, bytes(b ^ 0xFF for b in self.magic)) if new is None else (at + delta, new)
        [(_offset, old)] = write_spans(self.ssh, self.python, self.path, [(where, patch.hex())])
        return {"offset": where, "old": old, "new": patch.hex()}

    def _inject(self) -> None:
        if self.how == "bad-magic":
            self.patched = self._patch(0, None)
        else:
            offset, new = self.layout.header_damage[self.how]
            self.patched = self._patch(offset, new)
        self.note(f"{self.how}: {self.path} @{self.patched['offset']}: {self.patched['old']} -> {self.patched['new']}")

    def _undo(self) -> None:
        if self.patched is None:
            return
        offset, old = int(str(self.patched["offset"])), str(self.patched["old"])
        write_spans(self.ssh, self.python, self.path, [(offset, old)])
        self.note(f"restored {len(old) // 2} bytes @{offset} of {self.path}")


class AlterSaveImagePayload(Fault):
    """Invert payload content of the device's stream inside a saved VM image, where the model names content
    the driver does not validate (e.g. bytes in flight in a FIFO). The restore must succeed and the
    registers read back intact: only a guest that reads the content back can tell. Undo writes the bytes back.

    Nothing to alter (the model's spans are empty: no byte in flight at the save) is `nothing`, not a fault.
    """

    name = "alter-save-image-payload"
    HEAD = 4096  # bytes of the stream read to find the spans

    def __init__(self, ssh: HostConnection, path: str, layout: StreamLayout, how: str, python: str = "python3") -> None:
        super().__init__(f"{ssh.name}:{path} ({how})")
        if how not in layout.payload_damage:
            raise InfraError(f"{ssh.name}: the device's stream layout names no payload for {how}")
        self.name = f"alter-save-image-payload:{how}"
        self.record.name = self.name
        self.ssh, self.path, self.layout, self.how, self.python = ssh, path, layout, how, python
        self.old: list[tuple[int, str]] = []
        self.nothing: str | None = None  # why nothing was altered

    def _inject(self) -> None:
        at, head = find_stream(self.ssh, self.python, self.path, self.layout.magic, self.HEAD)
        spans = self.layout.payload_damage[self.how](head)
        if not spans:
            self.nothing = f"the stream at @{at} of {self.path} holds no {self.how} to alter"
            self.note(self.nothing)
            return
        new = [(at + off, bytes(b ^ 0xFF for b in head[off : off + size]).hex()) for off, size in spans]
        self.old = write_spans(self.ssh, self.python, self.path, new)
        self.note(
            f"{self.how}: inverted {', '.join(f'{size} bytes @{at + off}' for off, size in spans)} of {self.path}"
        )

    def _undo(self) -> None:
        if self.old:
            write_spans(self.ssh, self.python, self.path, self.old)
            self.note(f"wrote back {len(self.old)} spans of {self.path}")
