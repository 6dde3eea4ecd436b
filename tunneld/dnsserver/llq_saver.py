"""LLQ states written to the zone database in groups, so that a burst of setups costs a few disk syncs.

Each state change is written at once unless another write went out less than :data:`SAVE_DELAY` ago;
then it waits for that long and goes with the others in one transaction. A watcher of a 100-device
account sets up some 500 LLQs, and a disk sync per LLQ made the server the bottleneck. A crash loses
at most the last ``SAVE_DELAY`` of changes: those clients find out at their next refresh (NO-SUCH-LLQ)
and set up again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Final

import dns.name
import dns.rdata
import dns.rdataclass

from tunneld.dnsserver.llq_events import Records
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
        self._records: tuple[Records, list[list[Any]]] | None = None

    def records(self, held: Records) -> list[list[Any]]:
        """An answer set as saved: ``[owner, type, RDATA, TTL]`` in presentation form. The last one is
        kept: after an event, the acks of all the LLQs of a question save the answer they share."""
        if self._records is not None and self._records[0] is held:
            return self._records[1]
        out = [[name.to_text(), int(rdtype), rd.to_text(), ttl]
               for (name, rdtype), rds in held.items() for rd, ttl in rds.items()]
        self._records = (held, out)
        return out

    @staticmethod
    def snapshot(saved: Iterable[Any]) -> Records:
        """The answer set of :meth:`records`' output (ValueError, TypeError or a DNSException if bad)."""
        out: Records = {}
        for name, rdtype, rdata, ttl in saved:
            rd = dns.rdata.from_text(dns.rdataclass.IN, rdtype, rdata)
            out.setdefault((dns.name.from_text(name), rdtype), {})[rd] = int(ttl)
        return out

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
