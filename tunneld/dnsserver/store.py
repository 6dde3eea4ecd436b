"""SQLite-backed zone store for the rendezvous DNS server, with RFC 9664 leases.

One zone per store. Client records live in the ``records`` table, one row per RR, keyed by the canonical
(lower-case) owner name, the type and the canonical wire form of the RDATA (RFC 4034 §6.2), with the TTL and
an optional absolute lease expiry in wall-clock seconds. The zone's own SOA, apex NS and the
``_dns-update._udp`` / ``_dns-llq._udp`` SRV records (with DNS over TLS also ``_dns-update-tls._tcp``,
``_dns-query-tls._tcp`` and ``_dns-push-tls._tcp``; and the server's A/AAAA when its name is in the zone)
are synthesised from the creation arguments and the stored serial; they are served and visible to
prerequisites but clients cannot change them.

Time is always passed in (``now``, wall seconds); the store never reads a clock. Records whose lease has
expired are never returned, even before :meth:`ZoneStore.expire` sweeps them (RFC 9664 §7). The
``replays`` table is :mod:`tunneld.dnsserver.replay`'s memory of signed updates, written in each update's
own transaction. A full disk fails writes with :class:`DiskFull`, logged once until a write succeeds
again; reads go on. In front mode only the ``intents`` table is synced (:mod:`tunneld.dnsserver.intents`;
docs/perf-dns.md, "The front's commit off the device's path").
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from tunneld.dnsserver.replay import MAX_KEPT, Answered, remember
from tunneld.proto.srv import (
    LLQ_SRV_SERVICE,
    LLQ_TLS_SRV_SERVICE,
    PUSH_TLS_SRV_SERVICE,
    QUERY_TLS_SRV_SERVICE,
    UPDATE_SRV_SERVICE,
    UPDATE_TLS_SRV_SERVICE,
)

__all__ = [
    "AddRR",
    "Change",
    "DeleteName",
    "DeleteRR",
    "DeleteRRset",
    "DiskFull",
    "Lease",
    "NotWritable",
    "RRsetRemoval",
    "StoredRR",
    "ZoneStore",
]

TLS_SRV_SERVICES: Final = (UPDATE_TLS_SRV_SERVICE, QUERY_TLS_SRV_SERVICE, PUSH_TLS_SRV_SERVICE,
                           LLQ_TLS_SRV_SERVICE)
"""The SRV records naming the DNS-over-TLS port, published when the server has one."""

log = logging.getLogger(__name__)

SWEEP_RETRY: Final = 60.0
"""Seconds before a lease sweep that failed for want of space is tried again."""

SOA_REFRESH: Final = 3600
SOA_RETRY: Final = 600
SOA_EXPIRE: Final = 86400
SOA_MINIMUM: Final = 60
"""Negative-caching TTL (RFC 2308): short, because the zone changes whenever a device moves."""
ZONE_TTL: Final = 3600
"""TTL of the zone's own SOA, NS and SRV records."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    owner TEXT NOT NULL,
    rdtype INTEGER NOT NULL,
    rdata BLOB NOT NULL,
    ttl INTEGER NOT NULL,
    expires REAL,
    PRIMARY KEY (owner, rdtype, rdata)
);
CREATE INDEX IF NOT EXISTS records_expires ON records (expires);
CREATE TABLE IF NOT EXISTS llqs (id TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS replays (mac BLOB PRIMARY KEY, until INTEGER NOT NULL, reply BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS replays_until ON replays (until);
CREATE TABLE IF NOT EXISTS intents (intent INTEGER NOT NULL, owner TEXT NOT NULL, rdtype INTEGER NOT NULL,
    rdata BLOB NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS intents_rr ON intents (owner, rdtype, rdata);
"""
SCHEMA_VERSION: Final = 2
"""``PRAGMA user_version``: 0 for databases made before the ``replays`` table (added by the CREATE ...
IF NOT EXISTS above when such a database is opened), 2 since."""


class DiskFull(sqlite3.OperationalError):
    """A write failed for want of space (SQLITE_FULL: ENOSPC, or a page limit). Rolled back."""


class NotWritable(Exception):
    """The database cannot be written; ``str()`` says why, for one line at start-up."""


def _is_full(e: BaseException) -> bool:
    return isinstance(e, sqlite3.Error) and (getattr(e, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL


def canonical(name: dns.name.Name) -> str:
    """The key a name is stored under: absolute, lower-case presentation form."""
    return name.canonicalize().to_text()


@dataclass(frozen=True, slots=True)
class StoredRR:
    """One visible RR: TTL and RDATA (canonical wire form plus the parsed object)."""

    ttl: int
    rdata: dns.rdata.Rdata

    @property
    def wire(self) -> bytes:
        return self.rdata.to_digestable()


@dataclass(frozen=True, slots=True)
class Lease:
    """An RFC 9664 grant in seconds: ``lease`` for ordinary RRs, ``key_lease`` for KEY RRs."""

    lease: int
    key_lease: int

    def for_type(self, rdtype: int) -> int:
        return self.key_lease if rdtype == dns.rdatatype.KEY else self.lease


@dataclass(frozen=True, slots=True)
class AddRR:
    """Add one RR (RFC 2136 §2.5.1); an existing identical RR gets the new TTL and lease."""

    owner: dns.name.Name
    ttl: int
    rdata: dns.rdata.Rdata


@dataclass(frozen=True, slots=True)
class DeleteRRset:
    """Delete an RRset (§2.5.2)."""

    owner: dns.name.Name
    rdtype: int


@dataclass(frozen=True, slots=True)
class DeleteName:
    """Delete all RRsets of a name (§2.5.3)."""

    owner: dns.name.Name


@dataclass(frozen=True, slots=True)
class DeleteRR:
    """Delete one RR from an RRset (§2.5.4)."""

    owner: dns.name.Name
    rdata: dns.rdata.Rdata


Change = AddRR | DeleteRRset | DeleteName | DeleteRR


@dataclass(frozen=True, slots=True)
class RRsetRemoval:
    """RRs removed from one RRset by lease expiry (for LLQ removal events)."""

    owner: dns.name.Name
    rdtype: int
    rrs: tuple[StoredRR, ...] = field(default=())


def _rdata_from_wire(rdtype: int, wire: bytes) -> dns.rdata.Rdata:
    return dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.RdataType.make(rdtype), wire, 0, len(wire))


class ZoneStore:
    """The zone's data in one SQLite file (``":memory:"`` for tests).

    ``server`` and ``port`` give the target of the apex NS, the SOA MNAME and the two service SRV records;
    ``llq_port`` defaults to ``port``. ``tls_port``, if given, is the DNS-over-TLS port: the three TLS
    service SRV records (:data:`TLS_SRV_SERVICES`) name it. ``addresses`` (IPv4/IPv6 text) become the
    server name's A/AAAA records, allowed only when that name is inside the zone. Reopening an existing file
    for a different zone raises ValueError.
    """

    def __init__(
        self,
        path: str,
        zone: dns.name.Name | str,
        server: dns.name.Name | str,
        port: int,
        llq_port: int | None = None,
        addresses: Sequence[str] = (),
        tls_port: int | None = None,
    ) -> None:
        self.zone = (dns.name.from_text(zone) if isinstance(zone, str) else zone).canonicalize()
        self.server = dns.name.from_text(server) if isinstance(server, str) else server
        if not self.zone.is_absolute() or not self.server.is_absolute():
            raise ValueError("zone and server names must be absolute")
        if any(p is not None and not (0 < p < 65536) for p in (port, llq_port, tls_port)):
            raise ValueError("ports must be 1..65535")
        self.port = port
        self.llq_port = port if llq_port is None else llq_port
        self.tls_port = tls_port
        self.update_srv_name = dns.name.from_text(UPDATE_SRV_SERVICE, self.zone)
        self.llq_srv_name = dns.name.from_text(LLQ_SRV_SERVICE, self.zone)
        self.tls_srv_names = tuple(dns.name.from_text(s, self.zone) for s in TLS_SRV_SERVICES)
        self.srv_names = (self.update_srv_name, self.llq_srv_name, *(self.tls_srv_names if tls_port else ()))
        """The service SRV names the server publishes (the TLS ones with a TLS port)."""
        self._static: dict[dns.name.Name, dict[int, list[StoredRR]]] = {}
        self._add_static(self.zone, dns.rdatatype.NS, self.server.to_text())
        self._add_static(self.update_srv_name, dns.rdatatype.SRV, f"0 0 {self.port} {self.server}")
        self._add_static(self.llq_srv_name, dns.rdatatype.SRV, f"0 0 {self.llq_port} {self.server}")
        if tls_port is not None:
            for name in self.tls_srv_names:
                self._add_static(name, dns.rdatatype.SRV, f"0 0 {tls_port} {self.server}")
        if addresses and not self.server.is_subdomain(self.zone):
            raise ValueError("server addresses (glue) are only served for a server name inside the zone")
        for addr in addresses:
            rdtype = dns.rdatatype.AAAA if ":" in addr else dns.rdatatype.A
            self._add_static(self.server, rdtype, addr)
        self.path = path
        self.replays_kept = MAX_KEPT
        self.full = False
        """A write failed for want of space and none has succeeded since (reported once)."""
        self._sweep_after: float | None = None
        self._wal = False  # the journal is WAL, or switching failed (see _write)
        self._sync_all = True  # every commit synced (not in front mode: sync_intents_only)
        self._db = sqlite3.connect(path, isolation_level=None)
        try:
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)  # also the migration of older databases (SCHEMA_VERSION)
            row = self._db.execute("SELECT value FROM meta WHERE key='zone'").fetchone()
            if row is not None and row[0] != self.zone.to_text():
                raise ValueError(f"database holds zone {row[0]}, not {self.zone.to_text()}")
            if row is None:
                with self._write(wal=False):
                    self._db.execute("INSERT INTO meta VALUES ('zone', ?)", (self.zone.to_text(),))
                    self._db.execute("INSERT INTO meta VALUES ('serial', '1')")
            if self._db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    def _add_static(self, owner: dns.name.Name, rdtype: dns.rdatatype.RdataType, text: str) -> None:
        rdata = dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)  # ValueError-family on bad input
        self._static.setdefault(owner, {}).setdefault(rdtype, []).append(StoredRR(ZONE_TTL, rdata))

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _write(self, report: bool = True, wal: bool = True, sync: bool = False) -> Iterator[None]:
        """One write transaction: committed, or rolled back on any exception. For want of space it
        raises DiskFull, and says so once if ``report`` (one log line until a write that changed
        something succeeds again: one that changed nothing wrote nothing). The first one with ``wal``
        (not the creation, not :meth:`check_writable`'s probe: serve-dns has dropped root by then) turns
        the journal to WAL, synced at each commit: as durable, a third of the cost (docs/perf-dns.md).
        ``sync``: synced even after :meth:`sync_intents_only` (and with it every commit before)."""
        if wal and not self._wal:
            self._wal = True
            with contextlib.suppress(sqlite3.Error):  # a read-only database: the write below says so
                self._db.execute("PRAGMA journal_mode=WAL")
        changes = self._db.total_changes
        synced = sync and not self._sync_all
        if synced:
            self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException as e:
            if self._db.in_transaction:  # SQLite may have rolled back already (a failed COMMIT)
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            if not _is_full(e):
                raise
            if report and not self.full:
                self.full = True
                log.error("zone database %s: the disk is full; updates are answered SERVFAIL until there "
                          "is space again, queries are still answered", self.path)
            raise DiskFull(str(e)) from e
        finally:
            if synced:
                self._db.execute("PRAGMA synchronous=NORMAL")
        if self.full and self._db.total_changes != changes:
            self.full = False
            log.warning("zone database %s: writable again", self.path)

    def sync_intents_only(self) -> None:
        """Front mode: a commit no longer waits for the disk (it survives the process, not a power loss),
        except :mod:`~tunneld.dnsserver.intents`' (which syncs every commit before it too)."""
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._sync_all = False

    @property
    def db(self) -> sqlite3.Connection:
        """The database, read by the modules keeping tables here (intents.py, replay.py)."""
        return self._db

    @contextlib.contextmanager
    def transaction(self, sync: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction (:meth:`_write`) for those modules."""
        with self._write(sync=sync):
            yield self._db

    def check_writable(self) -> None:
        """Commit one write (a row added and removed), so that a database that cannot be written, or a
        directory where SQLite cannot create its journal, is found at start rather than at the first
        update (an unchanged row would not do: SQLite skips writing it). Raises NotWritable."""
        try:
            with self._write(report=False, wal=False):  # the caller says it, in one line
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('probe', '')")
                self._db.execute("DELETE FROM meta WHERE key='probe'")
        except DiskFull:
            raise NotWritable("the disk is full") from None
        except sqlite3.Error as e:
            name = getattr(e, "sqlite_errorname", "")
            if name == "SQLITE_READONLY_DIRECTORY":
                why = "its directory is not writable, and SQLite creates its journal there"
            elif name.startswith("SQLITE_READONLY"):
                why = "the file, or its file system, is read-only"
            else:
                why = str(e)
            raise NotWritable(why) from None

    # ---- long-lived queries (kept so that a restart does not lose the watchers) --------------------

    def llq_put(self, llq_id: int, state: str) -> None:
        """Store one established LLQ's state (JSON text from the LLQ server), replacing the old one."""
        self.llq_write([(llq_id, state)])

    def llq_delete(self, llq_id: int) -> None:
        """Forget one LLQ (on a full disk it stays saved, and expires with its lease after a restart)."""
        self.llq_write([(llq_id, None)])

    def llq_write(self, states: Iterable[tuple[int, str | None]]) -> None:
        """Store (or, for None, delete) several LLQs' states in one transaction: one disk sync. On a full
        disk they live on unsaved (only a restart would lose them). 64-bit unsigned IDs: stored as text."""
        with contextlib.suppress(DiskFull), self._write():
            for llq_id, state in states:
                if state is None:
                    self._db.execute("DELETE FROM llqs WHERE id = ?", (str(llq_id),))
                else:
                    self._db.execute("INSERT OR REPLACE INTO llqs (id, state) VALUES (?, ?)",
                                     (str(llq_id), state))

    def llq_all(self) -> list[tuple[int, str]]:
        return [(int(i), st) for i, st in self._db.execute("SELECT id, state FROM llqs")]

    # ---- the zone's own records -------------------------------------------------------------------

    @property
    def serial(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='serial'").fetchone()
        return int(row[0])

    def soa(self) -> dns.rdata.Rdata:
        rname = dns.name.Name(("hostmaster",)).concatenate(self.zone)
        text = f"{self.server} {rname} {self.serial} {SOA_REFRESH} {SOA_RETRY} {SOA_EXPIRE} {SOA_MINIMUM}"
        return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SOA, text)

    def _fixed(self, owner: dns.name.Name) -> dict[int, list[StoredRR]]:
        result = {t: list(rrs) for t, rrs in self._static.get(owner, {}).items()}
        if owner == self.zone:
            result[dns.rdatatype.SOA] = [StoredRR(ZONE_TTL, self.soa())]
        return result

    def is_protected(self, owner: dns.name.Name, rdtype: int) -> bool:
        """True for RRsets clients may not change: apex SOA and NS, anything at the service SRV names (the
        TLS ones too, published or not: no device may redirect the others' TLS), and the server's own
        addresses (``rdtype`` ANY stands for "every type at the name")."""
        if owner == self.zone and rdtype in (dns.rdatatype.SOA, dns.rdatatype.NS, dns.rdatatype.ANY):
            return True
        if owner in (self.update_srv_name, self.llq_srv_name, *self.tls_srv_names):
            return True
        fixed = self._static.get(owner, {})
        return rdtype in fixed or (rdtype == dns.rdatatype.ANY and bool(fixed))

    # ---- lookups ------------------------------------------------------------------------------------

    def in_zone(self, name: dns.name.Name) -> bool:
        return name.is_subdomain(self.zone)

    def rrsets(self, owner: dns.name.Name, now: float) -> dict[int, list[StoredRR]]:
        """Every visible RRset at ``owner``, by type (empty if the name owns nothing)."""
        result = self._fixed(owner)
        rows = self._db.execute(
            "SELECT rdtype, rdata, ttl FROM records WHERE owner=? AND (expires IS NULL OR expires>?) "
            "ORDER BY rdtype, rdata",
            (canonical(owner), now),
        ).fetchall()
        for rdtype, wire, ttl in rows:
            result.setdefault(rdtype, []).append(StoredRR(ttl, _rdata_from_wire(rdtype, wire)))
        return result

    def rrset(self, owner: dns.name.Name, rdtype: int, now: float) -> list[StoredRR]:
        return self.rrsets(owner, now).get(rdtype, [])

    def name_in_use(self, owner: dns.name.Name, now: float) -> bool:
        """Does the name own any visible RR? (Empty non-terminals do not count, RFC 2136 §2.4.4.)"""
        return bool(self.rrsets(owner, now))

    def name_exists(self, owner: dns.name.Name, now: float) -> bool:
        """Does the name exist (owns RRs, or is an empty non-terminal above some)? Decides NXDOMAIN."""
        if self.name_in_use(owner, now) or owner == self.zone:
            return True
        if any(n.is_subdomain(owner) for n in self._static):
            return True
        suffix = "." + canonical(owner)
        rows = self._db.execute(
            "SELECT DISTINCT owner FROM records WHERE substr(owner, -?)=? AND (expires IS NULL OR expires>?)",
            (len(suffix), suffix, now),
        ).fetchall()
        return any(dns.name.from_text(r[0]).is_subdomain(owner) for r in rows)

    def lease_expiry(self, owner: dns.name.Name, rdtype: int, rdata: dns.rdata.Rdata) -> float | None:
        """The stored expiry of one RR (None if permanent or absent); for tests and status."""
        row = self._db.execute(
            "SELECT expires FROM records WHERE owner=? AND rdtype=? AND rdata=?",
            (canonical(owner), rdtype, rdata.to_digestable(self.zone)),
        ).fetchone()
        return None if row is None else row[0]

    def _visible(self, owners: Iterable[str], now: float) -> set[tuple[str, int, bytes, int]]:
        out: set[tuple[str, int, bytes, int]] = set()
        for owner in owners:
            rows = self._db.execute(
                "SELECT rdtype, rdata, ttl FROM records WHERE owner=? AND (expires IS NULL OR expires>?)",
                (owner, now),
            ).fetchall()
            out.update((owner, t, bytes(w), ttl) for t, w, ttl in rows)
        return out

    def _bump_serial(self) -> None:
        serial = (self.serial + 1) & 0xFFFFFFFF or 1
        self._db.execute("UPDATE meta SET value=? WHERE key='serial'", (str(serial),))

    # ---- changes ------------------------------------------------------------------------------------

    def apply_update(self, changes: Sequence[Change], lease: Lease | None, now: float,
                     answered: Answered | None = None, intent: int | None = None) -> bool:
        """Apply RFC 2136 update operations atomically; return True if served content changed.

        Added RRs get ``now + lease`` as expiry (permanent when ``lease`` is None); re-adding an existing
        RR only refreshes its TTL and lease. Changes to protected RRsets must have been refused by the
        caller; they raise ValueError here (and nothing is applied). The SOA serial is bumped only when the
        visible content changed, so a refresh that only extends leases leaves it alone (RFC 9664 §5.3).
        CNAME conflicts are ignored as RFC 2136 §3.4.2.2 says. ``answered`` (the request's replay entry)
        is written in the same transaction, and ``intent`` (:mod:`~tunneld.dnsserver.intents`) dropped.
        Any exception rolls the whole update back; DiskFull for want of space.
        """
        for ch in changes:
            rdtype = (
                ch.rdata.rdtype
                if isinstance(ch, AddRR | DeleteRR)
                else (ch.rdtype if isinstance(ch, DeleteRRset) else dns.rdatatype.ANY)
            )
            if isinstance(ch, DeleteName) and ch.owner == self.zone:
                continue  # ANY/ANY at the apex spares SOA and NS (§3.4.2.3); checked below per row
            if self.is_protected(ch.owner, rdtype) or not self.in_zone(ch.owner):
                raise ValueError(f"change to protected or out-of-zone RRset {ch.owner} {rdtype}")
        owners = {canonical(ch.owner) for ch in changes}
        with self._write():
            before = self._visible(owners, now)
            for ch in changes:
                self._apply_one(ch, lease, now)
            changed = before != self._visible(owners, now)
            if changed:
                self._bump_serial()
            if answered is not None and answered.mac:
                remember(self._db, answered, now, self.replays_kept)
            if intent is not None:
                self._db.execute("DELETE FROM intents WHERE intent=?", (intent,))
        return changed

    def _apply_one(self, ch: Change, lease: Lease | None, now: float) -> None:
        owner = canonical(ch.owner)
        if isinstance(ch, AddRR):
            rdtype = ch.rdata.rdtype
            types = {
                t
                for (t,) in self._db.execute(
                    "SELECT DISTINCT rdtype FROM records WHERE owner=? AND (expires IS NULL OR expires>?)",
                    (owner, now),
                )
            }
            if rdtype == dns.rdatatype.CNAME and types - {dns.rdatatype.CNAME}:
                return
            if rdtype != dns.rdatatype.CNAME and dns.rdatatype.CNAME in types:
                return
            expires = None if lease is None else now + lease.for_type(rdtype)
            # One TTL per RRset (RFC 2181 §5.2): the newest wins for the whole set.
            self._db.execute("UPDATE records SET ttl=? WHERE owner=? AND rdtype=?", (ch.ttl, owner, rdtype))
            if rdtype == dns.rdatatype.CNAME:  # a CNAME RRset holds one RR: replace it
                self._db.execute("DELETE FROM records WHERE owner=? AND rdtype=?", (owner, rdtype))
            self._db.execute(
                "INSERT INTO records VALUES (?, ?, ?, ?, ?) ON CONFLICT (owner, rdtype, rdata) "
                "DO UPDATE SET ttl=excluded.ttl, expires=excluded.expires",
                (owner, rdtype, ch.rdata.to_digestable(self.zone), ch.ttl, expires),
            )
        elif isinstance(ch, DeleteRRset):
            self._db.execute("DELETE FROM records WHERE owner=? AND rdtype=?", (owner, ch.rdtype))
        elif isinstance(ch, DeleteName):
            self._db.execute("DELETE FROM records WHERE owner=?", (owner,))
        else:
            self._db.execute(
                "DELETE FROM records WHERE owner=? AND rdtype=? AND rdata=?",
                (owner, ch.rdata.rdtype, ch.rdata.to_digestable(self.zone)),
            )

    def expire(self, now: float) -> list[RRsetRemoval]:
        """Delete every RR whose lease ended at or before ``now``; return what went, one entry per RRset.

        Bumps the serial when anything was removed. The LLQ server turns the result into removal events.
        Also forgets replay entries whose window closed before ``now``. On a full disk nothing is removed
        (the expired records stay invisible), the result is empty, and :meth:`next_expiry` says to retry
        in :data:`SWEEP_RETRY` seconds rather than at once.
        """
        try:
            with self._write():
                rows = self._db.execute(
                    "SELECT owner, rdtype, rdata, ttl FROM records WHERE expires IS NOT NULL AND expires<=? "
                    "ORDER BY owner, rdtype, rdata",
                    (now,),
                ).fetchall()
                if rows:
                    self._db.execute("DELETE FROM records WHERE expires IS NOT NULL AND expires<=?", (now,))
                    self._bump_serial()
                self._db.execute("DELETE FROM replays WHERE until < ?", (int(now),))
        except DiskFull:
            self._sweep_after = now + SWEEP_RETRY
            return []
        self._sweep_after = None
        grouped: dict[tuple[str, int], list[StoredRR]] = {}
        for owner, rdtype, wire, ttl in rows:
            grouped.setdefault((owner, rdtype), []).append(StoredRR(ttl, _rdata_from_wire(rdtype, wire)))
        return [
            RRsetRemoval(dns.name.from_text(owner), rdtype, tuple(rrs))
            for (owner, rdtype), rrs in grouped.items()
        ]

    def expired(self, now: float, limit: int) -> list[tuple[dns.name.Name, dns.rdata.Rdata]]:
        """Up to ``limit`` RRs whose lease ended at or before ``now``, still stored (the front's
        :mod:`tunneld.dnsserver.front` deletes them from its primary before :meth:`forget` drops them)."""
        rows = self._db.execute(
            "SELECT owner, rdtype, rdata FROM records WHERE expires IS NOT NULL AND expires<=? "
            "ORDER BY expires, owner, rdtype, rdata LIMIT ?", (now, limit)).fetchall()
        return [(dns.name.from_text(o), _rdata_from_wire(t, bytes(w))) for o, t, w in rows]

    def forget(self, rrs: Iterable[tuple[dns.name.Name, dns.rdata.Rdata]], now: float) -> list[RRsetRemoval]:
        """Delete these RRs if their lease still ended at or before ``now`` (one renewed meanwhile stays),
        as :meth:`expire` does; the same result. DiskFull for want of space (nothing deleted)."""
        gone: dict[tuple[str, int], list[StoredRR]] = {}
        with self._write():
            for owner, rdata in rrs:
                key = (canonical(owner), rdata.rdtype, rdata.to_digestable(self.zone))
                rows = self._db.execute(
                    "DELETE FROM records WHERE owner=? AND rdtype=? AND rdata=? AND expires IS NOT NULL AND "
                    "expires<=? RETURNING ttl", (*key, now)).fetchall()
                gone.setdefault(key[:2], []).extend(StoredRR(ttl, rdata) for (ttl,) in rows)
            if any(gone.values()):
                self._bump_serial()
            self._db.execute("DELETE FROM replays WHERE until < ?", (int(now),))
        return [RRsetRemoval(dns.name.from_text(o), t, tuple(rrs)) for (o, t), rrs in gone.items() if rrs]

    def snapshot(self) -> tuple[int, list[tuple[str, int, bytes, int, float | None]]]:
        """(serial, every stored row including expired ones): for tests and debugging dumps."""
        rows = self._db.execute("SELECT * FROM records ORDER BY owner, rdtype, rdata").fetchall()
        return self.serial, [(o, t, bytes(w), ttl, e) for o, t, w, ttl, e in rows]

    def replica_apply(self, apply: Callable[[sqlite3.Connection], bool]) -> bool:
        """Run ``apply`` (:mod:`tunneld.dnsserver.replica`) in one write transaction; when it says the
        records changed, the zone's serial is bumped. DiskFull as :meth:`apply_update`."""
        with self._write():
            if changed := apply(self._db):
                self._bump_serial()
        return changed

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def next_expiry(self) -> float | None:
        """The earliest lease expiry in the store, for scheduling the next :meth:`expire` sweep (not
        before the retry time after a sweep that failed for want of space)."""
        row = self._db.execute("SELECT min(expires) FROM records").fetchone()
        if row is None or row[0] is None:
            return None
        return max(float(row[0]), self._sweep_after or 0.0)
