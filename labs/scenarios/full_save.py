"""A VM save under a fault that must fail it (a full filesystem, a device whose driver fails the save):
the save fails with the fault's error, the VM runs on with its device state and guest, a save after it
succeeds."""

from __future__ import annotations

from dataclasses import dataclass

import libvirt

from labs.faults.base import Fault, error_name
from labs.faults.disk import FullFilesystem
from labs.faults.network import rule_tag
from labs.inventory import LabDevice
from labs.scenarios import save_resume as sr
from labs.scenarios.context import Scenario
from labs.scenarios.readback import Readback
from labs.virt.domain import VM


@dataclass
class FailedSave:
    fault: Fault
    host: str
    error: str | None = None
    error_domain: int | None = None
    error_code: int | None = None
    state_after: str = "absent"  # the domain's state after the failed save
    readback: Readback | None = None
    following: sr.SaveResumeResult | None = None
    under: str = "a full filesystem"  # what the save met, for the messages

    @property
    def problems(self) -> list[str]:
        out: list[str] = []
        if self.error is None:
            out.append(f"the save under {self.under} succeeded")
        elif not self.fault.matches(self.error_domain, self.error_code):
            expected = " or ".join(map(str, self.fault.expected_errors))
            got = error_name(self.error_domain, self.error_code)
            out.append(f"the save under {self.under} failed with {got}, not the fault's ({expected}): {self.error}")
        if self.state_after != "running":
            out.append(f"after the failed save the VM is {self.state_after}, not running")
        if self.readback is not None:
            out += [f"after the failed save: {p}" for p in self.readback.problems(expect_on=self.host)]
        if self.following is None:
            out.append("no save and restore followed")
        else:
            out += [f"the save after it: {p}" for p in self.following.save_problems]
            out += [f"the restore after it: {p}" for p in self.following.final.problems(expect_on=self.host)]
        return out

    @property
    def known_issues(self) -> list[str]:
        rbs = [self.readback] if self.readback else []
        rbs += self.following.readbacks if self.following else []
        return [k for rb in rbs for k in rb.known_issues]


def save_under_fault(sc: Scenario, vm: VM, device: LabDevice, fault: Fault, path: str, under: str) -> FailedSave:
    """Save `vm` to `path` with `fault` injected: the error, the state, the readback (device probe and guest
    against their marks), the undo, then a save and restore that must pass."""
    sc.inject(fault)
    out = FailedSave(fault, vm.hv.name, under=under)
    with sc.steps.step(f"save {vm} to {path} ({under})") as rec:
        try:
            vm.dom.save(path)
        except libvirt.libvirtError as exc:
            out.error, out.error_domain, out.error_code = (
                exc.get_error_message(),
                exc.get_error_domain(),
                exc.get_error_code(),
            )
        out.state_after = vm.state()
        rec.detail = {
            "error": error_name(out.error_domain, out.error_code),
            "message": out.error,
            "state": out.state_after,
        }
    out.readback = sr.read_on_host(sc, vm, device, "readback after the failed save", marked=True)
    with sc.steps.step(f"undo {fault.name}"):
        fault.undo()
    if out.state_after == "running":
        out.following = sr.save_restore(sc, vm, device)
    return out


def save_to_full_filesystem(sc: Scenario, vm: VM, device: LabDevice) -> FailedSave:
    fault = FullFilesystem(sc.session.ssh(vm.hv.name), rule_tag(sc.run_id, f"full_{vm.name[-12:]}"))
    return save_under_fault(sc, vm, device, fault, fault.image(vm.name), "a full filesystem")
