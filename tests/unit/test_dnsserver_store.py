"""ZoneStore: leases, atomic updates, serial rules, the zone's own records, durability."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.update
import pytest

from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.replay import Answered, ReplayCache
from tunneld.dnsserver.store import (
    SCHEMA_VERSION,
    SWEEP_RETRY,
    AddRR,
    DeleteName,
    DeleteRR,
    DeleteRRset,
    Lease,
    NotWritable,
    ZoneStore,
)
from tunneld.proto.tsig import sign

ZONE = dns.name.from_text("example.com.")
T0 = 1_800_000_000.0
LEASE = Lease(3600, 3600)


def n(text: str) -> dns.name.Name:
    return dns.name.from_text(text, ZONE)


def rd(rdtype: str, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text, ZONE, False)


def texts(store: ZoneStore, owner: str, rdtype: str, now: float) -> set[str]:
    return {rr.rdata.to_text() for rr in store.rrset(n(owner), dns.rdatatype.from_text(rdtype), now)}


@pytest.fixture
def store() -> ZoneStore:
    return ZoneStore(":memory:", "Example.COM.", "ns.example.com.", 53, llq_port=5352)


def test_zone_records_are_served(store: ZoneStore) -> None:
    soa = store.rrset(ZONE, dns.rdatatype.SOA, T0)
    assert len(soa) == 1
    assert soa[0].rdata.to_text() == "ns.example.com. hostmaster.example.com. 1 3600 600 86400 60"
    assert texts(store, "@", "NS", T0) == {"ns.example.com."}
    assert texts(store, "_dns-update._udp", "SRV", T0) == {"0 0 53 ns.example.com."}
    assert texts(store, "_dns-llq._udp", "SRV", T0) == {"0 0 5352 ns.example.com."}
    assert store.is_protected(ZONE, dns.rdatatype.SOA)
    assert store.is_protected(ZONE, dns.rdatatype.NS)
    assert not store.is_protected(ZONE, dns.rdatatype.TXT)
    assert store.is_protected(n("_dns-llq._udp"), dns.rdatatype.TXT)
    assert store.name_exists(n("_udp"), T0)  # empty non-terminal
    assert not store.name_in_use(n("_udp"), T0)
    assert not store.name_exists(n("nothing"), T0)


def test_add_lookup_and_serial(store: ZoneStore) -> None:
    assert store.apply_update([AddRR(n("Host"), 120, rd("AAAA", "fd00::1"))], LEASE, T0)
    assert store.serial == 2
    assert texts(store, "host", "AAAA", T0) == {"fd00::1"}
    assert store.lease_expiry(n("host"), dns.rdatatype.AAAA, rd("AAAA", "fd00::1")) == T0 + 3600
    assert store.name_in_use(n("HOST"), T0)
    # a second RR in the set; the newest TTL applies to the whole RRset
    assert store.apply_update([AddRR(n("host"), 60, rd("AAAA", "fd00::2"))], LEASE, T0)
    assert {rr.ttl for rr in store.rrset(n("host"), dns.rdatatype.AAAA, T0)} == {60}
    assert store.serial == 3


def test_noop_refresh_extends_lease_without_serial_bump(store: ZoneStore) -> None:
    add = [AddRR(n("host"), 120, rd("AAAA", "fd00::1")), AddRR(n("host"), 120, rd("TXT", '"v=1"'))]
    assert store.apply_update(add, LEASE, T0)
    serial = store.serial
    assert not store.apply_update(add, LEASE, T0 + 1000)
    assert store.serial == serial
    assert store.lease_expiry(n("host"), dns.rdatatype.AAAA, rd("AAAA", "fd00::1")) == T0 + 1000 + 3600
    # a TTL change is a content change
    assert store.apply_update([AddRR(n("host"), 300, rd("AAAA", "fd00::1"))], LEASE, T0 + 1000)
    assert store.serial == serial + 1


def test_expired_records_are_not_served_and_are_swept(store: ZoneStore) -> None:
    store.apply_update([AddRR(n("a"), 60, rd("A", "192.0.2.1"))], Lease(1800, 1800), T0)
    store.apply_update([AddRR(n("b"), 60, rd("A", "192.0.2.2"))], Lease(7200, 7200), T0)
    assert store.next_expiry() == T0 + 1800
    assert texts(store, "a", "A", T0 + 1799) == {"192.0.2.1"}
    assert texts(store, "a", "A", T0 + 1800) == set()  # expired, not yet swept: not served
    assert not store.name_exists(n("a"), T0 + 1800)
    serial = store.serial
    removed = store.expire(T0 + 1800)
    assert [(r.owner, r.rdtype, [rr.rdata.to_text() for rr in r.rrs]) for r in removed] == [
        (n("a"), dns.rdatatype.A, ["192.0.2.1"])
    ]
    assert store.serial == serial + 1
    assert store.expire(T0 + 1800) == []
    assert store.serial == serial + 1
    assert texts(store, "b", "A", T0 + 1800) == {"192.0.2.2"}


def test_readding_an_expired_record_is_a_change(store: ZoneStore) -> None:
    add = [AddRR(n("a"), 60, rd("A", "192.0.2.1"))]
    store.apply_update(add, Lease(1800, 1800), T0)
    serial = store.serial
    assert store.apply_update(add, Lease(1800, 1800), T0 + 2000)
    assert store.serial == serial + 1


def test_key_lease_applies_to_key_records(store: ZoneStore) -> None:
    key = rd("KEY", "256 3 15 l02Woi0iS8Aa25FQkUd9RMzZHJpBoRQwAQEX1SxZJA4=")
    store.apply_update(
        [AddRR(n("h"), 60, key), AddRR(n("h"), 60, rd("A", "192.0.2.1"))], Lease(1800, 7200), T0
    )
    assert store.lease_expiry(n("h"), dns.rdatatype.KEY, key) == T0 + 7200
    assert store.lease_expiry(n("h"), dns.rdatatype.A, rd("A", "192.0.2.1")) == T0 + 1800


def test_deletions(store: ZoneStore) -> None:
    store.apply_update(
        [
            AddRR(n("h"), 60, rd("A", "192.0.2.1")),
            AddRR(n("h"), 60, rd("A", "192.0.2.2")),
            AddRR(n("h"), 60, rd("TXT", '"x"')),
            AddRR(ZONE, 60, rd("TXT", '"apex"')),
        ],
        LEASE,
        T0,
    )
    assert store.apply_update([DeleteRR(n("h"), rd("A", "192.0.2.1"))], None, T0)
    assert texts(store, "h", "A", T0) == {"192.0.2.2"}
    assert not store.apply_update([DeleteRR(n("h"), rd("A", "192.0.2.9"))], None, T0)
    assert store.apply_update([DeleteRRset(n("h"), dns.rdatatype.A)], None, T0)
    assert texts(store, "h", "TXT", T0) == {'"x"'}
    assert store.apply_update([DeleteName(n("h"))], None, T0)
    assert not store.name_in_use(n("h"), T0)
    # ANY/ANY at the apex removes client data but spares SOA and NS
    assert store.apply_update([DeleteName(ZONE)], None, T0)
    assert texts(store, "@", "TXT", T0) == set()
    assert texts(store, "@", "NS", T0) == {"ns.example.com."}


def test_cname_conflicts_are_ignored(store: ZoneStore) -> None:
    store.apply_update([AddRR(n("h"), 60, rd("A", "192.0.2.1"))], LEASE, T0)
    assert not store.apply_update([AddRR(n("h"), 60, rd("CNAME", "other"))], LEASE, T0)
    store.apply_update([AddRR(n("c"), 60, rd("CNAME", "other"))], LEASE, T0)
    assert not store.apply_update([AddRR(n("c"), 60, rd("A", "192.0.2.1"))], LEASE, T0)
    assert store.apply_update([AddRR(n("c"), 60, rd("CNAME", "third"))], LEASE, T0)
    assert texts(store, "c", "CNAME", T0) == {"third.example.com."}


def test_protected_changes_are_rejected_atomically(store: ZoneStore) -> None:
    snap = store.snapshot()
    with pytest.raises(ValueError):
        store.apply_update(
            [AddRR(n("h"), 60, rd("A", "192.0.2.1")), AddRR(ZONE, 60, rd("NS", "evil.example."))], LEASE, T0
        )
    with pytest.raises(ValueError):
        store.apply_update([DeleteName(n("_dns-update._udp"))], None, T0)
    with pytest.raises(ValueError):
        store.apply_update([AddRR(dns.name.from_text("h.example.net."), 60, rd("A", "192.0.2.1"))], LEASE, T0)
    assert store.snapshot() == snap


def test_failure_mid_update_rolls_back(store: ZoneStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.apply_update([AddRR(n("keep"), 60, rd("A", "192.0.2.1"))], LEASE, T0)
    snap = store.snapshot()
    real = store._apply_one
    calls = []

    def failing(*args: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_apply_one", failing)
    with pytest.raises(RuntimeError):
        store.apply_update([AddRR(n("new"), 60, rd("A", "192.0.2.2")), DeleteName(n("keep"))], LEASE, T0)
    assert store.snapshot() == snap


def test_durable_across_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "zone.db")
    s1 = ZoneStore(path, "example.com.", "ns.example.com.", 53)
    s1.apply_update([AddRR(n("h"), 60, rd("AAAA", "fd00::1"))], LEASE, T0)
    s1.apply_update([AddRR(n("p"), 60, rd("TXT", '"perm"'))], None, T0)
    serial = s1.serial
    s1.close()
    s2 = ZoneStore(path, "example.com", "ns.example.com.", 53)
    assert s2.serial == serial
    assert texts(s2, "h", "AAAA", T0 + 10) == {"fd00::1"}
    assert s2.lease_expiry(n("h"), dns.rdatatype.AAAA, rd("AAAA", "fd00::1")) == T0 + 3600
    assert texts(s2, "h", "AAAA", T0 + 3600) == set()
    assert texts(s2, "p", "TXT", T0 + 10**6) == {'"perm"'}
    s2.close()
    with pytest.raises(ValueError, match="zone"):
        ZoneStore(path, "other.example.", "ns.example.com.", 53)


def test_bad_creation_arguments() -> None:
    with pytest.raises(ValueError):
        ZoneStore(":memory:", dns.name.from_text("example", None), "ns.example.com.", 53)
    with pytest.raises(ValueError):
        ZoneStore(":memory:", "example.com.", "ns.example.com.", 0)


def test_server_addresses_are_served_and_protected() -> None:
    store = ZoneStore(":memory:", "example.com.", "ns.example.com.", 53, addresses=["192.0.2.53", "fd00::53"])
    assert texts(store, "ns", "A", T0) == {"192.0.2.53"}
    assert texts(store, "ns", "AAAA", T0) == {"fd00::53"}
    assert store.is_protected(n("ns"), dns.rdatatype.A)
    assert store.is_protected(n("ns"), dns.rdatatype.ANY)
    assert not store.is_protected(n("ns"), dns.rdatatype.TXT)
    with pytest.raises(ValueError):
        ZoneStore(":memory:", "example.com.", "ns.example.net.", 53, addresses=["192.0.2.53"])


# ---- schema migration, writability, full disk ---------------------------------------------------------

_OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE records (owner TEXT NOT NULL, rdtype INTEGER NOT NULL, rdata BLOB NOT NULL,
    ttl INTEGER NOT NULL, expires REAL, PRIMARY KEY (owner, rdtype, rdata));
CREATE INDEX records_expires ON records (expires);
CREATE TABLE llqs (id TEXT PRIMARY KEY, state TEXT NOT NULL);
INSERT INTO meta VALUES ('zone', 'example.com.'), ('serial', '7');
"""


def test_a_database_from_before_the_replay_table_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(_OLD_SCHEMA)
    old.execute("INSERT INTO records VALUES ('host.example.com.', 28, ?, 120, NULL)",
                (rd("AAAA", "fd00::1").to_digestable(),))
    old.commit()
    old.close()
    store = ZoneStore(str(path), ZONE, "ns.example.com.", 53)
    assert store.serial == 7 and texts(store, "host", "AAAA", T0) == {"fd00::1"}
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    ReplayCache(store).remember(Answered(b"mac", int(T0) + 300, b"reply"), T0)
    store.close()
    again = ZoneStore(str(path), ZONE, "ns.example.com.", 53)
    assert ReplayCache(again).find(b"mac", T0) == b"reply"
    again.check_writable()


def test_check_writable_writes(tmp_path: Path) -> None:
    """A probe that changes nothing would not reach the disk (SQLite skips an unchanged row)."""
    store = ZoneStore(str(tmp_path / "z.sqlite"), ZONE, "ns.example.com.", 53)
    store.check_writable()
    store._db.execute("PRAGMA query_only=1")  # what a read-only file looks like to a writer
    with pytest.raises(NotWritable, match="read-only"):
        store.check_writable()


_AS_NOBODY = """
import sys
from tunneld.dnsserver.store import NotWritable, ZoneStore
try:
    ZoneStore(sys.argv[1], "example.com.", "ns.example.com.", 53).check_writable()
except NotWritable as e:
    print(e)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_check_writable_names_a_directory_sqlite_cannot_write_its_journal_in() -> None:
    """The file is writable but its directory is not: opening and reading work, the first write does
    not. Root writes anywhere, so the check runs as nobody."""
    d = Path(tempfile.mkdtemp(prefix="tunneld-store-"))
    try:
        d.chmod(0o755)
        db = d / "z.sqlite"
        ZoneStore(str(db), ZONE, "ns.example.com.", 53).close()
        db.chmod(0o666)
        d.chmod(0o555)
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                            "-c", _AS_NOBODY, str(db)], capture_output=True, text=True, timeout=30,
                           check=False, cwd=Path(__file__).parents[2])
        assert r.returncode == 0, r.stderr
        assert "directory is not writable" in r.stdout, r.stdout
    finally:
        d.chmod(0o755)
        shutil.rmtree(d)


def _update(i: int) -> bytes:
    upd = dns.update.UpdateMessage(ZONE, id=i)
    upd.use_edns(0, options=[dns.edns.GenericOption(2, struct.pack("!I", 3600))])  # type: ignore[arg-type]
    upd.add(f"h{i}", 120, "TXT", "x" * 200)
    return sign(upd.to_wire(), account_key(b"k" * 32, "example.com"), int(T0) + i)[0]


def _rcode(reply: bytes | None) -> dns.rcode.Rcode:
    assert reply is not None
    return dns.message.from_wire(reply, keyring=False).rcode()


def test_a_full_disk_is_reported_once_and_queries_are_still_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLITE_FULL (here from a page limit, as ENOSPC gives it): the update that does not fit, and every
    one after it, gets SERVFAIL and changes nothing; one log line says so; queries go on, and saving an
    LLQ fails quietly; once there is room, updates work again (and that is said once too)."""
    core = DnsCore(ZoneStore(str(tmp_path / "z.sqlite"), ZONE, "ns.example.com.", 53),
                   [account_key(b"k" * 32, "example.com")])
    store = core.store
    assert _rcode(core.handle(_update(0), ("192.0.2.1", 1), T0)) == dns.rcode.NOERROR
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")
    caplog.set_level(logging.INFO, logger="tunneld.dnsserver")
    rcodes = [_rcode(core.handle(_update(i), ("192.0.2.1", 1), T0 + i)) for i in range(1, 80)]
    assert dns.rcode.SERVFAIL in rcodes
    full_at = rcodes.index(dns.rcode.SERVFAIL) + 1
    assert set(rcodes[full_at - 1:]) == {dns.rcode.SERVFAIL}
    assert texts(store, f"h{full_at}", "TXT", T0 + 100) == set()
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "disk is full" in errors[0].getMessage()
    assert "Traceback" not in caplog.text
    query = sign(dns.message.make_query(f"h0.{ZONE}", "TXT").to_wire(),  # device records: signed only
                 account_key(b"k" * 32, "example.com"), int(T0) + 100)[0]
    answer = dns.message.from_wire(core.handle(query, ("192.0.2.1", 1), T0 + 100) or b"", keyring=False)
    assert answer.rcode() == dns.rcode.NOERROR and answer.answer
    store.llq_put(1, "x" * 10_000)  # needs new pages: the LLQ lives on unsaved, nothing raised
    assert store.llq_all() == []
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1

    store._db.execute(f"PRAGMA max_page_count={pages * 100}")
    again = _update(1000)
    assert _rcode(core.handle(again, ("192.0.2.1", 1), T0 + 1000)) == dns.rcode.NOERROR
    assert texts(store, "h1000", "TXT", T0 + 1000) == {'"' + "x" * 200 + '"'}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and "writable again" in warnings[1]


class _FullOnDelete:
    """The store's connection, failing record deletions as a full disk does (DELETE needs the journal)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql.startswith("DELETE FROM records"):
            e = sqlite3.OperationalError("database or disk is full")
            e.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
            raise e
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


def test_a_sweep_that_cannot_delete_is_retried_later_not_at_once(store: ZoneStore) -> None:
    """Otherwise the sweeper, seeing an expiry already past, would spin on a full disk."""
    store.apply_update([AddRR(n("host"), 60, rd("AAAA", "fd00::1"))], LEASE, T0)
    real = store._db
    store._db = _FullOnDelete(real)  # type: ignore[assignment]
    assert store.expire(T0 + 3600) == []
    assert store.next_expiry() == T0 + 3600 + SWEEP_RETRY
    assert texts(store, "host", "AAAA", T0 + 3600) == set()  # invisible all the same
    store._db = real
    assert [r.owner for r in store.expire(T0 + 3600 + SWEEP_RETRY)] == [n("host")]
    assert store.next_expiry() is None
    store.apply_update([AddRR(n("next"), 60, rd("AAAA", "fd00::2"))], LEASE, T0 + 4000)
    assert store.next_expiry() == T0 + 4000 + 3600  # the retry time is forgotten after a good sweep
