"""What the layers above need from an open device: its state names and the `DeviceAccess` protocol.

labs.vfio.device.DeviceHandle implements it; scenarios, faults and the janitor depend on this
small interface only, so a test can hand them a fake device.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from typing import Any, Protocol

RUNNING_STATES = ("RUNNING", "001")  # v2 name, v1 device_state bits
# A real device no VM holds may be left in STOP by QEMU (spec 4.2) and a driver that does not reset on
# close keeps it; never RESUMING, STOP_COPY or ERROR (docs/nested-findings.md, surprise 4).
IDLE_STATES = (*RUNNING_STATES, "STOP", "000")


class SavedStreamLike(Protocol):
    bytes: int  # its length (the device layer's name for it)

    def data(self) -> builtins.bytes: ...

    def chunks(self) -> Iterator[builtins.bytes]:
        """The stream as the device gave it (v1 keeps its chunk boundaries)."""
        ...


class DeviceAccess(Protocol):
    """What the scenarios need from a device handle of the device layer (labs.vfio.device.DeviceHandle)."""

    def state(self) -> str:
        """The migration state by name: RUNNING, STOP, ... (v1 bit values get the same names)."""
        ...

    def data_size(self) -> int:
        """Pending stop-copy data size (v2 MIG_DATA_SIZE)."""
        ...

    def save(self) -> SavedStreamLike:
        """A full device-level save: the stream, with the device left in STOP."""
        ...

    def resume(self, stream: Any) -> object:
        """RESUMING, the stream (a saved stream or an iterable of chunks), then RUNNING; raises on refusal."""
        ...

    def set_state(self, state: str) -> object:
        """One requested transition by state name (what QEMU does to recover: back to RUNNING)."""
        ...

    def reset(self) -> None:
        """VFIO_DEVICE_RESET."""
        ...

    def digest(self) -> str:
        """Content digest (simulated devices only)."""
        ...

    def faults(self, **knobs: Any) -> dict[str, Any]:
        """The driver's fault knobs (transitions=[{from, to, errno, error}], clear=True, ...): a simulated
        driver's, or those of a real driver patched with them (the nested lab builds one)."""
        ...
