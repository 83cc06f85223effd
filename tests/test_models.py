"""Device models (labs.models): the registry, each shipped model down to the domain XML and the doctor checks
it produces, the inventory keys, and a model from another package through the entry point."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from labs import doctor, models
from labs.errors import ConfigError
from labs.inventory import LabDevice, LabHost
from labs.inventory.models import Capability, Host, MdevDevice, PciDevice, SimDevice
from labs.models import DeviceModel
from labs.paths import REPO_ROOT
from labs.session import open_inventory
from labs.transport.ssh import Result
from labs.virt.xml import QEMU_NS, domain_xml, hostdev_for, spec_for

S, P, PRE, DIRTY = Capability.STOP_COPY, Capability.P2P, Capability.PRE_COPY, Capability.DIRTY_LOGGING
# what each in-tree variant driver advertises: always, and with some firmware or setting
VARIANTS = {
    "mlx5_vfio_pci": ({S, P, DIRTY}, {PRE}),
    "pds_vfio_pci": ({S, P, DIRTY}, set()),
    "qat_vfio_pci": ({S, P, PRE}, set()),
    "virtio_vfio_pci": ({S, P}, set()),
    "hisi_acc_vfio_pci": ({S, PRE}, set()),
    "xe_vfio_pci": ({S, P}, set()),
}
BDF = "0000:65:00.1"
UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
EXAMPLE = REPO_ROOT / "docs" / "examples" / "my_device_model.py"


def _device(spec: Any, host_model: str | None = None) -> LabDevice:
    return LabDevice(LabHost("hostA", Host(address="x", device_model=host_model, devices=(spec,))), 0, spec)


def _pci(model: str | None, caps: tuple[Capability, ...] = (S,), **kw: Any) -> LabDevice:
    return _device(PciDevice(kind="pci", pci=BDF, protocol="v2", device_model=model, capabilities=caps, **kw))


class FakeSsh:
    """A host with some modules loaded and the device bound to `driver`."""

    name = "hostA"

    def __init__(self, modules: set[str], driver: str) -> None:
        self.modules = modules
        self.driver = driver

    def run(self, command: str, timeout: float | None = None, **_kw: Any) -> Result:
        if "/sys/module/" in command:  # the doctor's host facts (labs.doctor._read_host)
            loaded = [f"module={m}" for m in re.findall(r"test -d /sys/module/(\w+)", command) if m in self.modules]
            out = "\n".join(["kernel=6.12.0", *loaded, "python=3.11.2", "python_exit=0"])
        elif "readlink" in command:  # the doctor's device probe (labs.doctor._read_devices), one device
            out = f"0:exists=1\n0:driver={self.driver}\n0:iommu=1"
        else:
            out = ""
        return Result("hostA", command, 0, out, "", 0.0)


def _checks(device: LabDevice, ssh: FakeSsh) -> dict[str, doctor.Check]:
    report = doctor.HostReport("hostA")
    facts = doctor._read_host(ssh, "python3", doctor._modules_wanted([device]))  # type: ignore[arg-type]
    doctor._check_modules(report, [device], facts)
    doctor._check_model(report, device)
    doctor._check_device(report, ssh, device, (6, 12))  # type: ignore[arg-type]
    return {c.name: c for c in report.checks}


# -- the shipped variant-driver models ------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_model_advertises_its_driver_flags(name: str) -> None:
    model = models.load(name)
    always, optional = VARIANTS[name]
    assert (model.name, model.kind, model.host_driver) == (name, "pci", name)
    assert model.migration_flags == always and model.optional_flags == optional
    assert name in model.modules and "vfio" in model.modules


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_model_domain_xml_names_its_driver_model(name: str) -> None:
    model = models.load(name)
    device = _pci(name, tuple(sorted(VARIANTS[name][0])))
    root = ET.fromstring(domain_xml(spec_for("labs-m", [device], "qemu")))
    hostdev = root.find("devices/hostdev")
    assert hostdev is not None and hostdev.get("type") == "pci" and hostdev.get("managed") == "yes"
    driver = hostdev.find("driver")
    assert driver is not None and driver.get("model") == name
    props = {p.get("name"): p.get("value") for p in root.iter(f"{{{QEMU_NS}}}property")}
    assert props == dict(model.qemu_properties)
    # no device dirty tracking: QEMU migrates it only when told to
    assert (props.get("enable-migration") == "on") == (DIRTY not in model.flags)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_model_doctor_checks(name: str) -> None:
    model = models.load(name)
    device = _pci(name, tuple(sorted(VARIANTS[name][0])))
    good = _checks(device, FakeSsh(set(model.modules), name))
    assert {k: c.status for k, c in good.items()} == dict.fromkeys(("modules", "model", "device"), doctor.Status.OK)
    assert good["modules"].detail == ", ".join(model.modules)
    # the variant module not loaded; the VF bound to plain vfio-pci (it would not migrate)
    bad = _checks(device, FakeSsh(set(model.modules) - {name}, "vfio-pci"))
    assert bad["modules"].status == doctor.Status.FAIL and bad["modules"].detail == f"missing {name}"
    assert bad["device"].status == doctor.Status.FAIL and f"its model needs {name}" in bad["device"].detail
    # managed: libvirt binds it on start, so the vendor's own driver is fine before that
    assert _checks(device, FakeSsh(set(model.modules), "acme_core"))["device"].status == doctor.Status.OK


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_model_flags_against_the_inventory(name: str) -> None:
    always, optional = VARIANTS[name]
    never = sorted(set(Capability) - always - optional)[0]
    over = _checks(_pci(name, tuple(sorted(always | {never}))), FakeSsh(set(), name))["model"]
    assert over.status == doctor.Status.FAIL and f"inventory lists {never.value}, which {name}" in over.detail
    if always - {S}:
        under = _checks(_pci(name, (S,)), FakeSsh(set(), name))["model"]
        assert under.status == doctor.Status.WARN and "which the inventory does not list" in under.detail


def test_unmanaged_model_and_plain_pci() -> None:
    plain = hostdev_for(_pci(None))
    assert plain.driver_model is None and plain.managed
    xml = domain_xml(spec_for("labs-p", [_pci(None)], "qemu"))
    assert "<driver" not in xml and 'managed="yes"' in xml
    checks = _checks(_pci(None), FakeSsh({"vfio", "vfio_pci"}, "vfio-pci"))
    assert checks["modules"].detail == "vfio, vfio_pci" and checks["device"].status == doctor.Status.OK
    assert _checks(_pci(None), FakeSsh({"vfio", "vfio_pci"}, "e1000e"))["device"].status == doctor.Status.FAIL


UNMANAGED = DeviceModel("fixed", "pci", host_driver="vfio-pci", managed=False)


def test_a_model_by_dotted_path_sets_managed_no() -> None:
    device = _pci("tests.test_models:UNMANAGED")
    hostdev = ET.fromstring(domain_xml(spec_for("labs-u", [device], "qemu"))).find("devices/hostdev")
    assert hostdev is not None and hostdev.get("managed") == "no" and hostdev.find("driver") is None
    # unmanaged: whoever set the lab up binds it; not bound as the model says is a failure
    assert _checks(device, FakeSsh(set(), "e1000e"))["device"].status == doctor.Status.FAIL


# -- mtty, the sim, the generic models --------------------------------------------------------
def test_mtty_is_found_without_a_key_and_carries_what_was_scattered() -> None:
    spec = MdevDevice(kind="mdev", parent="mtty", type="mtty-1", uuid=UUID, protocol="v2")
    model = models.model_of(_device(spec))
    assert model.name == "mtty" and model.probe is not None and model.seeder is not None
    assert model.incompatible["mtty-1"] == "mtty-2" and model.stream is not None
    assert set(model.stream.header_damage) == {"bad-version", "bad-ports"}
    checks = _checks(_device(spec), FakeSsh({"vfio", "mdev"}, "mtty"))
    assert checks["modules"].status == doctor.Status.FAIL and checks["modules"].detail == "missing mtty"
    props = dict(hostdev_for(_device(spec)).properties)
    assert props == {"enable-migration": "on", "x-device-dirty-page-tracking": "off"}


def test_other_devices_get_the_generic_or_sim_model() -> None:
    other = MdevDevice(kind="mdev", parent="i915", type="i915-GVTg_V5_4", uuid=UUID, protocol="v2")
    assert models.model_of(_device(other)) is models.GENERIC_MDEV
    assert models.model_of(_pci(None)) is models.GENERIC_PCI
    sim = SimDevice(kind="sim", protocol="v2", driver="labs.sim.v2:V2Driver")
    model = models.model_of(_device(sim))
    assert model.name == "sim" and model.probe is None and model.seeder is not None
    assert models.probe_for(_device(other)) is None
    assert models.known_issue(_device(sim), "failed-operation", "RESUMING") is None


def test_a_host_key_names_the_model_of_its_devices_of_that_kind() -> None:
    pci = PciDevice(kind="pci", pci=BDF, protocol="v2")
    sim = SimDevice(kind="sim", protocol="v2", driver="labs.sim.v2:V2Driver")
    host = LabHost("hostA", Host(address="x", device_model="xe_vfio_pci", devices=(pci, sim)))
    assert models.model_of(LabDevice(host, 0, pci)).name == "xe_vfio_pci"
    assert models.model_of(LabDevice(host, 1, sim)).name == "sim"  # a sim device names its own stand-in


def test_a_sim_device_may_stand_in_for_a_real_model() -> None:
    sim = SimDevice(kind="sim", protocol="v2", driver="labs.sim.v2:V2Driver", device_model="pds_vfio_pci")
    device = _device(sim)
    assert models.model_of(device).name == "pds_vfio_pci"
    checks = _checks(device, FakeSsh(set(), ""))
    assert checks["modules"].status == doctor.Status.NA  # no host module is looked for
    assert checks["model"].status == doctor.Status.WARN  # stop_copy only: p2p and dirty tracking untested


# -- bad input ------------------------------------------------------------------------------
def _inventory(tmp_path: Path, device: dict[str, Any], host: dict[str, Any] | None = None) -> Path:
    doc = {"hosts": {"hostA": {"address": "10.0.0.1", **(host or {}), "devices": [device]}}}
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_unknown_or_mismatched_models_are_one_line_errors(tmp_path: Path) -> None:
    pci = {"kind": "pci", "pci": BDF, "protocol": "v2"}
    with pytest.raises(ConfigError, match=r"lab\.yaml: hostA:0000:65:00\.1: device_model: device model 'nope': no "):
        open_inventory(_inventory(tmp_path, {**pci, "device_model": "nope"}))
    with pytest.raises(ConfigError, match=r"hosts\.hostA\.device_model: .*'nope'.*registered: hisi_acc_vfio_pci, mlx5"):
        open_inventory(_inventory(tmp_path, pci, {"device_model": "nope"}))
    with pytest.raises(ConfigError, match=r"device_model mtty is for mdev devices"):
        open_inventory(_inventory(tmp_path, {**pci, "device_model": "mtty"}))
    with pytest.raises(ConfigError, match=r"labs\.models\.mtty:NOPE: cannot be loaded \(AttributeError"):
        open_inventory(_inventory(tmp_path, {**pci, "device_model": "labs.models.mtty:NOPE"}))
    with pytest.raises(ConfigError, match=r"labs\.models\.mtty:is_mtty: is a function, not a labs\.models\.Device"):
        open_inventory(_inventory(tmp_path, {**pci, "device_model": "labs.models.mtty:is_mtty"}))
    with pytest.raises(Exception, match=r"device_model.*'a b' is not a registered device model name"):
        open_inventory(_inventory(tmp_path, {**pci, "device_model": "a b"}))


# -- a model from another package, through the entry point -----------------------------------------
def acme_site(tmp_path: Path) -> Path:
    """What `pip install acme-models` leaves in site-packages: the module and its dist-info."""
    site = tmp_path / "site"
    dist = site / "acme_models-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "my_device_model.py").write_text(EXAMPLE.read_text())
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[labs.device_models]\nacme_vfio_pci = my_device_model:ACME\n")
    return site


def test_an_installed_package_registers_its_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "acme_vfio_pci" not in models.registered()
    monkeypatch.syspath_prepend(str(acme_site(tmp_path)))
    assert models.registered()["acme_vfio_pci"] == "my_device_model:ACME"
    device = _pci("acme_vfio_pci", (S, P))
    assert models.model_of(device).name == "acme_vfio_pci"
    hostdev = ET.fromstring(domain_xml(spec_for("labs-a", [device], "qemu"))).find("devices/hostdev/driver")
    assert hostdev is not None and hostdev.get("model") == "acme_vfio_pci"
    checks = _checks(device, FakeSsh({"vfio", "vfio_pci_core"}, "acme_vfio_pci"))
    assert checks["modules"].detail == "missing acme_vfio_pci" and checks["model"].status == doctor.Status.OK


def _smoke(tmp_path: Path, caps: list[str], *args: str) -> Any:
    from labs.simlab import generate
    from tests.conftest import free_port

    spec = {
        "kind": "sim",
        "name": "acme",
        "protocol": "v2",
        "driver": "labs.sim.v2:V2Driver",
        "device_model": "acme_vfio_pci",
        "capabilities": caps,
        "options": {"content_size": 65536, "p2p": True},
    }
    lab = tmp_path / caps[-1]
    lab.mkdir()
    inventory = generate.write_sim_inventory(lab / "sim.yaml", lab / "sim", free_port(), 1, True, [spec])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(acme_site(lab))
    cmd = [sys.executable, "-m", "pytest", "suites/smoke", "--inventory", str(inventory), "-p", "no:randomly", "-q"]
    cmd += args
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_smoke_suite_runs_with_a_model_installed_through_the_entry_point(tmp_path: Path) -> None:
    """The README's example model, installed as a package would be, on a private sim lab's devices: green;
    and the same lab listing a flag the model never advertises is not (the model is what is checked)."""
    good = _smoke(tmp_path, ["stop_copy", "p2p"])
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-2000:]
    assert re.search(r"\b6 passed\b", good.stdout), good.stdout[-2000:]
    bad = _smoke(tmp_path, ["stop_copy", "p2p", "dirty_logging"], "-k", "doctor_green", "--lab-host", "hostA")
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "inventory lists dirty_logging, which acme_vfio_pci does not advertise" in bad.stdout


def test_the_sample_mdev_is_named_only_in_its_model_and_the_nested_lab() -> None:
    allowed = {Path("labs/models/mtty.py"), Path("labs/models/mtty_faults.py")}
    found = [
        path.relative_to(REPO_ROOT)
        for path in (REPO_ROOT / "labs").rglob("*.py")
        if "mtty" in path.read_text().lower() and "nested" not in path.relative_to(REPO_ROOT).parts
    ]
    assert set(found) <= allowed, found


def test_readme_shows_the_example_model_verbatim_next_to_the_driver_example() -> None:
    text = (REPO_ROOT / "README.md").read_text()
    both = text[text.index("### Two plug-in points") : text.index("### Plug your own driver model")]
    assert "docs/examples/my_driver.py" in both and "docs/examples/my_device_model.py" in both
    section = text[text.index("### Plug in a device model") : text.index("### Mutation testing")]
    assert EXAMPLE.read_text() in section
    assert '[project.entry-points."labs.device_models"]\nacme_vfio_pci = "my_device_model:ACME"' in section
    for name, (always, optional) in VARIANTS.items():  # the table says what the models carry
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}`"))
        cells = [{c.strip() for c in cell.split(",") if c.strip()} for cell in row.split("|")[2:4]]
        assert cells == [{c.value for c in always}, {c.value for c in optional}]


def test_a_lab_known_issue_may_name_a_device_model(tmp_path: Path) -> None:
    from labs.certify.results import TestResult
    from labs.reporting import known
    from tests.conftest import write_sim_inventory

    inv = open_inventory(write_sim_inventory(tmp_path, devices=True))
    issue = known.KnownIssue(id="A-1", title="t", link="https://x/1", models=("sim",), rules=("V2-R16",))
    other = known.KnownIssue(id="A-2", title="t", link="https://x/2", models=("mlx5_vfio_pci",), rules=("V2-R16",))

    def result(device: str) -> TestResult:
        return TestResult("t", "t", "failed", "", ("V2-R16",), "c", devices=(device,), test_case_id=device)

    seen = known.classify([other, issue], [result("hostA:simv2"), result("hostA:simv1")], inv)
    assert [len(s.failed) for s in seen] == [0, 2]
