"""What the nested lab needed in the VM layer, tested without it: QEMU property overrides in the domain XML,
the mtty probe against a fake monitor, the save-image corruption fault on a local file, released devices
idling in STOP, and `python -m labs.nested.ci` skipping with its reason."""

from __future__ import annotations

import random
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from labs.errors import InfraError
from labs.faults.device import AlterSaveImagePayload, CorruptSaveImage, count_streams
from labs.inventory import LabDevice, LabHost
from labs.inventory.models import Host, MdevDevice
from labs.models import mtty as mtty_probe
from labs.models import probe_for, probe_named
from labs.nested import ci
from labs.probes import ProbeMark
from labs.scenarios.readback import DeviceView, Readback
from labs.scenarios.save_resume import SaveResumeResult
from labs.transport.ssh import Result
from labs.vfio.access import IDLE_STATES
from labs.virt.xml import QEMU_NS, domain_xml, hostdev_for, hostdevs_of, spec_for, with_hostdevs

UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
PROPS = {"enable-migration": True, "x-device-dirty-page-tracking": False}  # as YAML reads on/off


def _mtty(props: dict[str, Any] | None = None, type_: str = "mtty-2") -> LabDevice:
    spec = MdevDevice(kind="mdev", parent="mtty", type=type_, uuid=UUID, protocol="v2", qemu_properties=props or {})
    return LabDevice(LabHost("nested-a", Host(address="127.0.0.1", devices=(spec,))), 0, spec)


def test_qemu_properties_become_an_override_on_the_hostdev_alias() -> None:
    device = _mtty(PROPS)
    assert device.spec.qemu_properties == {"enable-migration": "on", "x-device-dirty-page-tracking": "off"}
    root = ET.fromstring(domain_xml(spec_for("labs-x-1", [device], "qemu")))
    alias = root.find("devices/hostdev/alias")
    assert alias is not None and alias.get("name") == "ua-labs-hostdev0"
    dev = root.find(f"{{{QEMU_NS}}}override/{{{QEMU_NS}}}device")
    assert dev is not None and dev.get("alias") == "ua-labs-hostdev0"
    props = {p.get("name"): p.get("value") for p in dev.iter(f"{{{QEMU_NS}}}property")}
    assert props == {"enable-migration": "on", "x-device-dirty-page-tracking": "off"}
    # the properties are not part of the hostdev's identity: the live XML's hostdev compares equal
    assert hostdevs_of(domain_xml(spec_for("labs-x-1", [device], "qemu"))) == [hostdev_for(device)]


def test_no_override_without_properties_nor_on_test_driver() -> None:
    spec = MdevDevice(kind="mdev", parent="other", type="other-1", uuid=UUID, protocol="v2")
    other = LabDevice(LabHost("nested-a", Host(address="127.0.0.1", devices=(spec,))), 0, spec)
    plain = domain_xml(spec_for("labs-x-2", [other], "qemu"))
    assert "override" not in plain and "<alias" not in plain
    on_test = domain_xml(spec_for("labs-x-3", [_mtty(PROPS)], "test"))
    assert "override" not in on_test and "<alias" not in on_test


def test_destination_swap_keeps_alias_and_override() -> None:
    xml = domain_xml(spec_for("labs-x-4", [_mtty(PROPS)], "qemu"))
    other = hostdev_for(_mtty(PROPS)).__class__("mdev", "11111111-2222-3333-4444-555555555555")
    swapped = with_hostdevs(xml, (other,))
    assert "ua-labs-hostdev0" in swapped and "x-device-dirty-page-tracking" in swapped
    assert hostdevs_of(swapped) == [other]


class FakeMonitor:
    """query-pci with the mtty behind a root port, and a port space for HMP i/o."""

    def __init__(self, bars: tuple[int, ...] = (0xC000, 0xC008), mapped_after: int = 0) -> None:
        self.bars = bars
        self.ports: dict[int, int] = {}
        self.calls = 0
        self.mapped_after = mapped_after

    def name(self) -> str:
        return "dom"

    def XMLDesc(self, _flags: int) -> str:  # libvirt's name
        return (
            "<domain><devices><hostdev type='mdev'><source>"
            f"<address uuid='{UUID}'/></source><alias name='ua-labs-hostdev0'/></hostdev></devices></domain>"
        )

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command == "query-pci":
            self.calls += 1
            mapped = self.calls > self.mapped_after
            regions = [
                {"bar": i, "type": "io", "address": a if mapped else -1, "size": 8} for i, a in enumerate(self.bars)
            ]
            mtty = {"qdev_id": "ua-labs-hostdev0", "id": {"vendor": 0x4348, "device": 0x3253}, "regions": regions}
            port = {"qdev_id": "pci.2", "regions": [], "pci_bridge": {"devices": [mtty]}}
            return [{"bus": 0, "devices": [{"qdev_id": "", "regions": []}, port]}]
        assert command == "human-monitor-command" and arguments is not None
        words = arguments["command-line"].split()
        if words[0] == "o":
            self.ports[int(words[2], 16)] = int(words[3], 16)
            return ""
        address = int(words[2], 16)
        return f"portb[{address:#06x}] = {self.ports.get(address, 0):#x}\r\n"


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> FakeMonitor:
    fake = FakeMonitor(mapped_after=2)
    monkeypatch.setattr(mtty_probe, "qmp", lambda dom, cmd, args=None: fake.qmp(cmd, args))
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    return fake


def test_mtty_probe_marks_scratch_and_lcr_of_both_ports(monitor: FakeMonitor) -> None:
    device = _mtty(PROPS)
    probe = probe_for(device)
    assert probe is not None and probe_named("mtty-uart") is probe
    mark = probe.mark(monitor, device, UUID)
    assert set(mark.values) == {"port0.scr", "port0.lcr", "port1.scr", "port1.lcr"}
    assert monitor.ports[0xC007] == mark.values["port0.scr"] and monitor.ports[0xC00B] == mark.values["port1.lcr"]
    assert all(v < 0x80 for k, v in mark.values.items() if k.endswith(".lcr")), "DLAB must stay clear"
    assert probe.read(monitor, UUID, mark) == mark.values
    again = probe.mark(monitor, device, UUID)
    assert all(again.values[k] != mark.values[k] for k in mark.values), "a fresh mark repeats no value"


def test_probe_reading_reports_lost_state() -> None:
    from labs.probes import ProbeReading

    reading = ProbeReading("mtty-uart", "nested-b", {"port0.scr": 0x5A}, {"port0.scr": 0x00})
    assert reading.mismatches == ["port0.scr = 0x00, wrote 0x5a"]
    rb = Readback("d")
    from labs.scenarios.readback import SideView

    rb.sides.append(SideView("nested-b", "running", registers=[reading]))
    assert rb.problems(expect_on="nested-b") == [
        "mtty-uart on nested-b: device state lost: port0.scr = 0x00, wrote 0x5a"
    ]


def test_no_probe_for_other_devices() -> None:
    spec = MdevDevice(kind="mdev", parent="i915", type="i915-GVTg_V5_4", uuid=UUID, protocol="v2")
    assert probe_for(LabDevice(LabHost("h", Host(address="x", devices=(spec,))), 0, spec)) is None


def test_released_real_device_may_idle_in_stop_not_in_resuming() -> None:
    rb = Readback("d", devices=[DeviceView("a:mtty-2", state="STOP", accepted=IDLE_STATES)])
    assert rb.problems(expect_on=None) == []
    rb.devices[0].state = "RESUMING"
    assert rb.problems(expect_on=None) == ["device a:mtty-2 is RESUMING, not RUNNING or STOP"]
    sim = Readback("d", devices=[DeviceView("a:sim", state="STOP")])
    assert sim.problems(expect_on=None) == ["device a:sim is STOP, not RUNNING"]


class LocalSsh:
    name = "local"

    def run(self, command: str, timeout: float | None = None, *, sudo: bool | None = None, check: bool = False,
            **_kw: Any) -> Result:  # fmt: skip
        res = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=timeout)
        out = Result("local", command, res.returncode, res.stdout, res.stderr, 0.0)
        return out.check() if check else out


@pytest.mark.parametrize(
    ("how", "offset", "new"),
    [("bad-magic", 0, None), ("bad-version", 8, (2).to_bytes(4, "little")), ("bad-ports", 16, b"\xff\0\0\0")],
)
def test_corrupt_save_image_patches_the_header_and_undo_restores_it(
    tmp_path: Path, how: str, offset: int, new: bytes | None
) -> None:
    stream = mtty_probe.STREAM_MAGIC + (1).to_bytes(4, "little") + bytes(4) + (2).to_bytes(4, "little") + bytes(76)
    rng = random.Random(7)
    image = bytes(rng.randrange(256) for _ in range(4096)) + stream + bytes(1000)
    path = tmp_path / "vm.save"
    path.write_bytes(image)
    fault = CorruptSaveImage(LocalSsh(), str(path), mtty_probe.MTTY.stream, how, python="python3")  # type: ignore[arg-type]
    fault.inject()
    damaged = path.read_bytes()
    at = 4096 + offset
    want = new if new is not None else bytes(b ^ 0xFF for b in mtty_probe.STREAM_MAGIC)
    assert damaged[at : at + len(want)] == want
    assert damaged[:at] == image[:at] and damaged[at + len(want) :] == image[at + len(want) :]
    fault.undo()
    assert path.read_bytes() == image


def test_corrupt_save_image_refuses_an_ambiguous_image(tmp_path: Path) -> None:
    path = tmp_path / "vm.save"
    path.write_bytes(mtty_probe.STREAM_MAGIC * 2)
    fault = CorruptSaveImage(LocalSsh(), str(path), mtty_probe.MTTY.stream, "bad-magic")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="found 2 times"):
        fault.inject()
    assert path.read_bytes() == mtty_probe.STREAM_MAGIC * 2


def test_a_save_image_without_the_device_stream_fails_the_save(tmp_path: Path) -> None:
    """libvirt 11.3 reports no device bytes for a save, so `moved no device bytes` could not fail on the real
    stack: the image is looked at instead, and a save whose image holds no stream of the device is a problem."""
    path = tmp_path / "vm.save"
    path.write_bytes(bytes(4096) + mtty_probe.STREAM_MAGIC + bytes(100))
    assert count_streams(LocalSsh(), "python3", str(path), mtty_probe.STREAM_MAGIC) == 1  # type: ignore[arg-type]
    path.write_bytes(bytes(4096))
    assert count_streams(LocalSsh(), "python3", str(path), mtty_probe.STREAM_MAGIC) == 0  # type: ignore[arg-type]
    with pytest.raises(InfraError, match=r"reading .*missing\.save"):
        count_streams(LocalSsh(), "python3", str(tmp_path / "missing.save"), mtty_probe.STREAM_MAGIC)  # type: ignore[arg-type]
    saved = SaveResumeResult(vm=None, device="nested-a:mtty-2", device_streams=0)  # type: ignore[arg-type]
    assert saved.save_problems == [
        "the save image holds no device stream of nested-a:mtty-2 (its model's signature is not in it)"
    ]
    assert SaveResumeResult(vm=None, device_streams=1).save_problems == []  # type: ignore[arg-type]
    assert SaveResumeResult(vm=None).save_problems == []  # type: ignore[arg-type]  # not looked for: test:///


def _mtty_stream(counts: tuple[int, ...]) -> bytes:
    """mtty_data with len(counts) ports (spec 5.2): each FIFO holds 0x10.. bytes, rxtx.count as given."""
    header = mtty_probe.STREAM_MAGIC + (1).to_bytes(4, "little") + bytes(4) + len(counts).to_bytes(4, "little")
    ports = b"".join(bytes(8) + bytes(range(0x10, 0x20)) + bytes([c, 0, c]) + bytes(9) for c in counts)
    return header + bytes(4) + ports


def test_mtty_names_only_the_fifos_with_bytes_in_flight() -> None:
    assert mtty_probe.fifo_in_flight(_mtty_stream((3, 0))) == [(32, 16)]
    assert mtty_probe.fifo_in_flight(_mtty_stream((0, 5))) == [(68, 16)]
    assert mtty_probe.fifo_in_flight(_mtty_stream((0,))) == []
    wide = bytearray(_mtty_stream((1, 1)))
    wide[16:20] = (255).to_bytes(4, "little")  # a damaged nr_ports must not reach past mtty's two ports
    assert mtty_probe.fifo_in_flight(bytes(wide)) == [(32, 16), (68, 16)]


def test_altered_payload_inverts_the_fifo_in_flight_and_undo_restores_it(tmp_path: Path) -> None:
    stream = _mtty_stream((4, 0))
    image = bytes(random.Random(7).randrange(256) for _ in range(4096)) + stream + bytes(1000)
    path = tmp_path / "vm.save"
    path.write_bytes(image)
    layout = mtty_probe.MTTY.stream
    assert layout is not None
    fault = AlterSaveImagePayload(LocalSsh(), str(path), layout, "fifo-content")  # type: ignore[arg-type]
    fault.inject()
    altered = path.read_bytes()
    fifo = 4096 + 32
    assert altered[fifo : fifo + 16] == bytes(b ^ 0xFF for b in range(0x10, 0x20))
    assert altered[:fifo] == image[:fifo] and altered[fifo + 16 :] == image[fifo + 16 :]  # indices, port 1 intact
    fault.undo()
    assert path.read_bytes() == image


def test_altered_payload_with_nothing_in_flight_alters_nothing(tmp_path: Path) -> None:
    path = tmp_path / "vm.save"
    path.write_bytes(bytes(100) + _mtty_stream((0, 0)))
    layout = mtty_probe.MTTY.stream
    assert layout is not None
    fault = AlterSaveImagePayload(LocalSsh(), str(path), layout, "fifo-content")  # type: ignore[arg-type]
    fault.inject()
    assert fault.nothing and "no fifo-content" in fault.nothing
    assert path.read_bytes() == bytes(100) + _mtty_stream((0, 0))


def test_ci_skips_with_the_reason_when_qemu_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ci.shutil, "which", lambda tool: None if tool == "qemu-system-x86_64" else f"/usr/bin/{tool}")
    assert ci.main([]) == 0
    assert "nested: SKIPPED: qemu-system-x86_64 is not installed" in capsys.readouterr().out


def test_ci_skips_when_the_budget_is_too_small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ci.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setenv("LABS_NESTED_BUDGET", "60")
    reason = ci.cannot_run()
    assert reason is not None and "LABS_NESTED_BUDGET=60s" in reason


def test_mark_is_plain_data() -> None:
    mark = ProbeMark("mtty-uart", "nested-a:mtty-2", UUID, {"port0.scr": 1})
    assert mark.values == {"port0.scr": 1}


class FakeDev:
    def __init__(self, state: str) -> None:
        self._state = state
        self.resets = 0

    def state(self) -> str:
        return self._state

    def reset(self) -> None:
        self.resets += 1
        self._state = "RUNNING"


def _opener(dev: FakeDev) -> Any:
    from contextlib import contextmanager

    @contextmanager
    def open_(_session: Any, _device: Any) -> Any:
        yield dev

    return open_


@pytest.mark.parametrize(("state", "resets"), [("RUNNING", 0), ("STOP", 0), ("RESUMING", 1), ("STOP_COPY", 1)])
def test_ensure_idle_resets_a_device_left_resuming(monkeypatch: pytest.MonkeyPatch, state: str, resets: int) -> None:
    from labs.scenarios import readback

    dev = FakeDev(state)
    monkeypatch.setattr(readback, "open_device", _opener(dev))
    found = readback.ensure_idle(None, _mtty())  # type: ignore[arg-type]
    assert dev.resets == resets and found == (state if resets else None)


def test_recover_devices_resets_and_records(monkeypatch: pytest.MonkeyPatch) -> None:
    from labs.scenarios import readback

    dev = FakeDev("RESUMING")
    monkeypatch.setattr(readback, "open_device", _opener(dev))
    device = _mtty()
    rb = Readback("d", devices=[DeviceView(device.id, state="RESUMING", accepted=IDLE_STATES)])
    assert rb.problems(expect_on=None)
    readback.recover_devices(None, rb, [device])  # type: ignore[arg-type]
    assert dev.resets == 1 and rb.devices[0].recovered_from == "RESUMING" and rb.devices[0].state == "RUNNING"
    assert rb.problems(expect_on=None) == []


def test_a_managed_save_is_searched_where_the_system_daemon_keeps_it() -> None:
    """The same image check for managed save: libvirt's system daemon keeps the image under its save directory."""
    from types import SimpleNamespace

    from labs.virt.domain import VM

    system = SimpleNamespace(uri="qemu+ssh://root@127.0.0.1:22301/system?keyfile=/k")
    assert VM(system, "d1").managed_save_path() == "/var/lib/libvirt/qemu/save/d1.save"  # type: ignore[arg-type]
    assert VM(SimpleNamespace(uri="qemu:///session"), "d1").managed_save_path() is None  # type: ignore[arg-type]
