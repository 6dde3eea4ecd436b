"""Replay memory of signed UPDATEs: each one is applied once, however often it arrives.

TSIG's time check (RFC 8945 §5.2.3) lets a captured request be replayed for as long as its own window
lasts (time signed ± its fudge). The request MAC, unique per signed message, is remembered with the reply
sent until that window closes: a copy (a replay, or the client's retransmission after a lost reply) gets
that reply and changes nothing. Entries live in the zone's database and are written in the transaction of
the update they answer (:meth:`ZoneStore.apply_update`), so neither a restart nor a crash re-opens the
window. Expired entries go with the lease sweep and lazily on each insert; at most :data:`MAX_KEPT` are
kept, the oldest forgotten first. See docs/hardening.md ("Replays of signed updates").
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from tunneld.dnsserver.store import ZoneStore

__all__ = ["MAX_KEPT", "Answered", "ReplayCache", "remember"]

MAX_KEPT: Final = 16384
"""Entries kept (some 300 bytes each, 5 MB in all). Only holders of the account key can add entries; a
window is at most 600 s (±300 s fudge), so this is 27 updates a second for ten minutes: far beyond any
account's devices, and a runaway one only makes the oldest entries replayable again."""


@dataclass(frozen=True, slots=True)
class Answered:
    """One remembered request: its MAC, the last second its TSIG window accepts it, the reply sent."""

    mac: bytes
    until: int
    reply: bytes


def remember(db: sqlite3.Connection, answered: Answered, now: float, kept: int) -> None:
    """Inside a write transaction on the store's ``replays`` table: drop expired entries, add this one, keep
    the newest ``kept`` (rowids grow with each insert, so the oldest have the lowest)."""
    db.execute("DELETE FROM replays WHERE until < ?", (int(now),))
    db.execute("INSERT OR REPLACE INTO replays (mac, until, reply) VALUES (?, ?, ?)",
               (answered.mac, answered.until, answered.reply))
    db.execute("DELETE FROM replays WHERE rowid <= (SELECT max(rowid) FROM replays) - ?", (kept,))


class ReplayCache:
    """The replay memory of one zone, kept in its store."""

    def __init__(self, store: ZoneStore) -> None:
        self.store = store

    @property
    def kept(self) -> int:
        """The bound on entries (the store enforces it when it writes one)."""
        return self.store.replays_kept

    @kept.setter
    def kept(self, value: int) -> None:
        if value < 1:
            raise ValueError("the replay memory must keep at least one entry")
        self.store.replays_kept = value

    def __len__(self) -> int:
        return int(self.store.db.execute("SELECT count(*) FROM replays").fetchone()[0])

    def find(self, mac: bytes, now: float) -> bytes | None:
        """The reply already sent to the request of this MAC, if its window is still open at ``now``."""
        if not mac:
            return None
        row = self.store.db.execute("SELECT until, reply FROM replays WHERE mac=?", (mac,)).fetchone()
        if row is None or int(row[0]) < int(now):
            return None
        return bytes(row[1])

    @staticmethod
    def entry(mac: bytes, time_signed: int, fudge: int, reply: bytes) -> Answered:
        """The entry for a request signed at ``time_signed`` with ``fudge`` (the REQUEST's fudge, not
        the server's: the window is the one the request's TSIG check accepts)."""
        return Answered(mac, time_signed + fudge, reply)

    def remember(self, answered: Answered, now: float) -> None:
        """Remember a reply sent without changing the zone (a refused update), in its own transaction."""
        if answered.mac:
            with self.store.transaction() as db:
                remember(db, answered, now, self.store.replays_kept)
