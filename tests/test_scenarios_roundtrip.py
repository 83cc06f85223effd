"""Round trips whose content verdict can fail: seeded apart, a different device, re-save where no digest exists."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from labs.inventory import LabDevice, LabHost
from labs.inventory.models import Capability, Host, MdevDevice, PciDevice, SimDevice
from labs.scenarios import roundtrip


class Stream:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.bytes = len(data)

    def data(self) -> bytes:
        return self._data

    def chunks(self) -> Iterator[bytes]:
        yield self._data


class FakeDevice:
    """A device whose content is a few bytes; `writes_on_resume=False` is a driver whose resume writes nothing."""

    def __init__(self, content: bytes = b"\0" * 8, writes_on_resume: bool = True) -> None:
        self.content = content
        self.st = "RUNNING"
        self.writes_on_resume = writes_on_resume

    def state(self) -> str:
        return self.st

    def set_state(self, state: str) -> None:
        self.st = state

    def data_size(self) -> int:
        return 0

    def reset(self) -> None:
        self.st = "RUNNING"

    def faults(self, **knobs: Any) -> dict[str, Any]:
        return {}

    def digest(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def fill(self, seed: int | str) -> str:
        self.content = hashlib.sha256(str(seed).encode()).digest()[:8]
        return self.digest()

    def region_info(self, index: int) -> dict[str, int]:
        return {"size": 8 if index == 0 else 0}  # one register port, as mtty-1's

    def call(self, op: str, **args: Any) -> None:
        assert op == "region_write" and args["index"] == 0
        at, data = args["offset"], base64.b64decode(args["data"])
        self.content = self.content[:at] + data + self.content[at + len(data) :]

    def save(self) -> Stream:
        self.st = "STOP"
        return Stream(b"HDR" + self.content)

    def resume(self, stream: Any) -> None:
        if self.writes_on_resume:
            self.content = stream.data()[3:]
        self.st = "RUNNING"


def _dev(spec: SimDevice | MdevDevice | PciDevice, host: str) -> LabDevice:
    return LabDevice(LabHost(host, Host(address="x", devices=(spec,))), 0, spec)


SIM = SimDevice(
    kind="sim", name="s", driver="labs.sim.v2:V2Driver", protocol="v2", capabilities=(Capability.STOP_COPY,)
)
MTTY = MdevDevice(
    kind="mdev",
    parent="mtty",
    type="mtty-2",
    uuid="0b0c5a3e-7c1d-4c8e-9a57-6d1f0e2b3c4d",
    protocol="v2",
    capabilities=(Capability.STOP_COPY,),
)
PCI = PciDevice(kind="pci", pci="0000:65:00.0", protocol="v2", capabilities=(Capability.STOP_COPY,))


@pytest.mark.parametrize("spec", [SIM, MTTY], ids=["digest", "re-save"])
def test_a_resume_that_writes_nothing_fails_the_round_trip(spec: SimDevice | MdevDevice) -> None:
    src, dst = _dev(spec, "hostA"), _dev(spec, "hostB")
    good = roundtrip.round_trip(FakeDevice(), src, FakeDevice(), dst)
    assert good.undecided is None and good.problems == [] and good.seeded
    assert good.before != good.source_content == good.after
    # two equal devices, a resume that writes nothing: the old self round trip passed this
    broken = roundtrip.round_trip(FakeDevice(), src, FakeDevice(writes_on_resume=False), dst)
    assert broken.undecided is None
    how = "digest" if isinstance(spec, SimDevice) else "re-saved stream"
    assert f"{dst.id}'s {how} after the resume differs from {src.id}'s" in broken.problems, broken.problems


def test_into_itself_the_device_is_reseeded_so_its_content_differs() -> None:
    dev, device = FakeDevice(), _dev(MTTY, "hostA")
    check = roundtrip.round_trip(dev, device, dev, device)
    assert check.problems == [] and check.before != check.source_content and check.notes
    lazy = FakeDevice(writes_on_resume=False)
    assert roundtrip.round_trip(lazy, device, lazy, device).problems


def test_no_seeder_and_equal_content_is_undecided_never_a_pass() -> None:
    src, dst = _dev(PCI, "hostA"), _dev(PCI, "hostB")
    check = roundtrip.round_trip(FakeDevice(), src, FakeDevice(writes_on_resume=False), dst)
    assert not check.seeded and check.undecided and "cannot tell a resume that writes nothing" in check.undecided
    assert check.problems == []  # undecided, not failed: unseeded devices may hold the same content


def test_content_never_read_is_undecided() -> None:
    check = roundtrip.ContentCheck("a", "b", method="re-save", state_after="RUNNING")
    assert check.undecided == "no content was read (re-save) on a or b"
    one_side = roundtrip.ContentCheck("a", "b", method="", source_content="x", state_after="RUNNING")
    assert one_side.undecided == "no content was read (no method) on a or b" and one_side.problems == []


def test_content_verdict_by_what_each_side_held() -> None:
    """Unseeded but different before the resume: decided. Seeded apart yet equal before: a failure."""

    def check(seeded: bool, before: str) -> roundtrip.ContentCheck:
        return roundtrip.ContentCheck(
            "a", "b", "re-save", seeded, source_content="x", before=before, after="x", state_after="RUNNING"
        )

    assert check(seeded=False, before="y").undecided is None and check(seeded=False, before="y").problems == []
    assert check(seeded=True, before="x").undecided is None
    assert check(seeded=True, before="x").problems == ["b held a's content before the resume although seeded apart"]
