"""Host kernel health: which log lines and taint changes are findings (labs.kernelhealth)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from labs import kernelhealth as kh

# Real formats, as /dev/kmsg gives them through the agent ("[sec.usec] text")
TROUBLE = [
    ("WARNING", "[  812.431502] WARNING: CPU: 0 PID: 1 at drivers/vfio/vfio_main.c:1123 vfio_ioctl+0x5a/0x80 [vfio]"),
    ("WARNING", "[   12.000001] WARNING: possible circular locking dependency detected"),
    ("BUG", "[  101.202020] BUG: kernel NULL pointer dereference, address: 0000000000000008"),
    ("BUG", "[  101.202021] BUG: unable to handle page fault for address: ffffb2a6c0a5f000"),
    ("BUG", "[  101.202022] kernel BUG at mm/slub.c:440!"),
    ("BUG", "[    3.100000] BUG: sleeping function called from invalid context at kernel/locking/mutex.c:283"),
    ("Oops", "[  101.202030] Oops: 0002 [#1] PREEMPT SMP NOPTI"),
    ("Oops", "[  101.202031] Internal error: Oops: 0000000096000005 [#1] SMP"),
    ("Oops", "[  101.202032] Unable to handle kernel paging request at virtual address dead000000000108"),
    ("general protection fault", "[ 2211.000000] Oops: general protection fault, probably for non-canonical address"
     " 0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI"),
    ("general protection fault", "[ 2211.000000] general protection fault: 0000 [#1] SMP PTI"),
    ("soft lockup", "[  560.811002] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [qemu-system-x86:4121]"),
    ("hard lockup", "[  560.811003] NMI watchdog: Watchdog detected hard LOCKUP on cpu 3"),
    ("hard lockup", "[  560.811004] watchdog: Watchdog detected hard LOCKUP on cpu 0"),
    ("RCU stall", "[  623.100200] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"),
    ("RCU stall", "[  623.100201] rcu: INFO: rcu_sched self-detected stall on CPU"),
    ("RCU stall", "[  623.100202] INFO: rcu_sched detected stalls on CPUs/tasks: { 1} (detected by 0, t=21002)"),
    ("hung task", "[  984.000100] INFO: task x:1 blocked for more than 120 seconds."),
    ("hung task", "[  984.000101] INFO: task kworker/u4:2:87 blocked for more than 122 seconds."),
    ("KASAN", "[   77.000001] BUG: KASAN: slab-out-of-bounds in mtty_read+0x1b4/0x2c0 [mtty]"),
    ("KFENCE", "[   77.000002] BUG: KFENCE: use-after-free read in test_use_after_free_read+0xb3/0x143"),
    ("UBSAN", "[   77.000003] UBSAN: array-index-out-of-bounds in drivers/vfio/pci/vfio_pci_core.c:812:10"),
    ("Kernel panic", "[ 1002.000000] Kernel panic - not syncing: Fatal exception"),
]  # fmt: skip

BENIGN = [
    "[   10.511092] mtty: loading out-of-tree module taints kernel.",
    "[   10.511093] mtty: module verification failed: signature and/or required key missing - tainting kernel",
    "[   10.600000] mtty mtty: MDEV: Registered",
    "[  130.000000] mtty 83b8f4f2-509f-382f-3c1e-e6bfe0fa1001: PCI config write @0x30 of 4 bytes not handled",
    "[  130.000001] vfio-pci 0000:65:00.0: warning: no bug here",
    "[  130.000002] ------------[ cut here ]------------",
    "[  130.000003] systemd[1]: Started session-3.scope - Session 3 of User root.",
    '[  130.000004] audit: type=1400 audit(1700000000.000:2): apparmor="STATUS" info="Oops in the name"',
]


@pytest.mark.parametrize(("kind", "line"), TROUBLE)
def test_trouble_lines_are_named(kind: str, line: str) -> None:
    assert kh.classify(line) == kind


@pytest.mark.parametrize("line", BENIGN)
def test_ordinary_lines_are_not_findings(line: str) -> None:
    assert kh.classify(line) is None


def test_a_line_without_timestamp_is_classified_too() -> None:
    assert kh.classify("BUG: kernel NULL pointer dereference, address: 0000000000000000") == "BUG"


def test_allowlist_drops_matching_lines_only() -> None:
    warn = "[  812.0] WARNING: CPU: 0 PID: 55 at samples/vfio-mdev/mtty.c:700 mtty_probe+0x1/0x2 [mtty]"
    other = "[  812.1] WARNING: CPU: 1 PID: 56 at drivers/vfio/vfio_main.c:10 vfio_x+0x1/0x2"
    allow = kh.compile_allow([r"at samples/vfio-mdev/mtty\.c:700 "])
    got = kh.findings([warn, other, BENIGN[0]], allow)
    assert got == [kh.Finding("WARNING", other)]
    assert kh.findings([warn, other]) == [kh.Finding("WARNING", warn), kh.Finding("WARNING", other)]


def test_allowlist_matches_the_text_not_the_timestamp() -> None:
    line = "[  812.431502] WARNING: CPU: 0 PID: 1 at x.c:1 f+0x0/0x1"
    assert kh.findings([line], kh.compile_allow([r"^WARNING: CPU: 0 "])) == []


def test_taint_letters() -> None:
    assert kh.taint_letters(0) == ""
    assert kh.taint_letters(4096 | 8192) == "OE"
    assert kh.taint_letters(1 << 9) == "W"
    assert kh.taint_letters((1 << 7) | (1 << 9) | (1 << 14)) == "DWL"


def test_only_new_taint_flags_count() -> None:
    oe = 4096 | 8192
    assert kh.new_taint(oe, oe) == ""  # an out-of-tree module loaded before the run is no change
    assert kh.new_taint(oe, oe | 512) == "W"
    assert kh.new_taint(0, oe) == "OE"
    assert kh.new_taint(oe | 512, oe) == ""  # flags are never cleared; a lower value is not a finding
    assert kh.new_taint(None, oe) == ""
    assert kh.new_taint(oe, None) == ""
    assert "W (kernel issued warning)" in kh.describe_taint("W")


class FakeKmsg:
    """A host's kernel log and taint, appended to by the test, read like the agent's `kmsg` op."""

    def __init__(self, tainted: int | None = 0, readable: bool = True) -> None:
        self.records: list[str] = ["[    1.0] Linux version 6.12.0"]
        self.tainted, self.readable = tainted, readable

    def log(self, *lines: str) -> None:
        self.records.extend(lines)

    def __call__(self, after: int) -> Mapping[str, Any]:
        if not self.readable:
            return {"seq": None, "lines": [], "tainted": self.tainted, "error": "EPERM"}
        seq = len(self.records) - 1
        new = self.records[after + 1 :] if after >= 0 else []
        return {"seq": seq, "lines": new, "tainted": self.tainted}


def test_watch_judges_only_what_came_after_it_began() -> None:
    kmsg = FakeKmsg()
    kmsg.log(TROUBLE[0][1])  # before the test: not its finding
    watch = kh.KernelWatch("h1", kmsg)
    assert not watch.check().failed
    kmsg.log(BENIGN[2], TROUBLE[2][1])
    check = watch.check()
    assert check.failed
    assert check.lines == [BENIGN[2], TROUBLE[2][1]]
    assert check.findings == [kh.Finding("BUG", TROUBLE[2][1])]
    assert not watch.check().failed  # each check covers what came since the previous one


def test_watch_fails_on_a_taint_change_and_names_the_flags() -> None:
    kmsg = FakeKmsg(tainted=4096 | 8192)
    watch = kh.KernelWatch("nested-a", kmsg)
    assert not watch.check().failed
    kmsg.tainted = 4096 | 8192 | 1 << 9
    check = watch.check()
    assert check.failed and check.new_taint == "W" and not check.findings
    assert "taint +W" in check.summary()
    assert "W (kernel issued warning)" in check.evidence()


def test_watch_with_unreadable_log_still_judges_taint() -> None:
    kmsg = FakeKmsg(tainted=0, readable=False)
    watch = kh.KernelWatch("h1", kmsg)
    assert watch.error == "EPERM"
    kmsg.log(TROUBLE[0][1])
    assert not watch.check().failed  # the log cannot be read: its lines are not seen
    kmsg.tainted = 1 << 7
    assert watch.check().new_taint == "D"


def test_watch_of_a_host_that_stopped_answering_finds_nothing() -> None:
    kmsg = FakeKmsg()
    watch = kh.KernelWatch("h1", kmsg)
    watch.source = lambda after: {}
    assert not watch.check().failed


def test_reason_is_one_line_naming_hosts_and_first_lines() -> None:
    a = kh.HostCheck("a", findings=[kh.Finding("WARNING", TROUBLE[0][1]), kh.Finding("BUG", TROUBLE[2][1])])
    b = kh.HostCheck("b", new_taint="W")
    c = kh.HostCheck("quiet")
    text = kh.reason([a, b, c])
    assert "\n" not in text
    assert text.startswith("host kernel: a: WARNING: CPU: 0 PID: 1 at drivers/vfio/vfio_main.c:1123")
    assert "(+1 more)" in text and "b: taint +W" in text and "quiet" not in text


def test_host_kernel_error_is_a_finding_not_infrastructure() -> None:
    from labs.hostwatch import infra_error

    assert isinstance(kh.HostKernelError("x"), AssertionError)
    assert infra_error(kh.HostKernelError("x")) is None


INVENTORY = """
hosts:
  a:
    address: 10.0.0.1
    devices:
      - {kind: pci, pci: "0000:65:00.0", model: nic, protocol: v2}
      - {kind: mdev, name: mtty-2, parent: mtty, type: mtty-2, uuid: 7e8b6c2a-1f1c-4b4e-9a56-2f4f6f1d0a01,
         protocol: v2, kernel_log_allow: ['PCI config write @0x\\w+ of \\d+ bytes not handled']}
  b:
    address: 10.0.0.2
    devices:
      - {kind: mdev, name: mtty-2, parent: mtty, type: mtty-2, uuid: 7e8b6c2a-1f1c-4b4e-9a56-2f4f6f1d0a02,
         protocol: v2}
  c:
    address: 10.0.0.3
    devices:
      - {kind: pci, pci: "0000:65:00.0", model: nic, protocol: v2}
"""


def test_allowlist_key_applies_to_every_host_with_the_model(tmp_path: Path) -> None:
    from labs.inventory import load_inventory
    from labs.plugin.kernels import kernel_log_allow

    path = tmp_path / "inv.yaml"
    path.write_text(INVENTORY)
    inv = load_inventory(path)
    line = "[  1.0] WARNING: mtty x: PCI config write @0x30 of 4 bytes not handled"
    for host in ("a", "b"):  # b's mtty-2 says nothing: the model's list holds there too
        assert kh.findings([line], kernel_log_allow(inv, inv.host(host))) == [], host
    assert kh.findings([line], kernel_log_allow(inv, inv.host("c"))) != []


def test_a_bad_allowlist_regex_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    from labs.inventory import load_inventory
    from labs.inventory.yamlsource import InventoryError

    path = tmp_path / "inv.yaml"
    path.write_text(INVENTORY.replace("'PCI config write", "'PCI config (write"))
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert "hosts.a.devices[1].kernel_log_allow" in message, message
    assert "not a valid regular expression" in message and "missing )" in message, message


def test_sim_hosts_are_not_judged_and_real_hosts_are(tmp_path: Path, sim_inventory: Any) -> None:
    from labs.inventory import load_inventory
    from labs.plugin.kernels import kernel_not_judged

    why = kernel_not_judged(sim_inventory, sim_inventory.hosts[0])
    assert why is not None and "controller" in why
    path = tmp_path / "inv.yaml"
    path.write_text(INVENTORY)
    real = load_inventory(path)
    assert kernel_not_judged(real, real.host("a")) is None


def test_local_agent_gives_the_taint_mask() -> None:
    from labs.vfio.client import AgentClient

    with AgentClient.local("kmsg") as client:
        got = client.call("kmsg", after=-1)
    assert got["tainted"] == int(Path("/proc/sys/kernel/tainted").read_text())


# The plugin end to end on a sim lab whose hosts' kernels are a fake: files the inner tests write to.
FAKE_KERNELS = """
from pathlib import Path

import re

import pytest

import labs.plugin.kernels as kernels

HERE = Path(__file__).parent


class Kernels:
    def log(self, host, line):
        with open(HERE / f"{host}.kmsg", "a") as f:
            f.write(line + "\\n")

    def taint(self, host, mask):
        (HERE / f"{host}.taint").write_text(str(mask))


def fake_source(session, host):
    def read(after):
        log, taint = HERE / f"{host}.kmsg", HERE / f"{host}.taint"
        lines = ["[    0.000000] Linux version 6.12.0"] + (log.read_text().splitlines() if log.exists() else [])
        tainted = int(taint.read_text()) if taint.exists() else 12288  # O and E, as with mtty.ko
        return {"seq": len(lines) - 1, "lines": lines[after + 1 :] if after >= 0 else [], "tainted": tainted}

    return read


kernels.kmsg_source = fake_source
kernels.kernel_not_judged = lambda inventory, host: None


@pytest.fixture
def kernel():
    return Kernels()
"""

INNER = """
import re

import pytest

WARN = "[  812.431502] WARNING: CPU: 0 PID: 1 at drivers/vfio/vfio_main.c:1123 vfio_ioctl+0x5a/0x80 [vfio]"
BUG = "[  813.000000] BUG: kernel NULL pointer dereference, address: 0000000000000008"
OOPS = "[  813.000001] Oops: 0002 [#1] PREEMPT SMP NOPTI"


def test_clean(host, kernel):
    kernel.log(host.name, "[  811.0] mtty mtty: MDEV: Registered")


def test_warns(host, kernel):
    kernel.log(host.name, "[  812.431500] ------------[ cut here ]------------")
    kernel.log(host.name, WARN)


def test_allowed(host, kernel):
    kernel.log(host.name, "[  812.5] WARNING: CPU: 1 PID: 7 at labs_benign.c:1 benign+0x0/0x1")


def test_taints(host, kernel):
    kernel.taint(host.name, 12288 | 512)


def test_taint_stays(host, kernel):
    kernel.taint(host.name, 12288 | 512)


def test_fails_and_oopses(host, kernel):
    kernel.log(host.name, BUG)
    kernel.log(host.name, OOPS)
    assert 1 == 2, "readback differs"


def test_skips_after_oops(host, kernel):
    kernel.log(host.name, OOPS)
    pytest.skip("lacks capability p2p")


@pytest.fixture
def warn_at_teardown(host, kernel):
    yield
    kernel.log(host.name, WARN)


def test_teardown_warns(host, warn_at_teardown):
    pass
"""


def test_plugin_fails_tests_on_host_kernel_trouble(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import yaml

    from tests import allure_results
    from tests.conftest import write_sim_inventory

    doc = yaml.safe_load(write_sim_inventory(tmp_path, devices=True).read_text())
    doc["hosts"]["hostA"]["devices"][0]["kernel_log_allow"] = [r"at labs_benign\.c:\d+ "]
    inventory = pytester.path / "lab.yaml"
    inventory.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("COLUMNS", "400")  # the short summary's lines in full
    pytester.makeconftest(FAKE_KERNELS)
    pytester.makepyfile(test_inner=INNER)
    results = pytester.path / "results"
    args = ("--inventory", str(inventory), f"--alluredir={results}", "--lab-host", "hostA", "-p", "no:randomly")
    run = pytester.runpytest_subprocess(*args, "-rA")
    run.assert_outcomes(passed=4, failed=4, errors=1)  # test_teardown_warns: passed, then an error
    out = run.stdout.str()
    assert (
        "FAILED test_inner.py::test_warns[hostA] - labs.kernelhealth.HostKernelError: host kernel: hostA: WARNING:"
        in out
    )
    assert "host kernel: hostA: taint +W" in out
    assert "ERROR test_inner.py::test_teardown_warns[hostA] - labs.kernelhealth.HostKernelError" in out
    assert "(the test also failed: AssertionError: readback differs" in out

    tests = allure_results.results(results)
    attachments = {name: found[1] for name, found in allure_results.evidence(results).items()}
    categories = json.loads((results / "categories.json").read_text())
    host_kernel = categories[0]
    assert host_kernel["name"].startswith("Host kernel") and host_kernel["matchedStatuses"] == ["failed"]
    failed = ("test_warns", "test_taints", "test_fails_and_oopses", "test_skips_after_oops", "test_teardown_warns")
    for name in (f"{t}[hostA]" for t in failed):
        doc = tests[name]
        assert doc["status"] == "failed", name
        message = doc["statusDetails"]["message"]
        assert re.fullmatch(host_kernel["messageRegex"], message), (name, message)
        for other in categories[1:]:  # the first category that matches names it: no earlier one may
            assert "messageRegex" not in other or not re.fullmatch(other["messageRegex"], message), (name, other)
        assert "host kernel hostA" in attachments[name], (name, attachments[name])
    for name in ("test_clean[hostA]", "test_allowed[hostA]", "test_taint_stays[hostA]"):
        assert tests[name]["status"] == "passed", name
    assert "dmesg hostA" in attachments["test_clean[hostA]"]
    assert "host kernel hostA" not in attachments["test_clean[hostA]"]
    warned = [a for a in tests["test_warns[hostA]"]["attachments"] if a["name"] == "host kernel hostA"]
    text = (results / warned[0]["source"]).read_text()
    assert "[  812.431502] WARNING: CPU: 0 PID: 1 at drivers/vfio/vfio_main.c:1123 vfio_ioctl+0x5a/0x80 [vfio]" in text
    assert "cut here" not in text
    env = (results / "environment.properties").read_text()
    assert "hostA.kernel_verdict=on" in env
