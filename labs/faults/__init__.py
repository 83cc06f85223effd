"""Named fault injectors, each recorded and undone (see base.FaultLedger)."""

from labs.faults.base import Fault, FaultLedger, FaultRecord
from labs.faults.daemon import KillDaemon, StopDaemon
from labs.faults.device import (
    AlterSaveImagePayload,
    CorruptResumeStream,
    CorruptSaveImage,
    DestinationLacksDevice,
    DeviceTransitionFailure,
    IncompatibleDestinationMdev,
)
from labs.faults.disk import FullFilesystem
from labs.faults.driver import DriverArcFailure, DriverStreamCut
from labs.faults.host import RebootHost
from labs.faults.job import (
    AbortJob,
    AbortOnDestination,
    DestroyDuringFinish,
    KillDestinationQemu,
    KillSourceQemu,
    MigrationDeadline,
)
from labs.faults.netem import DegradedLink
from labs.faults.network import CutMigrationLink

__all__ = [
    "AbortJob",
    "AbortOnDestination",
    "AlterSaveImagePayload",
    "CorruptResumeStream",
    "CorruptSaveImage",
    "CutMigrationLink",
    "DegradedLink",
    "DestinationLacksDevice",
    "DestroyDuringFinish",
    "DeviceTransitionFailure",
    "DriverArcFailure",
    "DriverStreamCut",
    "Fault",
    "FaultLedger",
    "FaultRecord",
    "FullFilesystem",
    "IncompatibleDestinationMdev",
    "KillDaemon",
    "KillDestinationQemu",
    "KillSourceQemu",
    "MigrationDeadline",
    "RebootHost",
    "StopDaemon",
]
