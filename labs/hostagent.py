"""Host services through the device agent (filled in by the device layer)."""

from __future__ import annotations

from labs.doctor import MigrationProbe

migration_probe: MigrationProbe | None = None
