"""LLQ states written to the zone database in groups, so that a burst of setups costs a few disk syncs.

Each state change is written at once unless another write went out less than :data:`SAVE_DELAY` ago;
then it waits for that long and goes with the others in one transaction. A watcher of a 100-device
account sets up some 500 LLQs, and a disk sync per LLQ made the server the bottleneck. A crash loses
at most the last ``SAVE_DELAY`` of changes: those clients find out at their next refresh (NO-SUCH-LLQ)
and set up again.
"""

from __future__ import annotations

import math
from typing import Final

from tunneld.dnsserver.store import ZoneStore

__all__ = ["SAVE_DELAY", "Saver"]

SAVE_DELAY: Final = 0.2
"""Seconds between two writes of LLQ states (at most five disk syncs a second)."""


class Saver:
    """Pending LLQ states (None: delete) for ``store``, written by :meth:`put` or :meth:`poll`."""

    def __init__(self, store: ZoneStore, delay: float = SAVE_DELAY) -> None:
        self.store = store
        self.delay = delay
        self.writes = 0
        self._pending: dict[int, str | None] = {}
        self._last = -math.inf

    def put(self, llq_id: int, state: str | None, now: float) -> None:
        self._pending[llq_id] = state
        self.poll(now)

    def due(self) -> float | None:
        """When :meth:`poll` writes what is pending (None: nothing is)."""
        return self._last + self.delay if self._pending else None

    def poll(self, now: float) -> None:
        if self._pending and not now < self._last + self.delay:
            pending, self._pending = self._pending, {}
            self.store.llq_write(pending.items())
            self._last = now
            self.writes += 1
