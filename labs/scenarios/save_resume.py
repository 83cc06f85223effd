"""Save/resume scenarios through libvirt: save + restore, managed save + start, restore on the other host.

What each does to the device on a real QEMU is in the spec (4.2): `virsh save`
pauses the VM (RUNNING -> STOP), reads the stream (STOP -> STOP_COPY -> STOP),
and kills QEMU; restore runs the destination flow (RESUMING, then RUNNING).

On libvirt's test:/// driver none of that happens: its save image holds the
domain XML and no device state at all. Where the sim lab needs a device-level
effect, `device_round_trip` drives the device explicitly through the device
layer, and says so in its step titles.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from labs.agentpool import open_device
from labs.errors import InfraError, LabError
from labs.faults.device import AlterSaveImagePayload, CorruptSaveImage, ImageDamage, count_streams
from labs.inventory import LabDevice
from labs.models import model_of
from labs.scenarios import probing, roundtrip
from labs.scenarios.context import Scenario
from labs.scenarios.held import despite_held_device
from labs.scenarios.readback import Readback, ensure_idle, read_back, recover_devices
from labs.scenarios.roundtrip import ContentCheck
from labs.virt.domain import VM
from labs.virt.migrate import completed_stats, vfio_bytes
from labs.virt.xml import hostdev_for, with_hostdevs

TEST_DRIVER_NOTE = "test:/// image carries no device state"


@dataclass
class SaveResumeResult:
    vm: VM
    image: str | None = None
    image_bytes: int | None = None
    readbacks: list[Readback] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    save_stats: dict[str, Any] = field(default_factory=dict)  # libvirt's completed-job statistics of the save
    # the device's stream signature found in the image (None: not looked for: no stream layout, or test:///)
    device_streams: int | None = None
    device: str = ""

    @property
    def device_bytes(self) -> int | None:
        """The device bytes the save wrote, where libvirt reports them (None: it does not)."""
        return vfio_bytes(self.save_stats)

    @property
    def save_problems(self) -> list[str]:
        out = ["the save moved no device bytes (QEMU reports 0 for the VFIO device)"] if self.device_bytes == 0 else []
        if self.device_streams == 0:
            # libvirt 11.3 reports no device bytes for a save: the image itself is the evidence
            out.append(f"the save image holds no device stream of {self.device} (its model's signature is not in it)")
        return out

    @property
    def final(self) -> Readback:
        return self.readbacks[-1]


def _note(vm: VM) -> str:
    return f" ({TEST_DRIVER_NOTE})" if vm.hv.is_test_driver else ""


def read_on_host(sc: Scenario, vm: VM, device: LabDevice, title: str, *, marked: bool = False) -> Readback:
    """The readback of `vm` on its own host; `marked`: the device probe and the guest judged against their marks."""
    marks = probing.marks(sc, vm) if marked else ()
    return read_back(sc.session, [vm.hv], vm.name, [device], title=title, steps=sc.steps, marks=marks)


def start_vm(sc: Scenario, device: LabDevice, label: str, memory_mib: int | None = None) -> VM:
    vm = sc.define_vm(device, label, memory_mib)
    ensure_idle(sc.session, device, sc.steps)
    with sc.steps.step(f"start {vm}"):
        despite_held_device(sc, vm.hv, vm.start)
        if vm.state() != "running":
            raise InfraError(f"{vm}: {vm.state()} after start")
    probing.mark(sc, vm, device)
    return vm


def _image_size(sc: Scenario, vm: VM, path: str) -> int | None:
    if vm.hv.files_local:
        return os.path.getsize(path) if os.path.exists(path) else None
    res = sc.session.ssh(vm.hv.name).run(f"stat -c %s {path}", timeout=15, sudo=True)
    return int(res.stdout) if res.ok and res.stdout.strip().isdigit() else None


def _count_device_streams(sc: Scenario, vm: VM, device: LabDevice, path: str, result: SaveResumeResult) -> None:
    layout = model_of(device).stream
    result.device = device.id
    if layout is None or vm.hv.is_test_driver:
        return  # no signature to look for; test:/// images carry no device state
    result.device_streams = count_streams(sc.session.ssh(vm.hv.name), device.host.spec.python, path, layout.magic)


def save_restore(sc: Scenario, vm: VM, device: LabDevice) -> SaveResumeResult:
    """Save the running VM to a file, check it is gone, restore it, read back."""
    result = SaveResumeResult(vm)
    path = sc.image_path(vm.hv, vm.name)
    result.image = path
    with sc.steps.step(f"save {vm} to {path}{_note(vm)}") as rec:
        vm.save(path)
        result.image_bytes = _image_size(sc, vm, path)
        result.save_stats = completed_stats(vm.hv, name=vm.name)
        _count_device_streams(sc, vm, device, path, result)
        rec.detail = {**result.save_stats, "device_streams_in_image": result.device_streams}
    result.readbacks.append(read_on_host(sc, vm, device, "readback after save"))
    with sc.steps.step(f"restore {vm.name} on {vm.hv.name} from {path}"):
        despite_held_device(sc, vm.hv, lambda: vm.hv.restore(path, vm.name))
    result.readbacks.append(read_on_host(sc, vm, device, "readback after restore", marked=True))
    return result


def managed_save_start(sc: Scenario, vm: VM, device: LabDevice) -> SaveResumeResult:
    """Managed save (libvirt keeps the image), then start: the start resumes from the image."""
    result = SaveResumeResult(vm)
    with sc.steps.step(f"managed save {vm}{_note(vm)}") as rec:
        vm.managed_save()
        result.save_stats = completed_stats(vm.hv, name=vm.name)
        if not vm.has_managed_save():
            raise InfraError(f"{vm}: no managed save image after managed save")
        path = vm.managed_save_path()
        if path is not None:
            _count_device_streams(sc, vm, device, path, result)
        elif not vm.hv.is_test_driver:
            unknown = f"{vm.hv.uri} keeps it where only the system daemon's directory is known"
            result.notes.append(f"the managed save image was not searched for the device's stream: {unknown}")
        rec.detail = {**result.save_stats, "image": path, "device_streams_in_image": result.device_streams}
    result.readbacks.append(read_on_host(sc, vm, device, "readback after managed save"))
    with sc.steps.step(f"start {vm} from its managed save image"):
        mark = vm.hv.events.mark()
        despite_held_device(sc, vm.hv, vm.start)
        event = vm.hv.events.wait_for(vm.name, "started", since=mark, timeout=sc.timeouts.command)
        result.notes.append(f"start event: {event}" if event else "no start event seen")
        if vm.has_managed_save():
            raise InfraError(f"{vm}: managed save image still present after start")
    result.readbacks.append(read_on_host(sc, vm, device, "readback after start", marked=True))
    return result


def restore_on_other_host(sc: Scenario, vm: VM, src: LabDevice, dst: LabDevice) -> SaveResumeResult:
    """Save on the source host, carry the image over, restore on the destination with its own device."""
    dst_hv = sc.hv(dst.host)
    result = SaveResumeResult(vm)
    path = sc.image_path(vm.hv, vm.name)
    with sc.steps.step(f"save {vm} to {path}{_note(vm)}"):
        xml = vm.xml()
        vm.save(path)
        result.image_bytes = _image_size(sc, vm, path)
        result.save_stats = completed_stats(vm.hv, name=vm.name)
        _count_device_streams(sc, vm, src, path, result)
    with sc.steps.step(f"carry the image {vm.hv.name} -> {dst_hv.name}"):
        moved = sc.transfer_image(vm.hv, path, dst_hv)
        result.image = moved
    with sc.steps.step(f"remove the saved definition of {vm.name} from {vm.hv.name} (it moves)"):
        result.notes += vm.remove()
    dxml = with_hostdevs(xml, (hostdev_for(dst),)) if hostdev_for(dst) != hostdev_for(src) else None
    ensure_idle(sc.session, dst, sc.steps)
    with sc.steps.step(f"restore {vm.name} on {dst_hv.name} with {dst.id}"):
        try:
            moved_vm = despite_held_device(sc, dst_hv, lambda: dst_hv.restore(moved, vm.name, dxml))
        except LabError as exc:
            # test:/// cannot rewrite XML on restore ("xml modification unsupported"); its hostdev is inert there
            if dxml is None or not dst_hv.is_test_driver:
                raise
            result.notes.append(f"test:/// kept the image's hostdev ({exc}); it is not backed by a device there")
            moved_vm = dst_hv.restore(moved, vm.name)
    result.vm = moved_vm
    result.readbacks.append(
        read_back(
            sc.session,
            [vm.hv, dst_hv],
            vm.name,
            [src, dst],
            title="readback after restore on the other host",
            steps=sc.steps,
            marks=probing.marks(sc, vm),
        )
    )
    return result


@dataclass
class DeviceRoundTrip:
    check: ContentCheck | None = None

    @property
    def stream_bytes(self) -> int:
        return self.check.stream_bytes if self.check else 0

    @property
    def problems(self) -> list[str]:
        if self.check is None:
            return ["no round trip was made"]
        return self.check.problems


def device_round_trip(sc: Scenario, src: LabDevice, dst: LabDevice, why: str) -> DeviceRoundTrip:
    """Save src's state through the device layer and resume it into dst (explicit, device level).

    Both are seeded apart first; the same device twice resumes into its private sim peer instead.
    """
    out = DeviceRoundTrip()
    title = f"device save of {src.id}, resume into {{}}, through the agent (explicit: {why})"
    with ExitStack() as stack:
        src_dev = stack.enter_context(open_device(sc.session, src))
        if src.id == dst.id:
            peer = stack.enter_context(roundtrip.sim_peer(src_dev, src))
            if peer is None:
                raise InfraError(f"{src.id}: a round trip needs a second device (the pair names the same one)")
            dst_dev, dst = peer, roundtrip.peer_device(src)
        else:
            dst_dev = stack.enter_context(open_device(sc.session, dst))
        with sc.steps.step(title.format(dst.id)):
            out.check = roundtrip.round_trip(src_dev, src, dst_dev, dst)
        with sc.steps.step(f"{src.id} runs again after its save"):
            src_dev.set_state("RUNNING")
    return out


@dataclass
class CorruptRestore:
    """A restore from an image whose device stream was damaged, the recovery, and the restore that follows."""

    refused: str | None = None  # the restore's error (None: it was accepted)
    after_refusal: Readback | None = None
    device_state_after: str | None = None  # the device as the failed restore left it
    recovered_by_reset: bool = False
    following: Readback | None = None


def _save(sc: Scenario, vm: VM) -> str:
    path = sc.image_path(vm.hv, vm.name)
    with sc.steps.step(f"save {vm} to {path}"):
        vm.save(path)
    return path


def _restore_or_refusal(sc: Scenario, vm: VM, path: str, what: str) -> str | None:
    """Restore `vm` from `path`: None when accepted, else libvirt's refusal."""
    with sc.steps.step(f"restore {vm.name} on {vm.hv.name} from {what}"):
        try:
            vm.hv.restore(path, vm.name)
        except LabError as exc:
            return str(exc)
    return None


def restore_corrupted(sc: Scenario, vm: VM, device: LabDevice, how: ImageDamage) -> CorruptRestore:
    """Save, damage the device stream in the image (spec 5.4 header recipes), restore: it must fail cleanly.

    Then the device is recovered as a user would (VFIO_DEVICE_RESET where the
    failed restore left it out of RUNNING), the image is repaired (the fault's
    undo), and a restore from it must bring the VM back with its registers.
    """
    layout = model_of(device).stream
    if layout is None or (how != "bad-magic" and how not in layout.header_damage):
        raise InfraError(f"{device.id}: its model does not say where {how} damages its stream")
    out = CorruptRestore()
    path = _save(sc, vm)
    fault = sc.inject(CorruptSaveImage(sc.session.ssh(vm.hv.name), path, layout, how, device.host.spec.python))
    out.refused = _restore_or_refusal(sc, vm, path, f"the damaged image ({how})")
    out.after_refusal = read_on_host(sc, vm, device, f"readback after the {how} restore")
    out.device_state_after = out.after_refusal.devices[0].state if out.after_refusal.devices else None
    recover_devices(sc.session, out.after_refusal, [device], steps=sc.steps)
    out.recovered_by_reset = bool(out.after_refusal.devices and out.after_refusal.devices[0].recovered_from)
    with sc.steps.step(f"repair the image (undo {fault.name})"):
        fault.undo()
    if out.refused is None:
        return out  # accepted: the VM runs from a damaged stream; the test says so
    with sc.steps.step(f"restore {vm.name} on {vm.hv.name} from the repaired image"):
        despite_held_device(sc, vm.hv, lambda: vm.hv.restore(path, vm.name))
    out.following = read_on_host(sc, vm, device, "readback after the following restore", marked=True)
    return out


@dataclass
class AlteredRestore:
    nothing: str | None = None  # why nothing was altered (no payload there at the save): no verdict
    refused: str | None = None  # the restore's error (None: accepted, as it must be)
    readback: Readback | None = None  # after the restore: the probe's registers and the guest's mailbox


def restore_altered(sc: Scenario, vm: VM, device: LabDevice, how: str) -> AlteredRestore:
    """Save, invert payload content the driver does not validate (the model's payload spans), restore, read
    back: the restore is accepted and the registers are intact, so only the guest can tell."""
    layout = model_of(device).stream
    if layout is None or how not in layout.payload_damage:
        raise InfraError(f"{device.id}: its model does not say where {how} lies in its stream")
    out = AlteredRestore()
    path = _save(sc, vm)
    fault = sc.inject(AlterSaveImagePayload(sc.session.ssh(vm.hv.name), path, layout, how, device.host.spec.python))
    out.nothing = fault.nothing
    out.refused = _restore_or_refusal(sc, vm, path, f"the altered image ({how})")
    out.readback = read_on_host(sc, vm, device, f"readback after the {how} restore", marked=True)
    return out
