"""Typed inventory objects: what a lab is made of.

The models describe the canonical ("native") shape; the Ansible shape is
translated into it before validation (see ansible.py).
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BDF_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DRIVER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MODEL_REF_RE = re.compile(r"^([A-Za-z0-9][\w.-]*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
MODEL_REF_HELP = "a registered device model name (mlx5_vfio_pci, ...) or package.module:ATTRIBUTE"


def _model_ref(v: str | None) -> str | None:
    if v is not None and not MODEL_REF_RE.match(v):
        raise ValueError(f"'{v}' is not {MODEL_REF_HELP}")
    return v


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Capability(StrEnum):
    """What a device advertises (v2 MIGRATION flags, v1 region features)."""

    STOP_COPY = "stop_copy"
    P2P = "p2p"
    PRE_COPY = "pre_copy"
    DIRTY_LOGGING = "dirty_logging"
    MMAP_DATA = "mmap_data"


class ResetMethod(StrEnum):
    IOCTL = "ioctl"  # VFIO_DEVICE_RESET
    NONE = "none"  # the device cannot be reset: recovery tests are skipped


class HostKeyPolicy(StrEnum):
    STRICT = "strict"
    ACCEPT_NEW = "accept-new"


class _DeviceBase(Strict):
    name: str | None = Field(default=None, description="short name; defaults from the address")
    model: str | None = Field(default=None, description="devices of one model on different hosts pair up")
    device_model: str | None = Field(
        default=None, description=f"what kind of device this is (labs.models): {MODEL_REF_HELP}"
    )
    protocol: Literal["v1", "v2"]
    capabilities: tuple[Capability, ...] = (Capability.STOP_COPY,)
    reset: ResetMethod = ResetMethod.IOCTL
    qemu_properties: dict[str, str] = Field(
        default_factory=dict,
        description="QEMU properties of this device's vfio-pci frontend, set through libvirt's <qemu:override> "
        "(e.g. enable-migration: 'on' where device dirty tracking is unavailable)",
    )

    vm: str | None = Field(
        default=None,
        description="devices of one host with the same `vm` name go into one VM together (a multi-device VM)",
    )

    kernel_log_allow: tuple[str, ...] = Field(
        default=(),
        description="regular expressions (searched in a kernel log line's text) of known benign lines this "
        "model's driver logs: such a line never fails a test; they apply on every host with a device of the model",
    )

    @field_validator("kernel_log_allow")
    @classmethod
    def _allow_compiles(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
        return v

    @field_validator("qemu_properties", mode="before")
    @classmethod
    def _props_as_strings(cls, v: Any) -> Any:
        # YAML reads `on`/`off` as booleans; QEMU wants the words
        if isinstance(v, dict):
            return {str(k): ("on" if x is True else "off" if x is False else str(x)) for k, x in v.items()}
        return v

    _device_model_ok = field_validator("device_model")(_model_ref)

    @field_validator("name", "vm")
    @classmethod
    def _name_ok(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError(f"'{v}' is not a valid name (letters, digits, '_', '.', '-')")
        return v

    @model_validator(mode="after")
    def _v2_needs_stop_copy(self) -> _DeviceBase:
        if self.protocol == "v2" and Capability.STOP_COPY not in self.capabilities:
            raise ValueError("a v2 device must list stop_copy in its capabilities (it is mandatory)")
        return self

    @property
    def label(self) -> str:
        return self.name or self.default_name()

    def default_name(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def model_key(self) -> str:
        return self.model or self.default_model()

    def default_model(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError


class PciDevice(_DeviceBase):
    kind: Literal["pci"]
    pci: str

    @field_validator("pci")
    @classmethod
    def _bdf(cls, v: str) -> str:
        if not BDF_RE.match(v):
            raise ValueError(f"'{v}' is not a PCI address of the form 0000:65:00.0")
        return v.lower()

    def default_name(self) -> str:
        return self.pci

    def default_model(self) -> str:
        return f"pci:{self.pci}"


class MdevDevice(_DeviceBase):
    kind: Literal["mdev"]
    parent: str
    type: str
    uuid: str

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, v: str) -> str:
        if not UUID_RE.match(v):
            raise ValueError(f"'{v}' is not a UUID")
        return v.lower()

    def default_name(self) -> str:
        return self.type

    def default_model(self) -> str:
        return self.type


class SimDevice(_DeviceBase):
    kind: Literal["sim"]
    driver: str = Field(description="package.module:ClassName of a labs.sim driver model")
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("driver")
    @classmethod
    def _driver(cls, v: str) -> str:
        if not DRIVER_RE.match(v):
            raise ValueError(f"'{v}' is not of the form package.module:ClassName")
        return v

    def default_name(self) -> str:
        return self.driver.rsplit(":", 1)[1].lower()

    def default_model(self) -> str:
        return self.driver


Device = Annotated[PciDevice | MdevDevice | SimDevice, Field(discriminator="kind")]


class JumpHost(Strict):
    address: str
    port: int = Field(default=22, ge=1, le=65535)
    user: str = "root"
    identity_file: Path | None = None
    known_hosts: Path | None = None
    host_key_policy: HostKeyPolicy = HostKeyPolicy.STRICT


class Reboot(Strict):
    """How a host that destructive tests may reboot comes back."""

    power_on: str | None = Field(
        default=None,
        description="a command run on the controller once the host is down that brings it back and returns when it "
        "is (a BMC's power-on; the nested lab's `lab nested power-on`); none: the host comes back by itself",
    )
    timeout: float = Field(default=600.0, gt=0, description="seconds the host has to answer SSH again")


class Host(Strict):
    address: str
    port: int = Field(default=22, ge=1, le=65535)
    user: str = "root"
    identity_file: Path | None = None
    identity_passphrase_env: str | None = Field(
        default=None, description="name of the environment variable that holds the key's passphrase"
    )
    known_hosts: Path | None = None
    host_key_policy: HostKeyPolicy = HostKeyPolicy.STRICT
    jump: str | JumpHost | None = Field(default=None, description="another host's name, or a jump host")
    libvirt_uri: str | None = None
    migration_address: str | None = Field(
        default=None, description="address other hosts use for migration traffic to this host"
    )
    python: str = "python3"
    python_path: tuple[str, ...] = Field(
        default=(),
        description="directories on the host the agent adds to sys.path (sim driver modules kept outside labs)",
    )
    sudo: bool = False
    device_model: str | None = Field(
        default=None, description=f"the model of this host's devices of its kind that name none: {MODEL_REF_HELP}"
    )
    devices: tuple[Device, ...] = ()
    reboot: Reboot | None = Field(
        default=None,
        description="destructive tests may reboot this host (during an incoming migration); absent: they skip",
    )

    _device_model_ok = field_validator("device_model")(_model_ref)

    @field_validator("python_path", mode="before")
    @classmethod
    def _python_path(cls, v: Any) -> Any:
        if isinstance(v, str) or not isinstance(v, list | tuple):
            raise ValueError(f"must be a list of directories on the host, e.g. [/opt/acme/drivers], not {v!r}")
        for entry in v:
            if not isinstance(entry, str) or not entry.startswith("/"):
                raise ValueError(f"{entry!r} is not an absolute path (a directory on the host)")
        return v


class Timeouts(Strict):
    connect: float = Field(default=15.0, gt=0)
    command: float = Field(default=120.0, gt=0)
    agent_op: float = Field(default=60.0, gt=0)
    migration: float = Field(default=600.0, gt=0)
    test: float = Field(default=900.0, gt=0)


class SimSettings(Strict):
    """The embedded sim lab: the framework runs each host's sshd itself."""

    dir: Path = Field(description="where generated keys, sshd configs and device state live")
    port: int = Field(default=2222, ge=1, le=65535)


class Gates(Strict):
    """What turns `lab run` red besides pytest's exit status (evaluated by labs.reporting.gates)."""

    min_passed: int = Field(default=1, ge=0, description="fewer passed tests fail the run: all skipped is red")
    min_tests: int = Field(default=0, ge=0, description="fewer tests (passed, failed or skipped) fail the run")
    max_failures: int = Field(default=0, ge=0, description="more failed or broken tests fail the run")
    must_rules: bool = Field(default=True, description="a failing test of a MUST rule fails the run")
    max_duration_s: float | None = Field(default=None, gt=0, description="a longer run fails")
    regression_pct: float = Field(
        default=50.0, gt=0, description="a median downtime or total time this much (%) above its baseline fails"
    )
    regression_runs: int = Field(default=5, ge=2, description="the baseline: the median of the last N runs' medians")
    regression_min_ms: float = Field(
        default=20.0, ge=0, description="a regression smaller than this (ms) is noise, whatever its percentage"
    )


class LinuxGuest(Strict):
    """A Linux guest that uses the device while it moves, driven through the QEMU guest agent (no guest network).

    Its files are paths on the lab hosts (every host that may run the VM: a migration or a restore elsewhere
    loads them there too). The guest must run qemu-ga on the virtio port `org.qemu.guest_agent.0`.
    """

    kernel: str | None = Field(default=None, description="a kernel on the hosts, booted directly with `initrd`")
    initrd: str | None = None
    cmdline: str = ""
    disk: str | None = Field(default=None, description="a disk image on the hosts (instead of kernel + initrd)")
    memory_mib: int = Field(default=256, gt=0)
    workload: str = Field(
        description="a shell command in the guest that prints the workload's verdict as one JSON object: "
        '{"ok": bool, "progress": int, ...}; progress only grows while the workload runs'
    )
    drivers: dict[str, str] = Field(
        default_factory=dict,
        description="PCI vendor:device (hex, as the guest's sysfs shows it) -> the guest driver that must stay bound",
    )
    boot_timeout: float = Field(default=600.0, gt=0, description="seconds from start until the workload makes progress")

    @model_validator(mode="after")
    def _boot(self) -> LinuxGuest:
        if (self.kernel is None) == (self.disk is None):
            raise ValueError("a guest boots either a kernel (with initrd) or a disk, give exactly one")
        if self.initrd is not None and self.kernel is None:
            raise ValueError("initrd needs kernel")
        for ids in self.drivers:
            if not re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{4}", ids):
                raise ValueError(f"drivers: '{ids}' is not a PCI vendor:device in lower-case hex (4348:3253)")
        return self


class LabSettings(Strict):
    name: str = "lab"
    timeouts: Timeouts = Timeouts()
    gates: Gates = Gates()
    known_issues: Path | None = Field(default=None, description="known driver bugs (YAML), relative to the inventory")
    artifact_dir: Path = Path("reports")
    keepalive: float = Field(default=15.0, ge=0)
    max_downtime_ms: int | None = Field(
        default=None, gt=0, description="the live migrations' maximum downtime (QEMU's default of 300 ms is for KVM)"
    )
    downtime_budget_ms: int | None = Field(
        default=None,
        gt=0,
        description="a completed live migration whose downtime (libvirt's) is longer fails; unset: max_downtime_ms",
    )
    sim: SimSettings | None = None
    guest: LinuxGuest | None = Field(default=None, description="a Linux guest for the guest suite (suites/guest)")

    @model_validator(mode="after")
    def _budget_not_below_target(self) -> LabSettings:
        # QEMU may spend all of its target on RAM's last pass: a budget below it fails drivers for QEMU's choice
        if self.downtime_budget_ms and self.max_downtime_ms and self.downtime_budget_ms < self.max_downtime_ms:
            raise ValueError(
                f"downtime_budget_ms ({self.downtime_budget_ms}) is below max_downtime_ms ({self.max_downtime_ms}), "
                "the downtime QEMU may take for RAM alone"
            )
        return self

    @property
    def downtime_budget(self) -> int | None:
        """The longest downtime a completed live migration may take: QEMU's target is only what it aims for."""
        return self.downtime_budget_ms or self.max_downtime_ms


class PairSpec(Strict):
    source: str = Field(description="host:device")
    destination: str = Field(description="host:device")


class InventoryDoc(Strict):
    """The file as validated, before cross-references are resolved."""

    lab: LabSettings = LabSettings()
    hosts: dict[str, Host]
    pairs: tuple[PairSpec, ...] | None = Field(
        default=None, description="explicit pairs; when absent, devices of one model on different hosts pair up"
    )

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: dict[str, Host]) -> dict[str, Host]:
        if not v:
            raise ValueError("an inventory needs at least one host")
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(f"'{name}' is not a valid host name")
        return v
