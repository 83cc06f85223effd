"""PCI configuration matrix, unit level: VM groups, several hostdevs, managed mode, vIOMMU, QEMU's trace."""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from labs.errors import InfraError
from labs.inventory import Inventory, InventoryError, LabDevice, load_inventory
from labs.inventory.models import Capability, SimDevice
from labs.scenarios import migration as mig
from labs.scenarios import multidevice as md
from labs.scenarios import viommu
from labs.scenarios.context import Scenario
from labs.session import LabSession
from labs.virt import nodedev
from labs.virt.trace import missing_p2p, set_states, states_by_device
from labs.virt.xml import Hostdev, domain_xml, hostdevs_of, managed_of, spec_for, with_hostdevs

GROUPED = """
hosts:
  a:
    address: 10.0.0.1
    devices:
      - {kind: mdev, name: m1, model: mt, parent: mtty, type: mtty-2, uuid: 7e8b6c2a-1f1c-4b4e-9a56-2f4f6f1d0a01,
         protocol: v2, capabilities: [stop_copy, p2p, pre_copy], vm: multi}
      - {kind: mdev, name: m2, model: mt1, parent: mtty, type: mtty-1, uuid: 7e8b6c2a-1f1c-4b4e-9a56-2f4f6f1d0a02,
         protocol: v2, capabilities: [stop_copy, p2p], vm: multi}
      - {kind: pci, pci: "0000:65:00.0", model: nic, protocol: v2}
  b:
    address: 10.0.0.2
    devices:
      - {kind: mdev, name: m1, model: mt, parent: mtty, type: mtty-2, uuid: 7e8b6c2a-1f1c-4b4e-9a56-2f4f6f1d0a01,
         protocol: v2, capabilities: [stop_copy, p2p, pre_copy], vm: multi}
      - {kind: mdev, name: m2, model: mt1, parent: mtty, type: mtty-1, uuid: 7e8b6c2a-1f1c-4b4e-9a56-2f4f6f1d0a02,
         protocol: v2, capabilities: [stop_copy, p2p], vm: multi}
      - {kind: pci, pci: "0000:66:00.0", model: nic, protocol: v2}
pairs:
  - {source: "a:m1", destination: "b:m1"}
  - {source: "a:0000:65:00.0", destination: "b:0000:66:00.0"}
"""


def _inventory(tmp_path: Path, text: str = GROUPED) -> Inventory:
    path = tmp_path / "inv.yaml"
    path.write_text(textwrap.dedent(text))
    return load_inventory(path)


def test_vm_group_pairs_member_by_member(tmp_path: Path) -> None:
    inv = _inventory(tmp_path)
    grouped, single = inv.pairs
    group = inv.group_pairs(grouped)
    assert [(p.source.id, p.destination.id) for p in group] == [("a:m1", "b:m1"), ("a:m2", "b:m2")]
    assert inv.group_pairs(single) == (single,)
    assert [d.id for d in inv.vm_group(inv.device("a:m2"))] == ["a:m1", "a:m2"]
    assert md.wanted_p2p_states(group) == ("RUNNING_P2P",)  # m2 does no pre-copy
    assert md.wanted_p2p_states(group[:1]) == ("RUNNING_P2P", "PRE_COPY_P2P")


def test_vm_group_name_is_checked(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match=r"vm.*not a valid name"):
        _inventory(tmp_path, GROUPED.replace("vm: multi}", "vm: 'a b'}", 1))


def test_several_hostdevs_in_one_domain_and_swapped_together(tmp_path: Path) -> None:
    inv = _inventory(tmp_path)
    group = inv.group_pairs(inv.pairs[0])
    xml = domain_xml(spec_for("labs-g", [p.source for p in group], "qemu"))
    assert [h.address for h in hostdevs_of(xml)] == [getattr(p.source.spec, "uuid", None) for p in group]
    moved = with_hostdevs(xml, (Hostdev("mdev", "11111111-2222-3333-4444-555555555555"), hostdevs_of(xml)[1]))
    assert hostdevs_of(moved)[0].address == "11111111-2222-3333-4444-555555555555"


def test_managed_mode_is_a_parameter_and_survives_the_destination_swap(tmp_path: Path) -> None:
    inv = _inventory(tmp_path)
    pci = inv.device("a:0000:65:00.0")
    assert managed_of(domain_xml(spec_for("labs-m", [pci], "kvm"))) == [True]
    xml = domain_xml(spec_for("labs-m", [pci], "kvm", managed=False))
    assert managed_of(xml) == [False]
    assert managed_of(with_hostdevs(xml, (Hostdev("pci", "0000:66:00.0"),))) == [False]
    mdev = domain_xml(spec_for("labs-m", [inv.device("a:m1")], "kvm", managed=False))
    assert ET.fromstring(mdev).find("devices/hostdev").get("managed") is None  # type: ignore[union-attr]


def test_viommu_in_the_domain(tmp_path: Path) -> None:
    inv = _inventory(tmp_path)
    root = ET.fromstring(domain_xml(spec_for("labs-i", [inv.device("a:m1")], "qemu", iommu="intel")))
    assert [el.get("model") for el in root.iter("iommu")] == ["intel"]
    assert not list(ET.fromstring(domain_xml(spec_for("labs-i", [inv.device("a:m1")], "qemu"))).iter("iommu"))


def test_viommu_refusal_judged_by_error_domain_and_code() -> None:
    qemu_internal = (libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_INTERNAL_ERROR)
    assert viommu.refusal_problems(viommu.Refusal("start", *qemu_internal, "anything")) == []
    assert viommu.refusal_problems(viommu.Refusal("")) != []  # migrated: the blocker did not apply
    wrong = viommu.refusal_problems(viommu.Refusal("start", libvirt.VIR_FROM_RPC, libvirt.VIR_ERR_SYSTEM_ERROR, "x"))
    assert wrong and "VIR_FROM_RPC" in wrong[0]
    # the domain and the code must both match: one right is not enough
    assert viommu.refusal_problems(viommu.Refusal("start", libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_SYSTEM_ERROR, "x"))
    assert viommu.refusal_problems(viommu.Refusal("start", libvirt.VIR_FROM_RPC, libvirt.VIR_ERR_INTERNAL_ERROR, "x"))


# What QEMU 10's log backend writes (pid@time prefix), and QEMU 8's numbered form
TRACE = """\
2210@1733150000.100000:vfio_migration_set_state  (0000:65:00.1) new state PRE_COPY, recover state ERROR
2210@1733150000.200000:vfio_migration_set_state  (0000:65:00.2) new state PRE_COPY, recover state ERROR
2210@1733150001.100000:vfio_migration_set_state  (0000:65:00.1) new state PRE_COPY_P2P, recover state ERROR
2210@1733150001.200000:vfio_migration_set_state  (0000:65:00.2) new state PRE_COPY_P2P, recover state ERROR
2210@1733150001.300000:vfio_save_block (83b8f4f2) data_size 12
2299@1733150009.100000:vfio_migration_set_state  (0000:65:00.1) state 5
"""


def test_trace_states_per_device() -> None:
    changes = set_states(TRACE.splitlines())
    seen = states_by_device(changes)
    assert seen["0000:65:00.1"] == ["PRE_COPY", "PRE_COPY_P2P", "RUNNING_P2P"]
    assert seen["0000:65:00.2"] == ["PRE_COPY", "PRE_COPY_P2P"]
    assert missing_p2p(changes, 2, ("PRE_COPY_P2P",)) == []
    # a QEMU that stops the devices without P2P is caught, per device and state
    assert missing_p2p(changes, 2) == [
        "device 0000:65:00.2 never entered RUNNING_P2P (states set: PRE_COPY PRE_COPY_P2P)"
    ]
    assert "names 1 VFIO device" in missing_p2p(changes[:1], 2)[0]
    assert missing_p2p([], 2)[0].startswith("the trace names 0 VFIO device(s) (none)")


class FakeNodeDev:
    """A node device as libvirt's API shows it: its XML names the bound driver; detach binds vfio-pci."""

    def __init__(self, driver: str | None, supported: bool = True, reattach_to: str | None = None) -> None:
        self.driver, self.supported, self.reattach_to = driver, supported, reattach_to
        self.calls: list[str] = []

    def XMLDesc(self, _flags: int) -> str:
        inner = f"<driver><name>{self.driver}</name></driver>" if self.driver else ""
        return f"<device><name>pci_0000_65_00_1</name>{inner}</device>"

    def detachFlags(self, driver: str | None, _flags: int) -> None:
        self.calls.append("detach")
        if not self.supported:
            raise libvirt.libvirtError("this function is not supported by the connection driver")
        self.driver = "vfio-pci"

    def reAttach(self) -> None:
        self.calls.append("reattach")
        self.driver = self.reattach_to


class FakeConn:
    def __init__(self, dev: FakeNodeDev) -> None:
        self.dev = dev
        self.names: list[str] = []

    def nodeDeviceLookupByName(self, name: str) -> FakeNodeDev:
        self.names.append(name)
        return self.dev


def test_detach_then_reattach_returns_the_function_to_its_driver() -> None:
    dev = FakeNodeDev("mlx5_core", reattach_to="mlx5_core")
    conn = FakeConn(dev)
    done = nodedev.detach(conn, "0000:65:00.1")
    assert (done.host_driver, done.vfio_driver, conn.names[0]) == ("mlx5_core", "vfio-pci", "pci_0000_65_00_1")
    done.reattach()
    assert dev.calls == ["detach", "reattach"] and dev.driver == "mlx5_core"


def test_reattach_that_leaves_the_function_elsewhere_is_an_error() -> None:
    done = nodedev.detach(FakeConn(FakeNodeDev("mlx5_core", reattach_to=None)), "0000:65:00.1")
    with pytest.raises(InfraError, match="bound to no driver after reattach, not mlx5_core"):
        done.reattach()


def test_a_function_found_on_vfio_is_left_there() -> None:
    dev = FakeNodeDev("vfio-pci", reattach_to="mlx5_core")
    nodedev.detach(FakeConn(dev), "0000:65:00.1").reattach()
    assert dev.calls == ["detach"] and dev.driver == "vfio-pci"


def test_no_nodedev_support_is_its_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libvirt.libvirtError, "get_error_code", lambda _self: libvirt.VIR_ERR_NO_SUPPORT)
    with pytest.raises(nodedev.NodeDevUnsupported, match="virNodeDeviceDetachFlags"):
        nodedev.detach(FakeConn(FakeNodeDev("mlx5_core", supported=False)), "0000:65:00.1")


def _sim(session: LabSession, host: str, name: str) -> LabDevice:
    spec = SimDevice(kind="sim", name=name, protocol="v2", driver="labs.sim.v2:V2Driver", vm="g",
                     capabilities=(Capability.STOP_COPY, Capability.P2P), options={"content_size": 4096})  # fmt: skip
    return LabDevice(session.inventory.host(host), 0, spec)


def test_multi_device_vm_on_test_driver_and_cleanup_order(sim_session: LabSession) -> None:
    """Two devices in one domain; a failed migration reads back all four ends; a host change registered
    with on_cleanup is undone after the domain is gone."""
    sc = Scenario(sim_session, "g")
    a1, a2, b1, b2 = (_sim(sim_session, h, n) for h in ("hostA", "hostB") for n in ("g1", "g2"))
    vm = md.start_vm(sc, [a1, a2], "multi")
    assert len(hostdevs_of(vm.xml())) == 2
    seen: list[bool] = []
    sc.on_cleanup("undo", lambda: seen.append(vm.hv.exists(vm.name)))
    _vm, leg = mig.migrate_leg(sc, vm, a1, b1, scenario="multi", companions=[(a2, b2)], hang_is_infra=False)
    assert not leg.result.ok  # test:/// cannot migrate
    assert [d.device for d in leg.readback.devices] == [a1.id, b1.id, a2.id, b2.id]
    assert sc.cleanup() == [] and sc.leftovers() == []
    assert seen == [False], "the undo ran while the domain still existed"


@pytest.mark.parametrize("mdevs", ["1", "2"])
def test_nested_inventory_groups_a_second_mdev(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mdevs: str) -> None:
    from labs.nested import lifecycle as lab

    monkeypatch.setenv("LABS_NESTED_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("LABS_NESTED_BASE_PORT", "30000")
    monkeypatch.setenv("LABS_NESTED_MDEVS", mdevs)
    keys = lab.Keys(tmp_path / "keys")
    keys.regenerate(list(lab.HOST_NAMES))
    keys.known_hosts.write_text("")
    path = tmp_path / "nested.yaml"
    lab.write_inventory(path, lab.inventory_doc(lab.specs(), keys, {}))
    inv = load_inventory(path)
    pair, second, faults = inv.pairs
    assert faults.id == "nested-b->nested-a:mtty_faults-2" and inv.group_pairs(faults) == (faults,)
    # the plain driver's second pair: the same type, no VM group, a device group of its own (labs.nested.ci)
    assert second.id == f"nested-b->nested-a:{lab.SECOND_NAME}" and inv.group_pairs(second) == (second,)
    assert second.source.spec.vm is None and second.source.spec.model == "mtty-2"
    from labs.nested import ci

    assert f"*:{lab.SECOND_NAME}" == ci.SECOND_DEVICES
    group = inv.group_pairs(pair)
    if mdevs == "1":
        assert group == (pair,) and pair.source.spec.vm is None
    else:
        assert [(p.source.id, p.destination.id) for p in group] == [
            ("nested-a:mtty-2", "nested-b:mtty-2"),
            ("nested-a:mtty-1", "nested-b:mtty-1"),
        ]


def test_nested_mdev_count_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from labs.nested import lifecycle as lab

    monkeypatch.setenv("LABS_NESTED_MDEVS", "3")
    with pytest.raises(InfraError, match="LABS_NESTED_MDEVS='3'"):
        lab.mdev_count()
