"""The leases of updates the primary is applying, on disk before their devices are answered.

In front mode the store's commits are not synced (``ZoneStore.sync_intents_only``): the sync of a
forwarded update's commit sat between the primary's answer and the device's, the largest part of what the
front added to an update (docs/perf-dns.md, "The front's commit off the device's path"). Instead, once a
forward is sent, the RRs it adds are written here with their lease's end and synced while the primary
works (the sync carries every commit before it too); the commit after the primary's NOERROR drops them,
unsynced, and a refusal drops them as well. So an update answered NOERROR has its lease on disk, as before.

What stays here after a crash or a power cut, or after a forward that got no answer, is an RR that may
be on the primary with no lease at the front, which would then never delete it: :meth:`Intents.recover`
(at start) gives each such RR the intended lease if the store holds it, and :meth:`Intents.lease_of`
gives it to an RR a transfer brings later. An intent whose lease has ended goes. docs/protocol.md,
"Front mode".
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence

from tunneld.dnsserver.store import AddRR, Change, DiskFull, Lease, ZoneStore, canonical

__all__ = ["Intents"]

log = logging.getLogger(__name__)

_RECOVER = """
UPDATE records SET expires = max(coalesce(records.expires, 0), i.expires)
FROM (SELECT owner, rdtype, rdata, max(expires) AS expires FROM intents GROUP BY owner, rdtype, rdata) AS i
WHERE records.owner = i.owner AND records.rdtype = i.rdtype AND records.rdata = i.rdata
"""
_RECOVERED = """
DELETE FROM intents WHERE EXISTS (SELECT 1 FROM records AS r WHERE r.owner = intents.owner
    AND r.rdtype = intents.rdtype AND r.rdata = intents.rdata)
"""


class Intents:
    """The ``intents`` table of one front's store: rows (intent number, owner, type, RDATA, lease end)."""

    def __init__(self, store: ZoneStore) -> None:
        self.store = store
        row = store.db.execute("SELECT max(intent) FROM intents").fetchone()
        self._last = int(row[0] or 0)

    def write(self, changes: Sequence[Change], lease: Lease | None, now: float,
              sync: bool = True) -> int | None:
        """Write the leases of the RRs ``changes`` add, synced unless not ``sync`` (the caller syncs the
        WAL: :mod:`tunneld.dnsserver.walsync`); their intent number (None: none added with a lease, or
        the write failed: a full disk, which the store has said, or another error, logged here; the
        commit will most likely fail the same way). Intents whose lease has ended go in the same
        transaction."""
        if lease is None:
            return None
        zone = self.store.zone
        rows = [(canonical(ch.owner), int(ch.rdata.rdtype), ch.rdata.to_digestable(zone),
                 now + lease.for_type(ch.rdata.rdtype)) for ch in changes if isinstance(ch, AddRR)]
        if not rows:
            return None
        self._last += 1
        try:
            with self.store.transaction(sync=sync) as db:
                db.execute("DELETE FROM intents WHERE expires <= ?", (now,))
                db.executemany("INSERT INTO intents VALUES (?, ?, ?, ?, ?)", [(self._last, *r) for r in rows])
        except DiskFull:
            return None
        except sqlite3.Error as e:
            log.error("writing the leases of a forwarded update to %s failed: %s", self.store.path, e)
            return None
        return self._last

    def drop(self, intent: int | None) -> None:
        """The primary refused the update: its intent goes (unsynced; should it stay, :meth:`recover`
        gives a lease only to an RR the store holds)."""
        if intent is not None:
            try:
                with self.store.transaction() as db:
                    db.execute("DELETE FROM intents WHERE intent = ?", (intent,))
            except sqlite3.Error:  # DiskFull included: it stays (see recover)
                pass

    def recover(self, now: float) -> int:
        """At start: every RR the store holds that has an intent gets the later of its lease's end and
        the intent's (a permanent one: the intent's), and those intents go; so do ended ones. Returns how
        many intents are left for :meth:`lease_of`."""
        with self.store.transaction(sync=True) as db:
            db.execute("DELETE FROM intents WHERE expires <= ?", (now,))
            db.execute(_RECOVER)
            db.execute(_RECOVERED)
            return int(db.execute("SELECT count(*) FROM intents").fetchone()[0])

    @staticmethod
    def lease_of(db: sqlite3.Connection, key: tuple[str, int, bytes]) -> float | None:
        """Inside a transfer's transaction (:mod:`tunneld.dnsserver.replica`): the lease end intended for
        an RR the primary's zone adds to the store (``key``: owner, type, RDATA as the records table
        keeps them), and its intents gone; None when it has none."""
        row = db.execute("SELECT max(expires) FROM intents WHERE owner = ? AND rdtype = ? AND rdata = ?",
                         key).fetchone()
        if row is None or row[0] is None:
            return None
        db.execute("DELETE FROM intents WHERE owner = ? AND rdtype = ? AND rdata = ?", key)
        return float(row[0])
