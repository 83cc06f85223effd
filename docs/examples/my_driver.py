"""A driver model kept outside labs: the v2 sim driver with one deliberate bug.

`lab defects --driver my_driver.py:LeakyStopCopy` judges it against suites/conformance;
README "Plug your own driver model" walks through it.
"""

from __future__ import annotations

from labs.sim.v2 import STOP, STOP_COPY, DataFile, V2Driver


class LeakyStopCopy(V2Driver):
    """Leaving STOP_COPY for STOP keeps the saving data_fd readable: the session ends on reset only."""

    breaks = "V2-R16"  # the rule this model breaks on purpose: `lab defects` must show it CAUGHT

    def arc(self, cur: int, nxt: int) -> DataFile | None:
        if (cur, nxt) == (STOP_COPY, STOP):
            return None  # the bug: no self.end_session() here
        return super().arc(cur, nxt)
