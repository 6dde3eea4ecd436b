"""The front's intents (tunneld.dnsserver.intents) on a real ZoneStore file: once a forward is sent, the
leases of the RRs it adds are written in a synced transaction while the commits of front mode are not;
the primary's NOERROR commits the update and drops them, a refusal drops them, no answer keeps them; what
a crash left gives its lease to the RR at the next start, or when a transfer brings the RR."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.name
import dns.rcode
import dns.rdata
import dns.rdatatype
import pytest

from tests.unit.test_dnsserver_front import (
    ACCOUNT,
    FRONT,
    HOST,
    PRIMARY,
    T0,
    ZONE,
    checked,
    counter_rand,
    device_update,
    primary_answers,
    primary_reads,
)
from tunneld.dnsserver.core import DnsCore
from tunneld.dnsserver.front import Front
from tunneld.dnsserver.replica import apply_transfer
from tunneld.dnsserver.store import AddRR, Lease, ZoneStore
from tunneld.proto.xfr import Diff, Full, Incremental, ZoneRecord

ADDR = dns.rdata.from_text("IN", "AAAA", "fd00::1")


def soa(serial: int) -> ZoneRecord:
    text = f"ns.example.com. hostmaster.example.com. {serial} 60 60 3600 60"
    return ZoneRecord(ZONE, 60, dns.rdata.from_text("IN", "SOA", text))


def started(path: Path, at: float = T0) -> tuple[DnsCore, Front]:
    store = ZoneStore(str(path / "front.sqlite"), ZONE, "ns.example.com.", 53)
    front = Front(store, FRONT, PRIMARY, rand=counter_rand())
    front.start(at)
    return DnsCore(store, [ACCOUNT]), front


def intents(store: ZoneStore) -> list[tuple[str, int, float]]:
    return [(o, t, e) for o, t, e in store.db.execute("SELECT owner, rdtype, expires FROM intents")]


def lease(store: ZoneStore) -> float | None:
    return store.lease_expiry(HOST, dns.rdatatype.AAAA, ADDR)


def test_the_intent_is_written_synced_and_the_commit_after_noerror_drops_it_unsynced(tmp_path: Path) -> None:
    core, front = started(tmp_path)
    statements: list[str] = []
    core.store.db.set_trace_callback(statements.append)
    upd = checked(core, device_update(lease=3600))
    fwd = front.forward(upd, T0)
    assert fwd is not None and intents(core.store) == []  # nothing before the forward is on its way
    front.sent(upd, T0)
    assert intents(core.store) == [("host.example.com.", dns.rdatatype.AAAA, T0 + 3600)]
    written = statements[:]
    full = written.index("PRAGMA synchronous=FULL")
    assert any(s.startswith("INSERT INTO intents") for s in written[full:])
    assert written.index("COMMIT", full) < written.index("PRAGMA synchronous=NORMAL")  # synced, then back
    statements.clear()
    front.answer(core, upd, fwd, primary_answers(primary_reads(fwd.wire), dns.rcode.NOERROR), T0)
    assert intents(core.store) == [] and lease(core.store) == T0 + 3600
    assert "COMMIT" in statements and not any("synchronous" in s for s in statements)  # not synced
    assert core.store.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_the_primarys_refusal_drops_the_intent(tmp_path: Path) -> None:
    core, front = started(tmp_path)
    upd = checked(core, device_update())
    fwd = front.forward(upd, T0)
    assert fwd is not None
    front.sent(upd, T0)
    front.answer(core, upd, fwd, primary_answers(primary_reads(fwd.wire), dns.rcode.REFUSED), T0)
    assert intents(core.store) == [] and lease(core.store) is None


def test_no_answer_keeps_the_intent_and_the_transfer_bringing_the_record_gives_it_the_lease(
        tmp_path: Path) -> None:
    core, front = started(tmp_path)
    apply_transfer(core.store, Full(soa(1), ()))
    upd = checked(core, device_update(lease=3600))
    fwd = front.forward(upd, T0)
    assert fwd is not None
    front.sent(upd, T0)
    front.answer(core, upd, fwd, None, T0)  # timed out: SERVFAIL, but the primary may have taken it
    assert len(intents(core.store)) == 1 and lease(core.store) is None
    record = ZoneRecord(HOST, 120, ADDR)
    apply_transfer(core.store, Incremental(soa(2), (Diff(1, (), 2, (record,)),)))
    assert lease(core.store) == T0 + 3600 and intents(core.store) == []  # deleted at expiry, not kept


def test_an_update_adding_nothing_writes_no_intent(tmp_path: Path) -> None:
    core, front = started(tmp_path)
    assert front.intents.write([], Lease(3600, 3600), T0) is None
    assert front.intents.write([AddRR(HOST, 120, ADDR)], None, T0) is None
    assert intents(core.store) == []


def test_recover_at_start_gives_stored_records_their_intended_lease_and_keeps_the_others(
        tmp_path: Path) -> None:
    core, front = started(tmp_path)
    apply_transfer(core.store, Full(soa(1), (ZoneRecord(HOST, 120, ADDR),)))  # permanent: no lease known
    other = dns.name.from_text("other", ZONE)
    front.intents.write([AddRR(HOST, 120, ADDR)], Lease(3600, 3600), T0)  # a crash before the commit
    front.intents.write([AddRR(other, 120, ADDR)], Lease(3600, 3600), T0)  # not in the store (yet)
    front.intents.write([AddRR(dns.name.from_text("gone", ZONE), 120, ADDR)], Lease(60, 60), T0)
    core.store.close()
    core, front = started(tmp_path, at=T0 + 120)  # the "gone" one's lease has ended: dropped
    assert lease(core.store) == T0 + 3600
    assert intents(core.store) == [("other.example.com.", dns.rdatatype.AAAA, T0 + 3600)]


def test_recover_keeps_the_later_of_a_stored_lease_and_the_intent(tmp_path: Path) -> None:
    core, front = started(tmp_path)
    upd = checked(core, device_update(lease=7200))
    fwd = front.forward(upd, T0)
    assert fwd is not None
    front.sent(upd, T0)
    front.answer(core, upd, fwd, primary_answers(primary_reads(fwd.wire), dns.rcode.NOERROR), T0)
    front.intents.write([AddRR(HOST, 120, ADDR)], Lease(60, 60), T0)  # a shorter one, unanswered
    core.store.close()
    core, front = started(tmp_path, at=T0 + 1)
    assert lease(core.store) == T0 + 7200 and intents(core.store) == []


def test_a_failed_write_is_logged_and_gives_no_intent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A write the database refuses (an I/O error, say) must not take the forward down with it: no
    intent, one error logged; the commit that follows fails the same way and answers SERVFAIL."""
    core, front = started(tmp_path)

    @contextmanager
    def broken(sync: bool = False) -> Iterator[sqlite3.Connection]:
        raise sqlite3.OperationalError("disk I/O error")
        yield core.store.db  # pragma: no cover

    monkeypatch.setattr(core.store, "transaction", broken)
    with caplog.at_level(logging.ERROR, logger="tunneld.dnsserver.intents"):
        assert front.intents.write([AddRR(HOST, 120, ADDR)], Lease(3600, 3600), T0) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"writing the leases of a forwarded update to {core.store.path} failed: disk I/O error"]
