"""Bounds on an untrusted DNS message, checked on its bytes before dnspython parses it.

dnspython's cost is not linear in a message's size: it decodes a compressed name in full at every
reference, and rebuilds a name in RDATA once per suffix whenever it hashes the record, so 65 KB of
2-byte pointers to a 127-label name cost seconds. :func:`check` reads the message once, in time linear
in its size (each name suffix is read once and remembered), enforces RFC 1035's framing and name rules,
and charges the work dnspython would do against a budget that grows with the message's size, capped.
:func:`parse` is the one way untrusted bytes become a ``dns.message.Message``. The bounds and why:
docs/hardening.md ("DNS input bounds").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import dns.message

from tunneld.proto.errors import ParseError

__all__ = [
    "ADDITIONAL",
    "ANSWER",
    "AUTHORITY",
    "HEADER_SIZE",
    "MAX_LABEL",
    "MAX_MESSAGE",
    "MAX_NAME",
    "MAX_POINTER_HOPS",
    "RDATA_NAME_TYPES",
    "Record",
    "budget",
    "check",
    "from_checked",
    "parse",
    "rdata_name_work",
    "try_parse",
    "work",
]

# -- RFC 1035 bounds ----------------------------------------------------------------------------------------

MAX_MESSAGE: Final = 65535  # §4.2.2: the TCP length prefix bounds a message; a UDP payload is no larger
HEADER_SIZE: Final = 12  # §4.1.1
MAX_LABEL: Final = 63  # §2.3.4
MAX_NAME: Final = 255  # §2.3.4: octets of a name in wire form, length octets and the root included
MIN_QUESTION: Final = 5  # §4.1.2: the root name, QTYPE, QCLASS
MIN_RR: Final = 11  # §4.1.3: the root name, TYPE, CLASS, TTL, RDLENGTH
MAX_POINTER_HOPS: Final = 16
"""Compression pointers one name may follow (§4.1.4 sets no limit; real chains are one to three long)."""

_COUNTS: Final = struct.Struct("!HHHH")  # QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT at offset 4
_RR_FIXED: Final = struct.Struct("!HHIH")  # TYPE, CLASS, TTL, RDLENGTH (§4.1.3)
_QR: Final = 0x80  # in the third header octet
_OPCODE_UPDATE: Final = 5  # RFC 2136 §1
_CLASS_CH: Final = 3
_CLASS_NONE: Final = 254  # RFC 2136 §2.4: in an UPDATE, NONE and ANY stand for the zone's class
_CLASS_ANY: Final = 255
_TYPE_A: Final = 1
_TYPE_OPT: Final = 41  # RFC 6891 §6.1.2: RDATA is {CODE u16, LENGTH u16, DATA}*

ANSWER: Final = 1
AUTHORITY: Final = 2
ADDITIONAL: Final = 3

# -- the parse budget ---------------------------------------------------------------------------------------
# dnspython's work, in units of about one label decoded (~1.3 us here): a name in the question or an RR's
# owner costs its L labels (root included); a name in RDATA costs L(L+32)/4, as hashing its record builds
# a Name of every suffix (L^2/2 labels), up to three times when a record repeats; each question or record
# costs a fixed amount on top (its objects and lookups), and so does each EDNS option.

RECORD_WORK: Final = 32
OPTION_WORK: Final = 2
WORK_PER_OCTET: Final = 6
"""Budget per octet: our densest answer, the browse PTRs in a domain of six labels, costs 3.6 per octet."""
WORK_FLOOR: Final = 6144
"""Budget of a small message: one maximal (127-label) name in the question and another in RDATA fit."""
WORK_MAX: Final = 65536
"""Budget of any message (about 100 ms here): every record of 150 devices in one answer fits."""


def name_end(wire: bytes, start: int) -> int:
    """Where the name at ``start`` ends in place (after its root label or first pointer), read under the
    guard's rules; ParseError if it breaks them."""
    return _Names(wire).read(start, len(wire))[0]


def budget(size: int, work_max: int = WORK_MAX) -> int:
    """The work a message of ``size`` octets may cost dnspython (at most ``work_max``)."""
    return min(work_max, max(WORK_FLOOR, WORK_PER_OCTET * size))


def rdata_name_work(labels: int) -> int:
    """The work of a name of ``labels`` labels in RDATA."""
    return labels * (labels + 32) // 4


@dataclass(frozen=True, slots=True)
class Record:
    """The frame of one resource record: where it starts, its fixed fields as sent, where its RDATA is.
    ``section`` is :data:`ANSWER`, :data:`AUTHORITY` or :data:`ADDITIONAL` (for UPDATE: prerequisite,
    update, additional)."""

    offset: int
    section: int
    rtype: int
    rclass: int
    ttl: int
    rdata: int
    rdlength: int


# -- names (RFC 1035 §3.1, §4.1.4) -------------------------------------------------------------------------


class _Names:
    """Reads the names of one message. Every suffix is read once: ``_known[start]`` keeps, for the name
    that starts at ``start``, ``(end, labels, octets, hops, target, target_end)``: where its bytes in
    place end, its labels and octets in full (root included), the pointers it follows, and its first
    pointer's target and the end of the target's bytes in place (-1 and 0 without a pointer).

    The pointer rules are dnspython's (so what passes here does not fail there for them), and stricter
    than RFC 1035: a pointer goes to before the start of the bytes that contain it, and the bytes it
    reaches end before that start; hence pointers strictly decrease along a name and never loop."""

    __slots__ = ("_known", "wire")

    def __init__(self, wire: bytes) -> None:
        self.wire = wire
        self._known: dict[int, tuple[int, int, int, int, int, int]] = {}

    def read(self, start: int, limit: int) -> tuple[int, int]:
        """(end, labels) of the name at ``start``, whose bytes in place must end by ``limit``."""
        end, labels, _, _, _, _ = self._name(start)
        if end > limit:
            raise ParseError("truncated")
        return end, labels

    def _name(self, start: int, depth: int = 0) -> tuple[int, int, int, int, int, int]:
        """The entry of ``start``; ``depth`` pointers were followed to reach it (bounding the recursion)."""
        known = self._known.get(start)
        if known is not None:
            return known
        wire, size = self.wire, len(self.wire)
        starts: list[int] = []  # label starts in place, before the tail (a root, a pointer or a known suffix)
        p = start
        while True:
            tail = self._known.get(p)
            if tail is not None:
                break
            if p >= size:
                raise ParseError("truncated")
            length = wire[p]
            if length == 0:
                tail = (p + 1, 1, 1, 0, -1, 0)
                break
            if length & 0xC0 == 0xC0:
                if p + 2 > size:
                    raise ParseError("truncated")
                target = ((length & 0x3F) << 8) | wire[p + 1]
                if target >= start:
                    raise ParseError("bad pointer")  # not before these bytes: refused before reading it
                if depth >= MAX_POINTER_HOPS:
                    raise ParseError("too many pointers")
                t_end, t_labels, t_octets, t_hops, _, _ = self._name(target, depth + 1)
                if t_hops + 1 > MAX_POINTER_HOPS:
                    raise ParseError("too many pointers")
                tail = (p + 2, t_labels, t_octets, t_hops + 1, target, t_end)
                break
            if length & 0xC0:
                raise ParseError("bad label type")  # 0x40 and 0x80: extended label types (RFC 6891 §5)
            starts.append(p)
            p += 1 + length
        end, labels, octets, hops, target, target_end = tail
        # The tail's pointer (if any) is followed from the bytes in place that begin at `start`.
        if target >= 0 and (target >= start or target_end > start):
            raise ParseError("bad pointer")
        for q in reversed(starts):
            labels += 1
            octets += 1 + wire[q]
            if octets > MAX_NAME:
                raise ParseError("name too long")
            self._known[q] = (end, labels, octets, hops, target, target_end)
        if not starts:
            self._known[p] = tail
        return self._known[start]


# -- names inside RDATA ----------------------------------------------------------------------------------
# Where dnspython reads a name in the RDATA of the types it knows (every one of its rdata classes that
# reads a name is listed; tests/unit/test_dnsguard.py checks this against dnspython). A layout is a
# sequence of steps: an int skips that many octets, "n" is a name, "s" a one-octet-counted string.

_N = "n"
_LAYOUTS: Final[dict[int, tuple[int | str, ...]]] = {
    2: (_N,),  # NS
    5: (_N,),  # CNAME
    6: (_N, _N),  # SOA: MNAME, RNAME (then 20 octets)
    12: (_N,),  # PTR
    15: (2, _N),  # MX
    17: (_N, _N),  # RP
    18: (2, _N),  # AFSDB
    21: (2, _N),  # RT
    23: (_N,),  # NSAP-PTR
    24: (18, _N),  # SIG
    26: (2, _N, _N),  # PX
    33: (6, _N),  # SRV
    35: (4, "s", "s", "s", _N),  # NAPTR
    36: (2, _N),  # KX
    39: (_N,),  # DNAME
    46: (18, _N),  # RRSIG
    47: (_N,),  # NSEC
    64: (2, _N),  # SVCB
    65: (2, _N),  # HTTPS
    66: (5, _N),  # DSYNC
    107: (2, _N),  # LP
    249: (_N,),  # TKEY
    250: (_N,),  # TSIG
}
_HIP: Final = 55  # HIT length u8, algorithm u8, key length u16, HIT, key, then names to the end
_IPSECKEY: Final = 45  # precedence, gateway type, algorithm, gateway (a name if its type is 3)
_AMTRELAY: Final = 260  # precedence, D bit and relay type, relay (a name if its type is 3)
RDATA_NAME_TYPES: Final = frozenset(_LAYOUTS) | {_HIP, _IPSECKEY, _AMTRELAY}
"""The types whose RDATA holds names (and Chaos A: a name, then an address)."""
_IN_ONLY: Final = frozenset({23, 26, 33, 35, 36, 45, 64, 65})  # dnspython's rdtypes/IN: other classes get
# generic RDATA, which holds no name
_CLASS_IN: Final = 1


def _rdata_names(names: _Names, rtype: int, rclass: int, start: int, end: int) -> list[int]:
    """The label counts of the names dnspython reads in this RDATA (ParseError if they do not fit)."""
    wire = names.wire
    if rtype in _IN_ONLY and rclass != _CLASS_IN:
        return []
    layout = _LAYOUTS.get(rtype)
    if layout is None:
        if rtype == _TYPE_A and rclass == _CLASS_CH:  # Chaos A (RFC 1035 §3.4.1 for IN): domain, address
            layout = (_N,)
        elif rtype == _HIP and end - start >= 4:
            hit, key = wire[start], int.from_bytes(wire[start + 2:start + 4], "big")
            out: list[int] = []
            p = start + 4 + hit + key
            while p < end:
                p, labels = names.read(p, end)
                out.append(labels)
            return out
        elif rtype in (_IPSECKEY, _AMTRELAY) and end - start >= 2:
            gateway = wire[start + 1] if rtype == _IPSECKEY else wire[start + 1] & 0x7F
            if gateway != 3:
                return []
            layout = (3 if rtype == _IPSECKEY else 2, _N)
        else:
            return []
    out = []
    p = start
    for step in layout:
        if isinstance(step, int):
            p += step
        elif step == "s":
            if p >= end:
                raise ParseError("truncated")
            p += 1 + wire[p]
        else:
            if p >= end:
                raise ParseError("truncated")
            p, labels = names.read(p, end)
            out.append(labels)
        if p > end:
            raise ParseError("truncated")
    return out


def _options_work(wire: bytes, start: int, end: int) -> int:
    """The work of an OPT RR's options (RFC 6891 §6.1.2); ParseError if they do not frame."""
    work, p = 0, start
    while p < end:
        if p + 4 > end:
            raise ParseError("truncated")
        p += 4 + int.from_bytes(wire[p + 2:p + 4], "big")
        work += OPTION_WORK
    if p != end:
        raise ParseError("truncated")
    return work


# -- messages ----------------------------------------------------------------------------------------------


def check(wire: bytes, *, max_size: int = MAX_MESSAGE, query: bool = False,
          work_max: int = WORK_MAX) -> list[Record]:
    """Check ``wire`` against every bound above, in time linear in its size; the frame of each resource
    record after the question section, in wire order. ``query``: a request (QR clear) must ask exactly
    one question. ``work_max``: a larger cap for a reader that bounds its whole exchange (a zone
    transfer). Raises ParseError and nothing else."""
    return _scan(wire, max_size, query, budget(len(wire), work_max))[0]


def work(wire: bytes) -> int:
    """The work (in the budget's units) dnspython would spend on ``wire``; ParseError as :func:`check`,
    but for the budget."""
    return _scan(wire, MAX_MESSAGE, False, None)[1]


def _scan(wire: bytes, max_size: int, query: bool, allowed: int | None) -> tuple[list[Record], int]:
    size = len(wire)
    if size > min(max_size, MAX_MESSAGE):
        raise ParseError("oversized")
    if size < HEADER_SIZE:
        raise ParseError("truncated")
    qd, an, ns, ar = _COUNTS.unpack_from(wire, 4)
    if qd > 1 or (query and qd == 0 and not wire[2] & _QR):
        raise ParseError("question count")  # RFC 9619: one question; an UPDATE's zone section alike
    if qd * MIN_QUESTION + (an + ns + ar) * MIN_RR > size - HEADER_SIZE:
        raise ParseError("counts beyond the message")
    update = (wire[2] >> 3) & 0xF == _OPCODE_UPDATE
    names = _Names(wire)
    offset = HEADER_SIZE
    used = 0
    zone_class = -1
    if qd:
        offset, labels = names.read(offset, size)
        if offset + 4 > size:
            raise ParseError("truncated")
        zone_class = int.from_bytes(wire[offset + 2:offset + 4], "big")
        offset += 4
        used += labels + RECORD_WORK
    records: list[Record] = []
    for section, count in ((ANSWER, an), (AUTHORITY, ns), (ADDITIONAL, ar)):
        for _ in range(count):
            start = offset
            offset, labels = names.read(offset, size)
            if offset + _RR_FIXED.size > size:
                raise ParseError("truncated")
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, offset)
            offset += _RR_FIXED.size
            end = offset + rdlength
            if end > size:
                raise ParseError("truncated")
            used += labels + RECORD_WORK
            if rtype == _TYPE_OPT:
                used += _options_work(wire, offset, end)
            elif rdlength:
                cls = zone_class if update and rclass in (_CLASS_NONE, _CLASS_ANY) else rclass
                used += sum(rdata_name_work(n) for n in _rdata_names(names, rtype, cls, offset, end))
            if allowed is not None and used > allowed:
                raise ParseError("over the parse budget")  # early: the rest need not even be read
            records.append(Record(start, section, rtype, rclass, ttl, offset, rdlength))
            offset = end
    if offset < size:
        raise ParseError("trailing data")
    return records, used


def parse(wire: bytes, *, max_size: int = MAX_MESSAGE, query: bool = False,
          one_rr_per_rrset: bool = False) -> dns.message.Message:
    """:func:`check`, then dnspython's parse, once. TSIG is left unverified (``keyring=False``): reading
    the clock is the caller's (:mod:`tunneld.proto.tsig`). Raises ParseError and nothing else: the
    guard's reason, or "malformed DNS message" for anything dnspython rejects."""
    check(wire, max_size=max_size, query=query)
    return from_checked(wire, one_rr_per_rrset=one_rr_per_rrset)


def from_checked(wire: bytes, *, one_rr_per_rrset: bool = False) -> dns.message.Message:
    """dnspython's parse of bytes that :func:`check` has passed (a reader that checks a message under
    bounds of its own, then its TSIG, before paying for the parse); ParseError("malformed DNS message")
    for anything dnspython rejects, and nothing else."""
    try:
        return dns.message.from_wire(wire, keyring=False, one_rr_per_rrset=one_rr_per_rrset)
    except Exception as e:  # dnspython raises many types (FormError, ValueError, struct.error, ...)
        raise ParseError("malformed DNS message") from e


def try_parse(wire: bytes, *, max_size: int = MAX_MESSAGE, query: bool = False,
              one_rr_per_rrset: bool = False) -> dns.message.Message | ParseError:
    """:func:`parse`'s result or its ParseError, for a listener that parses a message once and hands
    the outcome to more than one handler."""
    try:
        return parse(wire, max_size=max_size, query=query, one_rr_per_rrset=one_rr_per_rrset)
    except ParseError as e:
        return e
