"""tunneld.proto.xfr and the multi-message TSIG of tunneld.proto.tsig: zone transfers, checked against
answers that dnspython renders and signs (its own multi-message TSIG, RFC 8945 §5.3.1, is the reference).

``render`` below plays the primary: it parses our request with dnspython (so the request must verify
there), cuts the answer's records into messages and signs them with ``dns.message.Message.to_wire(
multi=True, tsig_ctx=...)``, feeding the unsigned ones into the context as dnspython's own reader does.
The results, applied to a zone, are also compared with what dnspython's IXFR client (``dns.xfr.Inbound``)
makes of the same answer.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Sequence

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.versioned
import dns.xfr
import pytest

from tunneld.crypto.kdf import derive_front_key
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.dnsguard import HEADER_SIZE, check
from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import TsigError, TsigKey, TsigStream, sign
from tunneld.proto.xfr import (
    MAX_XFR_RECORDS,
    Diff,
    Full,
    Incremental,
    TransferQuery,
    TransferReader,
    UpToDate,
    ZoneRecord,
    front_key,
    read_message,
    serial_gt,
    transfer_query,
)

ZONE = dns.name.from_text("home.example.net.")
KEY = front_key(bytes(range(32)), "Home.Example.NET.")
OTHER_KEY = TsigKey(KEY.name, bytes(32))
DP_KEY = KEY.dnspython()


def soa(serial: int, ttl: int = 3600, refresh: int = 60) -> ZoneRecord:
    rdata = dns.rdata.from_text("IN", "SOA",
                                f"ns.home.example.net. admin.home.example.net. {serial} {refresh} 30 600 60")
    return ZoneRecord(ZONE, ttl, rdata)


def rec(owner: str, rdtype: str, text: str, ttl: int = 120) -> ZoneRecord:
    return ZoneRecord(dns.name.from_text(owner, ZONE), ttl, dns.rdata.from_text("IN", rdtype, text))


def devices(n: int, start: int = 0) -> list[ZoneRecord]:
    return list(_devices(max(3000, start + n))[start:start + n])


@functools.cache
def _devices(n: int) -> tuple[ZoneRecord, ...]:
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append(rec(f"d{i}", "AAAA", f"fd00::{i:x}"))
        elif kind == 1:
            out.append(rec(f"d{i}", "TXT", f'"v=1" "k={i:064x}"'))
        else:
            out.append(rec("_tunneld._udp", "PTR", f"d{i}._tunneld._udp.home.example.net."))
    return tuple(out)


def render(query: TransferQuery, records: Sequence[ZoneRecord], *, per_message: int = 50,
           signed_every: int = 1, key: dns.tsig.Key = DP_KEY, sign_last: bool = True,
           question_every: bool = True, rcode: int = 0, msg_id: int | None = None) -> list[bytes]:
    """The primary's answer to ``query``: ``records`` cut into messages of ``per_message``, every
    ``signed_every``-th message signed (and the last, unless ``sign_last`` is False)."""
    q = dns.message.from_wire(query.wire, keyring={DP_KEY.name: DP_KEY})  # verifies our request
    plain = dns.message.from_wire(query.wire, keyring=False)
    chunks = [list(records[i:i + per_message]) for i in range(0, len(records), per_message)] or [[]]
    out: list[bytes] = []
    ctx = None
    for n, chunk in enumerate(chunks):
        last = n == len(chunks) - 1
        signed = n == 0 or n % signed_every == 0 or (last and sign_last)
        msg = dns.message.make_response(plain)
        msg.set_rcode(rcode)
        if msg_id is not None:
            msg.id = msg_id
        if n and not question_every:
            msg.question = []
        for r in chunk:
            rrset = dns.rrset.RRset(r.owner, dns.rdataclass.IN, r.rdata.rdtype)
            rrset.add(r.rdata, r.ttl)
            msg.answer.append(rrset)
        if signed:
            msg.use_tsig({key.name: key}, key.name, original_id=msg.id)
            msg.request_mac = q.mac
            wire = msg.to_wire(multi=True, tsig_ctx=ctx)
            ctx = msg.tsig_ctx
        else:
            wire = msg.to_wire()
            assert ctx is not None
            ctx.update(wire)
        out.append(wire)
    return out


def read_all(reader: TransferReader, messages: Sequence[bytes], now: float | None = None) -> object:
    """Feed the messages through a FrameBuffer as one TCP stream would; the one result."""
    now = time.time() if now is None else now
    buf = FrameBuffer()
    result = None
    for wire in messages:
        buf.feed(frame(wire))
        got = buf.next()
        assert got is not None
        out = reader.feed(got, now)
        if out is not None:
            assert result is None
            result = out
    return result


def ixfr(serial: int) -> TransferQuery:
    return transfer_query(ZONE, KEY, 0x1234, time.time(), current=soa(serial))


def axfr() -> TransferQuery:
    return transfer_query(ZONE, KEY, 0x4321, time.time())


# -- queries ---------------------------------------------------------------------------------------------


def test_ixfr_query_verifies_with_dnspython_and_carries_our_soa() -> None:
    q = ixfr(7)
    msg = dns.message.from_wire(q.wire, keyring={DP_KEY.name: DP_KEY})  # raises unless the TSIG verifies
    assert msg.had_tsig and msg.mac == q.mac and msg.id == 0x1234
    assert not msg.flags & dns.flags.QR and not msg.flags & dns.flags.RD
    assert [(r.name, r.rdtype, r.rdclass) for r in msg.question] == [
        (ZONE, dns.rdatatype.IXFR, dns.rdataclass.IN)]
    assert len(msg.authority) == 1 and msg.authority[0].rdtype == dns.rdatatype.SOA
    assert msg.authority[0].name == ZONE and msg.authority[0][0].serial == 7  # RFC 1995 §3
    assert not msg.answer


def test_axfr_query_has_the_question_alone() -> None:
    q = axfr()
    msg = dns.message.from_wire(q.wire, keyring={DP_KEY.name: DP_KEY})
    assert [(r.name, r.rdtype) for r in msg.question] == [(ZONE, dns.rdatatype.AXFR)]
    assert not msg.answer and not msg.authority and msg.had_tsig and q.current is None


def test_query_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        transfer_query(dns.name.from_text("rel", None), KEY, 1, 0)
    with pytest.raises(ValueError):
        transfer_query(ZONE, KEY, 0x10000, 0)
    with pytest.raises(ValueError):
        transfer_query(ZONE, KEY, 1, 0, current=rec("a", "A", "192.0.2.1"))


# -- the multi-message TSIG (RFC 8945 §5.3.1) ------------------------------------------------------------


@pytest.mark.parametrize("signed_every", [1, 2, 7, 100])  # 100: 99 unsigned in a row, the most allowed
def test_tsig_stream_verifies_dnspython_multi_message_signing(signed_every: int) -> None:
    q = axfr()
    messages = render(q, [soa(9), *devices(600), soa(9)], per_message=3, signed_every=signed_every)
    stream = TsigStream(KEY, q.mac)
    signed = [stream.feed(m, time.time()) is not None for m in messages]
    stream.finish()
    assert signed[0] and signed[-1] and sum(signed) >= len(messages) // signed_every
    assert not all(signed) or signed_every == 1


def test_tsig_stream_refuses_100_unsigned_in_a_row_and_an_unsigned_last() -> None:
    q = axfr()
    messages = render(q, [soa(9), *devices(300), soa(9)], per_message=2, signed_every=101)
    stream = TsigStream(KEY, q.mac)
    for m in messages[:100]:  # the first, signed, and 99 unsigned
        stream.feed(m, None)
    with pytest.raises(TsigError, match="no tsig"):  # the 100th unsigned in a row
        stream.feed(messages[100], None)
    messages = render(q, [soa(9), *devices(10), soa(9)], per_message=2, signed_every=3, sign_last=False)
    stream = TsigStream(KEY, q.mac)
    for m in messages:
        stream.feed(m, None)
    with pytest.raises(TsigError, match="no tsig"):
        stream.finish()


def test_tsig_stream_refuses_a_changed_unsigned_message_a_wrong_key_and_an_unsigned_first() -> None:
    q = axfr()
    messages = render(q, [soa(9), *devices(20), soa(9)], per_message=4, signed_every=2)
    stream = TsigStream(KEY, q.mac)
    stream.feed(messages[0], None)
    tampered = bytearray(messages[1])
    tampered[-1] ^= 1  # inside an unsigned message: caught by the next signed one
    assert stream.feed(bytes(tampered), None) is None
    with pytest.raises(TsigError, match="mac"):
        stream.feed(messages[2], None)
    with pytest.raises(TsigError, match="mac"):
        TsigStream(OTHER_KEY, q.mac).feed(messages[0], None)
    with pytest.raises(TsigError, match="mac"):  # the first MAC covers the request's
        TsigStream(KEY, b"\x00" * 32).feed(messages[0], None)
    unsigned = dns.message.make_response(dns.message.from_wire(q.wire, keyring=False)).to_wire()
    with pytest.raises(TsigError, match="no tsig"):  # the first message must be signed
        TsigStream(KEY, q.mac).feed(unsigned, None)


def test_tsig_stream_checks_the_time_of_every_signed_message() -> None:
    q = axfr()
    messages = render(q, [soa(9), *devices(8), soa(9)], per_message=4)
    stream = TsigStream(KEY, q.mac)
    stream.feed(messages[0], time.time())
    with pytest.raises(TsigError, match="time"):
        stream.feed(messages[1], time.time() + 3600)


# -- AXFR ------------------------------------------------------------------------------------------------


def test_axfr_gives_the_whole_zone_in_order() -> None:
    q = axfr()
    zone = devices(500)
    messages = render(q, [soa(42), *zone, soa(42)], per_message=64, signed_every=3)
    result = read_all(TransferReader(q, KEY), messages)
    assert isinstance(result, Full)
    assert result.serial == 42 and result.soa == soa(42)
    assert list(result.records) == zone


def test_axfr_of_an_empty_zone_and_in_one_message() -> None:
    q = axfr()
    result = read_all(TransferReader(q, KEY), render(q, [soa(1), soa(1)]))
    assert result == Full(soa(1), ())
    result = read_all(TransferReader(q, KEY), render(q, [soa(1), *devices(5), soa(1)], per_message=100))
    assert isinstance(result, Full) and len(result.records) == 5


def test_axfr_later_messages_may_leave_the_question_out() -> None:
    q = axfr()
    messages = render(q, [soa(3), *devices(30), soa(3)], per_message=7, question_every=False)
    assert isinstance(read_all(TransferReader(q, KEY), messages), Full)


def test_axfr_keeps_ttls_as_sent() -> None:
    q = axfr()
    odd = rec("d1", "AAAA", "fd00::1", ttl=0x80000000)  # dnspython would read 0
    result = read_all(TransferReader(q, KEY), render(q, [soa(3), odd, soa(3)]))
    assert isinstance(result, Full) and result.records[0].ttl == 0x80000000


# -- IXFR ------------------------------------------------------------------------------------------------


def test_ixfr_single_soa_is_up_to_date_for_our_serial_or_older() -> None:
    for theirs in (10, 9, (10 - 26) % (1 << 32)):  # the last is older across the wrap (RFC 1982)
        q = ixfr(10)
        assert read_all(TransferReader(q, KEY), render(q, [soa(theirs)])) == UpToDate(theirs)


def test_ixfr_incremental_sequences() -> None:
    q = ixfr(10)
    a, b, c = devices(3)
    d = rec("d9", "AAAA", "fd00::9")
    answer = [soa(12), soa(10), a, soa(11), b, c, soa(11), b, soa(12), d, soa(12)]
    result = read_all(TransferReader(q, KEY), render(q, answer, per_message=2, signed_every=2))
    assert result == Incremental(soa(12), (Diff(10, (a,), 11, (b, c)), Diff(11, (b,), 12, (d,))))
    assert isinstance(result, Incremental) and result.serial == 12


def test_ixfr_across_the_serial_wrap() -> None:
    q = ixfr(0xFFFFFFFF)
    answer = [soa(2), soa(0xFFFFFFFF), soa(2), *devices(2), soa(2)]
    result = read_all(TransferReader(q, KEY), render(q, answer))
    assert result == Incremental(soa(2), (Diff(0xFFFFFFFF, (), 2, tuple(devices(2))),))


def test_ixfr_answered_axfr_style_is_full() -> None:
    q = ixfr(10)
    zone = devices(40)
    result = read_all(TransferReader(q, KEY), render(q, [soa(15), *zone, soa(15)], per_message=9))
    assert result == Full(soa(15), tuple(zone))


def test_a_first_message_with_the_soa_alone_waits_for_more() -> None:
    q = ixfr(10)
    messages = render(q, [soa(11), soa(10), soa(11), *devices(3), soa(11)], per_message=1)
    reader = TransferReader(q, KEY)
    assert reader.feed(messages[0], time.time()) is None
    assert isinstance(read_all(reader, messages[1:]), Incremental)


# -- malformed answers: each raises ParseError, and the reader stays dead --------------------------------


def _refused(q: TransferQuery, messages: Sequence[bytes], reason: str) -> None:
    reader = TransferReader(q, KEY)
    with pytest.raises(ParseError, match=reason):
        read_all(reader, messages)
    with pytest.raises(ParseError, match="after the end"):
        reader.feed(messages[0], time.time())


def test_malformed_sequences_are_refused() -> None:
    q = ixfr(10)
    a, b = devices(2)
    cases = [
        ([a, soa(11)], "does not start with the SOA"),
        ([soa(12), soa(10), a, soa(9), b, soa(12)], "serial going backwards"),
        ([soa(12), soa(10), a, soa(13), b, soa(12)], "SOA sequence broken"),
        ([soa(12), soa(10), a, soa(11), b, soa(12)], "SOA sequence broken"),
        ([soa(12), soa(10), soa(12), b, soa(12), a], "records after the final SOA"),
        ([soa(12), a, soa(13)], "SOA sequence broken"),
        ([soa(12), a, soa(12, refresh=61)], "SOA sequence broken"),  # the same SOA again, not another
        ([soa(10), a, soa(10)], "records after an up-to-date SOA"),
        # not our serial: AXFR-style, and then a second SOA
        ([soa(12), soa(9), a, soa(12)], "SOA sequence broken"),
        ([soa(12), rec("x.example.org.", "A", "192.0.2.1"), soa(12)], "outside the zone"),
        ([soa(12), ZoneRecord(dns.name.from_text("sub", ZONE), 60, soa(1).rdata), soa(12)],
         "SOA off the apex"),
    ]
    for answer, reason in cases:
        _refused(q, render(q, answer, per_message=2), reason)


def test_answers_that_end_unfinished_wait_and_the_wrong_answers_are_refused() -> None:
    q = ixfr(10)
    reader = TransferReader(q, KEY)
    assert read_all(reader, render(q, [soa(12), soa(10), *devices(3)])) is None  # the rest never came
    _refused(q, render(q, [soa(12), soa(12)], rcode=dns.rcode.REFUSED), "rcode 5")
    _refused(q, render(q, [soa(12), soa(12)], msg_id=0x9999), "tsig|message ID")
    _refused(axfr(), render(q, [soa(12), soa(12)]), "tsig")  # the other query's MAC
    _refused(q, render(q, [soa(12), soa(12)], key=OTHER_KEY.dnspython()), "tsig: mac")
    _refused(q, render(q, [soa(12), *devices(9), soa(12)], per_message=2, signed_every=2, sign_last=False),
             "tsig: no tsig")


def test_wrong_question_and_unsigned_or_truncated_messages_are_refused() -> None:
    q = ixfr(10)
    other = transfer_query(dns.name.from_text("other.example.net."), KEY, q.msg_id, time.time(), None)
    # an AXFR question for another zone, signed over our request's MAC
    msg = dns.message.make_response(dns.message.from_wire(other.wire, keyring=False))
    msg.answer.append(dns.rrset.from_text(ZONE, 60, "IN", "SOA", "ns. a. 1 1 1 1 1"))
    wire, _ = sign(msg.to_wire(), KEY, int(time.time()), q.mac)
    _refused(q, [wire], "wrong question")
    bad = bytearray(render(q, [soa(12), soa(12)])[0])
    bad[2] |= 0x02  # TC, after signing: the MAC breaks first
    _refused(q, [bytes(bad)], "tsig: mac")
    msg = dns.message.make_response(dns.message.from_wire(q.wire, keyring=False))
    msg.flags |= dns.flags.TC
    wire, _ = sign(msg.to_wire(), KEY, int(time.time()), q.mac)
    _refused(q, [wire], "truncated over TCP")
    _refused(q, [b"\x00" * 5 + b"\x01" + b"\x00" * 6], "counts beyond the message")


def test_transfer_bounds() -> None:
    q = axfr()
    reader = TransferReader(q, KEY)
    reader.records = MAX_XFR_RECORDS - 1  # as if the transfer had gone on this long
    with pytest.raises(ParseError, match="too large"):
        read_all(reader, render(q, [soa(1), *devices(5)]))
    reader = TransferReader(q, KEY)
    reader.size = 16 * 1024 * 1024
    with pytest.raises(ParseError, match="too large"):
        read_all(reader, render(q, [soa(1)]))


def test_serial_arithmetic_rfc1982() -> None:
    assert serial_gt(1, 0) and serial_gt(0, 0xFFFFFFFF) and serial_gt(0x7FFFFFFF, 0)
    assert not serial_gt(0, 0) and not serial_gt(0, 1) and not serial_gt(0xFFFFFFFF, 0)
    assert not serial_gt(0x80000000, 0) and not serial_gt(0, 0x80000000)  # undefined: never newer


def test_a_dense_message_over_the_guards_default_budget_is_read() -> None:
    # A primary packs a transfer message to the brim; 1000 PTRs in one message cost dnspython more than
    # the guard lets a server's single message cost, and the reader's own cap (XFR_WORK_MAX) admits them
    # once the message's MAC has been checked.
    q = axfr()
    ptrs = [r for r in devices(3000) if r.rdtype == dns.rdatatype.PTR]
    messages = render(q, [soa(5), *ptrs, soa(5)], per_message=2000)
    assert len(messages) == 1 and len(messages[0]) < 65535
    with pytest.raises(ParseError, match="over the parse budget"):
        check(messages[0])
    result = read_all(TransferReader(q, KEY), messages)
    assert isinstance(result, Full) and list(result.records) == ptrs


def _signed(q: TransferQuery, answer: list[dns.rrset.RRset], flags: int = dns.flags.QR) -> bytes:
    """A one-message answer to ``q``, built by hand and signed over its MAC (so only the part under
    test is wrong)."""
    msg = dns.message.make_response(dns.message.from_wire(q.wire, keyring=False))
    msg.flags = dns.flags.Flag(flags)
    msg.answer = answer
    return sign(msg.to_wire(), KEY, int(time.time()), q.mac)[0]


def test_records_of_another_class_and_requests_are_refused() -> None:
    q = axfr()
    apex = dns.rrset.from_text(ZONE, 3600, "IN", "SOA", soa(3).rdata.to_text())
    chaos = dns.rrset.from_text(dns.name.from_text("d1", ZONE), 60, "CH", "TXT", '"x"')
    _refused(q, [_signed(q, [apex, chaos, apex])], "record class")
    _refused(q, [_signed(q, [apex, apex], flags=0)], "not a query response")
    assert read_all(TransferReader(q, KEY), [_signed(q, [apex, apex])]) == Full(soa(3), ())


def test_records_read_in_place_are_dnspython_s() -> None:
    # The answer records are read in place (names once per message, the SOAs by hand): the same owners,
    # TTLs and RDATA as dnspython's parse of the message, compression and mixed case included.
    q = ixfr(10)
    other_soa = rec("@", "SOA", "NS2.Other.example. Hostmaster.home.example.net. 11 7 8 9 10")
    answer = [soa(12), soa(10), rec("D1", "AAAA", "fd00::1"), other_soa, *devices(3), soa(12)]
    wire = render(q, answer, per_message=100)[0]
    parsed = dns.message.from_wire(wire, keyring=False, one_rr_per_rrset=True)
    reference = [(rrset.name, rrset.ttl, rdata) for rrset in parsed.answer for rdata in rrset]
    stream = TsigStream(KEY, q.mac)
    got = read_message(wire, q.msg_id, ZONE, dns.rdatatype.IXFR, stream, time.time(), first=True)
    assert [(r.owner, r.ttl, r.rdata) for r in got] == reference
    assert [r.rdata.to_text() for r in got] == [rdata.to_text() for _, _, rdata in reference]


def test_malformed_soa_meta_records_and_extended_rcodes_are_refused() -> None:
    q = axfr()
    apex = dns.rrset.from_text(ZONE, 3600, "IN", "SOA", soa(3).rdata.to_text())
    good = soa(3).rdata.to_wire()
    for data in (good + b"\0", good[:-1]):
        generic = dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.SOA, data)
        bad = dns.rrset.from_rdata(ZONE, 3600, generic)
        _refused(q, [_signed(q, [apex, bad, apex])], "malformed SOA")
    bad_aaaa = dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.AAAA, b"\0" * 5)
    _refused(q, [_signed(q, [apex, dns.rrset.from_rdata(ZONE, 60, bad_aaaa), apex])], "malformed DNS message")
    any_type = dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.ANY, b"")
    _refused(q, [_signed(q, [apex, dns.rrset.from_rdata(ZONE, 60, any_type), apex])], "record type")
    msg = dns.message.make_response(dns.message.from_wire(q.wire, keyring=False))
    msg.use_edns(0)
    msg.set_rcode(dns.rcode.BADVERS)  # 16: the header's rcode is 0, the OPT holds the rest
    msg.answer = [apex, apex]
    _refused(q, [sign(msg.to_wire(), KEY, int(time.time()), q.mac)[0]], "rcode 16")


def test_signed_garbage_read_in_place_raises_only_parse_errors() -> None:
    # Behind a valid MAC the records are read by hand: changed bytes, signed again, must still give
    # records or ParseError, nothing else.
    q = ixfr(10)
    body = render(q, [soa(12), soa(10), rec("d1", "AAAA", "fd00::1"), soa(11), soa(11), *devices(4), soa(12)],
                  per_message=100, key=DP_KEY)[0]
    body = body[:10] + b"\0\0" + body[12:check(body)[-1].offset]  # the TSIG RR cut off
    rnd = random.Random(1995)
    read = 0
    for _ in range(3000):
        wire = bytearray(body)
        for _ in range(rnd.randrange(1, 4)):
            p = rnd.randrange(HEADER_SIZE, len(wire))
            if rnd.random() < 0.7:
                wire[p] ^= 1 << rnd.randrange(8)
            else:
                wire[p:p] = rnd.randbytes(rnd.randrange(1, 6))
        signed = sign(bytes(wire), KEY, int(time.time()), q.mac)[0]
        try:
            read_message(signed, q.msg_id, ZONE, dns.rdatatype.IXFR, TsigStream(KEY, q.mac), time.time(),
                         first=True)
        except ParseError:
            continue
        read += 1
    assert 0 < read < 3000  # some changes leave a readable message (a TTL, an address), most do not


def test_front_key_is_named_under_the_domain_with_the_derived_secret() -> None:
    assert KEY.name == dns.name.from_text("front.home.example.net.")
    assert KEY.name.to_text() == "front.home.example.net."  # lower case, absolute: as the stanzas print it
    assert KEY.algorithm == "hmac-sha256"
    assert KEY.secret == derive_front_key(bytes(range(32)), "home.example.net")
    with pytest.raises(ValueError):
        front_key(bytes(31), "home.example.net")


# -- dnspython's own transfer client as a second reference ------------------------------------------------


def _as_set(records: Sequence[ZoneRecord]) -> set[tuple[dns.name.Name, int, dns.rdata.Rdata]]:
    return {(r.owner, r.rdtype, r.rdata) for r in records}


def _dnspython_applies(base: Sequence[ZoneRecord], ours: int, messages: Sequence[bytes]) -> set[object]:
    """The zone after dnspython's IXFR client (dns.xfr.Inbound) applied the answer to ``base``."""
    zone = dns.versioned.Zone(ZONE, relativize=False)
    with zone.writer() as txn:
        for r in base:
            txn.add(r.owner, r.ttl, r.rdata)
    inbound = dns.xfr.Inbound(zone, dns.rdatatype.IXFR, serial=ours)
    done = False
    for wire in messages:
        assert not done
        done = inbound.process_message(dns.message.from_wire(wire, keyring=False, one_rr_per_rrset=True))
    assert done
    return {(name, rdataset.rdtype, rdata)
            for name, rdataset in zone.iterate_rdatasets() for rdata in rdataset}


def _we_apply(base: Sequence[ZoneRecord], result: object) -> set[object]:
    if isinstance(result, Full):
        return {*_as_set(result.records), *_as_set([result.soa])}
    assert isinstance(result, Incremental)
    zone = _as_set(base)
    for diff in result.diffs:
        zone -= _as_set(diff.removed)
        zone |= _as_set(diff.added)
    zone -= {r for r in zone if r[1] == dns.rdatatype.SOA}
    return zone | _as_set([result.soa])


@pytest.mark.parametrize("kind", ["incremental", "axfr-style"])
def test_results_apply_as_dnspython_applies_the_same_answer(kind: str) -> None:
    ns = rec("@", "NS", "ns.home.example.net.", ttl=3600)
    base = [soa(20), ns, *devices(300)]
    gone, moved, new = devices(300)[:40], devices(300)[40:60], devices(120, start=300)
    if kind == "incremental":
        answer = [soa(23), soa(20), *gone, soa(21), *new[:60], soa(21), *moved, soa(22), *moved[:5],
                  soa(22), soa(23), *new[60:], soa(23)]
    else:
        answer = [soa(23), ns, *devices(300)[40:], *new, soa(23)]
    q = ixfr(20)
    messages = render(q, answer, per_message=37, signed_every=4)
    result = read_all(TransferReader(q, KEY), messages)
    assert isinstance(result, Incremental if kind == "incremental" else Full)
    assert _we_apply(base, result) == _dnspython_applies(base, 20, messages)
