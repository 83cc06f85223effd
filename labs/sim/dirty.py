"""Device DMA dirty logging for the v2 sim driver: the driver half of the kernel's log_ops.

The VFIO core (labs.sim.kernel) validates START/REPORT and owns the user bitmap; the driver
tracks which pages of the started ranges the device wrote, at the page size it chose, like
mlx5 and pds. The device "DMAs" through sim_control `dma_write` {iova, length}.
Option: dirty_logging: bool   advertise log_ops (without it DMA_LOGGING_* answer ENOTTY)
"""

from __future__ import annotations

import errno
from typing import Any

from labs.sim.base import err

MIN_LOG_PAGE = 4096


class DirtyLogging:
    """Mixin for a SimDriver: log_start / log_stop / log_read_and_clear and the device's DMA."""

    log_ranges: list[tuple[int, int]] | None = None  # (iova, length) while logging, else None
    log_page_size = 0
    log_dirty: set[int]  # tracker page indexes (iova // log_page_size) written since the last REPORT

    def init_dirty_logging(self, options: dict[str, Any]) -> None:
        self.has_log_ops = bool(options.get("dirty_logging"))
        self.log_ranges = None
        self.log_dirty = set()

    def log_start(self, ranges: list[tuple[int, int]], page_size: int) -> int:
        """Start tracking; returns the page size the tracker uses (the core writes it back)."""
        if self.log_ranges is not None:
            raise err(errno.EINVAL, "DMA logging is already started")  # mlx5 and pds answer EINVAL
        self.log_page_size = max(MIN_LOG_PAGE, 1 << max(page_size - 1, 0).bit_length())
        self.log_ranges = list(ranges)
        self.log_dirty = set()
        return self.log_page_size

    def log_stop(self) -> None:
        self.log_ranges = None
        self.log_dirty = set()

    def log_read_and_clear(self, iova: int, length: int) -> list[tuple[int, int]]:
        """The dirty spans (iova, length) that meet [iova, iova+length); they are clean afterwards."""
        if self.log_ranges is None:
            raise err(errno.EINVAL, "DMA logging is not started")  # mlx5 and pds answer EINVAL
        ps = self.log_page_size
        pages = sorted(p for p in self.log_dirty if p * ps < iova + length and (p + 1) * ps > iova)
        self.log_dirty.difference_update(pages)
        return [(p * ps, ps) for p in pages]

    def device_dma_write(self, iova: int, length: int) -> int:
        """The device wrote guest memory [iova, iova+length): mark the logged pages; returns how many."""
        if self.log_ranges is None or length <= 0:
            return 0
        ps, marked = self.log_page_size, set[int]()
        for start, size in self.log_ranges:
            lo, hi = max(iova, start), min(iova + length, start + size)
            if lo < hi:
                marked.update(range(lo // ps, (hi - 1) // ps + 1))
        self.log_dirty |= marked
        return len(marked)

    def ctl_dma_write(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"pages": self.device_dma_write(int(params["iova"]), int(params["length"]))}

    def ctl_dma_log(self, params: dict[str, Any]) -> dict[str, Any]:
        ranges = None if self.log_ranges is None else [list(r) for r in self.log_ranges]
        return {"ranges": ranges, "page_size": self.log_page_size, "dirty": sorted(self.log_dirty)}
