"""The DNS guard: the compression-pointer CPU bomb it stops, every bound it enforces, and its agreement
with dnspython on the rules they share.

The bomb (a name of 126 labels, then thousands of 2-byte pointers to it) made dnspython decode the long
name once per pointer; in RDATA, dnspython also rebuilds the name once per suffix when it hashes the
record. The guard counts that work without doing it, and refuses a message whose work exceeds its budget.
"""

from __future__ import annotations

import importlib
import inspect
import ipaddress
import pkgutil
import struct
import time
from collections.abc import Callable

import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes
import dns.rrset
import pytest

from tunneld.dnsserver.core import DnsCore
from tunneld.dnsserver.store import ZoneStore
from tunneld.proto import dnsguard, dnswire, records
from tunneld.proto.dnsguard import (
    MAX_POINTER_HOPS,
    RDATA_NAME_TYPES,
    budget,
    check,
    parse,
    work,
)
from tunneld.proto.errors import ParseError

QR = 0x8000
A, NS, SOA, PTR, MX, TXT, SRV, NAPTR, OPT = 1, 2, 6, 12, 15, 16, 33, 35, 41
HIP, IPSECKEY, AMTRELAY = 55, 45, 260
LONG = b"\x01a" * 126 + b"\x00"  # 127 labels (root included), 253 octets
TO_QUESTION = b"\xc0\x0c"  # a pointer to the question's name, right after the header


def header(qd: int = 0, an: int = 0, ns: int = 0, ar: int = 0, flags: int = QR) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qd, an, ns, ar)


def question(name: bytes, qtype: int = A) -> bytes:
    return name + struct.pack("!HH", qtype, 1)


def rr(owner: bytes, rtype: int, rdata: bytes, rclass: int = 1, ttl: int = 60) -> bytes:
    return owner + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def owner_bomb(size: int) -> bytes:
    """A 126-label question name, then as many A records as fit whose owner is a pointer to it."""
    one = rr(TO_QUESTION, A, b"\xc0\x00\x02\x01")
    n = (size - 12 - len(LONG) - 4) // len(one)
    return header(1, n) + question(LONG) + one * n


def rdata_bomb(size: int, rtype: int = PTR, before: bytes = b"", after: bytes = b"") -> bytes:
    """The same long name, then records of ``rtype`` whose RDATA names are pointers to it."""
    one = rr(b"\x00", rtype, before + TO_QUESTION + after)
    n = (size - 12 - len(LONG) - 4) // len(one)
    return header(1, n) + question(LONG, rtype) + one * n


def benign(size: int) -> bytes:
    """A plain answer of about ``size`` octets within the budget: an AAAA record for each of 800 names
    (about 24 KB), then TXT records of 1 KB."""
    msg = dns.message.make_response(dns.message.make_query("q.example.com.", "ANY"))
    rrsets = [dns.rrset.from_text(f"h{i}.example.com.", 60, "IN", "AAAA", "fd00::1") for i in range(800)]
    text = " ".join(['"' + "t" * 250 + '"'] * 4)
    rrsets += [dns.rrset.from_text(f"t{i}.example.com.", 60, "IN", "TXT", text) for i in range(size // 1000)]
    n = len(rrsets)
    while True:
        msg.answer = rrsets[:n]
        try:
            return msg.to_wire(max_size=size)
        except dns.exception.TooBig:
            n -= 1


# -- the bomb ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1400, 65535])
@pytest.mark.parametrize("bomb", [owner_bomb, rdata_bomb], ids=["owner pointers", "PTR pointers"])
def test_pointer_bomb_costs_more_than_the_budget_and_is_refused(bomb: Callable[[int], bytes],
                                                                size: int) -> None:
    wire = bomb(size)
    assert size - 20 <= len(wire) <= size
    # Counted, not timed: the work dnspython would have done (owner bombs: 127 labels per 16 octets).
    assert work(wire) > budget(len(wire))
    if size > 60000:
        assert work(wire) > 8 * budget(len(wire))
    with pytest.raises(ParseError, match="over the parse budget"):
        parse(wire)
    with pytest.raises(ParseError, match="over the parse budget"):
        dnswire.walk(wire)


def test_guarded_bomb_costs_less_cpu_than_a_benign_message_of_its_size() -> None:
    """The server's handling of a 65 KB bomb (FORMERR) against its handling of 65 KB of plain AAAA
    records: before the guard, the PTR bomb took some 27 s of CPU here and the owner bomb 1 s, the benign
    message 0.1 s. With it, refusing either costs less than parsing the benign message."""
    store = ZoneStore(":memory:", "example.com", "ns.example.com", 53)
    core = DnsCore(store, [])
    good = benign(65535)
    query = dns.message.make_query("q.example.com.", "A")
    good_request = bytearray(good)
    good_request[2:4] = query.to_wire()[2:4]  # a request (QR clear): the server parses it in full
    assert len(good) > 65000 and len(parse(bytes(good_request), query=True).answer) > 800

    def cpu(wire: bytes) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.process_time()
            core.handle(wire, ("192.0.2.1", 53), 1_700_000_000.0, max_size=65535)
            best = min(best, time.process_time() - t)
        return best

    benign_cpu = cpu(bytes(good_request))
    for bomb in (owner_bomb(65535), rdata_bomb(65535), rdata_bomb(65535, SOA, after=TO_QUESTION + bytes(20))):
        request = header(1, int.from_bytes(bomb[6:8], "big"), flags=0) + bomb[12:]
        assert cpu(request) < benign_cpu + 0.005
        reply = core.handle(request, ("192.0.2.1", 53), 1_700_000_000.0, max_size=65535)
        assert reply is not None and reply[3] & 0xF == 1  # FORMERR
    assert core.parse_errors == {"over the parse budget": 3 * 4}  # the bombs only, each 4 times
    store.close()


# -- what fits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["example.com", "a.b.c.example.co.uk"])
def test_an_account_of_150_devices_fits_the_budget(domain: str) -> None:
    """Every record of 150 devices in one answer, and the browse answer of 400, in a deep domain too."""
    sets: list[dns.rrset.RRset] = []
    ptrs = dns.rrset.RRset(records.browse_name(domain), dns.rdataclass.IN, dns.rdatatype.PTR)
    for i in range(400):
        host = records.HostRecords.derive(f"device{i}", domain, i.to_bytes(2, "big") + bytes(30), 4500,
                                          [ipaddress.ip_address("198.51.100.7"),
                                           ipaddress.ip_address("2001:db8::7")])
        built = records.build(host, 60)
        ptrs.union_update(built[-1])
        if i < 150:
            sets += built  # the browse PTR too, as its own RRset
    browse = dns.message.make_response(dns.message.make_query(records.browse_name(domain), "PTR"))
    browse.answer = [ptrs]
    everything = dns.message.make_response(dns.message.make_query(records.browse_name(domain), "ANY"))
    everything.answer = sets
    for message in (browse, everything):
        wire = message.to_wire(max_size=65535)
        assert work(wire) <= budget(len(wire))
        assert parse(wire) == dns.message.from_wire(wire)


def test_a_single_maximal_name_fits_in_a_small_message() -> None:
    wire = header(1, 1) + question(LONG, PTR) + rr(b"\xc0\x0c", PTR, LONG)
    assert work(wire) <= budget(len(wire))
    assert check(wire)[0].rtype == PTR


def test_budget_grows_with_size_between_floor_and_cap() -> None:
    assert budget(12) == dnsguard.WORK_FLOOR
    assert budget(4000) == 4000 * dnsguard.WORK_PER_OCTET
    assert budget(65535) == dnsguard.WORK_MAX


# -- framing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("wire", "reason"), [
    (b"", "truncated"),
    (header()[:11], "truncated"),
    (header(2) + question(b"\x00") * 2, "question count"),  # RFC 9619
    (header(0, 6000) + bytes(100), "counts beyond the message"),
    (header(1) + question(b"\x00")[:-1], "counts beyond the message"),
    (header(1) + b"\x03abc\x00\x00\x01", "truncated"),
    (header(0, 1) + rr(b"\x00", TXT, b"\x03abc")[:-1], "truncated"),  # RDATA past the end
    (header(0, 1) + rr(b"\x00", A, bytes(4)) + b"\x00", "trailing data"),
    (header(0, 1) + b"\x00" + struct.pack("!HHIH", A, 1, 0, 4), "truncated"),
])
def test_framing_is_checked(wire: bytes, reason: str) -> None:
    with pytest.raises(ParseError) as info:
        check(wire)
    assert str(info.value) == reason


def test_size_bound_is_the_smaller_of_the_callers_and_65535() -> None:
    wire = header(0, 1) + rr(b"\x00", TXT, b"\xff" + bytes(255))
    assert check(wire, max_size=len(wire))
    with pytest.raises(ParseError, match="oversized"):
        check(wire, max_size=len(wire) - 1)
    huge = header(0, 1) + rr(b"\x00", 65000, bytes(65535 - 23))
    assert len(huge) == 65535 and check(huge, max_size=10**6)
    with pytest.raises(ParseError, match="oversized"):
        check(huge + b"\x00", max_size=10**6)


def test_a_request_asks_exactly_one_question() -> None:
    bare_request = header(0, 0, flags=0)
    with pytest.raises(ParseError, match="question count"):
        check(bare_request, query=True)
    assert check(bare_request) == []  # not checked as a request
    assert check(header(0), query=True) == []  # a response (QR set) may have no question
    assert check(header(1, flags=0) + question(b"\x00"), query=True) == []


# -- names -------------------------------------------------------------------------------------------------


def name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


@pytest.mark.parametrize(("qname", "reason"), [
    (b"\x40" + b"a" * 64 + b"\x00", "bad label type"),  # a 64-octet label is 0x40: an extended type
    (b"\x80\x00", "bad label type"),
    (name(*[b"a" * 63] * 4), "name too long"),  # 4 * 64 + 1 = 257 octets
    (b"\xc0\x0c", "bad pointer"),  # to itself
    (b"\xc0\x0d\x00", "bad pointer"),  # forwards
    (b"\x01a\xc0\x0c", "bad pointer"),  # into the name it ends
    (b"\xc0", "truncated"),
    (b"\x05ab", "truncated"),
])
def test_name_rules(qname: bytes, reason: str) -> None:
    with pytest.raises(ParseError) as info:
        check(header(1) + question(qname))
    assert str(info.value) == reason


def test_the_longest_name_passes_and_one_octet_more_does_not() -> None:
    longest = name(*[b"a" * 63] * 3, b"a" * 61)  # 3 * 64 + 62 + 1 = 255 octets
    assert len(longest) == 255
    check(header(1) + question(longest))
    with pytest.raises(ParseError, match="name too long"):
        check(header(1) + question(name(*[b"a" * 63] * 3, b"a" * 62)))


def chain(hops: int) -> bytes:
    """A message whose last RR owner follows ``hops`` pointers: each RR's owner is a label and a
    pointer to the previous owner."""
    body = question(b"\x00")
    previous = None
    for _ in range(hops + 1):
        offset = 12 + len(body)
        owner = b"\x01a" + (b"\x00" if previous is None else struct.pack("!H", 0xC000 | previous))
        body += rr(owner, A, bytes(4))
        previous = offset
    return header(1, hops + 1) + body


def test_pointer_hops_are_bounded() -> None:
    wire = chain(MAX_POINTER_HOPS)
    assert len(check(wire)) == MAX_POINTER_HOPS + 1
    assert dns.message.from_wire(wire).answer[-1].name.labels == (b"a",) * (MAX_POINTER_HOPS + 1) + (b"",)
    with pytest.raises(ParseError, match="too many pointers"):
        check(chain(MAX_POINTER_HOPS + 1))


def test_a_pointer_target_may_not_run_into_the_bytes_that_point_to_it() -> None:
    # The root question ends with QCLASS 0x0001 at offset 16; the answer's owner at 17 is a label
    # "\x00ab" and a pointer to 16. From 16, the bytes read "\x01" + one octet (the owner's first) + the
    # root: a name that runs into the owner pointing to it. dnspython refuses it as well.
    wire = header(1, 1) + question(b"\x00") + rr(b"\x03\x00ab\xc0\x10", A, bytes(4))
    with pytest.raises(ParseError, match="bad pointer"):
        check(wire)
    with pytest.raises(dns.exception.FormError):
        dns.message.from_wire(wire)


def test_names_in_rdata_must_end_inside_it() -> None:
    wire = header(0, 1) + rr(b"\x00", PTR, b"\x03abc")  # the name's root is missing from the RDATA
    wire += b"\x00"
    with pytest.raises(ParseError, match="truncated"):
        check(wire)


@pytest.mark.parametrize(("rtype", "rclass", "before", "after", "decompressed"), [
    (NS, 1, b"", b"", True),
    (MX, 1, b"\x00\x0a", b"", True),
    (SRV, 1, bytes(6), b"", True),
    (SOA, 1, b"\x00", bytes(20), True),
    (NAPTR, 1, b"\x00\x01\x00\x01\x01u\x00\x00", b"", True),
    # dnspython 2.9 refuses pointers in these (RFC 3597 §4); older ones followed them, so they count.
    (HIP, 1, b"\x01\x02\x00\x01" + b"h" + b"k", b"", False),
    (IPSECKEY, 1, b"\x01\x03\x00", b"", False),
    (AMTRELAY, 1, b"\x01\x03", b"", False),
    (A, 3, b"", b"\x00\x01", False),  # Chaos A: a name, then an address
])
def test_names_in_every_kind_of_rdata_are_charged(rtype: int, rclass: int, before: bytes, after: bytes,
                                                  decompressed: bool) -> None:
    one = rr(b"\x00", rtype, before + TO_QUESTION + after, rclass=rclass)
    wire = header(1, 60) + question(LONG, rtype) + one * 60
    assert work(wire) > 60 * 127 * 127 // 4 > budget(len(wire))
    with pytest.raises(ParseError, match="over the parse budget"):
        check(wire)
    single = header(1, 1) + question(LONG, rtype) + one
    assert check(single)
    if decompressed:  # one such record is what dnspython reads: the long name, through the pointer
        assert LONG in dns.message.from_wire(single).answer[0][0].to_wire()


def test_an_in_a_record_is_not_read_as_a_name() -> None:
    wire = header(0, 1) + rr(b"\x00", A, b"\xc0\x00\x02\x01")  # 192.0.2.1 looks like a pointer
    assert check(wire)[0].rdlength == 4


def test_an_srv_outside_class_in_is_generic_rdata() -> None:
    """dnspython knows SRV in class IN only: elsewhere its RDATA is opaque, so not read as a name."""
    forward = bytes(6) + b"\xc0\xff"  # a forward pointer, if it were a name
    assert check(header(0, 1) + rr(b"\x00", SRV, forward, rclass=3))
    dns.message.from_wire(header(0, 1) + rr(b"\x00", SRV, forward, rclass=3))
    with pytest.raises(ParseError, match="bad pointer"):
        check(header(0, 1) + rr(b"\x00", SRV, forward))


def test_update_deletions_take_the_zone_class() -> None:
    """In an UPDATE, class NONE stands for the zone's: a Chaos zone's A record holds a name."""
    zone = question(name(b"ch"), SOA)[:-2] + b"\x00\x03"
    one = rr(b"\x00", A, name(b"x") + b"\x00\x01", rclass=254)
    wire = header(1, 0, 1, flags=0x2800) + zone + one
    fixed = (2 + dnsguard.RECORD_WORK) + (1 + dnsguard.RECORD_WORK)  # question, RR owner
    assert work(wire) == fixed + dnsguard.rdata_name_work(2)
    update = dns.message.from_wire(wire)
    assert update.update[0].deleting == dns.rdataclass.NONE
    assert update.update[0].rdclass == 3 and update.update[0].rdtype == A
    in_zone = wire[:18] + b"\x00\x01" + wire[20:]  # the same in an IN zone: an address, not a name
    assert work(in_zone) == fixed


def test_every_dnspython_rdata_type_with_a_name_is_known() -> None:
    """dnspython's rdata classes that read a name (or a gateway that may be one) are all in the guard's
    table: a type missing there would let the RDATA bomb through."""
    found: set[int] = set()
    for package in ("ANY", "IN"):
        module = importlib.import_module(f"dns.rdtypes.{package}")
        for info in pkgutil.iter_modules(module.__path__):
            cls = getattr(importlib.import_module(f"dns.rdtypes.{package}.{info.name}"), info.name, None)
            if cls is None or not hasattr(cls, "from_wire_parser"):
                continue
            source = inspect.getsource(cls.from_wire_parser)
            if "get_name" in source or "Gateway" in source:
                found.add(dns.rdatatype.from_text(info.name.replace("_", "-")))
    assert found and found <= RDATA_NAME_TYPES, sorted(found - RDATA_NAME_TYPES)
    assert dns.rdatatype.SRV in found and dns.rdatatype.SOA in found and dns.rdatatype.IPSECKEY in found


def test_edns_options_must_frame() -> None:
    opt = lambda data: rr(b"\x00", OPT, data, rclass=1232, ttl=0)  # noqa: E731
    assert check(header(0, 0, 0, 1) + opt(b"\xfd\xe9\x00\x02ab"))
    with pytest.raises(ParseError, match="truncated"):
        check(header(0, 0, 0, 1) + opt(b"\xfd\xe9\x00\x03ab"))


# -- agreement with dnspython -----------------------------------------------------------------------------


def test_walk_is_the_guards_frame_pass_and_sees_raw_ttls() -> None:
    msg = dns.message.make_response(dns.message.make_query("q.example.com.", "ANY"))
    msg.answer.append(dns.rrset.from_text("q.example.com.", 0xFFFFFFFF, "IN", "A", "192.0.2.1"))
    msg.additional.append(dns.rrset.from_text("x.example.com.", 7, "IN", "SRV", "0 0 1 q.example.com."))
    wire = msg.to_wire()
    frames = dnswire.walk(wire)
    assert frames == check(wire)
    assert [(f.section, f.rtype, f.ttl) for f in frames] == [(dnsguard.ANSWER, A, 0xFFFFFFFF),
                                                               (dnsguard.ADDITIONAL, SRV, 7)]


def test_parse_maps_dnspython_errors_to_parse_error() -> None:
    wire = header(0, 1) + rr(b"\x00", A, bytes(3))  # an A record of 3 octets: framed, but not an A
    check(wire)
    with pytest.raises(ParseError, match="malformed DNS message"):
        parse(wire)


def test_parse_gives_what_dnspython_gives() -> None:
    msg = dns.message.make_query("q.example.com.", "PTR", use_edns=0, payload=4096)
    msg.flags = QR
    for i in range(20):
        msg.answer.append(dns.rrset.from_text("q.example.com.", 60, "IN", "PTR", f"d{i}.q.example.com."))
        msg.answer.append(dns.rrset.from_text(f"d{i}.q.example.com.", 60, "IN", "SOA",
                                              "ns.example.com. host.example.com. 1 2 3 4 5"))
        msg.answer.append(dns.rrset.from_text(f"d{i}.q.example.com.", 60, "IN", "MX", "10 mx.example.com."))
    wire = msg.to_wire()
    assert parse(wire) == dns.message.from_wire(wire)
    ours = parse(wire, one_rr_per_rrset=True)
    assert len(ours.answer) == 60 and ours == dns.message.from_wire(wire, one_rr_per_rrset=True)
