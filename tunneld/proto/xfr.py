"""Zone transfers from the zone's primary to the rendezvous front: AXFR (RFC 5936), IXFR (RFC 1995); sans-I/O.

The front keeps a replica of the account zone: it asks the primary for the changes since its serial (IXFR)
or for the whole zone (AXFR), over TCP, signed with the front key. :func:`transfer_query` builds the
request; :class:`TransferReader` is fed the answer one framed message at a time and ends in exactly one
result: :class:`UpToDate`, :class:`Full` or :class:`Incremental`. The answer is bounded as a whole
(messages, records, bytes) before anything is parsed, its multi-message TSIG checked before dnspython reads
a message, and every malformed answer raises :class:`~tunneld.proto.errors.ParseError` and nothing else.
What the front sends and accepts: docs/protocol.md ("Zone transfers and NOTIFY").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rrset

from tunneld.crypto.kdf import derive_front_key, normalize_domain
from tunneld.proto.dnsguard import ANSWER, MAX_MESSAGE, WORK_PER_OCTET, Record, check, name_end
from tunneld.proto.dnswire import SOA_NUMBERS, extended_rcode, question, read_name, soa_numbers
from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import TsigError, TsigKey, TsigStream, find_tsig, sign

__all__ = [
    "FRONT_KEY_LABEL",
    "MAX_XFR_BYTES",
    "MAX_XFR_MESSAGES",
    "MAX_XFR_RECORDS",
    "XFR_WORK_MAX",
    "Diff",
    "Full",
    "Incremental",
    "TransferQuery",
    "TransferReader",
    "TransferResult",
    "UpToDate",
    "ZoneRecord",
    "front_key",
    "read_message",
    "serial_gt",
    "transfer_query",
]

# -- constants ---------------------------------------------------------------------------------------------

TYPE_SOA: Final = 6  # RFC 1035 §3.2.2
TYPE_IXFR: Final = 251  # RFC 1995 §2
TYPE_AXFR: Final = 252  # RFC 5936 §2
SERIAL_HALF: Final = 1 << 31  # RFC 1982 §3.2: SERIAL_BITS 32, comparisons within 2^31
SERIAL_MOD: Final = 1 << 32

MAX_XFR_RECORDS: Final = 100_000
"""Records in one transfer, the SOAs included: an account of 10,000 devices at ten records each (a device
publishes six to nine, docs/protocol.md "DNS records"). A bigger answer is refused, not truncated."""
MAX_XFR_BYTES: Final = 16 * 1024 * 1024
"""Bytes of one transfer's messages: MAX_XFR_RECORDS at ~160 bytes each (an SSHFP or TXT record with its
owner is the longest a device has), so a zone within the record bound always fits."""
MAX_XFR_MESSAGES: Final = 10_000
"""Messages in one transfer: MAX_XFR_RECORDS at ten records a message. BIND fills its transfer messages
to about 20 KB by default (transfer-message-size), a hundred records or more; a primary that sends fewer
than ten a message is refused rather than paid for message by message (a TSIG, a parse each)."""
XFR_WORK_MAX: Final = WORK_PER_OCTET * MAX_MESSAGE
"""The guard's work budget of one transfer message (docs/hardening.md, "DNS input bounds"): the guard's
per-octet rate without its cap (a primary packs its messages densely, by design); the transfer's total
is bounded by :data:`MAX_XFR_BYTES` instead."""


FRONT_KEY_LABEL: Final = "front"
"""The front key's name is this label under the account domain: ``front.<domain>.`` (docs/protocol.md)."""


def front_key(secret: bytes, domain: str) -> TsigKey:
    """The TSIG key between the front and the zone's primary: hmac-sha256, named ``front.<domain>.``
    (lower case, absolute), its secret :func:`tunneld.crypto.kdf.derive_front_key`. ValueError for a bad
    secret or domain."""
    name = dns.name.from_text(f"{FRONT_KEY_LABEL}.{normalize_domain(domain)}.")
    return TsigKey(name, derive_front_key(secret, domain))


def serial_gt(a: int, b: int) -> bool:
    """RFC 1982 §3.2: serial ``a`` is newer than ``b`` (undefined at a distance of exactly 2^31: False)."""
    return a != b and ((a - b) % SERIAL_MOD) < SERIAL_HALF


# -- results -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZoneRecord:
    """One record of the zone as transferred: owner (absolute), TTL as sent, RDATA (class IN)."""

    owner: dns.name.Name
    ttl: int
    rdata: dns.rdata.Rdata

    @property
    def rdtype(self) -> int:
        return int(self.rdata.rdtype)


@dataclass(frozen=True, slots=True)
class UpToDate:
    """The primary has nothing newer than our serial (RFC 1995 §4: one SOA, ours or older)."""

    serial: int


@dataclass(frozen=True, slots=True)
class Full:
    """The whole zone (an AXFR, or an IXFR answered AXFR-style, RFC 1995 §4): its SOA, and every other
    record in the order sent (the SOA is not repeated among them)."""

    soa: ZoneRecord
    records: tuple[ZoneRecord, ...]

    @property
    def serial(self) -> int:
        return _serial(self.soa)


@dataclass(frozen=True, slots=True)
class Diff:
    """One step of an incremental answer (RFC 1995 §4): the version ``old_serial`` becomes ``new_serial``
    by removing ``removed`` and then adding ``added`` (the SOAs that delimit them are not among them)."""

    old_serial: int
    removed: tuple[ZoneRecord, ...]
    new_serial: int
    added: tuple[ZoneRecord, ...]


@dataclass(frozen=True, slots=True)
class Incremental:
    """The changes from our serial to the primary's: ``diffs`` in order, each starting where the one before
    ended; ``soa`` is the zone's new SOA."""

    soa: ZoneRecord
    diffs: tuple[Diff, ...]

    @property
    def serial(self) -> int:
        return _serial(self.soa)


TransferResult = UpToDate | Full | Incremental


def _serial(record: ZoneRecord) -> int:
    assert isinstance(record.rdata, dns.rdtypes.ANY.SOA.SOA)
    return int(record.rdata.serial)


# -- the request -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransferQuery:
    """A signed transfer request: ``wire`` to send (frame it for TCP), its ID and TSIG MAC (the answer's
    first MAC covers it), the zone, and for an IXFR our current SOA (None: AXFR)."""

    wire: bytes
    msg_id: int
    mac: bytes
    zone: dns.name.Name
    current: ZoneRecord | None

    @property
    def rdtype(self) -> int:
        return TYPE_AXFR if self.current is None else TYPE_IXFR


def transfer_query(zone: dns.name.Name, key: TsigKey, msg_id: int, now: float,
                   current: ZoneRecord | None = None) -> TransferQuery:
    """The request for the zone: IXFR from ``current`` (our replica's SOA, in the authority section, RFC
    1995 §3), or AXFR without it (RFC 5936 §2.2: one question, no records). Signed with ``key`` at
    ``now`` (Unix seconds); ``msg_id`` comes from the caller's randomness."""
    if not zone.is_absolute():
        raise ValueError("zone must be an absolute name")
    if not 0 <= msg_id <= 0xFFFF:
        raise ValueError("message ID out of range")
    rdtype = TYPE_AXFR if current is None else TYPE_IXFR
    msg = dns.message.Message(id=msg_id)
    msg.flags = dns.flags.Flag(0)  # no RD: a transfer is not recursive
    msg.find_rrset(msg.question, zone, dns.rdataclass.IN, dns.rdatatype.RdataType(rdtype), create=True)
    if current is not None:
        if current.rdtype != TYPE_SOA or current.owner != zone:
            raise ValueError("the current SOA must be the zone's SOA record")
        rrset = dns.rrset.RRset(zone, dns.rdataclass.IN, dns.rdatatype.SOA)
        rrset.add(current.rdata, current.ttl)
        msg.authority.append(rrset)
    wire, mac = sign(msg.to_wire(), key, int(now))
    return TransferQuery(wire, msg_id, mac, zone, current)


def _name_at(wire: bytes, offset: int, names: dict[int, dns.name.Name]) -> dns.name.Name:
    """The name at ``offset`` of a message check() passed (its pointers go strictly backwards), read once
    per message wherever it starts: an IXFR repeats the same few names (the SOAs') in every diff."""
    while wire[offset] & 0xC0 == 0xC0:  # a bare pointer: the name it points to
        offset = ((wire[offset] & 0x3F) << 8) | wire[offset + 1]
    name = names.get(offset)
    if name is None:
        name = names[offset] = read_name(wire, offset)[0]
    return name


def _soa(wire: bytes, record: Record, names: dict[int, dns.name.Name]) -> dns.rdata.Rdata:
    """The SOA RDATA of ``record`` (RFC 1035 §3.3.13: MNAME, RNAME, five 32-bit numbers), its names read
    through ``names``: two of the three records of each diff of an IXFR are SOAs."""
    numbers_at = soa_numbers(wire, record)
    mname = _name_at(wire, record.rdata, names)
    rname = _name_at(wire, name_end(wire, record.rdata), names)
    return dns.rdtypes.ANY.SOA.SOA(dns.rdataclass.IN, dns.rdatatype.SOA, mname, rname,  # type: ignore[no-untyped-call]
                                   *SOA_NUMBERS.unpack_from(wire, numbers_at))


# -- one message of an answer ------------------------------------------------------------------------------


def read_message(wire: bytes, msg_id: int, zone: dns.name.Name, rdtype: int, stream: TsigStream,
                 now: float, *, first: bool) -> list[ZoneRecord]:
    """The answer records of one message answering our ``rdtype`` question about ``zone``, its TSIG
    checked in ``stream`` before it is parsed. Every record must be class IN and inside the zone. The
    first message must echo the question; later ones echo it or ask none (RFC 5936 §2.2.1)."""
    records = check(wire, work_max=XFR_WORK_MAX)
    try:
        stream.feed(wire, now, find_tsig(wire, records))
    except TsigError as e:
        raise ParseError(f"tsig: {e}") from None
    (got_id, flags) = struct.unpack_from("!HH", wire)
    if got_id != msg_id:
        raise ParseError("message ID")
    if not flags & dns.flags.QR or dns.opcode.from_flags(flags) != dns.opcode.QUERY:
        raise ParseError("not a query response")
    if flags & dns.flags.TC:
        raise ParseError("truncated over TCP")
    if rcode := extended_rcode(wire, records):
        raise ParseError(f"rcode {rcode}")
    # Read in place, record by record: dnspython's message parse hashed every rdata into rrsets and cost
    # some 5 ms for one 1.6 KiB IXFR message (docs/perf-dns.md); check() has framed and bounded it all.
    (qdcount,) = struct.unpack_from("!H", wire, 4)
    if qdcount or first:
        if qdcount != 1:
            raise ParseError("question count")
        if question(wire) != (zone, rdtype, dns.rdataclass.IN):
            raise ParseError("wrong question")
    out: list[ZoneRecord] = []
    names: dict[int, dns.name.Name] = {}
    for r in records:
        if r.section != ANSWER:
            continue
        if r.rclass != dns.rdataclass.IN:
            raise ParseError("record class")
        owner = _name_at(wire, r.offset, names)
        if not owner.is_subdomain(zone):
            raise ParseError("record outside the zone")
        if r.rtype == TYPE_SOA and owner != zone:
            raise ParseError("SOA off the apex")
        rtype = dns.rdatatype.RdataType.make(r.rtype)
        if dns.rdatatype.is_metatype(rtype):  # OPT, TSIG, ANY...: not zone data (dnspython refused them)
            raise ParseError("record type")
        if rtype == TYPE_SOA:
            rdata = _soa(wire, r, names)
        else:
            try:
                rdata = dns.rdata.from_wire(dns.rdataclass.IN, rtype, wire, r.rdata, r.rdlength)
            except Exception as e:  # dnspython raises many types (FormError, ValueError, struct.error...)
                raise ParseError("malformed DNS message") from e
        out.append(ZoneRecord(owner, r.ttl, rdata))  # the TTL as sent (dnspython rewrites TTLs >= 2^31)
    return out


# -- the answer --------------------------------------------------------------------------------------------


class TransferReader:
    """Reads the answer to one :class:`TransferQuery`, one framed message per :meth:`feed` (the stream's
    framing is :class:`tunneld.proto.dnsframe.FrameBuffer`'s).

    ``feed`` returns None while the answer goes on, then its one :class:`TransferResult`; it raises
    ParseError for a message that breaks anything (the bounds, TSIG, the header, the question, the SOA
    sequence of RFC 1995 §4 and RFC 5936 §2.2, a serial going backwards by RFC 1982), and after that,
    or after the result, for any message at all: the connection is to be closed."""

    def __init__(self, query: TransferQuery, key: TsigKey) -> None:
        self.query = query
        self._stream = TsigStream(key, query.mac)
        self._ours = None if query.current is None else _serial(query.current)
        self.messages = 0
        self.records = 0
        self.size = 0
        self.result: TransferResult | None = None
        self._dead = False
        self._first: ZoneRecord | None = None  # the answer's first SOA: the primary's version
        self._mode = ""  # "full", "diff-removing", "diff-adding", once the second record is known
        self._full: list[ZoneRecord] = []
        self._diffs: list[Diff] = []
        self._old = 0  # the current diff's old serial, and its parts so far
        self._new = 0
        self._removed: list[ZoneRecord] = []
        self._added: list[ZoneRecord] = []
        self._ended = False

    def feed(self, wire: bytes, now: float) -> TransferResult | None:
        if self._dead or self.result is not None:
            raise ParseError("message after the end")
        self._dead = True  # until this message is read through
        self.messages += 1
        self.size += len(wire)
        if self.messages > MAX_XFR_MESSAGES or self.size > MAX_XFR_BYTES:
            raise ParseError("transfer too large")
        if len(wire) >= 12:  # the guard refuses shorter ones; the counts bound the records before a parse
            (an,) = struct.unpack_from("!H", wire, 6)
            if self.records + an > MAX_XFR_RECORDS:
                raise ParseError("transfer too large")
        q = self.query
        for record in read_message(wire, q.msg_id, q.zone, q.rdtype, self._stream, now,
                                   first=self.messages == 1):
            self.records += 1
            self._take(record)
        self.result = self._end_of_message()
        if self.result is not None:
            try:
                self._stream.finish()
            except TsigError as e:
                self.result = None
                raise ParseError(f"tsig: {e}") from None
        self._dead = False
        return self.result

    def _take(self, record: ZoneRecord) -> None:
        if self._ended:
            raise ParseError("records after the final SOA")
        soa = record.rdtype == TYPE_SOA
        if self._first is None:
            if not soa:
                raise ParseError("answer does not start with the SOA")
            self._first = record
            return
        final = _serial(self._first)
        if not self._mode:
            if self._ours is not None and not serial_gt(final, self._ours):
                raise ParseError("records after an up-to-date SOA")
            if soa and _serial(record) == self._ours:  # RFC 1995 §4: SOA, then our version's: incremental
                self._mode, self._old = "diff-removing", self._ours
                return
            self._mode = "full"  # AXFR-style (an empty zone's second record is the final SOA)
        if self._mode == "full":
            if soa:
                if record.rdata != self._first.rdata:
                    raise ParseError("SOA sequence broken")
                self._ended = True
            else:
                self._full.append(record)
        elif self._mode == "diff-removing":
            if soa:
                serial = _serial(record)
                if not serial_gt(serial, self._old):
                    raise ParseError("serial going backwards")
                if serial_gt(serial, final):
                    raise ParseError("SOA sequence broken")
                self._new, self._mode = serial, "diff-adding"
            else:
                self._removed.append(record)
        elif soa:  # diff-adding: the next diff's old SOA, or the final SOA
            if _serial(record) != self._new:
                raise ParseError("SOA sequence broken")
            self._diffs.append(Diff(self._old, tuple(self._removed), self._new, tuple(self._added)))
            self._removed, self._added = [], []
            if self._new == final:
                if record.rdata != self._first.rdata:
                    raise ParseError("SOA sequence broken")
                self._ended = True
            else:
                self._old, self._mode = self._new, "diff-removing"
        else:
            self._added.append(record)

    def _end_of_message(self) -> TransferResult | None:
        if self._first is None:
            raise ParseError("answer does not start with the SOA")
        if self._ended:
            if self._mode == "full":
                return Full(self._first, tuple(self._full))
            return Incremental(self._first, tuple(self._diffs))
        if not self._mode and self._ours is not None and not serial_gt(_serial(self._first), self._ours):
            return UpToDate(_serial(self._first))  # one SOA, ours or older: nothing to fetch
        return None
