"""DNS wire helpers that dnspython does not give: record walking with raw TTLs, and the Update Lease option.

dnspython parses messages, but keeps neither where a record starts (TSIG needs the offset of its RR) nor
the TTL of a record as sent (it rewrites TTLs above 2**31-1 to 0, and drops them for RRs without RDATA),
while LLQ removals (TTL 0xFFFFFFFF) and RFC 2136 deletions (TTL 0) depend on them. :func:`walk` reads the
frame of every resource record; it is bounded (a message is at most 65535 bytes, a name at most 255
octets) and raises :class:`~tunneld.proto.errors.ParseError` and nothing else.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any, Final

import dns.edns
import dns.exception
import dns.wire

from tunneld.proto.errors import ParseError

__all__ = [
    "ADDITIONAL",
    "ANSWER",
    "AUTHORITY",
    "HEADER_SIZE",
    "MAX_MESSAGE",
    "UPDATE_LEASE_OPTION_CODE",
    "Record",
    "UpdateLeaseOption",
    "decode_update_lease",
    "encode_update_lease",
    "from_server",
    "skip_name",
    "walk",
]

# -- messages (RFC 1035 §4.1) ----------------------------------------------------------------------------

MAX_MESSAGE: Final = 65535  # RFC 1035 §4.2.2: the TCP length prefix bounds every message
HEADER_SIZE: Final = 12  # §4.1.1
MAX_NAME: Final = 255  # §2.3.4: octets of a name in wire form
_COUNTS: Final = struct.Struct("!HHHH")  # QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT at offset 4
_RR_FIXED: Final = struct.Struct("!HHIH")  # TYPE, CLASS, TTL, RDLENGTH (§4.1.3)
_QUESTION_FIXED: Final = 4  # QTYPE, QCLASS (§4.1.2)

ANSWER: Final = 1
AUTHORITY: Final = 2
ADDITIONAL: Final = 3


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


def skip_name(wire: bytes, offset: int) -> int:
    """The offset just after the (possibly compressed) name at ``offset``. Pointers are not followed:
    the name ends at the first one (§4.1.4)."""
    size = 0
    while True:
        if offset >= len(wire):
            raise ParseError("truncated")
        length = wire[offset]
        if length & 0xC0 == 0xC0:
            if offset + 2 > len(wire):
                raise ParseError("truncated")
            return offset + 2
        if length & 0xC0:
            raise ParseError("bad label")  # 0x40 and 0x80: extended label types (RFC 6891 §5)
        size += length + 1
        if size > MAX_NAME:
            raise ParseError("name too long")
        offset += 1 + length
        if length == 0:
            return offset


def walk(wire: bytes) -> list[Record]:
    """Every resource record after the question section, in wire order. The message must frame
    exactly: no record may run past the end, and nothing may follow the last one."""
    if len(wire) > MAX_MESSAGE:
        raise ParseError("oversized")
    if len(wire) < HEADER_SIZE:
        raise ParseError("truncated")
    qd, an, ns, ar = _COUNTS.unpack_from(wire, 4)
    offset = HEADER_SIZE
    for _ in range(qd):
        offset = skip_name(wire, offset) + _QUESTION_FIXED
    records: list[Record] = []
    for section, count in ((ANSWER, an), (AUTHORITY, ns), (ADDITIONAL, ar)):
        for _ in range(count):
            start = offset
            offset = skip_name(wire, offset)
            if offset + _RR_FIXED.size > len(wire):
                raise ParseError("truncated")
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, offset)
            offset += _RR_FIXED.size
            records.append(Record(start, section, rtype, rclass, ttl, offset, rdlength))
            offset += rdlength
    if offset > len(wire):
        raise ParseError("truncated")
    if offset < len(wire):
        raise ParseError("trailing data")
    return records


def from_server(source: tuple[str, int], server: tuple[str, int]) -> bool:
    """Whether a datagram from ``source`` comes from ``server`` (a client core drops any other: a reply
    must come from where the request went, RFC 5452 §9.1). Addresses compare by value, so "::1" and
    "0:0::1" are one, and an IPv4-mapped IPv6 source matches its IPv4 server."""
    if source[1] != server[1]:
        return False
    try:
        a, b = ipaddress.ip_address(source[0].split("%")[0]), ipaddress.ip_address(server[0].split("%")[0])
    except ValueError:
        return source[0] == server[0]
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    return a == b


# -- the Update Lease option (RFC 9664 §4) ----------------------------------------------------------------

UPDATE_LEASE_OPTION_CODE: Final = 2
"""RFC 9664 §4 (IANA: "UL"). Data: LEASE (u32 seconds), optionally KEY-LEASE (u32): 4 or 8 bytes. In the
4-byte form LEASE covers every RR of the update, KEY records included."""

_U32_MAX: Final = 0xFFFFFFFF


def encode_update_lease(lease: int, key_lease: int | None = None) -> bytes:
    """The option *data* (without code and length): 4 bytes, or 8 with a KEY-LEASE."""
    for value in (lease, key_lease):
        if value is not None and not 0 <= value <= _U32_MAX:
            raise ValueError("lease must fit in an unsigned 32-bit field")
    if key_lease is None:
        return struct.pack("!I", lease)
    return struct.pack("!II", lease, key_lease)


def decode_update_lease(data: bytes) -> tuple[int, int | None]:
    """(LEASE, KEY-LEASE or None) from the option data; ParseError unless it is 4 or 8 bytes long."""
    if len(data) == 4:
        return struct.unpack("!I", data)[0], None
    if len(data) == 8:
        lease, key_lease = struct.unpack("!II", data)
        return lease, key_lease
    raise ParseError("update lease option length")


class UpdateLeaseOption(dns.edns.Option):
    """RFC 9664 Update Lease, for building messages with dnspython: ``lease`` seconds, and ``key_lease``
    seconds in the 8-byte form (else None).

    Not registered with ``dns.edns``: that registry is process-wide, and a registered class would make
    ``dns.message.from_wire`` raise on a malformed option instead of yielding a ``GenericOption`` (which
    the rendezvous server answers with FORMERR). Readers decode the data with :func:`decode_update_lease`.
    """

    def __init__(self, lease: int, key_lease: int | None = None) -> None:
        super().__init__(dns.edns.OptionType.make(UPDATE_LEASE_OPTION_CODE))
        self._data = encode_update_lease(lease, key_lease)  # validates the ranges
        self.lease = lease
        self.key_lease = key_lease

    def to_wire(self, file: Any | None = None) -> bytes | None:
        if file is not None:
            file.write(self._data)
            return None
        return self._data

    def to_text(self) -> str:
        if self.key_lease is None:
            return f"UPDATE-LEASE {self.lease}"
        return f"UPDATE-LEASE {self.lease} KEY-LEASE {self.key_lease}"

    def __repr__(self) -> str:
        return f"UpdateLeaseOption(lease={self.lease}, key_lease={self.key_lease})"

    @classmethod
    def from_wire_parser(cls, otype: dns.edns.OptionType | str, parser: dns.wire.Parser) -> dns.edns.Option:
        try:
            lease, key_lease = decode_update_lease(parser.get_remaining())
        except ParseError as e:
            # dnspython's exception classes have an unannotated __init__.
            raise dns.exception.FormError(str(e)) from None  # type: ignore[no-untyped-call]
        return cls(lease, key_lease)
