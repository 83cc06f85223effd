"""The guest workload: the bootblock builds, boots under plain QEMU, and its mailbox verdict can fail."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from labs.inventory import LabDevice, LabHost
from labs.inventory.models import Host, MdevDevice, SimDevice
from labs.models import workload_for
from labs.scenarios.migration import Leg
from labs.scenarios.readback import Readback, SideView
from labs.virt.migrate import MigrationResult
from labs.virt.xml import DomainSpec, domain_xml
from labs.workloads import WorkloadReading
from labs.workloads.build import build
from labs.workloads.mailbox import MAGIC, MAILBOX_ADDR, SIZE, STATUS_RUNNING, Gap, Mailbox, PortStats, judge, parse_xp

QEMU = shutil.which("qemu-system-x86_64")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("gcc"):
        pytest.skip("no gcc: the bootblock is built with the controller's compiler")
    return build(tmp_path_factory.mktemp("bootblock"))


def test_the_elf_is_multiboot_with_the_mailbox_where_the_host_reads_it(kernel: Path) -> None:
    data = kernel.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 1  # 32-bit
    magic = (0x1BADB002).to_bytes(4, "little")
    assert 0 <= data.find(magic) < 8192 - 12  # multiboot v1: the header in the first 8 KiB
    symbols = subprocess.run(["nm", "-S", str(kernel)], capture_output=True, text=True, check=True).stdout
    mb = next(line.split() for line in symbols.splitlines() if line.endswith(" mb"))
    assert (int(mb[0], 16), int(mb[1], 16)) == (MAILBOX_ADDR, SIZE)  # the C layout is the one mailbox.py parses


def test_a_second_build_reuses_the_first(kernel: Path) -> None:
    assert build(kernel.parent) == kernel


def _box(heartbeat: int, sent: int = 100, **kw: object) -> Mailbox:
    counters = (heartbeat, heartbeat // 10, heartbeat, 1000, 1, STATUS_RUNNING, 16, 8, 8)
    box = Mailbox(MAGIC, 1, *counters, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    box.ports = [PortStats(0xC000, 0x100, sent, sent - 8, 0, 0, 0, 8)]
    return replace(box, **kw)  # type: ignore[arg-type]


def test_a_guest_that_went_on_passes() -> None:
    assert judge(_box(1000), _box(1500, 200), _box(1600, 210), 0.5) == []


@pytest.mark.parametrize(
    ("after", "later", "finding"),
    [
        (_box(1500), _box(1500), "does not run"),
        (_box(10, 5), _box(20, 6), "restarted"),
        (_box(1500, 50), _box(1600, 60), "counters went back"),
        (_box(1500), _box(1600, ports=[PortStats(0xC000, 0x100, 300, 290, 1, 0, 0, 8)]), "came back wrong"),
        (_box(1500), _box(1600, ports=[PortStats(0xC000, 0x100, 300, 290, 0, 2, 0, 8)]), "went missing"),
        (_box(1500), _box(1600, err_code=1, err_expected=5, err_found=6), "expected 0x5, found 0x6"),
        (_box(1500), _box(1600, gaps=[Gap(1200, 0, 5)]), "stood still 5 s"),
        (_box(1500), _box(1600, magic=0), "not the bootblock"),
    ],
)
def test_what_the_guest_saw_go_wrong_is_a_finding(after: Mailbox, later: Mailbox, finding: str) -> None:
    problems = judge(_box(1000, 100), after, later, 2.0)
    assert any(finding in p for p in problems), problems


def test_a_pause_pushed_out_of_the_ring_is_still_seen() -> None:
    """More than MAX_GAPS short gaps after a long one: the all-time longest gap grew across the move."""
    later = _box(1600, gaps=[Gap(1500 + i, 0, 0) for i in range(8)], max_gap_rtc=30)
    problems = judge(_box(1000, max_gap_rtc=2), _box(1500), later, 2.0)
    assert any("stood still 30 s" in p for p in problems), problems
    assert judge(_box(1000, max_gap_rtc=30), _box(1500), later, 2.0) == []  # that gap came before the mark
    # the guest's own clock too: the figure beside libvirt's downtime
    reading = WorkloadReading("bootblock", "hostB", _box(1000), _box(1500), replace(later, max_gap_tsc=3_000_000))
    assert reading.stall_s == 30 and reading.stall_guest_ms == 3000.0  # _box's TSC runs at 1000 kHz


def test_a_pause_before_the_mark_is_not_this_moves() -> None:
    assert judge(_box(1000), _box(1500), _box(1600, gaps=[Gap(900, 0, 30)]), 0.2) == []


def test_the_xml_boots_the_workload_kernel() -> None:
    xml = domain_xml(DomainSpec("d", virt_type="qemu", kernel="/var/tmp/k.elf", cmdline="dirty_mib=4"))
    assert "<kernel>/var/tmp/k.elf</kernel>" in xml and "<cmdline>dirty_mib=4</cmdline>" in xml
    assert "<kernel>" not in domain_xml(DomainSpec("d", virt_type="qemu"))


def test_a_workload_is_its_device_model_s() -> None:
    uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
    spec = MdevDevice(kind="mdev", parent="mtty", type="mtty-2", uuid=uuid, protocol="v2")
    sim_spec = SimDevice(kind="sim", protocol="v2", driver="labs.sim.v2:V2Driver")
    host = LabHost("h", Host(address="127.0.0.1", devices=(spec, sim_spec)))
    mtty, sim = LabDevice(host, 0, spec), LabDevice(host, 1, sim_spec)
    workload = workload_for(mtty)
    assert workload is not None and workload.name == "bootblock"
    assert workload_for(sim) is None


class Hmp:
    serial: Path  # the guest's serial port, written to a file

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        for _ in range(100):
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                time.sleep(0.1)
        self.read_prompt()

    def read_prompt(self) -> str:
        out = b""
        while not out.endswith(b"(qemu) "):
            out += self.sock.recv(65536)
        return out.decode(errors="replace")

    def __call__(self, command: str) -> str:
        self.sock.sendall(command.encode() + b"\n")
        out = self.read_prompt()
        return out.split("\r\n", 1)[-1] if "\r\n" in out else out  # the echoed command line first

    def mailbox(self) -> Mailbox:
        return Mailbox.parse(parse_xp(self(f"xp /{SIZE // 4}wx {MAILBOX_ADDR:#x}")))


@pytest.fixture
def guest(kernel: Path, tmp_path: Path) -> Iterator[Hmp]:
    if QEMU is None:
        pytest.skip("no qemu-system-x86_64 on the controller")
    sock, serial = tmp_path / "hmp.sock", tmp_path / "serial.txt"
    cmd = [QEMU, "-accel", "tcg", "-M", "q35", "-m", "64", "-display", "none", "-serial", f"file:{serial}"]
    cmd += ["-kernel", str(kernel), "-append", "dirty_mib=8 rate_mib=16", "-monitor", f"unix:{sock},server,nowait"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        hmp = Hmp(sock)
        hmp.serial = serial
        deadline = time.monotonic() + 60
        while hmp.mailbox().status != STATUS_RUNNING:
            assert time.monotonic() < deadline, "the bootblock did not reach its loop in 60 s"
            time.sleep(0.2)
        yield hmp
    finally:
        proc.kill()
        proc.wait()


def test_the_bootblock_waits_for_its_tick(guest: Hmp) -> None:
    """Between passes the guest halts until the timer's next tick, so a running VM leaves its host's CPU to
    the migration; it says on its serial port (before it reports its loop running) which way it runs."""
    assert "a pass per tick" in guest.serial.read_text()


def _settle(hmp: Hmp) -> tuple[Mailbox, Mailbox]:
    after = hmp.mailbox()
    time.sleep(0.5)
    return after, hmp.mailbox()


def test_the_bootblock_runs_on_across_a_stop(guest: Hmp) -> None:
    """Plain QEMU without mtty: the RAM and mailbox part (no ports found, none driven)."""
    before = guest.mailbox()
    guest("stop")
    time.sleep(4.5)
    guest("cont")
    after, later = _settle(guest)
    assert later.nports == 0 and later.dirty_mib == 8 and later.dirty_pages > 0
    assert judge(before, after, later, 4.5) == []
    assert judge(before, after, later, 0.0) != []  # the stop is seen, by the RTC, as a pause of 4-5 s
    assert max(g.rtc_s for g in later.gaps if g.heartbeat > before.heartbeat) >= 4


def test_a_guest_that_started_over_is_caught(guest: Hmp) -> None:
    time.sleep(1.0)
    before = guest.mailbox()
    guest("system_reset")
    deadline = time.monotonic() + 60
    while guest.mailbox().status != STATUS_RUNNING or guest.mailbox().heartbeat >= before.heartbeat:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    after, later = _settle(guest)
    assert any("restarted" in p for p in judge(before, after, later, 60.0))


def test_the_readback_fails_on_what_the_guest_saw() -> None:
    from labs.scenarios.readback import Readback, SideView
    from labs.workloads import WorkloadReading

    bad = _box(1600, ports=[PortStats(0xC000, 0x100, 300, 290, 0, 1, 0, 8)])
    reading = WorkloadReading("bootblock", "hostB", _box(1000), _box(1500), bad, allowed_stall_s=1.0)
    reading.judge()
    rb = Readback("d", sides=[SideView("hostB", "running", guest=[reading])])
    problems = rb.problems(expect_on="hostB", expect_device_running=False)
    assert any("guest bootblock on hostB: port 0" in p for p in problems), problems
    reading.later, reading.error = None, "InfraError: no monitor"
    reading.judge()
    assert rb.problems(expect_on="hostB", expect_device_running=False) == [
        "guest bootblock on hostB: mailbox not read: InfraError: no monitor"
    ]
    assert rb.as_dict()["sides"][0]["guest"][0]["before"]["heartbeat"] == 1000


def test_a_guest_pause_over_the_downtime_budget_fails_the_leg_that_libvirt_passed() -> None:
    """Old behaviour: a source driver 8 s slow into STOP_COPY passed: libvirt's downtime (805 ms) leaves the
    arc out, and the guest's pause was judged only against that same downtime."""
    reading = WorkloadReading("bootblock", "hostB", _box(1000), _box(1500), _box(1600, gaps=[Gap(1200, 0, 10)]))
    assert (reading.stall_s, reading.stall_at_least_s) == (10, 8)
    short = WorkloadReading("bootblock", "hostB", _box(1000), _box(1500), _box(1600, gaps=[Gap(1200, 0, 1)]))
    assert short.stall_at_least_s == 0  # a second by the RTC is within its slack

    def leg(guest: WorkloadReading) -> Leg:
        done = MigrationResult("hostA", "hostB", "d", ok=True, completed={"downtime": 805, "vfio_data_transferred": 96})
        sides = [SideView("hostA", "absent"), SideView("hostB", "running", guest=[guest])]
        return Leg("hostA", "hostB", done, Readback("d", sides), downtime_budget_ms=5000)

    assert leg(reading).downtime_problems == [
        "the guest stood still at least 8 s by its clock, over the lab's downtime budget of 5000 ms "
        "(libvirt's downtime: 805 ms)"
    ]
    assert leg(short).downtime_problems == []
    at_most = leg(reading)  # the boundary: at least 8 s by the guest's clock keeps to 8000 ms, not to 7999 ms
    at_most.downtime_budget_ms = 8000
    assert at_most.downtime_problems == []
    at_most.downtime_budget_ms = 7999
    assert at_most.downtime_problems == [
        "the guest stood still at least 8 s by its clock, over the lab's downtime budget of 7999 ms "
        "(libvirt's downtime: 805 ms)"
    ]
