"""The host kernel verdict: each test's hosts' kernel logs and taint, watched from before its lab
fixtures to after them, judged against the models' allowlists."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import pytest

from labs.attachments import attach
from labs.errors import LabError
from labs.inventory import Inventory, LabHost
from labs.kernelhealth import HostCheck, HostKernelError, KernelWatch, KmsgSource, compile_allow, reason
from labs.models import model_of
from labs.plugin.state import LabState, subject_of
from labs.session import LabSession

KERNEL_WATCHES = pytest.StashKey[list[KernelWatch]]()


def kernel_not_judged(inventory: Inventory, host: LabHost) -> str | None:
    """Why a host's kernel is not judged, or None when it is."""
    if inventory.is_sim:
        return "a sim host is an sshd on this machine: its kernel log is the controller's, shared by every process here"
    return None


def kernel_log_allow(inventory: Inventory, host: LabHost) -> tuple[Any, ...]:
    """The compiled allowlist on `host`: every pattern given for a model that has a device there, and those
    of the device models (labs.models) of its devices."""
    models = {d.model_key for d in host.spec.devices}
    mine = [d for d in inventory.devices if d.host.name == host.name]
    patterns = dict.fromkeys(
        [p for d in inventory.devices if d.spec.model_key in models for p in d.spec.kernel_log_allow]
        + [p for d in mine for p in model_of(d).kernel_log_allow]
    )
    return compile_allow(patterns)


def kmsg_source(session: LabSession, host: str) -> KmsgSource:
    """The host's kernel log and taint through a pooled agent; a host that stopped answering gives nothing."""

    def read(after: int) -> dict[str, Any]:
        from labs.agentpool import agent_for

        try:
            with agent_for(session, host) as agent:
                return dict(agent.call("kmsg", after=after, limit=2000))
        except LabError:
            return {}

    return read


def watch_kernels(item: pytest.Item, state: LabState) -> None:
    watches = []
    for h in subject_of(item)[0]:
        if kernel_not_judged(state.inventory, h) is None:
            watch = KernelWatch(h.name, kmsg_source(state.session, h.name), kernel_log_allow(state.inventory, h))
            if watch.error:
                state.kernel_log_errors[h.name] = watch.error
            watches.append(watch)
    item.stash[KERNEL_WATCHES] = watches


def judge_kernels(item: pytest.Item, when: str, failure: BaseException | None) -> None:
    """Attach what each watched host's kernel said; raise HostKernelError when one reported trouble."""

    checks: list[HostCheck] = [w.check() for w in item.stash.get(KERNEL_WATCHES, [])]
    for c in checks:
        if c.lines:
            attach(f"dmesg {c.host}", "".join(f"{line}\n" for line in c.lines))
        if c.failed:
            attach(f"host kernel {c.host}", c.evidence())
            item.add_report_section(when, f"host kernel {c.host}", c.evidence())
    if not any(c.failed for c in checks):
        return
    message = reason(checks)
    if failure is not None and not isinstance(failure, pytest.skip.Exception):
        first = (str(failure).strip().splitlines() or [""])[0][:200]
        message += f" (the test also failed: {type(failure).__name__}: {first})"
    raise HostKernelError(message) from failure


@contextmanager
def kernel_verdict(item: pytest.Item, when: str, after_success: bool) -> Generator[None]:
    try:
        yield
    except (KeyboardInterrupt, pytest.exit.Exception):
        raise
    except BaseException as exc:
        judge_kernels(item, when, exc)
        raise
    else:
        if after_success:
            judge_kernels(item, when, None)
