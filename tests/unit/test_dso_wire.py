"""The DSO (RFC 8490) and DNS Push (RFC 8765) wire, and the stream framing (RFC 7766).

Known answers are built by hand from the RFCs' layouts (the section is cited beside each); every TLV and
message kind round-trips; every class of malformed input raises ParseError. The fuzz invariant: for any
bytes up to 64 KB -- random, or valid DSO messages cut, bit-flipped, spliced, padded or with a compression
pointer planted -- :func:`dso_wire.decode` returns a message that re-encodes to the same bytes, or raises
ParseError and nothing else; and :class:`FrameBuffer` fed any stream in any pieces yields exactly the
messages framed into it, or raises ParseError.
"""

from __future__ import annotations

import random
import struct

import dns.name
import dns.rdata
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.proto import dso_wire as d
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.errors import ParseError

SLOW = settings(max_examples=10_000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**64 - 1)

NAME = dns.name.from_text("_ssh._tcp.example.com.")
NAME_WIRE = b"\x04_ssh\x04_tcp\x07example\x03com\x00"
HOST = dns.name.from_text("h1.example.com.")
HOST_WIRE = b"\x02h1\x07example\x03com\x00"


def header(msg_id: int, flags: int = 0x30, low: int = 0, counts: bytes = bytes(8)) -> bytes:
    """RFC 8490 §5.4: ID, QR|OPCODE(6)|AA|TC|RD (0x30 = OPCODE 6 in bits 3..6), RA|Z|AD|CD|RCODE, counts 0."""
    return struct.pack("!HBB", msg_id, flags, low) + counts


def tlv(dso_type: int, value: bytes) -> bytes:
    return struct.pack("!HH", dso_type, len(value)) + value  # RFC 8490 §5.4


def rr(owner: bytes, rtype: int, rclass: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata  # RFC 8765 §6.3


def a(text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text("IN", "A", text)


def ptr(target: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text("IN", "PTR", target)


def records_of(message: d.DsoMessage) -> tuple[d.PushRecord, ...]:
    assert isinstance(message.primary, d.Push)
    return message.primary.records


def check_kat(wire: bytes, message: d.DsoMessage) -> None:
    assert d.encode(message) == wire
    assert d.decode(wire) == message


# -- known answers ------------------------------------------------------------------------------------------


def test_keepalive_request_and_response() -> None:
    # RFC 8490 §7.1: KEEPALIVE, 8 bytes: inactivity timeout 15 s, keepalive interval 1 h (ms, u32 each).
    value = bytes.fromhex("00003a98" "0036ee80")
    request = header(0x1234) + tlv(0x0001, value)
    assert request.hex() == "123430000000000000000000" "00010008" "00003a980036ee80"
    check_kat(request, d.DsoMessage(0x1234, (d.Keepalive(15_000, 3_600_000),)))
    # The response: QR set (0xB0), same ID, the server's values in a Response Primary TLV (§7.1).
    response = header(0x1234, 0xB0) + tlv(0x0001, bytes.fromhex("ffffffff" "00002710"))
    check_kat(response, d.DsoMessage(0x1234, (d.Keepalive(d.INFINITE, d.MIN_KEEPALIVE_INTERVAL),),
                                     response=True))
    # A server's unidirectional KEEPALIVE (ID 0) is allowed too (§7.1).
    check_kat(header(0) + tlv(1, value), d.DsoMessage(0, (d.Keepalive(15_000, 3_600_000),)))


def test_retry_delay_unidirectional_with_its_reason() -> None:
    # RFC 8490 §7.2: a server's unidirectional RETRY DELAY (ID 0) carries the reason as RCODE (5 REFUSED).
    wire = header(0, 0x30, 5) + tlv(0x0002, bytes.fromhex("00001388"))
    message = d.decode(wire)
    assert message == d.DsoMessage(0, (d.RetryDelay(5000),), rcode=5)
    assert message.unidirectional and message.primary == d.RetryDelay(5000)
    assert d.encode(message) == wire


def test_error_response_without_tlvs() -> None:
    # RFC 8490 §5.4: an unknown primary TLV gets a response with RCODE DSOTYPENI (11) and no TLVs.
    check_kat(header(0x0101, 0xB0, 11), d.DsoMessage(0x0101, (), response=True, rcode=d.RCODE_DSOTYPENI))


def test_subscribe() -> None:
    # RFC 8765 §6.2: SUBSCRIBE TLV 0x0040 = NAME (uncompressed) | TYPE | CLASS, in a request (ID != 0).
    wire = header(7) + tlv(0x0040, NAME_WIRE + bytes.fromhex("000c" "0001"))
    check_kat(wire, d.DsoMessage(7, (d.Subscribe(NAME, 12, 1),)))
    # The acknowledgement: a response with no TLV (§6.2).
    check_kat(header(7, 0xB0), d.DsoMessage(7, (), response=True))


def test_push_every_change_kind() -> None:
    # RFC 8765 §6.3: change notifications NAME|TYPE|CLASS|TTL|RDLEN|RDATA, in a unidirectional PUSH.
    value = (rr(HOST_WIRE, 1, 1, 60, bytes([192, 0, 2, 1]))  # added, TTL 60
             + rr(HOST_WIRE, 1, 1, 0xFFFFFFFF, bytes([192, 0, 2, 2]))  # this one RR deleted
             + rr(HOST_WIRE, 28, 1, 0xFFFFFFFE, b"")  # the AAAA RRset deleted
             + rr(HOST_WIRE, 255, 1, 0xFFFFFFFE, b"")  # every RRset of the name deleted
             + rr(HOST_WIRE, 255, 255, 0xFFFFFFFE, b""))  # ... in every class
    wire = header(0) + tlv(0x0041, value)
    records = (d.PushRecord.add(HOST, 60, a("192.0.2.1")), d.PushRecord.delete(HOST, a("192.0.2.2")),
               d.PushRecord.delete_rrset(HOST, 28), d.PushRecord.delete_name(HOST),
               d.PushRecord.delete_name(HOST, d.CLASS_ANY))
    check_kat(wire, d.DsoMessage(0, (d.Push(records),)))
    kinds = [(r.added, r.collective) for r in records_of(d.decode(wire))]
    assert kinds == [(True, False), (False, False), (False, True), (False, True), (False, True)]


def test_push_rdata_names_are_uncompressed() -> None:
    # A PTR's target in full (RFC 8765 §6.3), not a pointer back to the owner.
    value = rr(NAME_WIRE, 12, 1, 120, HOST_WIRE)
    wire = header(0) + tlv(0x0041, value)
    check_kat(wire, d.DsoMessage(0, (d.Push((d.PushRecord.add(NAME, 120, ptr("h1.example.com.")),)),)))


def test_unsubscribe_and_reconfirm() -> None:
    # RFC 8765 §6.4: UNSUBSCRIBE 0x0042 carries the SUBSCRIBE's MESSAGE ID (u16), unidirectional.
    check_kat(header(0) + tlv(0x0042, b"\x00\x07"), d.DsoMessage(0, (d.Unsubscribe(7),)))
    # RFC 8765 §6.5: RECONFIRM 0x0043 = NAME | TYPE | CLASS | RDATA (to the TLV's end), unidirectional.
    wire = header(0) + tlv(0x0043, NAME_WIRE + bytes.fromhex("000c0001") + HOST_WIRE)
    check_kat(wire, d.DsoMessage(0, (d.Reconfirm(NAME, ptr("h1.example.com.")),)))


def test_padding_and_unknown_tlvs() -> None:
    # RFC 8490 §7.3: ENCRYPTION PADDING (0x0003), additional only; we send zeros and ignore what arrives.
    wire = header(9) + tlv(1, bytes(8)) + tlv(0x0003, bytes(6))
    check_kat(wire, d.DsoMessage(9, (d.Keepalive(0, 0), d.EncryptionPadding(6))))
    assert d.decode(header(9) + tlv(1, bytes(8)) + tlv(3, b"junk")).tlvs[1] == d.EncryptionPadding(4)
    # RFC 8490 §5.4: unknown TLVs are kept for the session to answer (primary) or ignore (additional).
    wire = header(3) + tlv(0xF901, b"abc") + tlv(0x0003, b"") + tlv(0xBEEF, b"")
    message = d.decode(wire)
    assert message.tlvs == (d.UnknownTlv(0xF901, b"abc"), d.EncryptionPadding(0), d.UnknownTlv(0xBEEF, b""))
    assert d.tlv_type(message.tlvs[0]) == 0xF901 and d.encode(message) == wire


def test_header_bits_are_ignored_on_receipt() -> None:
    # RFC 8490 §5.4: AA, TC, RD, RA, Z, AD, CD are sent as zero and ignored when received.
    message = d.decode(header(4, 0x30 | 0x07, 0xF0) + tlv(1, bytes(8)))
    assert message == d.DsoMessage(4, (d.Keepalive(0, 0),))
    assert d.encode(message)[2:4] == b"\x30\x00"


# -- round trips --------------------------------------------------------------------------------------------

ROUND_TRIPS = [
    d.DsoMessage(1, (d.Keepalive(0, 0),)),
    d.DsoMessage(0xFFFF, (d.Keepalive(0xFFFFFFFF, 0xFFFFFFFF), d.EncryptionPadding(300)), response=True),
    d.DsoMessage(0, (d.RetryDelay(0xFFFFFFFF),), rcode=2),
    d.DsoMessage(2, (d.RetryDelay(1),), response=True, rcode=15),
    d.DsoMessage(5, (d.Subscribe(dns.name.root, 255, 255),)),
    d.DsoMessage(5, (d.Subscribe(NAME, 33, 1), d.EncryptionPadding(0), d.UnknownTlv(9, b"x"))),
    d.DsoMessage(0, (d.Push(tuple(d.PushRecord.add(HOST, t, a(f"192.0.2.{t % 256}"))
                                  for t in (0, 1, 0x7FFFFFFF))),)),
    d.DsoMessage(0, (d.Push((d.PushRecord.add(NAME, 5, dns.rdata.from_text("IN", "TXT", '"a" "" "b"')),
                             d.PushRecord.add(NAME, 5, dns.rdata.from_text("IN", "SRV", "0 5 22 h1.ex.")),
                             d.PushRecord.add(NAME, 5, dns.rdata.from_text("IN", "TYPE65280", r"\# 0")),
                             d.PushRecord.delete_rrset(NAME, 65280, 3))),)),
    d.DsoMessage(0, (d.Unsubscribe(0xFFFF),)),
    d.DsoMessage(0, (d.Reconfirm(HOST, dns.rdata.from_text("IN", "AAAA", "2001:db8::1")),)),
    d.DsoMessage(0x42, (d.UnknownTlv(0x0004, bytes(65535 - 16)),)),  # the largest message
]


@pytest.mark.parametrize("message", ROUND_TRIPS)
def test_round_trip(message: d.DsoMessage) -> None:
    wire = d.encode(message)
    assert d.decode(wire) == message
    assert d.encode(d.decode(wire)) == wire


# -- malformed input ----------------------------------------------------------------------------------------

KA = tlv(1, bytes(8))
LONG_NAME = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"  # 257 octets: over 255

MALFORMED = {  # case: (the reason refused, the bytes)
    "empty": ("truncated", b""),
    "short header": ("truncated", header(1)[:11]),
    "wrong opcode (QUERY)": ("not a DSO message", header(1, 0x00) + KA),
    "wrong opcode (UPDATE)": ("not a DSO message", header(1, 0x28) + KA),
    "QDCOUNT": ("DSO counts not zero", header(1, counts=bytes.fromhex("0001000000000000")) + KA),
    "ANCOUNT": ("DSO counts not zero", header(1, counts=bytes.fromhex("0000000100000000")) + KA),
    "NSCOUNT": ("DSO counts not zero", header(1, counts=bytes.fromhex("0000000000010000")) + KA),
    "ARCOUNT": ("DSO counts not zero", header(1, counts=bytes.fromhex("0000000000000001")) + KA),
    "no primary TLV": ("no primary TLV", header(1)),
    "truncated TLV header": ("truncated TLV", header(1) + KA + b"\x00\x03\x00"),
    "TLV length past the end": ("TLV past the end", header(1) + tlv(1, bytes(8))[:-1]),
    "padding as primary": ("padding as the primary TLV", header(1) + tlv(3, b"")),
    "response to a unidirectional message": ("response to a unidirectional message", header(0, 0xB0)),
    "RCODE in a request": ("RCODE in a request", header(1, 0x30, 1) + KA),
    "RCODE in a unidirectional PUSH": ("RCODE in a request",
        header(0, 0x30, 2) + tlv(0x41, rr(HOST_WIRE, 1, 1, 1, bytes(4)))),
    "keepalive length": ("keepalive length", header(1) + tlv(1, bytes(7))),
    "retry delay length": ("retry delay length", header(0) + tlv(2, bytes(5))),
    "unidirectional SUBSCRIBE": ("TLV must be a request", header(0) + tlv(0x40, NAME_WIRE + bytes(4))),
    "SUBSCRIBE trailing bytes": ("subscribe length", header(1) + tlv(0x40, NAME_WIRE + bytes(5))),
    "SUBSCRIBE short": ("subscribe length", header(1) + tlv(0x40, NAME_WIRE + bytes(3))),
    "SUBSCRIBE name compressed": ("bad pointer", header(1) + tlv(0x40, b"\x02h1\xc0\x0c" + bytes(4))),
    "SUBSCRIBE name a pointer": ("bad pointer", header(1) + tlv(0x40, b"\xc0\x00" + bytes(4))),
    "SUBSCRIBE name too long": ("name too long", header(1) + tlv(0x40, LONG_NAME + bytes(4))),
    "SUBSCRIBE label type 0x40": ("bad label type", header(1) + tlv(0x40, b"\x41" + bytes(4))),
    "SUBSCRIBE name unterminated": ("truncated", header(1) + tlv(0x40, b"\x05abc")),
    "PUSH in a request": ("TLV must be unidirectional",
        header(1) + tlv(0x41, rr(HOST_WIRE, 1, 1, 1, bytes(4)))),
    "PUSH empty": ("empty PUSH", header(0) + tlv(0x41, b"")),
    "PUSH owner compressed": ("bad pointer", header(0) + tlv(0x41, rr(b"\x02h1\xc0\x10", 1, 1, 1, bytes(4)))),
    # As a compressing sender writes them (offsets from the DSO message's start: the owner is at 16): the
    # guard reads the pointer's target in its own layout, so the reason is whichever rule it breaks there.
    "PUSH RDATA name compressed": (None, header(0) + tlv(0x41, rr(HOST_WIRE, 12, 1, 1, b"\x02h2\xc0\x13"))),
    "PUSH RDATA pointer to the owner": (None, header(0) + tlv(0x41, rr(HOST_WIRE, 12, 1, 1, b"\xc0\x10"))),
    # Pointers to a real name in the guard's layout (the records from offset 12): the guard lets them
    # through, and the RDATA read alone does not parse.
    "PUSH RDATA name, guard-valid pointer": ("malformed RDATA",
        header(0) + tlv(0x41, rr(HOST_WIRE, 12, 1, 1, b"\x02h2\xc0\x0f"))),
    "PUSH RDATA pointer to the owner, guard-valid": ("malformed RDATA",
        header(0) + tlv(0x41, rr(HOST_WIRE, 12, 1, 1, b"\xc0\x0c"))),
    "PUSH RDATA pointer inside it": ("compressed or non-canonical RDATA",
        header(0) + tlv(0x41, rr(HOST_WIRE, 33, 1, 1, bytes(5) + b"\x16\xc0\x00"))),
    "PUSH record truncated": ("truncated record",
        header(0) + tlv(0x41, rr(HOST_WIRE, 1, 1, 1, bytes(4))[:-5])),
    "PUSH RDATA past the TLV": ("record past the end",
        header(0) + tlv(0x41, rr(HOST_WIRE, 1, 1, 1, bytes(4))[:-1])),
    "PUSH reserved TTL": ("PUSH TTL", header(0) + tlv(0x41, rr(HOST_WIRE, 1, 1, 0x80000000, bytes(4)))),
    "PUSH reserved TTL 0xFFFFFFFD": ("PUSH TTL",
        header(0) + tlv(0x41, rr(HOST_WIRE, 1, 1, 0xFFFFFFFD, bytes(4)))),
    "PUSH collective deletion with RDATA": ("collective deletion with RDATA",
        header(0) + tlv(0x41, rr(HOST_WIRE, 1, 1, 0xFFFFFFFE, bytes(4)))),
    "PUSH addition in class ANY": ("meta class in a record",
        header(0) + tlv(0x41, rr(HOST_WIRE, 1, 255, 60, bytes(4)))),
    "PUSH deletion in class NONE": ("meta class in a record",
        header(0) + tlv(0x41, rr(HOST_WIRE, 1, 254, 0xFFFFFFFF, bytes(4)))),
    "PUSH OPT record": ("meta type in a record", header(0) + tlv(0x41, rr(b"\x00", 41, 1232, 60, b""))),
    "PUSH TSIG record": ("meta type in a record", header(0) + tlv(0x41, rr(HOST_WIRE, 250, 255, 0, b""))),
    "PUSH malformed A": ("malformed RDATA", header(0) + tlv(0x41, rr(HOST_WIRE, 1, 1, 60, bytes(3)))),
    "PUSH malformed TXT": ("malformed RDATA", header(0) + tlv(0x41, rr(HOST_WIRE, 16, 1, 60, b"\x05ab"))),
    "PUSH NSEC bitmap ending in zero": ("malformed RDATA",
        header(0) + tlv(0x41, rr(HOST_WIRE, 47, 1, 60, HOST_WIRE + b"\x00\x01\x00"))),
    "UNSUBSCRIBE length": ("unsubscribe length", header(0) + tlv(0x42, b"\x00\x07\x00")),
    "UNSUBSCRIBE of ID 0": ("unsubscribe of message ID 0", header(0) + tlv(0x42, b"\x00\x00")),
    "UNSUBSCRIBE in a request": ("TLV must be unidirectional", header(3) + tlv(0x42, b"\x00\x07")),
    "RECONFIRM short": ("truncated TLV", header(0) + tlv(0x43, NAME_WIRE + b"\x00\x0c")),
    "RECONFIRM of type ANY": ("meta type in a record",
        header(0) + tlv(0x43, NAME_WIRE + bytes.fromhex("00ff0001"))),
    "RECONFIRM RDATA compressed": (None,
        header(0) + tlv(0x43, NAME_WIRE + bytes.fromhex("000c0001") + b"\xc0\x10")),
    "RECONFIRM RDATA, guard-valid pointer": ("malformed RDATA",
        header(0) + tlv(0x43, NAME_WIRE + bytes.fromhex("000c0001") + b"\xc0\x0c")),
    "too many TLVs": ("too many TLVs", header(1) + KA + tlv(3, b"") * d.MAX_TLVS),
    "too many PUSH records": ("too many PUSH records",
        header(0) + tlv(0x41, rr(b"\x00", 1, 1, 1, bytes(4)) * (d.MAX_PUSH_RECORDS + 1))),
    "oversized": ("oversized", header(1) + KA + tlv(3, bytes(65535 - 28 + 1))),
}


@pytest.mark.parametrize(("reason", "wire"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_raises_parse_error(reason: str | None, wire: bytes) -> None:
    with pytest.raises(ParseError) as e:
        d.decode(wire)
    assert reason is None or str(e.value) == reason  # refused for the rule the case breaks, not by accident


def test_the_malformed_cases_are_one_change_from_valid() -> None:
    """The limits are exactly where they claim: one TLV fewer, one record fewer, one byte less is valid."""
    assert len(d.decode(header(1) + KA + tlv(3, b"") * (d.MAX_TLVS - 1)).tlvs) == d.MAX_TLVS
    push = d.decode(header(0) + tlv(0x41, rr(b"\x00", 1, 1, 1, bytes(4)) * d.MAX_PUSH_RECORDS))
    assert len(records_of(push)) == d.MAX_PUSH_RECORDS
    assert len(d.encode(d.decode(header(1) + KA + tlv(3, bytes(65535 - 28))))) == 65535
    name = dns.name.from_wire(LONG_NAME[:-65] + b"\x3d" + b"a" * 61 + b"\x00", 0)[0]  # 255 octets: fits
    assert d.decode(d.encode(d.DsoMessage(1, (d.Subscribe(name, 1),)))).tlvs[0] == d.Subscribe(name, 1)


def test_compression_refused_for_the_right_reason() -> None:
    """A pointer in a name is refused as a pointer (owner and SUBSCRIBE names, by the guard's rules); in
    RDATA, by the guard, or as RDATA that does not parse alone or does not re-encode to itself. An SRV
    whose target points at its own first octet (0: the root) passes the guard and dnspython: only the
    re-encoding shows it."""
    for case in ("SUBSCRIBE name compressed", "PUSH owner compressed"):
        assert MALFORMED[case][0] == "bad pointer"
    for case in ("PUSH RDATA name, guard-valid pointer", "PUSH RDATA pointer to the owner, guard-valid",
                 "RECONFIRM RDATA, guard-valid pointer"):
        assert MALFORMED[case][0] == "malformed RDATA"
    assert MALFORMED["PUSH RDATA pointer inside it"][0] == "compressed or non-canonical RDATA"
    wire = MALFORMED["PUSH RDATA pointer inside it"][1]
    srv = wire[-8:]
    assert dns.rdata.from_wire("IN", "SRV", srv, 0, len(srv)).to_text() == "0 0 22 ."  # what dnspython reads


def test_encoder_refuses_what_the_decoder_would() -> None:
    bad = [
        d.DsoMessage(1, ()),  # no primary TLV
        d.DsoMessage(0, (), response=True),
        d.DsoMessage(1, (d.EncryptionPadding(4),)),
        d.DsoMessage(0, (d.Subscribe(NAME, 1),)),
        d.DsoMessage(1, (d.Push((d.PushRecord.add(HOST, 1, a("192.0.2.1")),)),)),
        d.DsoMessage(1, (d.Keepalive(0, 0),), rcode=1),
        d.DsoMessage(0x10000, (d.Keepalive(0, 0),)),
        d.DsoMessage(1, (d.Keepalive(1 << 32, 0),)),
        d.DsoMessage(1, (d.Subscribe(dns.name.from_text("relative", None), 1),)),
        d.DsoMessage(0, (d.Push(()),)),
        d.DsoMessage(0, (d.Push((d.PushRecord(HOST, 1, 1, 0x80000000, a("192.0.2.1")),)),)),
        d.DsoMessage(0, (d.Push((d.PushRecord(HOST, 1, 1, d.DELETE_COLLECTIVE_TTL, a("192.0.2.1")),)),)),
        d.DsoMessage(0, (d.Push((d.PushRecord(HOST, 28, 1, 5, a("192.0.2.1")),)),)),  # type mismatch
        d.DsoMessage(0, (d.Push((d.PushRecord.add(HOST, 1, a("192.0.2.1")),) * (d.MAX_PUSH_RECORDS + 1)),)),
        d.DsoMessage(0, (d.Unsubscribe(0),)),
        d.DsoMessage(1, (d.Keepalive(0, 0), d.EncryptionPadding(65535))),
        d.DsoMessage(1, (d.Keepalive(0, 0), d.EncryptionPadding(40000), d.EncryptionPadding(40000))),
        d.DsoMessage(1, (d.Keepalive(0, 0),) + (d.EncryptionPadding(0),) * d.MAX_TLVS),
        d.DsoMessage(1, (d.UnknownTlv(d.DSO_KEEPALIVE, bytes(8)),)),  # would decode as a Keepalive
        d.DsoMessage(1, (d.UnknownTlv(0x10000, b""),)),
    ]
    for message in bad:
        with pytest.raises(ValueError):
            d.encode(message)


def test_push_over_the_guard_budget_is_refused_at_both_ends() -> None:
    """Names in RDATA cost dnspython work the DNS guard budgets; a PUSH over it is refused on receipt, so
    the encoder refuses it too (the sender splits it) rather than send what its peer will drop."""
    deep = dns.name.from_text(".".join(["a"] * 120) + ".")  # 121 labels: costly in RDATA
    record = d.PushRecord.add(HOST, 1, dns.rdata.from_text("IN", "PTR", deep.to_text()))
    with pytest.raises(ValueError, match="guard"):
        d.encode(d.DsoMessage(0, (d.Push((record,) * 60),)))
    wire = header(0) + tlv(0x41, record.wire() * 60)
    with pytest.raises(ParseError, match="budget"):
        d.decode(wire)
    one = d.decode(d.encode(d.DsoMessage(0, (d.Push((record,)),))))
    assert one == d.DsoMessage(0, (d.Push((record,)),))


# -- stream framing -----------------------------------------------------------------------------------------


def test_frame_buffer_reassembles_any_split() -> None:
    messages = [header(1) + KA, header(0) + tlv(0x42, b"\x00\x01"), bytes(65535)]
    stream = b"".join(frame(m) for m in messages)
    assert stream[:2] == b"\x00\x18"  # RFC 1035 §4.2.2: a 2-byte length, big-endian (24 bytes here)
    for chunk in (1, 2, 3, 1000, len(stream)):
        buf, out = FrameBuffer(), []
        for i in range(0, len(stream), chunk):
            buf.feed(stream[i:i + chunk])
            while (m := buf.next()) is not None:
                out.append(m)
        assert out == messages and buf.at_boundary


def test_frame_buffer_limits() -> None:
    buf = FrameBuffer()
    buf.feed(b"\x00")
    assert not buf.at_boundary and buf.next() is None
    with pytest.raises(ParseError, match="shorter"):
        buf.feed(b"\x0b")  # 11 bytes: no DNS header fits
    small = FrameBuffer(max_message=512, max_buffered=2000)
    small.feed(frame(bytes(512))[:100])
    with pytest.raises(ParseError, match="oversized"):
        FrameBuffer(max_message=512).feed(b"\x02\x01")  # 513 bytes: refused before the body arrives
    small.feed(frame(bytes(512))[100:] + frame(bytes(512)) + frame(bytes(12)))  # pipelined, within the cap
    with pytest.raises(ParseError, match="full"):
        small.feed(bytes(1000))
    assert [len(m) for m in iter(small.next, None)] == [512, 512, 12]
    with pytest.raises(ValueError):
        frame(bytes(11))
    with pytest.raises(ValueError):
        frame(bytes(65536))
    with pytest.raises(ValueError):
        FrameBuffer(max_message=1000, max_buffered=1001)


# -- fuzzing ------------------------------------------------------------------------------------------------


def _name(rnd: random.Random) -> dns.name.Name:
    return rnd.choice([NAME, HOST, dns.name.root, dns.name.from_text(f"d{rnd.randrange(99)}.example.")])


def _record(rnd: random.Random) -> d.PushRecord:
    name, kind = _name(rnd), rnd.randrange(5)
    rdata = rnd.choice([a(f"192.0.2.{rnd.randrange(256)}"), ptr(_name(rnd).to_text()),
                        dns.rdata.from_text("IN", "TXT", f'"{"x" * rnd.randrange(100)}"'),
                        dns.rdata.from_text("IN", "SRV", f"0 0 {rnd.randrange(65536)} {_name(rnd)}")])
    if kind == 0:
        return d.PushRecord.delete(name, rdata)
    if kind == 1:
        return d.PushRecord.delete_rrset(name, rnd.choice([1, 12, 16, 33]))
    if kind == 2:
        return d.PushRecord.delete_name(name, rnd.choice([1, 255]))
    return d.PushRecord.add(name, rnd.choice([0, 60, 0x7FFFFFFF]), rdata)


_POOL_RANDOM = random.Random(17)
RECORDS: tuple[d.PushRecord, ...] = tuple(_record(_POOL_RANDOM) for _ in range(200))
"""Change notifications the fuzz cases draw from (building dnspython RDATA is most of a case's cost)."""


def valid_message(rnd: random.Random) -> d.DsoMessage:
    kind = rnd.randrange(7)
    padding: tuple[d.Tlv, ...] = (d.EncryptionPadding(rnd.randrange(64)),) if rnd.random() < 0.3 else ()
    msg_id = rnd.randrange(1, 65536)
    if kind == 0:
        return d.DsoMessage(msg_id, (d.Keepalive(rnd.getrandbits(32), rnd.getrandbits(32)), *padding),
                            response=rnd.random() < 0.5)
    if kind == 1:
        return d.DsoMessage(0, (d.RetryDelay(rnd.getrandbits(32)), *padding), rcode=rnd.randrange(16))
    if kind == 2:
        return d.DsoMessage(msg_id, (d.Subscribe(_name(rnd), rnd.choice([12, 33, 255])), *padding))
    if kind == 3:
        return d.DsoMessage(0, (d.Push(tuple(rnd.choices(RECORDS, k=rnd.randrange(1, 60)))), *padding))
    if kind == 4:
        return d.DsoMessage(0, (d.Unsubscribe(msg_id), *padding))
    if kind == 5:
        return d.DsoMessage(0, (d.Reconfirm(_name(rnd), ptr(_name(rnd).to_text())), *padding))
    return d.DsoMessage(msg_id, (), response=True, rcode=rnd.randrange(16))


def mutate(rnd: random.Random, wire: bytes) -> bytes:
    data = bytearray(wire)
    for _ in range(rnd.randrange(1, 4)):
        op = rnd.randrange(6)
        if op == 0 and data:
            del data[rnd.randrange(len(data)):]  # cut
        elif op == 1 and data:
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)  # flip a bit
        elif op == 2 and data:
            i = rnd.randrange(len(data))
            data[i:i + 2] = bytes([0xC0 | rnd.randrange(64), rnd.randrange(256)])  # a pointer
        elif op == 3:
            data += rnd.randbytes(rnd.randrange(64))  # trailing junk
        elif op == 4 and len(data) > 16:
            i = rnd.randrange(12, len(data) - 1)
            data[i:i + 2] = rnd.randbytes(2)  # a TLV or record length
        elif op == 5:
            data = data[:rnd.randrange(len(data) + 1)] + data  # spliced onto itself
    return bytes(data[:70_000])


def decode_property(wire: bytes) -> None:
    try:
        message = d.decode(wire)
    except ParseError:
        return
    assert d.encode(message) == _canonical(wire)  # what decodes re-encodes to the same bytes


def _canonical(wire: bytes) -> bytes:
    """``wire`` with what decoding drops: the ignored header bits zeroed, padding contents zeroed."""
    out = bytearray(wire)
    out[2] &= 0xF8
    out[3] &= 0x0F
    p = 12
    while p < len(out):
        t, n = struct.unpack_from("!HH", out, p)
        if t == d.DSO_ENCRYPTION_PADDING:
            out[p + 4:p + 4 + n] = bytes(n)
        p += 4 + n
    return bytes(out)


def fuzz_case(seed: int) -> None:
    rnd = random.Random(seed)
    message = valid_message(rnd)
    wire = d.encode(message)
    assert d.decode(wire) == message
    for _ in range(6):
        decode_property(mutate(rnd, wire))
    decode_property(rnd.randbytes(rnd.randrange(70_000)))
    chunks, stream = FrameBuffer(), frame(wire) * 3
    out = []
    p = 0
    while p < len(stream):
        n = rnd.randrange(1, 4096)
        chunks.feed(stream[p:p + n])
        out.extend(iter(chunks.next, None))
        p += n
    assert out == [wire] * 3


@QUICK
@given(seed=seeds)
@pytest.mark.quick_twin
def test_decode_fuzz(seed: int) -> None:
    fuzz_case(seed)


@pytest.mark.slow
@SLOW
@given(seed=seeds)
def test_decode_fuzz_10k(seed: int) -> None:
    fuzz_case(seed)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048))
def test_decode_and_framing_on_hypothesis_bytes(data: bytes) -> None:
    decode_property(data)
    decode_property(bytes.fromhex("000030000000000000000000") + data)  # behind a valid DSO header
    buf = FrameBuffer(max_message=1024, max_buffered=4096)
    try:
        buf.feed(data)
        while (m := buf.next()) is not None:
            assert 12 <= len(m) <= 1024
    except ParseError:
        pass
