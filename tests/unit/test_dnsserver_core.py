"""DnsCore against dnspython as the independent client: UPDATE + TSIG + Update Lease, QUERY, fuzzing.

Requests are signed by dnspython's own ``Message.to_wire`` at a fixed time (its clock is patched for the
call), and replies are verified by dnspython's ``from_wire`` with the request MAC, so the server's TSIG
handling is checked against an implementation it does not share code paths with.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rrset
import dns.tsig
import dns.update
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.dnsserver.core import CheckedUpdate, DnsCore, Policy, account_key
from tunneld.dnsserver.store import ZoneStore

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
SECRET = bytes(range(32))
KEY = account_key(SECRET, DOMAIN).dnspython()  # dnspython signs the requests here
T0 = 1_800_000_000
SRC = ("192.0.2.50", 5353)


@contextmanager
def clock(at: float) -> Iterator[None]:
    """dnspython reads time.time() when signing and verifying; pin it."""
    with mock.patch("time.time", return_value=at):
        yield


def make_core() -> DnsCore:
    return DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 53, llq_port=5352), [KEY])


@pytest.fixture
def core() -> DnsCore:
    return make_core()


def lease_opt(*values: int) -> dns.edns.GenericOption:
    return dns.edns.GenericOption(2, struct.pack(f"!{len(values)}I", *values))  # type: ignore[arg-type]


def update(lease: tuple[int, ...] | None = (5400,)) -> dns.update.UpdateMessage:
    upd = dns.update.UpdateMessage(ZONE)
    if lease is not None:
        upd.use_edns(0, options=[lease_opt(*lease)])
    return upd


def sign(msg: dns.message.Message, key: dns.tsig.Key = KEY, at: float = T0) -> bytes:
    msg.use_tsig(key)
    with clock(at):
        return msg.to_wire(max_size=65535)


def send(core: DnsCore, msg: dns.message.Message, at: float = T0, key: dns.tsig.Key | None = KEY) -> Any:
    """Sign (unless key is None), handle at ``at``, and parse + verify the reply as the client would."""
    wire = msg.to_wire() if key is None else sign(msg, key, at)
    reply = core.handle(wire, SRC, at)
    assert reply is not None
    with clock(at):
        if key is None:
            return dns.message.from_wire(reply)
        return dns.message.from_wire(reply, keyring=KEY, request_mac=msg.mac)


def aaaa(core: DnsCore, name: str, at: float = T0) -> set[str]:
    rrs = core.store.rrset(dns.name.from_text(name, ZONE), dns.rdatatype.AAAA, at)
    return {rr.rdata.to_text() for rr in rrs}


def register(core: DnsCore, name: str = "host", addr: str = "fd00::1", at: float = T0) -> Any:
    upd = update()
    upd.add(name, 120, "AAAA", addr)
    return send(core, upd, at)


# ---- UPDATE with TSIG and leases --------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lease", "edns without lease", "no edns", "rd set", "lease and payload"])
def test_the_noerror_answer_is_the_bytes_dnspython_renders(variant: str) -> None:
    """DnsCore.noerror builds an update's NOERROR answer by hand (header, OPT with the granted lease, TSIG):
    byte for byte what dnspython's make_response, use_edns and to_wire made, signed the same way."""
    core = DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 53), [KEY], Policy(default_lease=3600))
    upd = dns.update.UpdateMessage(ZONE, id=0x1234)
    if variant in ("lease", "rd set", "lease and payload"):
        upd.add("host", 120, "AAAA", "fd00::1")
        upd.use_edns(0, payload=4096 if variant == "lease and payload" else 1232, options=[lease_opt(5400)])
    elif variant == "edns without lease":
        upd.delete("gone", "AAAA")
        upd.use_edns(0)
    else:
        upd.delete("gone", "AAAA")
    if variant == "rd set":
        upd.flags |= dns.flags.RD
    checked = core.prepare(sign(upd), SRC, T0)
    assert isinstance(checked, CheckedUpdate)
    resp = dns.message.make_response(checked.req, copy_mode=dns.message.CopyMode.NOTHING)
    if checked.lease_reply is not None:
        resp.use_edns(0, 0, 1232, options=[dns.edns.GenericOption(2, checked.lease_reply)])
    assert core.noerror(checked, T0) == core.render(checked.req, resp, checked.signer, T0, None)
    with clock(T0):
        got = dns.message.from_wire(core.noerror(checked, T0), keyring=KEY, request_mac=upd.mac)
    assert got.rcode() == dns.rcode.NOERROR and got.id == 0x1234


def test_signed_update_with_lease_is_applied_and_reply_verifies(core: DnsCore) -> None:
    reply = register(core)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.QR and reply.opcode() == dns.opcode.UPDATE
    assert reply.had_tsig  # verified by from_wire with the request MAC
    assert [o.to_wire() for o in reply.options if o.otype == 2] == [struct.pack("!I", 5400)]
    assert aaaa(core, "host") == {"fd00::1"}
    assert core.store.serial == 2
    rdata = dns.rdata.from_text("IN", "AAAA", "fd00::1")
    assert core.store.lease_expiry(dns.name.from_text("host", ZONE), dns.rdatatype.AAAA, rdata) == T0 + 5400


@pytest.mark.parametrize(
    ("asked", "granted"),
    [((60,), (1800,)), ((100_000,), (7200,)), ((3000,), (3000,)), ((60, 10**6), (1800, 7200))],
)
def test_lease_is_clamped_and_echoed_in_the_same_form(
    core: DnsCore, asked: tuple[int, ...], granted: tuple[int, ...]
) -> None:
    upd = update(asked)
    upd.add("host", 120, "AAAA", "fd00::1")
    reply = send(core, upd)
    assert reply.rcode() == dns.rcode.NOERROR
    opts = [o.to_wire() for o in reply.options if o.otype == 2]
    assert opts == [struct.pack(f"!{len(granted)}I", *granted)]


def test_malformed_lease_option_is_formerr(core: DnsCore) -> None:
    upd = dns.update.UpdateMessage(ZONE)
    upd.use_edns(0, options=[dns.edns.GenericOption(2, b"\x00\x01")])  # type: ignore[arg-type]
    upd.add("host", 120, "AAAA", "fd00::1")
    assert send(core, upd).rcode() == dns.rcode.FORMERR
    assert aaaa(core, "host") == set()


def test_add_without_lease_is_refused_but_delete_is_fine(core: DnsCore) -> None:
    register(core)
    upd = update(None)
    upd.add("other", 120, "AAAA", "fd00::2")
    assert send(core, upd).rcode() == dns.rcode.REFUSED
    upd = update(None)
    upd.delete("host")
    assert send(core, upd).rcode() == dns.rcode.NOERROR
    assert aaaa(core, "host") == set()
    lax = DnsCore(core.store, [KEY], Policy(require_lease=False))
    upd = update(None)
    upd.add("perm", 120, "AAAA", "fd00::3")
    assert send(lax, upd).rcode() == dns.rcode.NOERROR
    assert aaaa(lax, "perm", T0 + 10**7) == {"fd00::3"}


def test_noop_refresh_keeps_serial_and_extends_lease(core: DnsCore) -> None:
    register(core)
    serial = core.store.serial
    reply = register(core, at=T0 + 4000)
    assert reply.rcode() == dns.rcode.NOERROR
    assert core.store.serial == serial
    assert aaaa(core, "host", T0 + 9000) == {"fd00::1"}  # would have expired at T0 + 5400


def test_lease_expiry_removes_records_from_answers(core: DnsCore) -> None:
    register(core)
    q = dns.message.make_query("host.example.com.", "AAAA")
    assert send(core, q, T0 + 5399).answer  # device records: signed queries only
    reply = send(core, q, T0 + 5400)
    assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
    removed = core.store.expire(T0 + 5400)
    assert [(r.owner.to_text(), r.rdtype) for r in removed] == [("host.example.com.", dns.rdatatype.AAAA)]


def test_wrong_secret_is_badsig_unsigned_and_store_unchanged(core: DnsCore) -> None:
    snap = core.store.snapshot()
    bad = dns.tsig.Key(KEY.name, b"\x01" * 32, dns.tsig.HMAC_SHA256)
    upd = update()
    upd.add("host", 120, "AAAA", "fd00::1")
    reply = core.handle(sign(upd, bad), SRC, T0)
    assert reply is not None
    parsed = dns.message.from_wire(reply, keyring=False)
    assert parsed.rcode() == dns.rcode.NOTAUTH
    assert parsed.tsig_error == dns.rcode.BADSIG
    assert parsed.mac == b""  # unsigned
    with pytest.raises(dns.tsig.PeerBadSignature), clock(T0):
        dns.message.from_wire(reply, keyring=KEY, request_mac=upd.mac)
    assert core.store.snapshot() == snap


def test_unknown_key_name_is_badkey(core: DnsCore) -> None:
    other = dns.tsig.Key("other.example.", KEY.secret, dns.tsig.HMAC_SHA256)
    upd = update()
    upd.add("host", 120, "AAAA", "fd00::1")
    reply = core.handle(sign(upd, other), SRC, T0)
    assert reply is not None
    parsed = dns.message.from_wire(reply, keyring=False)
    assert (parsed.rcode(), parsed.tsig_error, parsed.mac) == (dns.rcode.NOTAUTH, dns.rcode.BADKEY, b"")
    with pytest.raises(dns.tsig.PeerBadKey), clock(T0):
        dns.message.from_wire(reply, keyring={other.name: other}, request_mac=upd.mac)
    assert aaaa(core, "host") == set()


def test_wrong_algorithm_is_badkey(core: DnsCore) -> None:
    sha1 = dns.tsig.Key(KEY.name, KEY.secret, dns.tsig.HMAC_SHA1)
    upd = update()
    upd.add("host", 120, "AAAA", "fd00::1")
    reply = core.handle(sign(upd, sha1), SRC, T0)
    assert reply is not None
    assert dns.message.from_wire(reply, keyring=False).tsig_error == dns.rcode.BADKEY


def test_key_name_matches_case_insensitively(core: DnsCore) -> None:
    upper = dns.tsig.Key("EXAMPLE.Com.", KEY.secret, dns.tsig.HMAC_SHA256)
    upd = update()
    upd.add("host", 120, "AAAA", "fd00::1")
    assert core.handle(sign(upd, upper), SRC, T0) is not None
    assert aaaa(core, "host") == {"fd00::1"}


def test_stale_time_is_badtime_with_a_signed_reply(core: DnsCore) -> None:
    upd = update()
    upd.add("host", 120, "AAAA", "fd00::1")
    wire = sign(upd, KEY, T0 - 301)
    reply = core.handle(wire, SRC, T0)
    assert reply is not None
    parsed = dns.message.from_wire(reply, keyring=False)
    assert parsed.rcode() == dns.rcode.NOTAUTH
    assert parsed.tsig is not None
    tsig = parsed.tsig[0]
    assert isinstance(tsig, dns.rdtypes.ANY.TSIG.TSIG)
    assert tsig.error == dns.rcode.BADTIME
    assert tsig.time_signed == T0 - 301  # echoes the request
    assert tsig.other == struct.pack("!Q", T0)[2:]  # server time, u48
    # The MAC verifies (dnspython refuses to verify replies with a TSIG error, so recompute it with
    # dnspython's signer over the reply minus its TSIG, mixing in the request MAC).
    parsed.tsig = None
    unsigned = parsed.to_wire()
    assert reply.startswith(unsigned[:10]) and reply[12 : len(unsigned)] == unsigned[12:]
    expected, _ = dns.tsig.sign(unsigned, KEY, tsig, tsig.time_signed, upd.mac)  # type: ignore[no-untyped-call]
    assert tsig.mac == expected.mac and len(tsig.mac) == 32
    assert aaaa(core, "host") == set()
    # within the fudge is fine
    assert core.handle(sign(upd, KEY, T0 - 300), SRC, T0) is not None
    assert aaaa(core, "host") == {"fd00::1"}


def test_bad_mac_is_reported_before_bad_time(core: DnsCore) -> None:
    bad = dns.tsig.Key(KEY.name, b"\x02" * 32, dns.tsig.HMAC_SHA256)
    upd = update()
    upd.add("host", 120, "AAAA", "fd00::1")
    reply = core.handle(sign(upd, bad, T0 - 10_000), SRC, T0)
    assert reply is not None
    assert dns.message.from_wire(reply, keyring=False).tsig_error == dns.rcode.BADSIG


def test_unsigned_update_is_refused(core: DnsCore) -> None:
    upd = update()
    upd.add("host", 120, "AAAA", "fd00::1")
    reply = send(core, upd, key=None)
    assert reply.rcode() == dns.rcode.REFUSED
    assert not reply.had_tsig
    assert aaaa(core, "host") == set()


def test_wrong_zone_is_notauth_and_outside_name_is_notzone(core: DnsCore) -> None:
    upd = dns.update.UpdateMessage("example.net.")
    upd.use_edns(0, options=[lease_opt(3600)])
    upd.add("host", 120, "AAAA", "fd00::1")
    assert send(core, upd).rcode() == dns.rcode.NOTAUTH
    upd = update()
    upd.add(dns.name.from_text("host.example.net."), 120, "AAAA", "fd00::1")
    assert send(core, upd).rcode() == dns.rcode.NOTZONE


def test_zone_records_cannot_be_changed(core: DnsCore) -> None:
    builds: list[Callable[[dns.update.UpdateMessage], None]] = [
        lambda u: u.add("@", 60, "NS", "evil.example."),
        lambda u: u.delete("@", "SOA"),
        lambda u: u.delete("_dns-llq._udp"),
        lambda u: u.add("_dns-update._udp", 60, "SRV", "0 0 53 evil.example."),
    ]
    for build in builds:
        upd = update()
        build(upd)
        assert send(core, upd).rcode() == dns.rcode.REFUSED
    assert core.store.serial == 1


def test_update_is_atomic_when_a_later_rr_is_bad(core: DnsCore) -> None:
    upd = update()
    upd.add("host", 120, "AAAA", "fd00::1")
    upd.add("@", 60, "NS", "evil.example.")
    assert send(core, upd).rcode() == dns.rcode.REFUSED
    assert aaaa(core, "host") == set()


@pytest.mark.parametrize(
    ("prereq", "rcode"),
    [
        (lambda u: u.present("host"), dns.rcode.NXDOMAIN),
        (lambda u: u.absent("taken"), dns.rcode.YXDOMAIN),
        (lambda u: u.present("taken", "TXT"), dns.rcode.NXRRSET),
        (lambda u: u.absent("taken", "AAAA"), dns.rcode.YXRRSET),
        (lambda u: u.present("taken", "AAAA", "fd00::9"), dns.rcode.NXRRSET),
        (lambda u: u.present("taken", "AAAA", "fd00::5"), dns.rcode.NXRRSET),  # subset is not equal
        (lambda u: u.present(dns.name.from_text("x.example.net."), "AAAA"), dns.rcode.NOTZONE),
        (lambda u: u.absent("_udp"), dns.rcode.NOERROR),  # empty non-terminal is "not in use"
        (lambda u: u.present("taken"), dns.rcode.NOERROR),
        (lambda u: u.absent("host"), dns.rcode.NOERROR),
        (lambda u: u.present("taken", "AAAA"), dns.rcode.NOERROR),
        (lambda u: u.absent("taken", "TXT"), dns.rcode.NOERROR),
        (lambda u: u.present("taken", "AAAA", "fd00::5", "fd00::6"), dns.rcode.NOERROR),
        (lambda u: u.present("@", "SOA"), dns.rcode.NOERROR),
    ],
)
def test_prerequisites(core: DnsCore, prereq: Any, rcode: int) -> None:
    setup = update()
    setup.add("taken", 120, "AAAA", "fd00::5")
    setup.add("taken", 120, "AAAA", "fd00::6")
    assert send(core, setup).rcode() == dns.rcode.NOERROR
    snap = core.store.snapshot()
    upd = update()
    prereq(upd)
    upd.add("host", 120, "AAAA", "fd00::1")
    reply = send(core, upd)
    assert reply.rcode() == rcode
    assert reply.had_tsig
    if rcode != dns.rcode.NOERROR:
        assert core.store.snapshot() == snap
    else:
        assert aaaa(core, "host") == {"fd00::1"}


def test_nonzero_ttl_in_prerequisite_or_deletion_is_formerr(core: DnsCore) -> None:
    upd = update()
    soa = core.store.soa()
    upd.find_rrset(upd.prerequisite, ZONE, dns.rdataclass.IN, dns.rdatatype.SOA, create=True).add(soa, 5)
    upd.add("host", 120, "AAAA", "fd00::1")
    assert send(core, upd).rcode() == dns.rcode.FORMERR
    upd = update()
    upd.delete("host", "AAAA", "fd00::1")
    upd.update[-1].ttl = 5
    assert send(core, upd).rcode() == dns.rcode.FORMERR
    upd = update()
    upd.add("host", 120, "ANY", "\\# 0")
    assert send(core, upd).rcode() == dns.rcode.FORMERR
    assert aaaa(core, "host") == set()


def test_deletes_through_update(core: DnsCore) -> None:
    upd = update()
    upd.add("h", 120, "AAAA", "fd00::1")
    upd.add("h", 120, "AAAA", "fd00::2")
    upd.add("h", 120, "TXT", '"v=1"')
    send(core, upd)
    upd = update(None)
    upd.delete("h", "AAAA", "fd00::1")
    send(core, upd)
    assert aaaa(core, "h") == {"fd00::2"}
    upd = update(None)
    upd.delete("h", "AAAA")
    send(core, upd)
    assert aaaa(core, "h") == set()
    upd = update(None)
    upd.delete("h")
    send(core, upd)
    assert not core.store.name_in_use(dns.name.from_text("h", ZONE), T0)


# ---- QUERY ------------------------------------------------------------------------------------------


def query(core: DnsCore, name: str, rdtype: str, signed: bool = False) -> Any:
    return send(core, dns.message.make_query(name, rdtype), key=KEY if signed else None)


@pytest.mark.parametrize(
    ("name", "rdtype", "text"),
    [
        ("example.com.", "SOA", "ns.example.com. hostmaster.example.com. 1 3600 600 86400 60"),
        ("example.com.", "NS", "ns.example.com."),
        ("_dns-update._udp.example.com.", "SRV", "0 0 53 ns.example.com."),
        ("_dns-llq._udp.EXAMPLE.com.", "SRV", "0 0 5352 ns.example.com."),
    ],
)
def test_zone_records_are_answered(core: DnsCore, name: str, rdtype: str, text: str) -> None:
    reply = query(core, name, rdtype)
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
    assert [rr.to_text() for rrset in reply.answer for rr in rrset] == [text]
    assert reply.answer[0].name == dns.name.from_text(name)


def test_nxdomain_nodata_and_refused(core: DnsCore) -> None:
    register(core)
    reply = query(core, "nope.example.com.", "A")
    assert reply.rcode() == dns.rcode.NXDOMAIN and reply.flags & dns.flags.AA
    assert [rrset.rdtype for rrset in reply.authority] == [dns.rdatatype.SOA]
    reply = query(core, "host.example.com.", "A", signed=True)  # device names: signed queries only
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
    assert [rrset.rdtype for rrset in reply.authority] == [dns.rdatatype.SOA]
    reply = query(core, "_udp.example.com.", "SRV")  # empty non-terminal: NODATA
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
    assert query(core, "www.example.net.", "A").rcode() == dns.rcode.REFUSED
    assert query(core, "example.com.", "AXFR").rcode() == dns.rcode.REFUSED
    reply = query(core, "host.example.com.", "ANY", signed=True)
    assert [rrset.rdtype for rrset in reply.answer] == [dns.rdatatype.AAAA]


def test_signed_query_gets_signed_answer(core: DnsCore) -> None:
    reply = query(core, "example.com.", "SOA", signed=True)
    assert reply.had_tsig and reply.answer


def test_non_query_opcodes_and_responses(core: DnsCore) -> None:
    q = dns.message.make_query("example.com.", "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    assert send(core, q, key=None).rcode() == dns.rcode.NOTIMP
    resp = dns.message.make_response(dns.message.make_query("example.com.", "SOA"))
    assert core.handle(resp.to_wire(), SRC, T0) is None
    q = dns.message.make_query("example.com.", "SOA", use_edns=1)
    reply = send(core, q, key=None)
    assert reply.rcode() == dns.rcode.BADVERS


def test_garbage(core: DnsCore) -> None:
    assert core.handle(b"", SRC, T0) is None
    assert core.handle(b"\x12\x34\x01", SRC, T0) is None
    reply = core.handle(b"\x12\x34\x28\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff", SRC, T0)
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert parsed.id == 0x1234 and parsed.rcode() == dns.rcode.FORMERR
    assert parsed.opcode() == dns.opcode.UPDATE


def test_large_answer_is_truncated_over_udp(core: DnsCore) -> None:
    upd = update()
    for i in range(60):
        upd.add("big", 120, "AAAA", f"fd00::{i + 1:x}")
    send(core, upd)
    wire = sign(dns.message.make_query("big.example.com.", "AAAA"))  # device records: signed only
    reply = core.handle(wire, SRC, T0)
    assert reply is not None and len(reply) <= 512
    assert dns.message.from_wire(reply, keyring=False).flags & dns.flags.TC
    tcp = core.handle(wire, SRC, T0, max_size=65535)
    assert tcp is not None
    assert len(dns.message.from_wire(tcp, keyring=False).answer[0]) == 60


# ---- fuzz --------------------------------------------------------------------------------------------


def _check_reply(reply: bytes | None, wire: bytes) -> int | None:
    if reply is None:
        return None
    parsed = dns.message.from_wire(reply, keyring=False)
    assert parsed.flags & dns.flags.QR
    assert parsed.id == struct.unpack("!H", wire[:2])[0]
    return parsed.rcode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    core = make_core()
    snap = core.store.snapshot()
    _check_reply(core.handle(data, SRC, T0), data)
    assert core.store.snapshot() == snap  # nobody can forge a TSIG


def _genuine() -> tuple[bytes, tuple[int, list[Any]]]:
    core = make_core()
    upd = update()
    upd.present("@", "SOA")
    upd.add("host", 120, "AAAA", "fd00::1")
    upd.add("host", 120, "TXT", '"v=1" "pk=abc"')
    upd.delete("gone")
    wire = sign(upd)
    assert core.handle(wire, SRC, T0) is not None
    return wire, core.store.snapshot()


GENUINE_WIRE, GENUINE_AFTER = _genuine()


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    wire = bytearray(GENUINE_WIRE)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(wire) - 1, 0)))
        if kind == "flip" and wire:
            wire[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and wire:
            wire[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del wire[pos:]
        elif kind == "insert":
            wire[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del wire[pos : pos + draw(st.integers(1, 8))]
    return bytes(wire)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_fuzz_mutated_signed_update(wire: bytes) -> None:
    core = make_core()
    before = core.store.snapshot()
    rcode = _check_reply(core.handle(wire, SRC, T0), wire)
    after = core.store.snapshot()
    # Either rejected and untouched, or (the ID and TSIG-RR framing are outside the MAC) the genuine update.
    assert after in (before, GENUINE_AFTER)
    if after == GENUINE_AFTER:
        assert rcode == dns.rcode.NOERROR


def test_default_lease_for_updates_without_the_option(core: DnsCore) -> None:
    """Plain RFC 2136 clients (nsupdate) cannot send the lease option: with Policy.default_lease their
    adds are accepted with that lease, clamped to max_lease, no option in the reply, and expire."""
    nsupdate_like = DnsCore(core.store, [KEY], Policy(default_lease=99_999))
    upd = update(None)
    upd.add("plain", 120, "AAAA", "fd00::4")
    reply = send(nsupdate_like, upd)
    assert reply.rcode() == dns.rcode.NOERROR and not reply.options
    assert aaaa(core, "plain", T0 + 7199) == {"fd00::4"}
    assert aaaa(core, "plain", T0 + 7200) == set()  # 99 999 s clamped to the 2 h maximum


# ---- replays within the TSIG time window ------------------------------------------------------------


def test_a_replayed_update_changes_nothing_and_gets_the_reply_that_was_sent(core: DnsCore) -> None:
    """TSIG's time check lets a captured update be replayed for `fudge` seconds. An attacker replaying a
    device's old endpoint after it moved must not move it back: the copy gets the first reply again
    (which is also what a client retransmitting after a lost reply needs) and the zone keeps the newer
    record."""
    old = update()
    old.replace("host", 120, "AAAA", "fd00::1")
    old_wire = sign(old, at=T0)
    first = core.handle(old_wire, SRC, T0)
    new = update()
    new.replace("host", 120, "AAAA", "fd00::2")
    assert send(core, new, T0 + 10).rcode() == dns.rcode.NOERROR
    assert aaaa(core, "host", T0 + 10) == {"fd00::2"}
    replay = core.handle(old_wire, SRC, T0 + 20)
    assert replay == first
    assert aaaa(core, "host", T0 + 20) == {"fd00::2"}
    assert core.replays == 1
    # Outside the window the copy is refused by the time check, as before (BADTIME), and still changes
    # nothing.
    late = core.handle(old_wire, SRC, T0 + 400)
    assert late is not None and late != first
    assert aaaa(core, "host", T0 + 400) == {"fd00::2"}


def test_replay_memory_forgets_requests_whose_window_closed(core: DnsCore) -> None:
    for i in range(5):
        register(core, f"h{i}", at=T0 + i)
    assert len(core._answered) == 5
    register(core, "later", at=T0 + 1000)  # every earlier request's window (T0 + i + 300) has closed
    assert len(core._answered) == 1


@pytest.mark.parametrize("late", [0, 9999])
def test_a_response_with_a_bad_tsig_gets_no_error_reply(core: DnsCore, late: int) -> None:
    """A message with QR set (an LLQ ack) whose TSIG fails is refused with nothing to send: no error
    reply may be built for a response (dnspython cannot, and it was logged as an internal error)."""
    msg = dns.message.make_query(f"host.{DOMAIN}", "AAAA")
    msg.flags |= dns.flags.QR
    wire = sign(msg, dns.tsig.Key(KEY.name, b"\x01" * 32, KEY.algorithm) if late == 0 else KEY)
    parsed = dns.message.from_wire(wire, keyring=False)
    assert core.check_tsig(parsed, wire, int(T0) + late) == b""
