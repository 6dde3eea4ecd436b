"""tunneld.proto.notify_wire: the primary's NOTIFY (RFC 1996) and the front's SOA serial check, against
messages that dnspython builds and signs as a primary would (and dnspython verifying our answers)."""

from __future__ import annotations

import time

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from tests.unit.test_xfr import DP_KEY, KEY, OTHER_KEY, ZONE, soa
from tunneld.proto.errors import ParseError
from tunneld.proto.notify_wire import (
    MAX_NOTIFY,
    Notify,
    notify_response,
    read_notify,
    read_soa_answer,
    soa_query,
)

KEYRING = {DP_KEY.name: DP_KEY}


def notify(serial: int | None = 5, *, zone: dns.name.Name = ZONE, key: dns.tsig.Key | None = DP_KEY,
           rdtype: str = "SOA", qr: bool = False, opcode: int = dns.opcode.NOTIFY,
           authority: bool = False) -> dns.message.Message:
    """A NOTIFY as BIND sends it: question zone SOA, AA set, the new SOA in the answer."""
    msg = dns.message.make_query(zone, rdtype)
    msg.flags = dns.flags.Flag(dns.flags.AA | (dns.flags.QR if qr else 0))
    msg.set_opcode(dns.opcode.Opcode(opcode))
    if serial is not None:
        msg.answer.append(dns.rrset.from_text(zone, 3600, "IN", "SOA", soa(serial).rdata.to_text()))
    if authority:
        msg.authority.append(dns.rrset.from_text(zone, 3600, "IN", "NS", "ns.home.example.net."))
    if key is not None:
        msg.use_tsig({key.name: key}, key.name)
    return msg


def test_notify_with_its_serial_and_the_signed_response_dnspython_verifies() -> None:
    msg = notify(77)
    wire = msg.to_wire()
    got = read_notify(wire, ZONE, KEY, time.time())
    assert got == Notify(msg.id, ZONE, 77, msg.mac)
    response = notify_response(got, KEY, time.time())
    answer = dns.message.from_wire(response, keyring=KEYRING, request_mac=msg.mac)  # verifies, or raises
    assert answer.id == msg.id and answer.had_tsig
    assert answer.flags & dns.flags.QR and answer.flags & dns.flags.AA
    assert answer.opcode() == dns.opcode.NOTIFY
    assert answer.rcode() == dns.rcode.NOERROR
    assert [(q.name, q.rdtype) for q in answer.question] == [(ZONE, dns.rdatatype.SOA)]
    assert not answer.answer and not answer.authority


def test_notify_without_an_soa_has_no_serial() -> None:
    msg = notify(None)
    assert read_notify(msg.to_wire(), ZONE, KEY, time.time()).serial is None


@pytest.mark.parametrize(("msg", "reason"), [
    (notify(key=None), "tsig: no tsig"),
    (notify(key=OTHER_KEY.dnspython()), "tsig: mac"),
    (notify(zone=dns.name.from_text("other.example.net.")), "wrong question"),
    (notify(rdtype="A"), "wrong question"),
    (notify(qr=True), "not a NOTIFY"),
    (notify(opcode=dns.opcode.QUERY), "not a NOTIFY"),
    (notify(authority=True), "authority section"),
], ids=["unsigned", "other-key", "other-zone", "qtype", "response", "query", "authority"])
def test_notify_refused(msg: dns.message.Message, reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        read_notify(msg.to_wire(), ZONE, KEY, time.time())


def test_notify_refused_when_stale_oversized_or_not_the_apex_soa() -> None:
    wire = notify().to_wire()
    with pytest.raises(ParseError, match="original ID"):  # the ID is outside the MAC, so it is compared
        read_notify(bytes([wire[0] ^ 1]) + wire[1:], ZONE, KEY, time.time())
    with pytest.raises(ParseError, match="tsig: time"):
        read_notify(wire, ZONE, KEY, time.time() + 3600)
    msg = notify(None)
    msg.answer.append(dns.rrset.from_text(dns.name.from_text("sub", ZONE), 60, "IN", "SOA",
                                          soa(1).rdata.to_text()))
    with pytest.raises(ParseError, match="not the zone's SOA"):
        read_notify(msg.to_wire(), ZONE, KEY, time.time())
    msg = notify(None)
    for i in range(60):
        msg.answer.append(dns.rrset.from_text(ZONE, 60, "IN", "TXT", f'"{i:030}"'))
    wire = msg.to_wire()
    assert len(wire) > MAX_NOTIFY
    with pytest.raises(ParseError, match="oversized"):
        read_notify(wire, ZONE, KEY, time.time())


@pytest.mark.parametrize("serial", [0, 1, 2**31, 2**32 - 1])
def test_notify_serial_read_in_place_as_dnspython_reads_it(serial: int) -> None:
    # The NOTIFY is read without a dnspython parse: the question in any case, the SOA's owner and its
    # names compressed (dnspython compresses them against the question), the serial after them.
    msg = notify(serial)
    msg.question[0].name = dns.name.from_text("HOME.Example.NET.")
    wire = msg.to_wire()
    assert dns.message.from_wire(wire, keyring=KEYRING).answer[0][0].serial == serial
    assert read_notify(wire, ZONE, KEY, time.time()).serial == serial


def test_notify_with_a_malformed_soa_refused() -> None:
    good = soa(3).rdata.to_wire()  # two names and the five numbers
    for data in (good + b"\0", good[:-1]):
        msg = notify(None)
        rdata = dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.SOA, data)
        msg.answer.append(dns.rrset.from_rdata(ZONE, 60, rdata))
        with pytest.raises(ParseError):
            read_notify(msg.to_wire(), ZONE, KEY, time.time())


# -- the serial check ------------------------------------------------------------------------------------


def soa_answer(query_wire: bytes, serial: int | None = 9, *, aa: bool = True, rcode: int = 0,
               key: dns.tsig.Key = DP_KEY, tc: bool = False, extra: bool = False) -> bytes:
    q = dns.message.from_wire(query_wire, keyring=KEYRING)
    r = dns.message.make_response(q)
    if key is not DP_KEY:
        r.use_tsig({key.name: key}, key.name)
    r.flags |= (dns.flags.AA if aa else 0) | (dns.flags.TC if tc else 0)
    r.set_rcode(rcode)
    if serial is not None:
        r.answer.append(dns.rrset.from_text(ZONE, 3600, "IN", "SOA", soa(serial).rdata.to_text()))
    if extra:
        r.answer.append(dns.rrset.from_text(ZONE, 3600, "IN", "NS", "ns.home.example.net."))
    return r.to_wire()


def test_soa_query_verifies_with_dnspython_and_its_answer_gives_the_serial() -> None:
    q = soa_query(ZONE, KEY, 0xBEEF, time.time())
    msg = dns.message.from_wire(q.wire, keyring=KEYRING)
    assert msg.id == 0xBEEF and not msg.flags & dns.flags.RD and msg.mac == q.mac
    assert [(r.name, r.rdtype) for r in msg.question] == [(ZONE, dns.rdatatype.SOA)]
    assert read_soa_answer(soa_answer(q.wire, 0xFFFFFFFF), q, KEY, time.time()) == 0xFFFFFFFF


def test_soa_answers_refused() -> None:
    q = soa_query(ZONE, KEY, 0xBEEF, time.time())
    other = soa_query(ZONE, KEY, 0xBEEF, time.time() - 1)
    for wire, reason in [
        (soa_answer(q.wire, aa=False), "not authoritative"),
        (soa_answer(q.wire, None, rcode=dns.rcode.REFUSED), "rcode 5"),
        (soa_answer(q.wire, None), "no SOA"),
        (soa_answer(q.wire, tc=True), "truncated"),
        (soa_answer(q.wire, extra=True), "answer count"),
        (soa_answer(q.wire, key=OTHER_KEY.dnspython()), "tsig: mac"),
        (soa_answer(other.wire), "tsig: mac"),  # signed over another query's MAC
        (soa_answer(soa_query(ZONE, KEY, 0xBEEE, time.time()).wire), "message ID"),
        (notify().to_wire(), "message ID|not a query response|tsig"),
    ]:
        with pytest.raises(ParseError, match=reason):
            read_soa_answer(wire, q, KEY, time.time())


def test_soa_answer_with_the_zone_ns_in_authority_read() -> None:
    # BIND answers the SOA query with the zone's NS records in the authority section.
    q = soa_query(ZONE, KEY, 0xBEEF, time.time())
    r = dns.message.make_response(dns.message.from_wire(q.wire, keyring=KEYRING))
    r.flags |= dns.flags.AA
    r.answer.append(dns.rrset.from_text(ZONE, 3600, "IN", "SOA", soa(12).rdata.to_text()))
    r.authority.append(dns.rrset.from_text(ZONE, 3600, "IN", "NS", "ns.home.example.net."))
    assert read_soa_answer(r.to_wire(), q, KEY, time.time()) == 12


def test_soa_answer_with_an_extended_rcode_refused() -> None:
    q = soa_query(ZONE, KEY, 0xBEEF, time.time())
    r = dns.message.make_response(dns.message.from_wire(q.wire, keyring=KEYRING))
    r.flags |= dns.flags.AA
    r.use_edns(0)
    r.set_rcode(dns.rcode.BADVERS)  # 16: its upper bits in the OPT record, the header's rcode 0
    r.answer.append(dns.rrset.from_text(ZONE, 3600, "IN", "SOA", soa(9).rdata.to_text()))
    with pytest.raises(ParseError, match="rcode 16"):
        read_soa_answer(r.to_wire(), q, KEY, time.time())


def test_queries_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError):
        soa_query(dns.name.from_text("rel", None), KEY, 1, 0)
    with pytest.raises(ValueError):
        soa_query(ZONE, KEY, -1, 0)
