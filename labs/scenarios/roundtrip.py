"""A device-level round trip whose content verdict can fail.

The stream goes into a different device (a private sim peer next to a
simulated device; the pair's other device elsewhere) whose content was made to
differ before the resume, so a resume that writes nothing cannot pass. Content
is compared by digest where the device has one (sim); elsewhere by re-save
equivalence: the destination is saved again after the resume and that stream
must equal the source's, byte for byte after the model's normaliser (labs.models). A round
trip that could not decide (content equal before, no way to seed the model)
says so in `undecided`; it never compares two Nones.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

from labs.inventory import LabDevice
from labs.inventory.models import SimDevice
from labs.models import model_of
from labs.scenarios.steps import StepLog
from labs.vfio.access import RUNNING_STATES, DeviceAccess

PEER_SUFFIX = "-peer"


@dataclass
class ContentCheck:
    source: str  # device under test -> where its stream went, for messages
    destination: str
    method: str = ""  # "digest" (sim) or "re-save" (the destination saved again, its stream compared)
    seeded: bool = False  # both sides were given distinct content before the resume
    source_content: str | None = None
    before: str | None = None  # the destination's content before the resume
    after: str | None = None  # ... and after it
    state_after: str | None = None
    stream_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def undecided(self) -> str | None:
        """Why no content verdict could be made (None: one was made)."""
        if self.source_content is None or self.after is None:
            return f"no content was read ({self.method or 'no method'}) on {self.source} or {self.destination}"
        if self.before == self.source_content and not self.seeded:
            return (
                f"{self.destination} already held {self.source}'s content before the resume and this model "
                "has no seeder to make it differ: the round trip cannot tell a resume that writes nothing"
            )
        return None

    @property
    def problems(self) -> list[str]:
        out: list[str] = []
        if self.state_after not in RUNNING_STATES:
            out.append(f"{self.destination} is {self.state_after} after the resume, not RUNNING")
        if self.seeded and self.before == self.source_content:
            out.append(f"{self.destination} held {self.source}'s content before the resume although seeded apart")
        if self.undecided is None and self.after != self.source_content:
            how = "digest" if self.method == "digest" else "re-saved stream"
            out.append(f"{self.destination}'s {how} after the resume differs from {self.source}'s")
        return out


def _seeds() -> tuple[int, int]:
    a = random.randrange(1, 128)
    return a, a | 0x80  # distinct, both non-zero (a fresh register reads 0)


def seed(dev: DeviceAccess, device: LabDevice, value: int) -> bool:
    """Give the device content of its own through its model's seeder (a sim's fill, a real device's
    registers); False where the model has none (then no seeding)."""
    seeder = model_of(device).seeder
    if seeder is None or not hasattr(dev, "fill" if device.spec.kind == "sim" else "call"):
        return False
    from labs.vfio.device import DeviceHandle

    seeder(cast(DeviceHandle, dev), f"roundtrip-{value}")
    return True


def _fingerprint(device: LabDevice, data: bytes) -> str:
    normalise = model_of(device).normalise
    return hashlib.sha256(normalise(data) if normalise else data).hexdigest()


def content(dev: DeviceAccess, device: LabDevice) -> str:
    """The digest (sim), or the fingerprint of a fresh save, after which the device runs again."""
    if device.spec.kind == "sim":
        return dev.digest()
    stream = dev.save()
    dev.set_state("RUNNING")
    return _fingerprint(device, stream.data())


def round_trip(src_dev: DeviceAccess, src: LabDevice, dst_dev: DeviceAccess, dst: LabDevice) -> ContentCheck:
    """Seed both apart, save src, resume into dst, compare; src is left as its save left it (STOP)."""
    check = ContentCheck(src.id, dst.id, method="digest" if src.spec.kind == "sim" else "re-save")
    a, b = _seeds()
    same = src_dev is dst_dev
    check.seeded = seed(src_dev, src, a)
    if src.spec.kind == "sim":
        check.source_content = src_dev.digest()
    saved = src_dev.save()
    check.stream_bytes = saved.bytes
    if src.spec.kind != "sim":
        check.source_content = _fingerprint(src, saved.data())
    if same:
        check.notes.append(f"no peer of {src.id} at hand: resumed into itself, reseeded so its content differs")
    check.seeded = seed(dst_dev, dst, b) and check.seeded
    check.before = content(dst_dev, dst)
    dst_dev.resume(saved)
    check.state_after = dst_dev.state()
    check.after = content(dst_dev, dst)
    return check


@contextmanager
def sim_peer(dev: DeviceAccess, device: LabDevice) -> Iterator[DeviceAccess | None]:
    """A private simulated device of the same model on the same agent (None for real devices).

    Its name derives from the device's, so the device's reservation covers it too.
    """
    client: Any = getattr(dev, "client", None)
    if device.spec.kind != "sim" or client is None:
        yield None
        return
    from labs.vfio.device import DeviceHandle

    assert isinstance(device.spec, SimDevice)
    peer = DeviceHandle.open(client, device.spec, name=f"{device.spec.label}{PEER_SUFFIX}")
    try:
        if peer.state() not in RUNNING_STATES:
            peer.reset()  # a peer an earlier test left stopped
        yield peer
    finally:
        peer.close()


def peer_device(device: LabDevice) -> LabDevice:
    """The LabDevice naming the sim peer, for messages."""
    return LabDevice(device.host, device.index, device.spec.model_copy(update={"name": f"{device.name}{PEER_SUFFIX}"}))


def both_ways(steps: StepLog, dev: DeviceAccess, device: LabDevice, why: str) -> list[ContentCheck]:
    """`device` saves into its sim peer, then resumes the peer's stream; a real device (no peer at hand)
    goes into itself, reseeded. Each leg is one step; `device` ends RUNNING."""
    checks: list[ContentCheck] = []
    with sim_peer(dev, device) as peer:
        legs: list[tuple[DeviceAccess, LabDevice, DeviceAccess, LabDevice]] = [(dev, device, dev, device)]
        if peer is not None:
            other = peer_device(device)
            legs = [(dev, device, peer, other), (peer, other, dev, device)]
        for src_dev, src, dst_dev, dst in legs:
            with steps.step(f"{why}: save {src.id}, resume into {dst.id} (seeded apart), through the agent"):
                checks.append(round_trip(src_dev, src, dst_dev, dst))
    return checks
