"""The front's replica of its primary's zone: a zone transfer applied to the front's store.

In front mode (:mod:`tunneld.dnsserver.front`) the primary holds the zone and the front answers LLQs and
DNS Push subscriptions from its own store, so the store must hold what the primary holds. A transfer
(:mod:`tunneld.proto.xfr`) is applied here in one transaction: a :class:`~tunneld.proto.xfr.Full` makes
the store's records equal the zone's, an :class:`~tunneld.proto.xfr.Incremental` applies each diff in
order. The server's own records (SOA, apex NS, the service SRVs, its addresses) stay the store's. A record
the front already holds (it applied a forwarded update the primary took) keeps its lease; one the primary
removed goes, lease and all. The changes returned are those that altered a row, so the front's own
updates coming back through the primary change nothing and cause no second event. The primary's SOA is
kept in the store's ``meta`` table: after a restart the front asks for the changes since it.
docs/protocol.md, "Front mode".
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Final

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA

from tunneld.dnsserver.intents import Intents
from tunneld.dnsserver.store import AddRR, DeleteRR, ZoneStore, canonical
from tunneld.proto.xfr import Full, Incremental, ZoneRecord

__all__ = ["PRIMARY_SOA_KEY", "ReplicaError", "apply_transfer", "primary_soa", "soa_serial"]

PRIMARY_SOA_KEY: Final = "primary-soa"
"""The ``meta`` row holding the primary's SOA as last applied: ``TTL RDATA`` in presentation form."""

_Key = tuple[str, int, bytes]  # (canonical owner, type, canonical RDATA wire): the records table's key


class ReplicaError(Exception):
    """An incremental transfer that does not start at the replica's serial (ask for the whole zone)."""


def primary_soa(store: ZoneStore) -> ZoneRecord | None:
    """The primary's SOA as the replica last applied it (an IXFR starts from it); None before the first
    transfer."""
    text = store.meta(PRIMARY_SOA_KEY)
    if text is None:
        return None
    ttl, rdata = text.split(" ", 1)
    return ZoneRecord(store.zone, int(ttl), dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SOA, rdata))


def soa_serial(record: ZoneRecord) -> int:
    """The serial of an SOA record."""
    assert isinstance(record.rdata, dns.rdtypes.ANY.SOA.SOA)
    return int(record.rdata.serial)


def apply_transfer(store: ZoneStore, result: Full | Incremental) -> list[AddRR | DeleteRR]:
    """Apply a transfer to ``store`` in one transaction (the zone's own serial bumped if a row changed)
    and return the changes that altered a row: :class:`AddRR` for a record added or given a new TTL,
    :class:`DeleteRR` for one removed (what the LLQ server and the Push sessions take). ReplicaError for
    an incremental transfer from another serial than ours (nothing applied); DiskFull for want of space."""
    changes: list[AddRR | DeleteRR] = []

    def apply(db: sqlite3.Connection) -> bool:
        if isinstance(result, Full):
            _full(store, db, result.records, changes)
        else:
            ours = primary_soa(store)
            if result.diffs and (ours is None or soa_serial(ours) != result.diffs[0].old_serial):
                raise ReplicaError("the incremental transfer does not start at our serial")
            for diff in result.diffs:
                for record in diff.removed:
                    _remove(store, db, record, changes)
                for record in diff.added:
                    _add(store, db, record, changes)
        soa = result.soa
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                   (PRIMARY_SOA_KEY, f"{soa.ttl} {soa.rdata.to_text()}"))
        return bool(changes)

    store.replica_apply(apply)
    return changes


def _ours(store: ZoneStore, record: ZoneRecord) -> bool:
    """Is this one of the store's own records (not replicated: the store synthesises its own)?"""
    return record.rdtype == dns.rdatatype.SOA or store.is_protected(record.owner, record.rdtype)


def _key(store: ZoneStore, record: ZoneRecord) -> _Key:
    return (canonical(record.owner), record.rdtype, record.rdata.to_digestable(store.zone))


def _add(store: ZoneStore, db: sqlite3.Connection, record: ZoneRecord,
         changes: list[AddRR | DeleteRR]) -> None:
    """Insert the record (permanent: the primary's own, unless an intent gives it a lease:
    :mod:`tunneld.dnsserver.intents`) or, if present, set its TTL; its lease stays."""
    if _ours(store, record):
        return
    key = _key(store, record)
    row = db.execute("SELECT ttl FROM records WHERE owner=? AND rdtype=? AND rdata=?", key).fetchone()
    if row is None:
        expires = Intents.lease_of(db, key)
        db.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?)", (*key, record.ttl, expires))
    elif row[0] != record.ttl:
        db.execute("UPDATE records SET ttl=? WHERE owner=? AND rdtype=? AND rdata=?", (record.ttl, *key))
    else:
        return
    changes.append(AddRR(record.owner, record.ttl, record.rdata))


def _remove(store: ZoneStore, db: sqlite3.Connection, record: ZoneRecord,
            changes: list[AddRR | DeleteRR]) -> None:
    if _ours(store, record):
        return
    gone = db.execute("DELETE FROM records WHERE owner=? AND rdtype=? AND rdata=? RETURNING ttl",
                      _key(store, record)).fetchall()
    if gone:
        changes.append(DeleteRR(record.owner, record.rdata))


def _full(store: ZoneStore, db: sqlite3.Connection, records: Iterable[ZoneRecord],
          changes: list[AddRR | DeleteRR]) -> None:
    """Make the stored records equal ``records`` (the server's own aside)."""
    wanted: dict[_Key, ZoneRecord] = {}
    for record in records:
        if not _ours(store, record):
            wanted[_key(store, record)] = record
    stored = {(o, t, bytes(w)): ttl for o, t, w, ttl in
              db.execute("SELECT owner, rdtype, rdata, ttl FROM records").fetchall()}
    for key in stored.keys() - wanted.keys():
        db.execute("DELETE FROM records WHERE owner=? AND rdtype=? AND rdata=?", key)
        owner, rdtype, wire = key
        rdtype_ = dns.rdatatype.RdataType.make(rdtype)
        rdata = dns.rdata.from_wire(dns.rdataclass.IN, rdtype_, wire, 0, len(wire))
        changes.append(DeleteRR(dns.name.from_text(owner), rdata))
    for record in wanted.values():
        _add(store, db, record, changes)
