"""Front mode, sans-I/O: a device's UPDATE checked, forwarded to a primary signed with the front key, and
answered with the primary's rcode; the leases kept and deleted on the primary at expiry.

The primary is a memory fake built on dnspython, which parses and verifies what the front sends with its
own TSIG code and signs its replies the same way, so the front's messages are checked against an
implementation they share nothing with.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import dns.edns
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.dnsserver.core import CheckedUpdate, DnsCore, account_key
from tunneld.dnsserver.front import DELETE_BATCH, RETRY_FIRST, Forward, Front, read_key_stanza, read_reply
from tunneld.dnsserver.store import ZoneStore
from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import TsigError, TsigKey

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
SECRET = bytes(range(32))
ACCOUNT = account_key(SECRET, DOMAIN).dnspython()
FRONT = TsigKey(dns.name.from_text("front.example.com."), bytes(range(100, 132)))
PRIMARY = ("192.0.2.53", 53)
T0 = 1_800_000_000
SRC = ("192.0.2.50", 5353)
HOST = dns.name.from_text("host", ZONE)


@contextmanager
def clock(at: float) -> Iterator[None]:
    with mock.patch("time.time", return_value=at):
        yield


def counter_rand() -> Any:
    ids = itertools.count(0x1000)
    return lambda n: next(ids).to_bytes(n, "big")


def make(path: str = ":memory:") -> tuple[DnsCore, Front]:
    store = ZoneStore(path, ZONE, "ns.example.com.", 53)
    return DnsCore(store, [ACCOUNT]), Front(store, FRONT, PRIMARY, rand=counter_rand())


def device_update(addr: str = "fd00::1", lease: int = 3600, at: float = T0) -> bytes:
    upd = dns.update.UpdateMessage(ZONE, id=0x4242)
    upd.add(HOST, 120, "AAAA", addr)
    upd.use_edns(0, options=[dns.edns.GenericOption(2, struct.pack("!I", lease))])  # type: ignore[arg-type]
    upd.use_tsig(ACCOUNT)
    with clock(at):
        return upd.to_wire()


def checked(core: DnsCore, wire: bytes, at: float = T0) -> CheckedUpdate:
    out = core.prepare(wire, SRC, at)
    assert isinstance(out, CheckedUpdate), out
    return out


def primary_reads(wire: bytes, at: float = T0) -> dns.message.Message:
    """The fake primary parses the forward as BIND would, verifying the front key's TSIG."""
    with clock(at):
        return dns.message.from_wire(wire, keyring={FRONT.name: FRONT.dnspython()})


def primary_answers(req: dns.message.Message, rcode: dns.rcode.Rcode, at: float = T0,
                    key: TsigKey = FRONT) -> bytes:
    resp = dns.message.make_response(req)
    resp.set_rcode(rcode)
    if key is not FRONT:
        resp.use_tsig(key.dnspython(), original_id=req.id)
        resp.request_mac = req.mac
    with clock(at):
        return resp.to_wire()


def device_reads(reply: bytes, request: bytes, at: float = T0) -> dns.message.Message:
    """The device checks the answer with the account key over its request's MAC."""
    with clock(at):
        req = dns.message.from_wire(request, keyring={ACCOUNT.name: ACCOUNT})
        return dns.message.from_wire(reply, keyring={ACCOUNT.name: ACCOUNT}, request_mac=req.mac)


def aaaa(core: DnsCore, at: float) -> list[str]:
    return [rr.rdata.to_text() for rr in core.store.rrset(HOST, dns.rdatatype.AAAA, at)]


# ---- the forward -------------------------------------------------------------------------------------------


def test_forward_is_the_same_update_without_the_lease_signed_with_the_front_key() -> None:
    core, front = make()
    wire = device_update()
    fwd = front.forward(checked(core, wire), T0)
    assert fwd is not None
    got = primary_reads(fwd.wire)  # raises if the TSIG does not verify with the front key
    assert isinstance(got, dns.update.UpdateMessage)
    assert got.had_tsig and got.keyname == FRONT.name
    assert got.id == fwd.msg_id == 0x1000 != 0x4242
    assert got.edns < 0 and not got.options  # no OPT: the lease stays with the front
    with clock(T0):
        device = dns.message.from_wire(wire, keyring={ACCOUNT.name: ACCOUNT})
    assert got.zone == device.zone  # type: ignore[attr-defined]
    assert got.update == device.update  # type: ignore[attr-defined]
    assert got.prerequisite == device.prerequisite  # type: ignore[attr-defined]
    assert aaaa(core, T0) == []  # nothing applied before the primary answers


def test_primary_noerror_is_the_device_answer_and_applies_the_update_with_its_lease() -> None:
    core, front = make()
    wire = device_update(lease=3600)
    upd = checked(core, wire)
    fwd = front.forward(upd, T0)
    assert fwd is not None
    out = front.answer(core, upd, fwd, primary_answers(primary_reads(fwd.wire), dns.rcode.NOERROR), T0)
    reply = device_reads(out, wire)
    assert reply.rcode() == dns.rcode.NOERROR and reply.id == 0x4242
    assert [o.otype for o in reply.options] == [2]  # the lease granted, to the device
    assert aaaa(core, T0) == ["fd00::1"]
    rdata = core.store.rrset(HOST, dns.rdatatype.AAAA, T0)[0].rdata
    assert core.store.lease_expiry(HOST, dns.rdatatype.AAAA, rdata) == T0 + 3600
    assert core.last_changes  # LLQ and Push hear of it


@pytest.mark.parametrize("rcode", [dns.rcode.REFUSED, dns.rcode.NOTAUTH, dns.rcode.YXDOMAIN])
def test_the_primarys_refusal_passes_through_and_changes_nothing(rcode: dns.rcode.Rcode) -> None:
    core, front = make()
    wire = device_update()
    upd = checked(core, wire)
    fwd = front.forward(upd, T0)
    assert fwd is not None
    out = front.answer(core, upd, fwd, primary_answers(primary_reads(fwd.wire), rcode), T0)
    assert device_reads(out, wire).rcode() == rcode
    assert aaaa(core, T0) == []


@pytest.mark.parametrize("reply", ["none", "wrong key", "wrong id", "garbage"])
def test_no_usable_reply_is_servfail_and_not_remembered(reply: str) -> None:
    core, front = make()
    wire = device_update()
    upd = checked(core, wire)
    fwd = front.forward(upd, T0)
    assert fwd is not None
    req = primary_reads(fwd.wire)
    wires: dict[str, bytes | None] = {
        "none": None,
        "wrong key": primary_answers(req, dns.rcode.NOERROR, key=TsigKey(FRONT.name, b"x" * 32)),
        "wrong id": b"\x00\x01" + primary_answers(req, dns.rcode.NOERROR)[2:],
        "garbage": b"\x10\x00\xa8",
    }
    out = front.answer(core, upd, fwd, wires[reply], T0)
    assert device_reads(out, wire).rcode() == dns.rcode.SERVFAIL
    assert aaaa(core, T0) == []
    assert sum(v for k, v in front.counters.items() if k.startswith("update: ")) == 1
    again = front.forward(checked(core, wire, T0 + 1), T0 + 1)  # the retransmission is forwarded again
    assert again is not None and again.msg_id != fwd.msg_id


def test_read_reply_checks_the_tsig_over_our_request_mac() -> None:
    core, front = make()
    fwd = front.forward(checked(core, device_update()), T0)
    assert fwd is not None
    good = primary_answers(primary_reads(fwd.wire), dns.rcode.NOERROR)
    assert read_reply(good, fwd, FRONT, T0) == 0
    other = Forward(fwd.msg_id, fwd.wire, b"\x00" * 32)  # another request's MAC
    with pytest.raises(TsigError):
        read_reply(good, other, FRONT, T0)


def test_a_replay_is_answered_from_memory_never_forwarded_twice() -> None:
    core, front = make()
    wire = device_update()
    upd = checked(core, wire)
    fwd = front.forward(upd, T0)
    assert fwd is not None
    assert front.forward(checked(core, wire, T0 + 1), T0 + 1) is None  # a copy while it is out: dropped
    assert front.counters["update: copy while forwarding"] == 1
    out = front.answer(core, upd, fwd, primary_answers(primary_reads(fwd.wire), dns.rcode.NOERROR), T0)
    copy = b"\x77\x77" + wire[2:]  # a retransmission (or a replay) under another ID
    again = core.prepare(copy, SRC, T0 + 2)
    assert isinstance(again, bytes) and again == b"\x77\x77" + out[2:]  # the same answer, not a forward
    assert core.replays == 1


# ---- leases ------------------------------------------------------------------------------------------------


def publish(core: DnsCore, front: Front, addr: str, lease: int, at: float) -> None:
    wire = device_update(addr=addr, lease=lease, at=at)
    upd = checked(core, wire, at)
    fwd = front.forward(upd, at)
    assert fwd is not None
    ok = primary_answers(primary_reads(fwd.wire, at), dns.rcode.NOERROR, at)
    out = front.answer(core, upd, fwd, ok, at)
    assert device_reads(out, wire, at).rcode() == dns.rcode.NOERROR


def deleted_rrs(wire: bytes, at: float) -> set[tuple[str, str, str]]:
    msg = primary_reads(wire, at)
    assert isinstance(msg, dns.update.UpdateMessage) and not msg.prerequisite
    out = set()
    for rrset in msg.update:
        assert rrset.deleting == dns.rdataclass.NONE and rrset.ttl == 0  # RFC 2136 §2.5.4: delete one RR
        out |= {(rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype), rd.to_text()) for rd in rrset}
    return out


def test_an_expired_lease_becomes_a_delete_retried_until_acknowledged() -> None:
    core, front = make()
    core.policy = type(core.policy)(min_lease=60)
    publish(core, front, "fd00::1", 60, T0)
    publish(core, front, "fd00::2", 3600, T0)
    assert front.deadline() == T0 + 60
    assert front.due_deletion(T0 + 59) is None
    d1 = front.due_deletion(T0 + 60)
    assert d1 is not None
    assert deleted_rrs(d1.forward.wire, T0 + 60) == {("host.example.com.", "AAAA", "fd00::1")}
    assert front.deleted(d1, None, T0 + 60) == []  # no answer: retried later
    assert front.deadline() == T0 + 60 + RETRY_FIRST
    assert front.due_deletion(T0 + 61) is None
    d2 = front.due_deletion(T0 + 60 + RETRY_FIRST)
    assert d2 is not None
    refused = primary_answers(primary_reads(d2.forward.wire, T0 + 66), dns.rcode.REFUSED, T0 + 66)
    assert front.deleted(d2, refused, T0 + 66) == []
    assert front.deadline() == T0 + 66 + 2 * RETRY_FIRST  # backing off
    d3 = front.due_deletion(T0 + 76)
    assert d3 is not None and d3.rrs == d1.rrs
    serial = core.store.serial
    ok = primary_answers(primary_reads(d3.forward.wire, T0 + 76), dns.rcode.NOERROR, T0 + 76)
    removed = front.deleted(d3, ok, T0 + 76)
    assert [(r.owner, r.rdtype, [rr.rdata.to_text() for rr in r.rrs]) for r in removed] == [
        (HOST, dns.rdatatype.AAAA, ["fd00::1"])]
    assert core.store.serial == serial + 1
    assert aaaa(core, T0 + 76) == ["fd00::2"]
    assert front.due_deletion(T0 + 77) is None and front.deadline() == T0 + 3600


def test_a_lease_renewed_while_its_delete_was_out_stays() -> None:
    core, front = make()
    core.policy = type(core.policy)(min_lease=60)
    publish(core, front, "fd00::1", 60, T0)
    d = front.due_deletion(T0 + 61)
    assert d is not None
    publish(core, front, "fd00::1", 60, T0 + 62)  # renewed (forwarded after the delete, in order)
    ok = primary_answers(primary_reads(d.forward.wire, T0 + 63), dns.rcode.NOERROR, T0 + 63)
    assert front.deleted(d, ok, T0 + 63) == []
    assert aaaa(core, T0 + 63) == ["fd00::1"]


def test_deletes_go_in_bounded_batches() -> None:
    core, front = make()
    core.policy = type(core.policy)(min_lease=60)
    for i in range(DELETE_BATCH + 3):
        publish(core, front, f"fd00::{i + 1:x}", 60, T0)
    d = front.due_deletion(T0 + 60)
    assert d is not None and len(d.rrs) == DELETE_BATCH
    assert len(deleted_rrs(d.forward.wire, T0 + 60)) == DELETE_BATCH


def test_a_new_front_on_the_same_store_sends_the_due_deletes(tmp_path: Path) -> None:
    db = str(tmp_path / "front.sqlite")
    core, front = make(db)
    core.policy = type(core.policy)(min_lease=60)
    publish(core, front, "fd00::1", 60, T0)
    core.store.close()
    core, front = make(db)  # restarted, after the lease ended
    d = front.due_deletion(T0 + 600)
    assert d is not None
    assert deleted_rrs(d.forward.wire, T0 + 600) == {("host.example.com.", "AAAA", "fd00::1")}
    ok = primary_answers(primary_reads(d.forward.wire, T0 + 600), dns.rcode.NOERROR, T0 + 600)
    assert len(front.deleted(d, ok, T0 + 600)) == 1
    core.store.close()
    core, front = make(db)
    assert front.due_deletion(T0 + 700) is None and core.store.snapshot()[1] == []
    core.store.close()


# ---- the key file -----------------------------------------------------------------------------------------


def test_read_key_stanza_as_account_new_prints_it() -> None:
    from tunneld.cli import tsig_stanza

    key = read_key_stanza(tsig_stanza("front.example.com", FRONT.secret))
    assert key == FRONT
    md5 = read_key_stanza('key front.example.com { algorithm hmac-md5; secret "AAAA"; };')
    assert md5.algorithm == "hmac-md5"


@pytest.mark.parametrize("text", ["", "key x { };", 'key "a." { algorithm hmac-sha256; secret "@@"; };',
                                  'key "a." { algorithm hmac-sha1024; secret "AAAA"; };',
                                  'key "a." { algorithm hmac-sha256; secret "AAAA"; }; key "b." {};'])
def test_read_key_stanza_refuses_what_is_not_one_key(text: str) -> None:
    with pytest.raises(ValueError):
        read_key_stanza(text)


# ---- the primary's replies are untrusted input ----------------------------------------------------------


def _genuine_reply() -> tuple[Forward, bytes]:
    core, front = make()
    fwd = front.forward(checked(core, device_update()), T0)
    assert fwd is not None
    return fwd, primary_answers(primary_reads(fwd.wire), dns.rcode.NOERROR)


_FWD, _REPLY = _genuine_reply()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.integers(0, len(_REPLY) - 1), st.binary(min_size=1, max_size=8)).map(
                     lambda m: _REPLY[:m[0]] + m[1] + _REPLY[m[0] + len(m[1]):]),
                 st.integers(0, len(_REPLY)).map(lambda n: _REPLY[:n])))
def test_fuzz_read_reply_raises_only_our_errors(wire: bytes) -> None:
    try:
        rcode = read_reply(wire, _FWD, FRONT, T0)
    except (ParseError, TsigError):
        return
    assert wire[:2] == _REPLY[:2] and 0 <= rcode <= 15  # only a reply that verifies gets this far
