"""The wire of DNS Stateful Operations (RFC 8490) and DNS Push Notifications (RFC 8765): messages and TLVs.

A DSO message is a DNS header with OPCODE 6 and all four section counts zero, then TLVs (type u16, length
u16, value); the first TLV of a request or unidirectional message is its primary TLV. :func:`decode` bounds
the message (size, TLV count, records per PUSH) before parsing it, parses it once into typed TLVs, and raises
:class:`~tunneld.proto.errors.ParseError` and nothing else. Names in DSO TLVs are sent uncompressed (a TLV
stands on its own): a compression pointer in a name, owner or RDATA, is refused. Unknown TLV types are
kept as :class:`UnknownTlv` (an unknown primary is answered with DSOTYPENI, an unknown additional TLV is
ignored: RFC 8490 §5.4; that is the session's business). What we accept and refuse: docs/dnspush.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from tunneld.proto.dnsguard import HEADER_SIZE, MAX_MESSAGE, MAX_NAME, check, name_end
from tunneld.proto.errors import ParseError

__all__ = [
    "CLASS_ANY",
    "DELETE_COLLECTIVE_TTL",
    "DELETE_ONE_TTL",
    "DSO_ENCRYPTION_PADDING",
    "DSO_KEEPALIVE",
    "DSO_RETRY_DELAY",
    "INFINITE",
    "MAX_ADD_TTL",
    "MAX_PUSH_RECORDS",
    "MAX_TLVS",
    "MIN_KEEPALIVE_INTERVAL",
    "OPCODE_DSO",
    "PUSH_PUSH",
    "PUSH_RECONFIRM",
    "PUSH_SUBSCRIBE",
    "PUSH_UNSUBSCRIBE",
    "RCODE_DSOTYPENI",
    "TYPE_ANY",
    "DsoMessage",
    "EncryptionPadding",
    "Keepalive",
    "Push",
    "PushRecord",
    "Reconfirm",
    "RetryDelay",
    "Subscribe",
    "Tlv",
    "UnknownTlv",
    "Unsubscribe",
    "decode",
    "encode",
    "tlv_type",
]

# -- constants ----------------------------------------------------------------------------------------------

OPCODE_DSO: Final = 6  # RFC 8490 §5.4 (IANA DNS OPCODE 6)
RCODE_DSOTYPENI: Final = 11  # RFC 8490 §5.4 (IANA DNS RCODE 11): the primary TLV's type is not implemented
DSO_KEEPALIVE: Final = 0x0001  # RFC 8490 §7.1: inactivity timeout u32 ms, keepalive interval u32 ms
DSO_RETRY_DELAY: Final = 0x0002  # RFC 8490 §7.2: retry delay u32 ms
DSO_ENCRYPTION_PADDING: Final = 0x0003  # RFC 8490 §7.3: any length, additional TLV only
PUSH_SUBSCRIBE: Final = 0x0040  # RFC 8765 §6.2: NAME, TYPE u16, CLASS u16; an acknowledged request
PUSH_PUSH: Final = 0x0041  # RFC 8765 §6.3: one or more change notifications; unidirectional
PUSH_UNSUBSCRIBE: Final = 0x0042  # RFC 8765 §6.4: the SUBSCRIBE's MESSAGE ID (u16); unidirectional
PUSH_RECONFIRM: Final = 0x0043  # RFC 8765 §6.5: NAME, TYPE u16, CLASS u16, RDATA; unidirectional
INFINITE: Final = 0xFFFFFFFF  # RFC 8490 §7.1: an inactivity timeout or keepalive interval of "never"
MIN_KEEPALIVE_INTERVAL: Final = 10_000  # RFC 8490 §6.5: ms; a shorter interval is the session's error
DELETE_ONE_TTL: Final = 0xFFFFFFFF  # RFC 8765 §6.3: delete the one RR given (NAME, TYPE, CLASS, RDATA)
DELETE_COLLECTIVE_TTL: Final = 0xFFFFFFFE  # RFC 8765 §6.3: delete an RRset, or with TYPE ANY all of a name
MAX_ADD_TTL: Final = 0x7FFFFFFF  # RFC 8765 §6.3 (RFC 2181 §8): TTLs of added records
TYPE_ANY: Final = 255  # RFC 1035 §3.2.3
CLASS_ANY: Final = 255  # RFC 1035 §3.2.5
MAX_TLVS: Final = 64
"""TLVs one message may carry (RFC 8490 sets no limit; we send at most three: primary, padding, retry)."""
MAX_PUSH_RECORDS: Final = 1024
"""Change notifications one PUSH may carry (RFC 8765 sets no limit; a server sends more in several PUSHes)."""

_HEADER: Final = struct.Struct("!HBBHHHH")  # ID, flags (QR|OPCODE|AA|TC|RD), flags (RA|Z|AD|CD|RCODE), counts
_TL: Final = struct.Struct("!HH")  # RFC 8490 §5.4: DSO-TYPE, DSO-LENGTH
_U32: Final = struct.Struct("!I")
_U32X2: Final = struct.Struct("!II")
_U16: Final = struct.Struct("!H")
_TC: Final = struct.Struct("!HH")  # TYPE, CLASS
_RR_FIXED: Final = struct.Struct("!HHIH")  # TYPE, CLASS, TTL, RDLEN (RFC 1035 §4.1.3)
_TTL_RDLEN: Final = struct.Struct("!IH")
_QR: Final = 0x80
_META_TYPES: Final = range(128, 256)  # RFC 6895 §3.1: QTYPEs and meta-TYPEs, never a record's data
_TYPE_OPT: Final = 41  # RFC 6891 §6.1.1: a pseudo-record
_CLASS_NONE: Final = 254  # RFC 2136 §2.4


# -- TLVs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keepalive:
    """RFC 8490 §7.1, in milliseconds (:data:`INFINITE`: never). From a client: what it would like; from a
    server: what the session uses."""

    inactivity_timeout: int
    keepalive_interval: int

    def value(self) -> bytes:
        return _U32X2.pack(self.inactivity_timeout, self.keepalive_interval)


@dataclass(frozen=True, slots=True)
class RetryDelay:
    """RFC 8490 §7.2: wait this many milliseconds before retrying (a primary TLV: the server asks the client
    to close the session)."""

    delay: int

    def value(self) -> bytes:
        return _U32.pack(self.delay)


@dataclass(frozen=True, slots=True)
class EncryptionPadding:
    """RFC 8490 §7.3: ``length`` bytes of padding (sent as zeros; received contents are ignored)."""

    length: int

    def value(self) -> bytes:
        return bytes(self.length)


@dataclass(frozen=True, slots=True)
class Subscribe:
    """RFC 8765 §6.2: watch ``name`` for records of ``rtype`` (ANY: every type) in ``rclass``."""

    name: dns.name.Name
    rtype: int
    rclass: int = dns.rdataclass.IN

    def value(self) -> bytes:
        return _name_wire(self.name) + _TC.pack(self.rtype, self.rclass)


@dataclass(frozen=True, slots=True)
class PushRecord:
    """One change notification of a PUSH (RFC 8765 §6.3).

    ``ttl`` 0 .. 0x7FFFFFFF: ``rdata`` was added with that TTL. :data:`DELETE_ONE_TTL`: ``rdata`` was removed.
    :data:`DELETE_COLLECTIVE_TTL` (``rdata`` None): the RRset of ``rtype`` was removed, or with ``rtype`` ANY
    every RRset of the name (in ``rclass``, or in every class with ``rclass`` ANY)."""

    name: dns.name.Name
    rtype: int
    rclass: int
    ttl: int
    rdata: dns.rdata.Rdata | None

    @classmethod
    def add(cls, name: dns.name.Name, ttl: int, rdata: dns.rdata.Rdata) -> PushRecord:
        return cls(name, rdata.rdtype, rdata.rdclass, ttl, rdata)

    @classmethod
    def delete(cls, name: dns.name.Name, rdata: dns.rdata.Rdata) -> PushRecord:
        return cls(name, rdata.rdtype, rdata.rdclass, DELETE_ONE_TTL, rdata)

    @classmethod
    def delete_rrset(cls, name: dns.name.Name, rtype: int, rclass: int = dns.rdataclass.IN) -> PushRecord:
        return cls(name, rtype, rclass, DELETE_COLLECTIVE_TTL, None)

    @classmethod
    def delete_name(cls, name: dns.name.Name, rclass: int = dns.rdataclass.IN) -> PushRecord:
        return cls(name, TYPE_ANY, rclass, DELETE_COLLECTIVE_TTL, None)

    @property
    def added(self) -> bool:
        return self.ttl <= MAX_ADD_TTL

    @property
    def collective(self) -> bool:
        return self.ttl == DELETE_COLLECTIVE_TTL

    def wire(self) -> bytes:
        _check_record(self.rtype, self.rclass, self.ttl, self.rdata is not None)
        if self.rdata is not None and (self.rdata.rdtype, self.rdata.rdclass) != (self.rtype, self.rclass):
            raise ValueError("the RDATA's type and class differ from the record's")
        rdata = b"" if self.rdata is None else _rdata_wire(self.rdata)
        return _name_wire(self.name) + _RR_FIXED.pack(self.rtype, self.rclass, self.ttl, len(rdata)) + rdata


@dataclass(frozen=True, slots=True)
class Push:
    """RFC 8765 §6.3: one or more change notifications, in order."""

    records: tuple[PushRecord, ...]

    def value(self) -> bytes:
        """The TLV value; ValueError if a receiver would refuse it (too many records, or names in RDATA
        beyond the DNS guard's budget: split the change into several PUSHes)."""
        if not 1 <= len(self.records) <= MAX_PUSH_RECORDS:
            raise ValueError("a PUSH carries 1 to MAX_PUSH_RECORDS change notifications")
        body = b"".join(r.wire() for r in self.records)
        try:
            _guard(len(self.records), body)
        except ParseError as e:
            raise ValueError(f"PUSH refused by the DNS guard: {e}") from None
        return body


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """RFC 8765 §6.4: cancel the subscription made by the SUBSCRIBE with this MESSAGE ID."""

    subscribe_id: int

    def value(self) -> bytes:
        if not 1 <= self.subscribe_id <= 0xFFFF:
            raise ValueError("a SUBSCRIBE's MESSAGE ID is 1 to 65535")
        return _U16.pack(self.subscribe_id)


@dataclass(frozen=True, slots=True)
class Reconfirm:
    """RFC 8765 §6.5: the client believes this record is stale and asks the server to check it."""

    name: dns.name.Name
    rdata: dns.rdata.Rdata

    def value(self) -> bytes:
        _check_record(self.rdata.rdtype, self.rdata.rdclass, 0, True)
        owner, rdata = _name_wire(self.name), _rdata_wire(self.rdata)
        tc = _TC.pack(self.rdata.rdtype, self.rdata.rdclass)
        try:
            _guard(1, owner + tc + _TTL_RDLEN.pack(0, len(rdata)) + rdata)
        except ParseError as e:
            raise ValueError(f"RECONFIRM refused by the DNS guard: {e}") from None
        return owner + tc + rdata


@dataclass(frozen=True, slots=True)
class UnknownTlv:
    """A TLV of a type we do not implement, kept as received (RFC 8490 §5.4)."""

    type: int
    data: bytes

    def value(self) -> bytes:
        return self.data


Tlv: TypeAlias = (Keepalive | RetryDelay | EncryptionPadding | Subscribe | Push | Unsubscribe | Reconfirm
                  | UnknownTlv)

_TYPES: Final[dict[type, int]] = {
    Keepalive: DSO_KEEPALIVE,
    RetryDelay: DSO_RETRY_DELAY,
    EncryptionPadding: DSO_ENCRYPTION_PADDING,
    Subscribe: PUSH_SUBSCRIBE,
    Push: PUSH_PUSH,
    Unsubscribe: PUSH_UNSUBSCRIBE,
    Reconfirm: PUSH_RECONFIRM,
}
_REQUEST_ONLY: Final = frozenset({PUSH_SUBSCRIBE})  # RFC 8765 §6.2: SUBSCRIBE is acknowledged
_UNIDIRECTIONAL_ONLY: Final = frozenset({DSO_RETRY_DELAY, PUSH_PUSH, PUSH_UNSUBSCRIBE, PUSH_RECONFIRM})
# RFC 8490 §7.2 (RETRY DELAY as a primary TLV), RFC 8765 §6.3-6.5 (PUSH, UNSUBSCRIBE, RECONFIRM)


def tlv_type(tlv: Tlv) -> int:
    """The DSO-TYPE of ``tlv``."""
    return tlv.type if isinstance(tlv, UnknownTlv) else _TYPES[type(tlv)]


_KNOWN: Final = frozenset(_TYPES.values())


# -- messages -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DsoMessage:
    """A DSO message (RFC 8490 §5.4). ``msg_id`` 0 with ``response`` False: a unidirectional message
    (§5.4). ``tlvs[0]`` is the primary TLV of a request or unidirectional message; a response's TLVs may
    be empty, else its first one carries the request's primary type (§5.4: the session checks that)."""

    msg_id: int
    tlvs: tuple[Tlv, ...]
    response: bool = False
    rcode: int = 0

    @property
    def primary(self) -> Tlv | None:
        return self.tlvs[0] if self.tlvs and not self.response else None

    @property
    def unidirectional(self) -> bool:
        return not self.response and self.msg_id == 0


def encode(message: DsoMessage) -> bytes:
    """The wire form of ``message``; ValueError if it breaks a rule :func:`decode` enforces."""
    types = [tlv_type(t) for t in message.tlvs]
    for t in message.tlvs:
        if isinstance(t, UnknownTlv) and (t.type in _KNOWN or not 0 <= t.type <= 0xFFFF):
            raise ValueError("an UnknownTlv of a type we implement (use its class) or out of range")
    _check_shape(message.msg_id, message.response, message.rcode, types, ValueError)
    flags = (_QR if message.response else 0) | OPCODE_DSO << 3
    parts = [_HEADER.pack(message.msg_id, flags, message.rcode, 0, 0, 0, 0)]
    for tlv in message.tlvs:
        try:
            value = tlv.value()
        except struct.error as e:  # a field out of its range
            raise ValueError(f"TLV field out of range: {e}") from None
        if len(value) > 0xFFFF:
            raise ValueError("a TLV's value is at most 65535 bytes")
        parts.append(_TL.pack(tlv_type(tlv), len(value)) + value)
    wire = b"".join(parts)
    if len(wire) > MAX_MESSAGE:
        raise ValueError("a DSO message is at most 65535 bytes")
    return wire


def decode(wire: bytes) -> DsoMessage:
    """Parse a DSO message, bounded first; ParseError and nothing else."""
    size = len(wire)
    if size > MAX_MESSAGE:
        raise ParseError("oversized")
    if size < HEADER_SIZE:
        raise ParseError("truncated")
    msg_id, flags, low, qd, an, ns, ar = _HEADER.unpack_from(wire)
    if (flags >> 3) & 0xF != OPCODE_DSO:
        raise ParseError("not a DSO message")
    if qd or an or ns or ar:
        raise ParseError("DSO counts not zero")  # RFC 8490 §5.4: FORMERR
    # RFC 8490 §5.4: AA, TC, RD, RA, Z, AD and CD are sent as zero and ignored on receipt.
    response, rcode = bool(flags & _QR), low & 0xF
    frames: list[tuple[int, int, int]] = []  # (type, start, end) of each TLV's value
    p = HEADER_SIZE
    while p < size:
        if len(frames) >= MAX_TLVS:
            raise ParseError("too many TLVs")
        if p + _TL.size > size:
            raise ParseError("truncated TLV")
        tlv, length = _TL.unpack_from(wire, p)
        p += _TL.size
        if p + length > size:
            raise ParseError("TLV past the end")
        frames.append((tlv, p, p + length))
        p += length
    _check_shape(msg_id, response, rcode, [f[0] for f in frames], ParseError)
    tlvs = tuple(_decode_tlv(wire, t, start, end) for t, start, end in frames)
    return DsoMessage(msg_id, tlvs, response, rcode)


def _check_shape(msg_id: int, response: bool, rcode: int, types: list[int],
                 error: type[Exception]) -> None:
    """The header and TLV-placement rules of RFC 8490 §5.4 and RFC 8765 §6."""
    if not 0 <= msg_id <= 0xFFFF or not 0 <= rcode <= 0xF:
        raise error("header field out of range")
    if len(types) > MAX_TLVS:
        raise error("too many TLVs")
    if response:
        if msg_id == 0:
            raise error("response to a unidirectional message")  # §5.4: those get none
        return
    if not types:
        raise error("no primary TLV")  # §5.4
    primary = types[0]
    if rcode and (msg_id or primary != DSO_RETRY_DELAY):
        raise error("RCODE in a request")  # only a RETRY DELAY message gives a reason (§7.2)
    if primary == DSO_ENCRYPTION_PADDING:
        raise error("padding as the primary TLV")  # §7.3
    if msg_id and primary in _UNIDIRECTIONAL_ONLY:
        raise error("TLV must be unidirectional")
    if not msg_id and primary in _REQUEST_ONLY:
        raise error("TLV must be a request")


# -- TLV values ---------------------------------------------------------------------------------------------


def _decode_tlv(wire: bytes, tlv: int, start: int, end: int) -> Tlv:
    length = end - start
    if tlv == DSO_KEEPALIVE:
        if length != _U32X2.size:
            raise ParseError("keepalive length")
        return Keepalive(*_U32X2.unpack_from(wire, start))
    if tlv == DSO_RETRY_DELAY:
        if length != _U32.size:
            raise ParseError("retry delay length")
        return RetryDelay(_U32.unpack_from(wire, start)[0])
    if tlv == DSO_ENCRYPTION_PADDING:
        return EncryptionPadding(length)
    if tlv == PUSH_SUBSCRIBE:
        name, p = _read_name(wire, start, end)
        if p + _TC.size != end:
            raise ParseError("subscribe length")
        return Subscribe(name, *_TC.unpack_from(wire, p))
    if tlv == PUSH_PUSH:
        return Push(_decode_push(wire, start, end))
    if tlv == PUSH_UNSUBSCRIBE:
        if length != _U16.size:
            raise ParseError("unsubscribe length")
        (subscribe_id,) = _U16.unpack_from(wire, start)
        if not subscribe_id:
            raise ParseError("unsubscribe of message ID 0")  # a SUBSCRIBE's ID is never 0
        return Unsubscribe(subscribe_id)
    if tlv == PUSH_RECONFIRM:
        name, p = _read_name(wire, start, end)
        if p + _TC.size > end:
            raise ParseError("truncated TLV")
        rtype, rclass = _TC.unpack_from(wire, p)
        p += _TC.size
        _check_record(rtype, rclass, 0, True, ParseError)
        _guard(1, wire[start:p] + _TTL_RDLEN.pack(0, end - p) + wire[p:end])  # as the record it names
        return Reconfirm(name, _parse_rdatas(wire, [(rtype, rclass, p, end)])[0])
    return UnknownTlv(tlv, wire[start:end])


def _decode_push(wire: bytes, start: int, end: int) -> tuple[PushRecord, ...]:
    """The change notifications in ``wire[start:end]``: framed first (owner names, fixed fields, counts),
    then guarded as a whole, then every RDATA parsed."""
    heads: list[tuple[dns.name.Name, int, int, int]] = []
    rdatas: list[tuple[int, int, int, int]] = []
    p = start
    while p < end:
        if len(heads) >= MAX_PUSH_RECORDS:
            raise ParseError("too many PUSH records")
        name, p = _read_name(wire, p, end)
        if p + _RR_FIXED.size > end:
            raise ParseError("truncated record")
        rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(wire, p)
        p += _RR_FIXED.size
        if p + rdlen > end:
            raise ParseError("record past the end")
        _check_record(rtype, rclass, ttl, bool(rdlen), ParseError)
        heads.append((name, rtype, rclass, ttl))
        if ttl != DELETE_COLLECTIVE_TTL:
            rdatas.append((rtype, rclass, p, p + rdlen))
        p += rdlen
    if not heads:
        raise ParseError("empty PUSH")  # RFC 8765 §6.3: at least one change notification
    _guard(len(heads), wire[start:end])
    parsed = iter(_parse_rdatas(wire, rdatas))
    return tuple(PushRecord(name, rtype, rclass, ttl, None if ttl == DELETE_COLLECTIVE_TTL else next(parsed))
                 for name, rtype, rclass, ttl in heads)


def _check_record(rtype: int, rclass: int, ttl: int, has_rdata: bool,
                  error: type[Exception] = ValueError) -> None:
    """The TTL, TYPE and CLASS rules of a change notification (RFC 8765 §6.3) or a RECONFIRM (§6.5)."""
    if not (0 <= rtype <= 0xFFFF and 0 <= rclass <= 0xFFFF and 0 <= ttl <= 0xFFFFFFFF):
        raise error("record field out of range")
    if ttl == DELETE_COLLECTIVE_TTL:
        if has_rdata:
            raise error("collective deletion with RDATA")
        if rtype != TYPE_ANY and (rtype in _META_TYPES or rtype == _TYPE_OPT):
            raise error("meta type in a record")
        return
    if MAX_ADD_TTL < ttl < DELETE_ONE_TTL:
        raise error("PUSH TTL")  # neither an addition, nor one of the two deletions
    if rtype in _META_TYPES or rtype == _TYPE_OPT:
        raise error("meta type in a record")
    if rclass in (CLASS_ANY, _CLASS_NONE):
        raise error("meta class in a record")


def _guard(count: int, records: bytes) -> None:
    """Check ``count`` resource records in wire form with the DNS guard, as the answer section of a
    response: the names in their RDATA keep to its label, length and pointer rules, and dnspython's work on
    them to its budget (docs/hardening.md), before dnspython reads any. ParseError if not."""
    check(_HEADER.pack(0, _QR, 0, 0, count, 0, 0) + records)


def _parse_rdatas(wire: bytes, frames: list[tuple[int, int, int, int]]) -> list[dns.rdata.Rdata]:
    """Parse each RDATA ``(type, class, start, end)`` of ``wire`` (guarded already: :func:`_guard`), and
    refuse compressed names: each RDATA is parsed alone and must re-encode to its own bytes, which one with
    a compression pointer cannot (the octet where its first pointer was differs)."""
    datas = [(t, c, wire[s:e]) for t, c, s, e in frames]
    out = []
    for rtype, rclass, data in datas:
        try:
            rdclass, rdtype = dns.rdataclass.RdataClass.make(rclass), dns.rdatatype.RdataType.make(rtype)
            rdata = dns.rdata.from_wire(rdclass, rdtype, data, 0, len(data))
            again = rdata.to_wire()
        except Exception as e:  # dnspython raises many types (FormError, ValueError, struct.error, ...)
            raise ParseError("malformed RDATA") from e
        if again != data:
            raise ParseError("compressed or non-canonical RDATA")
        out.append(rdata)
    return out


# -- names --------------------------------------------------------------------------------------------------


def _read_name(wire: bytes, start: int, end: int) -> tuple[dns.name.Name, int]:
    """The uncompressed name at ``start`` (ending by ``end``) and where it ends. The guard reads it from a
    window that begins at the name, so any compression pointer points at or after its start and is refused
    (names in DSO TLVs are uncompressed: RFC 8765 §6.2); label and length rules are the guard's."""
    window = wire[start:min(end, start + MAX_NAME)]
    try:
        used = name_end(window, 0)
    except ParseError as e:
        if str(e) == "truncated" and len(window) == MAX_NAME:
            raise ParseError("name too long") from None  # no root label within 255 octets
        raise
    try:
        name, _ = dns.name.from_wire(window, 0)
    except Exception as e:  # the guard's rules are at least dnspython's; kept so only ParseError escapes
        raise ParseError("malformed name") from e
    return name, start + used


def _name_wire(name: dns.name.Name) -> bytes:
    if not name.is_absolute():
        raise ValueError("names on the wire are absolute")
    wire = name.to_wire()
    assert wire is not None  # to_wire without a file returns the bytes
    return wire


def _rdata_wire(rdata: dns.rdata.Rdata) -> bytes:
    """RDATA uncompressed, as RFC 8765 requires (dnspython compresses only when given a table)."""
    wire = rdata.to_wire()
    assert wire is not None
    return wire
