"""DNS UPDATE + TSIG + Update Lease publisher (tunneld.proto.dnsupdate), with dnspython as the oracle.

dnspython signs and validates with ``time.time()``; the ``frozen`` fixture pins that to WALL so that its
checks run at our signing time. Our core never reads it (it is given ``wall``)."""

from __future__ import annotations

import base64
import random
import struct
import time
from collections.abc import Callable, Iterator

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rrset
import dns.tsig
import dns.update
import pytest

from tests.unit.dns_steps import SERVER, PublisherView, Update, publisher
from tunneld.proto import dnsupdate as du
from tunneld.proto.dnsupdate import (
    DEFAULT_LEASE,
    Failed,
    Published,
    Publisher,
    Withdrawn,
    startup_delay,
)
from tunneld.proto.dnswire import (
    UPDATE_LEASE_OPTION_CODE,
    UpdateLeaseOption,
    decode_update_lease,
    encode_update_lease,
)
from tunneld.proto.errors import ParseError
from tunneld.proto.srv import SrvQuery, build_srv_query, pick_srv_target
from tunneld.proto.tsig import TsigError, TsigKey, find_tsig
from tunneld.proto.tsig import sign as tsig_sign
from tunneld.proto.tsig import verify as tsig_verify

ZONE = "example.com."
SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
WALL = 1_700_000_000.0


def rng(seed: int = 1) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def dkey(secret: bytes = SECRET, algorithm: dns.name.Name = dns.tsig.HMAC_SHA256,
         name: str = ZONE) -> dns.tsig.Key:
    return dns.tsig.Key(name, secret, algorithm)


def records(port: int = 61001, ipv4: str = "198.51.100.7") -> list[dns.rrset.RRset]:
    return [
        dns.rrset.from_text("host.example.com.", 120, "IN", "AAAA", "fd12:3456:789a::1"),
        dns.rrset.from_text("_autotunnel._udp.host.example.com.", 120, "IN", "SRV",
                            f"0 0 {port} AutoTunnel-02-1c-b3-ff-fe-09-85-15.example.com."),
        dns.rrset.from_text("_autotunnel._udp.host.example.com.", 120, "IN", "TXT", '"v=1" "pk=AAAA"'),
        dns.rrset.from_text("AutoTunnel-02-1c-b3-ff-fe-09-85-15.example.com.", 120, "IN", "A", ipv4),
    ]


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[float], None]]:
    """Pin time.time() (read by dnspython's TSIG code) to WALL, or to a value set later."""
    current = [WALL]
    monkeypatch.setattr(time, "time", lambda: current[0])

    def set_time(t: float) -> None:
        current[0] = t

    yield set_time


def server_parse(payload: bytes, key: dns.tsig.Key | None = None) -> dns.message.Message:
    """The server's view: dnspython parses and validates our UPDATE (at the frozen time)."""
    return dns.message.from_wire(payload, keyring=key or dkey())


def respond(payload: bytes, rcode: int = dns.rcode.NOERROR, lease: int | None = None,
            key_lease: int | None = None, key: dns.tsig.Key | None = None,
            tsig_error: int = 0, other: bytes = b"") -> bytes:
    """A signed response built by dnspython: make_response carries the request MAC into the signature."""
    query = server_parse(payload, key)
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.Rcode.make(rcode))
    if lease is not None:
        response.use_edns(0, options=[UpdateLeaseOption(lease, key_lease)])
    else:
        response.use_edns(False)
    if tsig_error or other:
        response.use_tsig(query.keyring, fudge=300, tsig_error=tsig_error, other_data=other)
        response.request_mac = query.mac or b""
    return response.to_wire()


def unsigned_tsig_error(payload: bytes, error: int, rcode: int = dns.rcode.NOTAUTH) -> bytes:
    """RFC 8945 §5.3.2: a BADSIG/BADKEY answer carries a TSIG with no MAC and Time Signed 0 (as miekg)."""
    query = dns.message.from_wire(payload, keyring=False)
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.Rcode.make(rcode))
    assert query.tsig is not None
    rd = query.tsig[0]
    assert isinstance(rd, dns.rdtypes.ANY.TSIG.TSIG)
    tsig = dns.rdtypes.ANY.TSIG.TSIG(  # type: ignore[no-untyped-call]  # dnspython leaves it unannotated
        dns.rdataclass.ANY, dns.rdatatype.TSIG, rd.algorithm, 0, rd.fudge, b"", query.id, error, b"")
    response.tsig = dns.rrset.from_rdata(query.tsig.name, 0, tsig)
    response.want_tsig_sign = False
    return response.to_wire()


def published(pub: PublisherView | None = None, lease: int | None = 1800, now: float = 0.0,
              ) -> tuple[PublisherView, bytes]:
    pub = pub or publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL + now)
    events = pub.receive(respond(tx.payload, lease=lease), WALL + now + 0.05)
    assert len(events) == 1 and isinstance(events[0], Published)
    return pub, tx.payload


def update_summary(msg: dns.message.Message) -> list[tuple[str, str, str, str, tuple[str, ...]]]:
    assert isinstance(msg, dns.update.UpdateMessage)
    out = []
    for rrset in msg.update:
        deleting = dns.rdataclass.to_text(rrset.deleting) if rrset.deleting else "-"
        out.append((rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype), deleting, str(rrset.ttl),
                    tuple(sorted(rd.to_text() for rd in rrset))))
    return out


# -- the UPDATE message, checked by dnspython ---------------------------------------------------------------


def test_update_verifies_with_dnspython_at_signing_time(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    msg = server_parse(tx.payload)
    assert msg.id == tx.message_id
    assert msg.opcode() == dns.opcode.UPDATE
    assert msg.had_tsig and msg.keyname == dns.name.from_text(ZONE)
    assert msg.keyalgorithm == dns.tsig.HMAC_SHA256
    rd = msg.tsig[0]  # type: ignore[index]
    assert rd.time_signed == int(WALL) and rd.fudge == 300 and rd.original_id == tx.message_id


def test_update_fails_with_another_key_or_out_of_time(frozen: Callable[[float], None]) -> None:
    tx = publisher(ZONE, ZONE, SECRET, rand=rng()).publish(records(), WALL)
    with pytest.raises(dns.tsig.BadSignature):
        server_parse(tx.payload, dkey(OTHER_SECRET))
    frozen(WALL + 301)
    with pytest.raises(dns.tsig.BadTime):
        server_parse(tx.payload)


def test_update_sections_are_exactly_delete_then_add(frozen: Callable[[float], None]) -> None:
    tx = publisher(ZONE, ZONE, SECRET, rand=rng()).publish(records(), WALL)
    msg = server_parse(tx.payload)
    assert isinstance(msg, dns.update.UpdateMessage)
    assert [(r.name.to_text(), r.rdtype) for r in msg.zone] == [(ZONE, dns.rdatatype.SOA)]
    assert msg.prerequisite == []
    summary = update_summary(msg)
    deletes = [s for s in summary if s[2] == "ANY"]
    adds = [s for s in summary if s[2] == "-"]
    assert summary == deletes + adds  # every delete comes before every add
    assert {(s[0], s[1]) for s in deletes} == {
        ("host.example.com.", "AAAA"), ("_autotunnel._udp.host.example.com.", "SRV"),
        ("_autotunnel._udp.host.example.com.", "TXT"),
        ("AutoTunnel-02-1c-b3-ff-fe-09-85-15.example.com.", "A"),
    }
    assert all(s[3] == "0" and s[4] == () for s in deletes)
    assert {(s[0], s[1], s[4]) for s in adds} == {
        (r.name.to_text(), dns.rdatatype.to_text(r.rdtype), tuple(sorted(rd.to_text() for rd in r)))
        for r in records()}
    assert all(s[3] == "120" for s in adds)


def test_lease_option_four_byte_form(frozen: Callable[[float], None]) -> None:
    tx = publisher(ZONE, ZONE, SECRET, rand=rng()).publish(records(), WALL)
    assert bytes.fromhex("0002000400001518") in tx.payload  # code 2, length 4, 5400 s
    msg = server_parse(tx.payload)
    options = [o for o in msg.options if o.otype == 2]
    assert len(options) == 1
    assert decode_update_lease(options[0].to_wire() or b"") == (DEFAULT_LEASE, None)


def test_tsig_names_are_lower_cased_and_key_never_shown(frozen: Callable[[float], None]) -> None:
    pub = publisher("Example.COM.", "Example.COM.", SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    tsig = find_tsig(tx.payload)
    assert tsig is not None
    assert tx.payload[tsig.start:tsig.start + 13] == b"\x07example\x03com\x00"
    assert b"\x0bhmac-sha256\x00" in tx.payload[tsig.start:]
    server_parse(tx.payload)  # dnspython (case-insensitive names) still verifies it
    secret_forms = [SECRET.hex(), base64.b64encode(SECRET).decode(), repr(SECRET)]
    shown = [repr(pub), str(pub), repr(pub.state), repr(TsigKey(dns.name.from_text(ZONE), SECRET))]
    assert not any(s in text for s in secret_forms for text in shown)


def test_hmac_md5(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, algorithm="hmac-md5", rand=rng())
    tx = pub.publish(records(), WALL)
    key = dkey(algorithm=dns.tsig.HMAC_MD5)
    msg = server_parse(tx.payload, key)
    assert msg.keyalgorithm == dns.tsig.HMAC_MD5
    with pytest.raises(dns.tsig.BadSignature):
        server_parse(tx.payload, dkey(OTHER_SECRET, dns.tsig.HMAC_MD5))
    events = pub.receive(respond(tx.payload, lease=3600, key=key), WALL + 0.1)
    assert isinstance(events[0], Published) and events[0].lease == 3600


def test_bad_configuration_is_rejected() -> None:
    with pytest.raises(ValueError):
        publisher(ZONE, ZONE, SECRET, algorithm="hmac-sha1")
    with pytest.raises(ValueError):
        publisher(ZONE, ZONE, SECRET, lease=600)
    with pytest.raises(ValueError):
        publisher(ZONE, ZONE, SECRET, lease=7201)
    with pytest.raises(ValueError):
        publisher(ZONE, ZONE, SECRET).publish(
            [dns.rrset.from_text("host.example.org.", 60, "IN", "A", "192.0.2.1")], WALL)


def test_core_never_reads_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """publish/receive/poll/withdraw and the SRV helpers use only the times they are given."""

    def no_clock() -> float:
        raise AssertionError("the sans-I/O core read the clock")

    def guarded(call: Callable[[], object]) -> object:
        with monkeypatch.context() as m:
            for name in ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter"):
                m.setattr(time, name, no_clock)
            return call()

    def answer(payload: bytes, lease: int | None = 1800, wall: float = WALL) -> bytes:
        with monkeypatch.context() as m:
            m.setattr(time, "time", lambda: wall)
            return respond(payload, lease=lease)

    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = guarded(lambda: pub.publish(records(), WALL))
    assert isinstance(tx, Update)
    guarded(lambda: pub.poll(WALL + 1))
    assert guarded(lambda: pub.receive(answer(tx.payload), WALL + 1))
    refresh_at = pub.deadline()
    assert refresh_at is not None
    polled = guarded(lambda: pub.poll(refresh_at))
    assert isinstance(polled, list) and len(polled) == 1
    refresh: Update = polled[0]
    wall = refresh_at
    guarded(lambda: pub.receive(answer(refresh.payload, None, wall), wall))
    done = guarded(lambda: pub.withdraw(refresh_at + 1))
    assert isinstance(done, Update)
    query = guarded(lambda: build_srv_query(ZONE, rng()))
    assert isinstance(query, SrvQuery)
    guarded(lambda: pick_srv_target(dns.message.make_response(dns.message.from_wire(query.payload)).to_wire(),
                                    query))
    assert len(pub.events) == 2


# -- answers -------------------------------------------------------------------------------------------


def test_granted_lease_is_obeyed(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL + 100.0)
    [event] = pub.receive(respond(tx.payload, lease=1800), WALL + 100.2)
    assert isinstance(event, Published) and event.granted and event.lease == 1800
    state = pub.state
    assert state.published and not state.pending and state.rcode == "NOERROR"
    assert state.lease_granted == 1800 and not state.server_ignores_lease
    assert state.expires_at == WALL + 100.0 + 1800
    assert state.next_refresh_at is not None
    assert WALL + 100.2 + 0.8 * 1800 <= state.next_refresh_at <= WALL + 100.2 + 0.85 * 1800
    assert pub.deadline() == state.next_refresh_at
    assert pub.poll(state.next_refresh_at - 0.01) == []
    frozen(state.next_refresh_at)  # the refresh is signed at its own time
    [refresh] = pub.poll(state.next_refresh_at)
    assert refresh.message_id != tx.message_id
    assert pub.state.pending and pub.state.published


def test_refresh_jitter_spans_the_five_percent() -> None:
    times = []
    for seed in range(40):
        pub = publisher(ZONE, ZONE, SECRET, rand=rng(seed))
        tx = pub.publish(records(), WALL)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(time, "time", lambda: WALL)
            pub.receive(respond(tx.payload, lease=1800), WALL)
        assert pub.state.next_refresh_at is not None
        times.append(pub.state.next_refresh_at - WALL)
    assert all(1440 <= t < 1530 for t in times)
    assert max(times) - min(times) > 45  # the jitter is really drawn from rand


def test_longer_granted_lease_and_eight_byte_form(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    [event] = pub.receive(respond(tx.payload, lease=86400, key_lease=604800), WALL)
    assert isinstance(event, Published) and event.lease == 86400  # longer than asked: still obeyed
    assert WALL + 0.8 * 86400 <= event.refresh_at <= WALL + 0.85 * 86400


def test_malformed_lease_in_a_signed_success_falls_back(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    query = server_parse(tx.payload)
    response = dns.message.make_response(query)
    response.use_edns(0, options=[dns.edns.GenericOption(dns.edns.OptionType.make(2), b"\x00\x00\x07")])
    [event] = pub.receive(response.to_wire(), WALL + 0.1)
    assert isinstance(event, Published) and not event.granted and event.lease == DEFAULT_LEASE
    assert pub.counters["bad lease option"] == 1


def test_server_ignoring_the_lease_bind(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL + 10.0)
    [event] = pub.receive(respond(tx.payload, lease=None), WALL + 10.0)
    assert isinstance(event, Published) and not event.granted and event.lease == DEFAULT_LEASE
    state = pub.state
    assert state.server_ignores_lease and state.lease_granted is None and state.published
    assert state.next_refresh_at is not None
    assert WALL + 10.0 + 0.8 * DEFAULT_LEASE <= state.next_refresh_at <= WALL + 10.0 + 0.85 * DEFAULT_LEASE
    assert "ignores the lease" in state.message


@pytest.mark.parametrize(("error", "name", "advice"), [
    (dns.rcode.BADSIG, "BADSIG",
     "the TSIG key does not match the server's: check the account secret on both"),
    (dns.rcode.BADKEY, "BADKEY", "the server does not know our TSIG key"),
])
def test_unsigned_badsig_badkey(frozen: Callable[[float], None], error: int, name: str, advice: str) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    [event] = pub.receive(unsigned_tsig_error(tx.payload, error), WALL + 0.1)
    assert isinstance(event, Failed) and event.rcode == name and event.unsigned
    state = pub.state
    assert state.rcode == name and state.unsigned_error and not state.published and not state.pending
    assert advice in state.message and "unsigned" in state.message
    assert state.next_refresh_at == pytest.approx(WALL + 0.1 + 30, abs=1e-6)


def test_badtime_is_signed_and_reports_the_skew(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    server_time = int(WALL) + 1000
    wire = respond(tx.payload, rcode=dns.rcode.NOTAUTH, tsig_error=dns.rcode.BADTIME,
                   other=struct.pack("!HI", server_time >> 32, server_time & 0xFFFFFFFF))
    [event] = pub.receive(wire, WALL + 0.1)
    assert isinstance(event, Failed) and event.rcode == "BADTIME" and not event.unsigned
    assert "clocks differ by more than the fudge (300 s): fix the clock (NTP)" in pub.state.message
    assert "1000 s ahead of ours" in pub.state.message


def test_forged_badtime_is_dropped(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    wire = respond(tx.payload, rcode=dns.rcode.NOTAUTH, tsig_error=dns.rcode.BADTIME)
    forged = bytearray(wire)
    forged[-20] ^= 1  # inside the MAC
    assert pub.receive(bytes(forged), WALL + 0.1) == []
    assert pub.state.pending and pub.counters["tsig mac"] == 1


@pytest.mark.parametrize(("rcode", "name", "advice"), [
    (dns.rcode.REFUSED, "REFUSED", "the server refuses updates for this zone from us: check its update "
                                   "policy/ACL"),
    (dns.rcode.NOTAUTH, "NOTAUTH", "the server is not authoritative for the zone, or rejected the key"),
    (dns.rcode.SERVFAIL, "SERVFAIL", "check its logs"),
    (dns.rcode.NOTZONE, "NOTZONE", "outside the zone"),
])
def test_signed_error_rcodes(frozen: Callable[[float], None], rcode: int, name: str, advice: str) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    [event] = pub.receive(respond(tx.payload, rcode=rcode), WALL + 0.1)
    assert isinstance(event, Failed) and event.rcode == name and not event.unsigned
    assert pub.state.rcode == name and advice in pub.state.message and not pub.state.unsigned_error


def test_unsigned_refused_is_reported_as_unsigned(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    response = dns.message.make_response(dns.message.from_wire(tx.payload, keyring=False))
    response.set_rcode(dns.rcode.REFUSED)
    [event] = pub.receive(response.to_wire(), WALL + 0.1)
    assert isinstance(event, Failed) and event.rcode == "REFUSED" and event.unsigned


def _assert_unchanged(pub: PublisherView, before: du.PublisherState) -> None:
    assert pub.state == before
    assert pub.events == []


def test_wrong_id_is_dropped(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    before = pub.state
    wire = bytearray(respond(tx.payload, lease=1800))
    wire[0] ^= 0xFF
    assert pub.receive(bytes(wire), WALL + 0.1) == []
    assert pub.counters["wrong id"] == 1
    _assert_unchanged(pub, before)


def test_wrong_mac_is_dropped(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    before = pub.state
    # Signed by someone with another secret under our key name.
    query = server_parse(tx.payload)
    response = dns.message.make_response(query)
    response.use_tsig(dkey(OTHER_SECRET))
    response.request_mac = query.mac or b""
    assert pub.receive(response.to_wire(), WALL + 0.1) == []
    # Signed with the right key but without our request MAC (a replay from another exchange).
    response = dns.message.make_response(query)
    response.request_mac = b""
    assert pub.receive(response.to_wire(), WALL + 0.1) == []
    # Not signed at all, claiming success.
    bare = dns.message.make_response(dns.message.from_wire(tx.payload, keyring=False))
    assert pub.receive(bare.to_wire(), WALL + 0.1) == []
    assert pub.counters["tsig mac"] == 2 and pub.counters["unsigned success"] == 1
    _assert_unchanged(pub, before)
    # The genuine answer still gets through afterwards.
    assert isinstance(pub.receive(respond(tx.payload, lease=1800), WALL + 0.2)[0], Published)


def test_response_signed_far_from_our_clock_is_dropped(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    wire = respond(tx.payload, lease=1800)
    before = pub.state
    assert pub.receive(wire, WALL + 301) == []
    assert pub.counters["tsig time"] == 1
    _assert_unchanged(pub, before)


def test_answers_without_a_pending_update_or_not_answers(frozen: Callable[[float], None]) -> None:
    pub, payload = published()
    assert pub.receive(respond(payload, lease=1800), WALL + 1.0) == []  # a duplicate: already answered
    assert pub.counters["no update pending"] == 1
    query = dns.message.make_query("example.com.", "SOA")
    assert pub.receive(query.to_wire(), WALL + 1.0) == []
    assert pub.counters["not a response"] == 1
    answer = dns.message.make_response(query)
    assert pub.receive(answer.to_wire(), WALL + 1.0) == []
    assert pub.counters["not an update response"] == 1


def test_garbage_and_truncation_never_raise(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    good = respond(tx.payload, lease=1800)
    before = pub.state
    r = random.Random(7)
    samples = [b"", b"\x00", b"\xff" * 11, good[:12]] + [good[:n] for n in range(len(good))]
    samples += [r.randbytes(r.randrange(1, 200)) for _ in range(300)]
    samples += [good[:n] + r.randbytes(r.randrange(1, 40)) for n in range(0, len(good), 7)]
    for sample in samples:
        assert pub.receive(sample, WALL + 0.1) == []
    parse_errors = sum(v for k, v in pub.counters.items() if k.startswith("parse error"))
    assert parse_errors > 300
    _assert_unchanged(pub, before)


def test_no_bit_flip_is_accepted_except_tsig_name_case(frozen: Callable[[float], None]) -> None:
    """Every single-bit change of a good answer is dropped, except letter case in the TSIG's key and
    algorithm names, which enter the MAC lower-cased (RFC 8945 §4.3.3)."""
    good = respond(publisher(ZONE, ZONE, SECRET, rand=rng()).publish(records(), WALL).payload,
                   lease=1800)
    tsig = find_tsig(good)
    assert tsig is not None
    accepted = []
    for i in range(len(good)):
        for bit in range(8):
            pub = publisher(ZONE, ZONE, SECRET, rand=rng())
            pub.publish(records(), WALL)
            flipped = bytearray(good)
            flipped[i] ^= 1 << bit
            if pub.receive(bytes(flipped), WALL + 0.1):
                accepted.append((i, bit))
            else:
                assert not pub.events and pub.state.pending and not pub.state.published
    assert all(i > tsig.start and bit == 5 and chr(good[i]).isalpha() for i, bit in accepted), accepted


def test_truncated_answer_is_a_counted_parse_error(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    before = pub.state
    assert pub.receive(respond(tx.payload, lease=1800)[:-3], WALL + 0.1) == []
    assert pub.receive(b"", WALL + 0.1) == []
    assert pub.counters["parse error: truncated"] == 2  # the guard's reason for both
    _assert_unchanged(pub, before)


# -- timers --------------------------------------------------------------------------------------------


def test_retransmission_schedule_and_timeout() -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    sent = [(0.0, tx)]
    now = 0.0
    while True:
        deadline = pub.deadline()
        assert deadline is not None
        deadline -= WALL
        if deadline > 20:
            break
        now = deadline
        assert pub.poll(WALL + now - 0.001) == []
        sent += [(now, t) for t in pub.poll(WALL + now)]
    assert [t for t, _ in sent] == [0.0, 1.0, 3.0, 7.0]
    assert all(t.payload == tx.payload and t.message_id == tx.message_id for _, t in sent)
    state = pub.state
    assert state.rcode == "TIMEOUT" and state.message.startswith("timeout: is the server reachable?")
    assert not state.pending and not state.published
    assert isinstance(pub.events[-1], Failed) and pub.events[-1].rcode == "TIMEOUT"
    assert pub.deadline() == pytest.approx(WALL + 15.0 + 30.0, abs=1e-6)
    [retry] = pub.poll(WALL + 45)
    assert retry.message_id != tx.message_id and pub.state.pending
    # The retry backoff doubles after another timeout.
    for t in (46.0, 48.0, 52.0, 60.0):
        pub.poll(WALL + t)
    assert pub.state.next_refresh_at == pytest.approx(WALL + 60.0 + 60.0, abs=1e-6)


def test_timeout_message_names_dropped_answers(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    pub.receive(respond(tx.payload, lease=1800), WALL + 1000)  # our clock is off: dropped
    for t in (1.0, 3.0, 7.0, 15.0):
        pub.poll(WALL + t)
    assert "answers dropped: tsig time x1" in pub.state.message


def test_lease_expires_when_refreshes_fail(frozen: Callable[[float], None]) -> None:
    pub, _ = published(lease=1800)
    now = 0.0
    for _ in range(200):
        deadline = pub.deadline()
        if deadline is None or deadline - WALL >= 1800:
            break
        now = deadline - WALL
        pub.poll(WALL + now)  # nobody answers
    assert pub.state.published
    assert pub.deadline() == WALL + 1800.0  # the expiry is a timer of its own
    pub.poll(WALL + 1800.0)
    assert not pub.state.published and "lease ran out" in pub.state.message
    # Retries while the lease ran were spaced to fit about nine into the remaining time.
    timeouts = [e for e in pub.events if isinstance(e, Failed)]
    assert len(timeouts) >= 5


def test_endpoint_change_republishes_at_once(frozen: Callable[[float], None]) -> None:
    pub, _ = published(lease=1800)
    extra = dns.rrset.from_text("AutoTunnel-02-1c-b3-ff-fe-09-85-15.example.com.", 120, "IN", "AAAA",
                                "2001:db8::7")
    tx = pub.publish([*records(), extra], WALL + 5.0)
    pub.receive(respond(tx.payload, lease=1800), WALL + 5.1)
    new = records(port=62000, ipv4="203.0.113.9")
    tx = pub.endpoint_changed(new, WALL + 10)
    assert pub.state.pending and pub.counters["endpoint changed"] == 1
    frozen(WALL + 10)
    summary = update_summary(server_parse(tx.payload))
    deletes = {(s[0], s[1]) for s in summary if s[2] == "ANY"}
    adds = {(s[0], s[1], s[4]) for s in summary if s[2] == "-"}
    # The AAAA outer address is gone from the new set, and its old RRset is deleted all the same.
    assert ("AutoTunnel-02-1c-b3-ff-fe-09-85-15.example.com.", "AAAA") in deletes
    assert ("AutoTunnel-02-1c-b3-ff-fe-09-85-15.example.com.", "A", ("203.0.113.9",)) in adds
    assert ("_autotunnel._udp.host.example.com.", "SRV",
            ("0 0 62000 AutoTunnel-02-1c-b3-ff-fe-09-85-15.example.com.",)) in adds
    assert not any(s[1] == "AAAA" and s[0].startswith("AutoTunnel") for s in summary if s[2] == "-")
    [event] = pub.receive(respond(tx.payload, lease=1800), WALL + 10)
    assert isinstance(event, Published)


def test_late_answer_to_a_superseded_update_is_dropped(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    old = pub.publish(records(), WALL)
    pub.endpoint_changed(records(port=62000), WALL + 0.5)
    assert pub.receive(respond(old.payload, lease=1800), WALL + 0.6) == []
    assert pub.counters["wrong id"] == 1 and pub.state.pending


def test_withdraw_deletes_our_rrsets(frozen: Callable[[float], None]) -> None:
    pub, _ = published(lease=1800)
    tx = pub.withdraw(WALL + 20.0)
    assert tx is not None
    msg = server_parse(tx.payload)
    summary = update_summary(msg)
    assert all(s[2] == "ANY" and s[4] == () for s in summary)
    assert {(s[0], s[1]) for s in summary} == {
        (r.name.to_text(), dns.rdatatype.to_text(r.rdtype)) for r in records()}
    assert not [o for o in msg.options if o.otype == 2]  # deletions are permanent: no lease
    [event] = pub.receive(respond(tx.payload), WALL + 20.1)
    assert isinstance(event, Withdrawn)
    state = pub.state
    assert not state.published and state.withdrawn and not state.pending
    assert pub.deadline() is None and pub.poll(WALL + 1e6) == []
    assert pub.withdraw(WALL + 30.0) is None  # nothing left to delete


def test_withdraw_before_any_answer_still_deletes(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    pub.publish(records(), WALL)  # never answered: the server may still have applied it
    tx = pub.withdraw(WALL + 1.0)
    assert tx is not None
    assert len(update_summary(server_parse(tx.payload))) == len(records())


def test_withdraw_timeout_does_not_retry() -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    pub.publish(records(), WALL)
    pub.withdraw(WALL + 1.0)
    for t in (2.0, 4.0, 8.0, 16.0):
        pub.poll(WALL + t)
    assert pub.state.rcode == "TIMEOUT" and pub.deadline() is None


# -- pure TSIG functions -------------------------------------------------------------------------------

# miekg/dns tsig_test.go @ 06480ef90059d62156439d0c12717b6288610869 (BSD-3-Clause): `wireMsg`, an UPDATE
# for example.com signed with key "testkey." (hmac-sha256), time signed 1594855491, fudge 300.
MIEKG_WIRE = bytes.fromhex(
    "c60028000001000000010001076578616d706c6503636f6d00000600010161c00c0001000100000e100004c0000201077465"
    "73746b65790000fa00ff00000000003d0b686d61632d73686132353600" + f"{1594855491:012x}"
    + "012c00208cf23e0081d915478a182edcea7ff48ad102948e6c7ef8e887536957d1fa5616c60000000000")
MIEKG_KEY = TsigKey(dns.name.from_text("testkey."),
                    base64.b64decode("NoTCJU+DMqFWywaPyxSijrDEA/eC3nK0xi3AMEZuPVk="))
MIEKG_TIME = 1594855491


def test_miekg_vector_verifies_and_our_signer_reproduces_it() -> None:
    tsig = tsig_verify(MIEKG_WIRE, MIEKG_KEY, b"", MIEKG_TIME)
    assert tsig.mac.hex() == "8cf23e0081d915478a182edcea7ff48ad102948e6c7ef8e887536957d1fa5616"
    unsigned = MIEKG_WIRE[:10] + struct.pack("!H", 0) + MIEKG_WIRE[12:tsig.start]
    signed, mac = tsig_sign(unsigned, MIEKG_KEY, MIEKG_TIME)
    assert signed == MIEKG_WIRE and mac == tsig.mac


def test_miekg_vector_mac_before_time() -> None:
    for now in (MIEKG_TIME + 301, MIEKG_TIME - 301):
        with pytest.raises(TsigError, match="time"):
            tsig_verify(MIEKG_WIRE, MIEKG_KEY, b"", now)
    assert tsig_verify(MIEKG_WIRE, MIEKG_KEY, b"", MIEKG_TIME + 300).time_signed == MIEKG_TIME
    # Wrong time signed *and* far from now: the MAC is checked first (miekg "we should see ErrSig").
    tampered = MIEKG_WIRE.replace(bytes.fromhex(f"{MIEKG_TIME:012x}"),
                                  bytes.fromhex(f"{MIEKG_TIME + 1:012x}"))
    with pytest.raises(TsigError, match="mac"):
        tsig_verify(tampered, MIEKG_KEY, b"", MIEKG_TIME + 10_000)
    with pytest.raises(TsigError, match="key"):
        tsig_verify(MIEKG_WIRE, TsigKey(dns.name.from_text("other."), MIEKG_KEY.secret), b"", MIEKG_TIME)
    with pytest.raises(TsigError, match="algorithm"):
        tsig_verify(MIEKG_WIRE, TsigKey(MIEKG_KEY.name, MIEKG_KEY.secret, "hmac-md5"), b"", MIEKG_TIME)


def test_miekg_vector_is_accepted_by_dnspython_too(frozen: Callable[[float], None]) -> None:
    frozen(MIEKG_TIME)
    msg = dns.message.from_wire(MIEKG_WIRE, keyring=dns.tsig.Key("testkey.", MIEKG_KEY.secret))
    assert msg.had_tsig


def test_tsig_original_id_allows_id_substitution() -> None:
    signed = bytearray(MIEKG_WIRE)
    signed[0:2] = b"\x00\x2a"  # a forwarder changed the ID: Original ID keeps the MAC valid
    tsig_verify(bytes(signed), MIEKG_KEY, b"", MIEKG_TIME)


def test_find_tsig_rejects_bad_framing() -> None:
    with pytest.raises(ParseError):
        find_tsig(MIEKG_WIRE[:-1])
    with pytest.raises(ParseError):
        find_tsig(MIEKG_WIRE + b"\x00")
    with pytest.raises(ParseError):
        find_tsig(b"\x00" * 5)


# -- the option class and helpers ----------------------------------------------------------------------


def test_update_lease_option_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    # Constructed by hand from the RFC 9664 §4 layout.
    assert UpdateLeaseOption(7200).to_wire() == encode_update_lease(7200) == bytes.fromhex("00001c20")
    assert encode_update_lease(7200, 604800) == bytes.fromhex("00001c2000093a80")
    assert decode_update_lease(bytes.fromhex("00001c2000093a80")) == (7200, 604800)
    for bad in (b"", b"\x00" * 3, b"\x00" * 5, b"\x00" * 9):
        with pytest.raises(ParseError):
            decode_update_lease(bad)
    msg = dns.message.make_query("example.com.", "SOA")
    msg.use_edns(0, options=[UpdateLeaseOption(7200, 604800)])
    wire = msg.to_wire()
    assert bytes.fromhex("0002000800001c2000093a80") in wire
    [generic] = dns.message.from_wire(wire).options  # importing does not register the class
    assert isinstance(generic, dns.edns.GenericOption)
    assert decode_update_lease(generic.to_wire() or b"") == (7200, 604800)
    malformed = dns.message.make_query("example.com.", "SOA")
    malformed.use_edns(0, options=[dns.edns.GenericOption(dns.edns.OptionType.make(2), b"\x00" * 5)])
    bad = malformed.to_wire()
    dns.message.from_wire(bad)  # unregistered: other parsers in the process still see the bad option
    with monkeypatch.context() as m:  # the registry is global: restore it afterwards
        m.setattr(dns.edns, "_type_to_class", dict(dns.edns._type_to_class))
        dns.edns.register_type(UpdateLeaseOption, dns.edns.OptionType.make(UPDATE_LEASE_OPTION_CODE))
        [option] = dns.message.from_wire(wire).options
        assert isinstance(option, UpdateLeaseOption) and (option.lease, option.key_lease) == (7200, 604800)
        with pytest.raises(dns.exception.FormError):
            dns.message.from_wire(bad)
    assert isinstance(dns.message.from_wire(wire).options[0], dns.edns.GenericOption)


def test_srv_query_and_target_selection() -> None:
    query = build_srv_query("example.com", rng())
    msg = dns.message.from_wire(query.payload)
    assert msg.id == query.message_id and msg.flags & dns.flags.RD
    assert [(q.name.to_text(), q.rdtype) for q in msg.question] == [
        ("_dns-update._udp.example.com.", dns.rdatatype.SRV)]
    answer = dns.message.make_response(msg)
    answer.answer.append(dns.rrset.from_text(
        "_dns-update._udp.example.com.", 300, "IN", "SRV",
        "10 0 53 backup.example.net.", "0 0 53 ns1.example.net.", "0 0 5353 ns2.example.net."))
    wire = answer.to_wire()
    picks = {pick_srv_target(wire, query, rng(seed)) for seed in range(30)}
    assert picks == {("ns1.example.net", 53), ("ns2.example.net", 5353)}  # never the priority-10 one
    weighted = dns.message.make_response(msg)
    weighted.answer.append(dns.rrset.from_text(
        "_dns-update._udp.example.com.", 300, "IN", "SRV", "0 0 53 never.example.net.",
        "0 100 53 always.example.net."))
    chosen = [pick_srv_target(weighted.to_wire(), query, rng(seed)) for seed in range(50)]
    assert chosen.count(("always.example.net", 53)) > 40
    empty = dns.message.make_response(msg)
    empty.set_rcode(dns.rcode.NXDOMAIN)
    assert pick_srv_target(empty.to_wire(), query) is None
    dot = dns.message.make_response(msg)
    dot.answer.append(dns.rrset.from_text("_dns-update._udp.example.com.", 300, "IN", "SRV", "0 0 0 ."))
    assert pick_srv_target(dot.to_wire(), query) is None
    other = build_srv_query("example.com", rng(99))
    with pytest.raises(ParseError):
        pick_srv_target(wire, other)
    with pytest.raises(ParseError):
        pick_srv_target(wire[:-2], query)


def test_startup_delay() -> None:
    delays = [startup_delay(rng(seed)) for seed in range(200)]
    assert all(0.0 <= d <= 3.0 for d in delays)
    assert all(abs(d * 100 - round(d * 100)) < 1e-9 for d in delays)
    assert max(delays) > 2.0 and min(delays) < 1.0


# -- the shared browse PTR, against our own server core ----------------------------------------------------


def test_devices_share_the_browse_ptr_without_deleting_each_other() -> None:
    """Every device publishes `_autotunnel._udp.DOMAIN PTR` to itself into one shared RRset. Replacing
    that RRset (as a device does with its own records) would delete the others from discovery; the
    Publisher deletes and adds only its own record there (RFC 2136 §2.5.4)."""
    import ipaddress

    from tests.helpers import drbg
    from tunneld.crypto.kdf import derive_tsig_key
    from tunneld.dnsserver.core import DnsCore, account_key
    from tunneld.dnsserver.store import ZoneStore
    from tunneld.proto import records

    domain, secret = "home.example.net", bytes(range(32))
    store = ZoneStore(":memory:", domain + ".", "ns." + domain + ".", 53)
    server = DnsCore(store, [account_key(secret, domain)])
    wall = 1_700_000_000.0
    browse = records.browse_name(domain)

    def device(name: str, key: bytes, seed: int) -> tuple[PublisherView, list[dns.rrset.RRset]]:
        host = records.HostRecords.derive(name, domain, key, 4500, (ipaddress.IPv4Address("192.0.2.7"),))
        pub = publisher(domain, domain, derive_tsig_key(secret, domain), rand=drbg(seed),
                        shared=[(browse, dns.rdatatype.PTR)])
        return pub, records.build(host, 300)

    def run(pub: PublisherView, tx: Update | None) -> None:
        assert tx is not None
        reply = server.handle(tx.payload, ("192.0.2.7", 5353), wall)
        assert reply is not None
        events = pub.receive(reply, wall)
        assert events and not isinstance(events[-1], Failed), events

    def ptr_targets() -> set[str]:
        return {rr.rdata.to_text() for rr in store.rrset(browse, dns.rdatatype.PTR, wall)}

    a, a_records = device("laptop", bytes(range(1, 33)), 1)
    b, b_records = device("desktop", bytes(range(2, 34)), 2)
    run(a, a.publish(a_records, wall))
    run(b, b.publish(b_records, wall))
    both = ptr_targets()
    assert len(both) == 2
    run(a, a.publish(a_records, wall))  # a refresh of a's records keeps b's PTR
    assert ptr_targets() == both
    run(a, a.withdraw(wall))  # a leaves: only a's PTR goes
    remaining = ptr_targets()
    assert len(remaining) == 1 and remaining < both
    assert store.rrset(records.host_name(domain, "desktop"), dns.rdatatype.AAAA, wall)


# -- the core face: source, start-up delay, goodbye ---------------------------------------------------


def test_answers_from_anywhere_but_the_server_are_dropped(frozen: Callable[[float], None]) -> None:
    pub = publisher(ZONE, ZONE, SECRET, rand=rng())
    tx = pub.publish(records(), WALL)
    answer = respond(tx.payload, lease=1800)
    host, port = SERVER
    assert pub.receive(answer, WALL + 0.1, source=("203.0.113.9", port)) == []
    assert pub.receive(answer, WALL + 0.1, source=(host, port + 1)) == []
    assert pub.counters["not from the server"] == 2 and pub.state.pending
    [event] = pub.receive(answer, WALL + 0.1)
    assert isinstance(event, Published)


def test_first_registration_waits_for_the_startup_delay(frozen: Callable[[float], None]) -> None:
    """RFC 9664 §4.2: the first UPDATE leaves after the delay (records given meanwhile replace the
    pending ones); later publications leave at once."""
    core = Publisher(ZONE, ZONE, SECRET, rand=rng(), server=SERVER, start_delay=2.5)
    core.publish(records(), WALL)
    assert core.transmits() == [] and core.deadline() == WALL + 2.5
    core.endpoint_changed(records(port=62000), WALL + 1)
    assert core.transmits() == []
    core.poll(WALL + 2.49)
    assert core.transmits() == []
    core.poll(WALL + 2.5)
    [first] = core.transmits()
    assert "62000" in server_parse(first.payload).to_text()
    core.receive(respond(first.payload, lease=1800), SERVER, WALL + 2.6)
    core.endpoint_changed(records(port=62001), WALL + 3)
    assert len(core.transmits()) == 1


def test_close_withdraws_and_finishes_when_answered(frozen: Callable[[float], None]) -> None:
    pub, _ = published(lease=1800)
    assert not pub.finished()
    pub.core.close(WALL + 1)
    [withdrawal] = pub.core.transmits()
    assert not pub.finished() and pub.state.withdrawn
    pub.core.publish(records(), WALL + 1.5)  # closed: nothing is published again
    assert pub.core.transmits() == []
    pub.core.receive(respond(withdrawal.payload), SERVER, WALL + 1.1)
    assert pub.finished() and isinstance(pub.core.events()[-1], Withdrawn)
    never = Publisher(ZONE, ZONE, SECRET, rand=rng(), server=SERVER)
    never.close(WALL)
    assert never.finished() and never.transmits() == []  # nothing published: nothing to say
