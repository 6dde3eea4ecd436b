"""The front's replica (tunneld.dnsserver.replica) on a real ZoneStore in a temporary directory: a full
transfer makes the records equal the zone's, an incremental one applies its diffs in order, records the
front applied itself keep their leases, the server's own records are untouched, the primary's SOA is kept
across a reopen, and only the changes that altered a row are reported."""

from __future__ import annotations

from pathlib import Path

import dns.name
import dns.rdata
import dns.rdatatype
import pytest

from tunneld.dnsserver.replica import ReplicaError, apply_transfer, primary_soa, soa_serial
from tunneld.dnsserver.store import AddRR, DeleteRR, Lease, ZoneStore
from tunneld.proto.xfr import Diff, Full, Incremental, ZoneRecord

ZONE = dns.name.from_text("home.example.net.")
NOW = 1_700_000_000.0


def soa(serial: int) -> ZoneRecord:
    rdata = dns.rdata.from_text("IN", "SOA",
                                f"ns1.home.example.net. hostmaster.home.example.net. {serial} 60 60 3600 60")
    return ZoneRecord(ZONE, 60, rdata)


def rec(owner: str, rdtype: str, text: str, ttl: int = 120) -> ZoneRecord:
    return ZoneRecord(dns.name.from_text(owner, ZONE), ttl, dns.rdata.from_text("IN", rdtype, text))


def open_store(path: Path) -> ZoneStore:
    return ZoneStore(str(path / "front.db"), ZONE, "ns.home.example.net.", 53)


def rows(store: ZoneStore) -> set[tuple[str, int, int, float | None]]:
    """(owner, type, TTL, expiry) of every stored row."""
    return {(o, t, ttl, e) for o, t, _, ttl, e in store.snapshot()[1]}


def texts(store: ZoneStore, owner: str, rdtype: str) -> list[str]:
    name = dns.name.from_text(owner, ZONE)
    return sorted(rr.rdata.to_text() for rr in store.rrset(name, dns.rdatatype.from_text(rdtype), NOW))


A1 = rec("laptop", "AAAA", "fd00::1")
A2 = rec("desk", "AAAA", "fd00::2")
TXT = rec("laptop", "TXT", '"v=1"')
# The primary's own records, which the front's store synthesises for itself and must not take over.
APEX_NS = rec("@", "NS", "ns1.home.example.net.")
SRV = rec("_dns-update._udp", "SRV", "0 0 53 ns1.home.example.net.")


def test_a_full_transfer_makes_the_records_equal_and_spares_the_servers_own(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    before = store.serial
    got = apply_transfer(store, Full(soa(5), (APEX_NS, SRV, A1, TXT)))
    assert {(type(c), c.owner) for c in got} == {(AddRR, A1.owner), (AddRR, TXT.owner)}
    assert texts(store, "laptop", "AAAA") == ["fd00::1"] and texts(store, "laptop", "TXT") == ['"v=1"']
    assert texts(store, "@", "NS") == ["ns.home.example.net."]  # the store's own, not the primary's
    assert texts(store, "_dns-update._udp", "SRV") == ["0 0 53 ns.home.example.net."]
    assert store.serial == before + 1
    saved = primary_soa(store)
    assert saved is not None and soa_serial(saved) == 5 and saved == soa(5)

    # A second full transfer: a record gone from the zone goes from the store, a new one comes.
    got = apply_transfer(store, Full(soa(6), (APEX_NS, A2, TXT)))
    assert sorted((type(c).__name__, c.owner.to_text()) for c in got) == [
        ("AddRR", "desk.home.example.net."), ("DeleteRR", "laptop.home.example.net.")]
    assert texts(store, "laptop", "AAAA") == [] and texts(store, "desk", "AAAA") == ["fd00::2"]
    assert {o for o, *_ in rows(store)} == {"desk.home.example.net.", "laptop.home.example.net."}  # TXT


def test_the_same_zone_again_changes_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    apply_transfer(store, Full(soa(5), (A1, TXT)))
    serial = store.serial
    assert apply_transfer(store, Full(soa(6), (A1, TXT))) == []
    assert store.serial == serial  # nothing visible changed: the front's own serial stays
    assert soa_serial(primary_soa(store) or soa(0)) == 6  # but the primary's is recorded
    assert apply_transfer(store, Incremental(soa(7), (Diff(6, (), 7, (A1,)),))) == []


def test_a_ttl_change_is_a_change(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    apply_transfer(store, Full(soa(5), (A1,)))
    got = apply_transfer(store, Full(soa(6), (rec("laptop", "AAAA", "fd00::1", ttl=30),)))
    assert got == [AddRR(A1.owner, 30, A1.rdata)]
    assert rows(store) == {("laptop.home.example.net.", dns.rdatatype.AAAA, 30, None)}


def test_an_incremental_transfer_applies_its_diffs_in_order(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    apply_transfer(store, Full(soa(5), (A1,)))
    diffs = (Diff(5, (A1,), 6, (A2, SRV)),  # laptop's address goes, desk's comes (the SRV is ours)
             Diff(6, (), 7, (A1,)),          # laptop's comes back
             Diff(7, (A2,), 8, ()))          # and desk's goes again
    got = apply_transfer(store, Incremental(soa(8), diffs))
    assert [(type(c), c.owner) for c in got] == [(DeleteRR, A1.owner), (AddRR, A2.owner), (AddRR, A1.owner),
                                                 (DeleteRR, A2.owner)]
    assert texts(store, "laptop", "AAAA") == ["fd00::1"] and texts(store, "desk", "AAAA") == []
    assert texts(store, "_dns-update._udp", "SRV") == ["0 0 53 ns.home.example.net."]
    assert soa_serial(primary_soa(store) or soa(0)) == 8
    # Removing a record the store does not hold changes nothing.
    assert apply_transfer(store, Incremental(soa(9), (Diff(8, (A2,), 9, ()),))) == []


def test_an_incremental_transfer_from_another_serial_is_refused_whole(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(ReplicaError):  # no replica yet: only a full transfer will do
        apply_transfer(store, Incremental(soa(6), (Diff(5, (), 6, (A1,)),)))
    apply_transfer(store, Full(soa(5), ()))
    with pytest.raises(ReplicaError):
        apply_transfer(store, Incremental(soa(8), (Diff(7, (), 8, (A1,)),)))
    assert rows(store) == set() and soa_serial(primary_soa(store) or soa(0)) == 5  # nothing applied


def test_records_the_front_applied_keep_their_lease_until_the_primary_removes_them(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    apply_transfer(store, Full(soa(5), ()))
    # A forwarded update the primary took: the front applied it with the device's lease.
    assert store.apply_update([AddRR(A1.owner, 120, A1.rdata)], Lease(3600, 3600), NOW)
    expiry = store.lease_expiry(A1.owner, dns.rdatatype.AAAA, A1.rdata)
    assert expiry == NOW + 3600
    # It comes back through the primary: no change, no second event, the lease stays.
    assert apply_transfer(store, Incremental(soa(6), (Diff(5, (), 6, (A1,)),))) == []
    assert store.lease_expiry(A1.owner, dns.rdatatype.AAAA, A1.rdata) == expiry
    assert apply_transfer(store, Full(soa(7), (A1,))) == []  # a full transfer keeps it too
    assert store.lease_expiry(A1.owner, dns.rdatatype.AAAA, A1.rdata) == expiry
    # The primary removes it (someone deleted it there): gone, lease and all.
    assert apply_transfer(store, Incremental(soa(8), (Diff(7, (A1,), 8, ()),))) == [
        DeleteRR(A1.owner, A1.rdata)]
    assert rows(store) == set() and store.next_expiry() is None


def test_a_full_transfer_removes_a_leased_record_the_zone_no_longer_has(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.apply_update([AddRR(A1.owner, 120, A1.rdata)], Lease(3600, 3600), NOW)
    assert apply_transfer(store, Full(soa(5), (A2,))) == [DeleteRR(A1.owner, A1.rdata),
                                                         AddRR(A2.owner, A2.ttl, A2.rdata)]
    # the primary's record: no lease
    assert rows(store) == {("desk.home.example.net.", dns.rdatatype.AAAA, 120, None)}


def test_the_primarys_soa_survives_a_reopen(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    assert primary_soa(store) is None
    apply_transfer(store, Full(soa(41), (A1,)))
    store.close()
    store = open_store(tmp_path)
    assert primary_soa(store) == soa(41)
    assert texts(store, "laptop", "AAAA") == ["fd00::1"]
    assert apply_transfer(store, Incremental(soa(42), (Diff(41, (), 42, (A2,)),))) == [
        AddRR(A2.owner, A2.ttl, A2.rdata)]
