"""Named fault injectors, each recorded and undone (see base.FaultLedger)."""

from labs.faults.base import Fault, FaultLedger, FaultRecord
from labs.faults.device import (
    CorruptResumeStream,
    CorruptSaveImage,
    DestinationLacksDevice,
    DeviceTransitionFailure,
    IncompatibleDestinationMdev,
)
from labs.faults.job import AbortJob, KillDestinationQemu
from labs.faults.network import CutMigrationLink

__all__ = [
    "AbortJob",
    "CorruptResumeStream",
    "CorruptSaveImage",
    "CutMigrationLink",
    "DestinationLacksDevice",
    "DeviceTransitionFailure",
    "Fault",
    "FaultLedger",
    "FaultRecord",
    "IncompatibleDestinationMdev",
    "KillDestinationQemu",
]
