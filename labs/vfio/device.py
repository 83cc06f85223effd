"""DeviceHandle: one open device behind an agent, with a protocol-neutral API for suites.

    dev = DeviceHandle.open(client, spec, state_dir=...)   # spec: an inventory device model
    dev.state()                 # "RUNNING" (v1 bit values get the same names: 010 is "STOP_COPY")
    saved = dev.save()          # the whole stream, chunk boundaries kept (v1 needs them)
    other.resume(saved)         # RESUMING, write, RUNNING
    dev.migrate_to(other)       # the same without holding the stream: host to host, chunk by chunk
    dev.reset(); dev.digest()   # digest: sim devices only (content readback)

Low-level calls (raw feature ioctls, v1 register reads, fd reads) stay on
`dev.client.call(...)` with `dev.handle`; this class is the common path.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from labs.inventory.models import Capability, MdevDevice, PciDevice, SimDevice
from labs.vfio import uapi
from labs.vfio.client import AgentClient, AgentOSError, CopyResult, StreamResult, copy_stream

_LEN = struct.Struct(">I")
SPOOL_IN_MEMORY = 64 << 20


class SavedStream:
    """A saved migration stream with its chunk boundaries, in memory or spilled to a temp file."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self._file = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - closed in close()
        self.bytes = 0
        self.nchunks = 0
        self.parts: list[StreamResult] = []  # one per read phase (pre-copy, stop-copy)

    def append(self, chunk: bytes) -> None:
        self._file.write(_LEN.pack(len(chunk)))
        self._file.write(chunk)
        self.bytes += len(chunk)
        self.nchunks += 1

    @property
    def sha256(self) -> str:
        """Hashed when asked, not as it streams in: few checks want it, every save would pay it."""
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()

    def chunks(self) -> Iterator[bytes]:
        """The chunks as read (v1 must replay exactly these)."""
        self._file.seek(0)
        while True:
            head = self._file.read(_LEN.size)
            if not head:
                return
            (n,) = _LEN.unpack(head)
            yield self._file.read(n)

    def rechunk(self, size: int) -> Iterator[bytes]:
        """The same bytes in writes of `size` (v2 does not keep boundaries, V2-R13)."""
        pending = b""
        for chunk in self.chunks():
            pending += chunk
            while len(pending) >= size:
                yield pending[:size]
                pending = pending[size:]
        if pending:
            yield pending

    def data(self) -> bytes:
        return b"".join(self.chunks())

    @classmethod
    def from_bytes(cls, protocol: str, data: bytes, chunk: int = 1 << 20) -> SavedStream:
        out = cls(protocol)
        for i in range(0, len(data), chunk):
            out.append(data[i : i + chunk])
        return out

    def close(self) -> None:
        self._file.close()


class DeviceHandle:
    def __init__(self, client: AgentClient, handle: int, protocol: str, name: str, info: dict[str, Any]) -> None:
        self.client = client
        self.handle = handle
        self.protocol = protocol  # "v1" | "v2"
        self.name = name
        self.open_info = info
        self.is_sim = info.get("backend") == "sim"
        self._flags: int | None = None

    # -- opening ------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        client: AgentClient,
        spec: PciDevice | MdevDevice | SimDevice,
        state_dir: str | None = None,
        name: str | None = None,
        path: str = "auto",
    ) -> DeviceHandle:
        """Open an inventory device. Sim devices keep their state in `state_dir` (on the agent's
        host); without it the agent uses $LABS_SIM_DIR/hosts/$LABS_SIM_HOST/devices/<name>,
        which is what the sim lab's sshd sets."""
        label = name or spec.label
        args: dict[str, Any]
        if isinstance(spec, SimDevice):
            args = {"kind": "sim", "driver": spec.driver, "options": dict(spec.options), "name": label}
            if state_dir:
                args["state_dir"] = state_dir
            args["sys_path"] = client.sys_path
        elif isinstance(spec, PciDevice):
            args = {"kind": "pci", "address": spec.pci, "path": path}
        else:
            args = {"kind": "mdev", "uuid": spec.uuid, "path": path}
        info = client.call("open", **args)
        return cls(client, int(info["handle"]), spec.protocol, label, info)

    @classmethod
    def open_sim(
        cls,
        client: AgentClient,
        driver: str,
        state_dir: str,
        options: dict[str, Any] | None = None,
        name: str = "sim0",
        protocol: str | None = None,
    ) -> DeviceHandle:
        caps = (Capability.STOP_COPY,)
        proto = protocol or ("v1" if ".v1:" in driver or "V1" in driver.rsplit(":", 1)[-1] else "v2")
        spec = SimDevice(kind="sim", protocol=proto, driver=driver, options=options or {}, capabilities=caps)
        return cls.open(client, spec, state_dir=state_dir, name=name)

    def close(self) -> None:
        self.client.call("close", dev=self.handle)

    def __enter__(self) -> DeviceHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, **args: Any) -> Any:
        return self.client.call(op, dev=self.handle, **args)

    # -- info -----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return dict(self.call("device_info"))

    def region_info(self, index: int) -> dict[str, Any]:
        return dict(self.call("region_info", index=index))

    def migration_region(self) -> dict[str, Any] | None:
        region = self.call("find_migration_region")
        return dict(region) if region else None

    # -- v2 -------------------------------------------------------------------------
    @property
    def mig_flags(self) -> int:
        if self._flags is None:
            self._flags = int(self.call("mig_flags")["flags"])
        return self._flags

    def supports(self, capability: str) -> bool:
        if self.protocol == "v1":
            return capability in ("stop_copy", "pre_copy")  # v1 has 011 by definition
        if capability == "dirty_logging":  # log_ops: PROBE|SET DMA_LOGGING_START answers 0, else ENOTTY
            flags = uapi.VFIO_DEVICE_FEATURE_PROBE | uapi.VFIO_DEVICE_FEATURE_SET | uapi.FEATURES["DMA_LOGGING_START"]
            try:
                self.call("feature", flags=flags, payload="")
            except AgentOSError:
                return False
            return True
        bit = {"stop_copy": uapi.SC, "p2p": uapi.P2P, "pre_copy": uapi.PRE_COPY}[capability]
        return bool(self.mig_flags & bit)

    def data_size(self) -> int:
        return int(self.call("mig_data_size")["stop_copy_length"])

    def precopy_info(self, fd: int) -> dict[str, int]:
        return dict(self.client.call("precopy_info", fd=fd))

    def close_fd(self, fd: int) -> None:
        self.client.call("close_fd", fd=fd)

    # -- v1 -------------------------------------------------------------------------
    def v1_read(self, field: str) -> int:
        return int(self.call("v1_read", field=field)["value"])

    def v1_write(self, field: str, value: int) -> None:
        self.call("v1_write", field=field, value=value)

    # -- either protocol ------------------------------------------------------------
    def state_value(self) -> int:
        if self.protocol == "v1":
            return self.v1_read("device_state")
        return int(self.call("mig_get_state")["state"])

    def state(self) -> str:
        value = self.state_value()
        return uapi.v1_state_name(value) if self.protocol == "v1" else uapi.v2_state_name(value)

    def set_state(self, state: int | str) -> int | None:
        """Move to `state` (name or value). v2 returns the new data fd handle, if any; v1 does a
        read-modify-write of device_state that keeps the reserved bits (V1-R4) and returns None."""
        if self.protocol == "v1":
            current = self.v1_read("device_state")
            bits = uapi.v1_state(state)
            self.v1_write("device_state", (current & ~uapi.V1_STATE_MASK & 0xFFFFFFFF) | bits)
            return None
        fd = self.call("mig_set_state", state=uapi.v2_state(state))["data_fd"]
        return None if fd is None else int(fd)

    def reset(self) -> None:
        self.call("reset")

    # -- save / resume ------------------------------------------------------------------
    def save(self, live: bool = False, max_bytes: int | None = None) -> SavedStream:
        """Save from RUNNING and end in STOP. `live` runs a pre-copy phase first (if supported)."""
        out = SavedStream(self.protocol)
        if self.protocol == "v1":
            if live:
                self.set_state("PRE_COPY")
                out.parts.append(self._v1_save_into(out, max_bytes))
            self.set_state("STOP_COPY")
            out.parts.append(self._v1_save_into(out, max_bytes))
            self.set_state("STOP")
            return out
        fd = None
        try:
            if live and self.supports("pre_copy"):
                # a device that dirties faster than we read never runs dry: bound the pre-copy phase
                limit = max_bytes if max_bytes is not None else 4 * self.data_size() + (1 << 20)
                fd = self.set_state("PRE_COPY")
                assert fd is not None
                out.parts.append(self.client.read_stream(fd, out.append, limit=limit)[0])
                again = self.set_state("STOP_COPY")  # same fd: the saving group keeps it (V2-R8)
                assert again is None, "a second data_fd inside the saving group"
            else:
                fd = self.set_state("STOP_COPY")
                assert fd is not None
            out.parts.append(self.client.read_stream(fd, out.append, limit=max_bytes)[0])
            self.set_state("STOP")
        finally:
            if fd is not None:
                self.close_fd(fd)
        return out

    def _v1_save_into(self, out: SavedStream, max_bytes: int | None) -> StreamResult:
        reader = self.client.frames("v1_save", dev=self.handle, max_bytes=max_bytes)
        for chunk in reader:
            out.append(chunk)
        assert reader.result is not None
        return reader.result

    def resume(self, stream: SavedStream | Iterable[bytes], end_state: str = "RUNNING") -> StreamResult:
        """RESUMING, the stream, then `end_state` (which validates; RUNNING by default)."""
        chunks = stream.chunks() if isinstance(stream, SavedStream) else stream
        fd = self.set_state("RESUMING")
        if self.protocol == "v1":
            result = self.client.send_frames("v1_resume", chunks, dev=self.handle)
        else:
            assert fd is not None, "STOP->RESUMING returned no data_fd"
            try:
                result = self.client.write_stream(fd, chunks)
            finally:
                self.close_fd(fd)
        self.set_state(end_state)
        return result

    def migrate_to(self, dst: DeviceHandle, live: bool = False) -> list[CopyResult | StreamResult]:
        """Save here, resume there, chunk by chunk through this process; ends STOP here, RUNNING there."""
        if self.protocol != dst.protocol:
            raise ValueError(f"cannot migrate {self.protocol} to {dst.protocol}")
        if self.protocol == "v1":
            dst.set_state("RESUMING")
            results: list[CopyResult | StreamResult] = []
            phases = ["PRE_COPY", "STOP_COPY"] if live else ["STOP_COPY"]
            for phase in phases:
                self.set_state(phase)
                reader = self.client.frames("v1_save", dev=self.handle)
                try:
                    results.append(dst.client.send_frames("v1_resume", reader, dev=dst.handle))
                finally:
                    reader.close()
            self.set_state("STOP")
            dst.set_state("RUNNING")
            return results
        dst_fd = dst.set_state("RESUMING")
        assert dst_fd is not None, "STOP->RESUMING returned no data_fd"
        src_fd = None
        results = []
        try:
            if live and self.supports("pre_copy"):
                # as in save(): a device that never runs dry must not hold the copy forever
                limit = 4 * self.data_size() + (1 << 20)
                src_fd = self.set_state("PRE_COPY")
                assert src_fd is not None
                results.append(copy_stream(self.client, src_fd, dst.client, dst_fd, limit=limit))
                self.set_state("STOP_COPY")
            else:
                src_fd = self.set_state("STOP_COPY")
                assert src_fd is not None
            results.append(copy_stream(self.client, src_fd, dst.client, dst_fd))
            self.set_state("STOP")
        finally:
            if src_fd is not None:
                self.close_fd(src_fd)
            dst.close_fd(dst_fd)
        dst.set_state("RUNNING")
        return results

    # -- sim readback ------------------------------------------------------------------------
    def sim(self, action: str, **params: Any) -> Any:
        return self.call("sim_control", action=action, params=params)

    def digest(self) -> str:
        """sha256 over the device's content and registers (sim devices)."""
        return str(self.sim("digest")["digest"])

    def fill(self, seed: int | str = 1) -> str:
        """Write a deterministic pattern into the content; returns the new digest."""
        return str(self.sim("fill", seed=seed)["digest"])

    def faults(self, **knobs: Any) -> dict[str, Any]:
        """The driver's fault knobs: a simulated driver's, or a real driver's module parameters
        (a patch adds them, labs/nested; the agent refuses a driver without them with EOPNOTSUPP)."""
        if self.is_sim:
            return dict(self.sim("faults", **knobs))
        return dict(self.call("driver_faults", spec=knobs))
