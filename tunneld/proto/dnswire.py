"""DNS wire helpers that dnspython does not give: record walking with raw TTLs, reading in place, and the
Update Lease option.

dnspython parses messages, but keeps neither where a record starts (TSIG needs the offset of its RR) nor
the TTL of a record as sent (it rewrites TTLs above 2**31-1 to 0, and drops them for RRs without RDATA),
while LLQ removals (TTL 0xFFFFFFFF) and RFC 2136 deletions (TTL 0) depend on them. :func:`walk` gives
the frame of every resource record; it is :func:`tunneld.proto.dnsguard.check` (so every bound on
untrusted DNS input holds there too) and raises :class:`~tunneld.proto.errors.ParseError` and nothing else.
The in-place readers (:func:`read_name`, :func:`question`, :func:`extended_rcode`, :func:`soa_numbers`)
serve messages `check` passed where dnspython's whole-message parse costs too much (NOTIFYs, transfers).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Final

import dns.edns
import dns.exception
import dns.name
import dns.rdatatype
import dns.wire

from tunneld.proto.dnsguard import (
    ADDITIONAL,
    ANSWER,
    AUTHORITY,
    HEADER_SIZE,
    MAX_MESSAGE,
    Record,
    check,
    name_end,
)
from tunneld.proto.errors import ParseError

__all__ = [
    "ADDITIONAL",
    "ANSWER",
    "AUTHORITY",
    "HEADER_SIZE",
    "MAX_MESSAGE",
    "SOA_NUMBERS",
    "UPDATE_LEASE_OPTION_CODE",
    "Record",
    "UpdateLeaseOption",
    "decode_update_lease",
    "encode_update_lease",
    "extended_rcode",
    "from_server",
    "question",
    "read_name",
    "soa_numbers",
    "walk",
]

SOA_NUMBERS: Final = struct.Struct("!IIIII")  # SERIAL, REFRESH, RETRY, EXPIRE, MINIMUM (RFC 1035 §3.3.13)
_TYPE_CLASS: Final = struct.Struct("!HH")


def read_name(wire: bytes, offset: int) -> tuple[dns.name.Name, int]:
    """The name at ``offset`` of a message :func:`check` passed, and where it ends in place."""
    try:
        name, used = dns.name.from_wire(wire, offset)
    except dns.exception.DNSException as e:  # not after check(); kept to the one error type all the same
        raise ParseError(f"name: {e}") from None
    return name, offset + used


def question(wire: bytes) -> tuple[dns.name.Name, int, int]:
    """The first question of a message :func:`check` passed (QDCOUNT at least 1): name, type, class."""
    name, end = read_name(wire, HEADER_SIZE)
    qtype, qclass = _TYPE_CLASS.unpack_from(wire, end)  # check() framed the question: the bytes are there
    return name, qtype, qclass


def extended_rcode(wire: bytes, records: list[Record]) -> int:
    """The message's RCODE: the header's 4 bits and, from an OPT record, the upper 8 (RFC 6891 §6.1.3)."""
    rcode = wire[3] & 0xF
    for r in records:
        if r.section == ADDITIONAL and r.rtype == dns.rdatatype.OPT:
            rcode |= (r.ttl >> 24) << 4
    return rcode


def soa_numbers(wire: bytes, record: Record) -> int:
    """Where the five numbers of the SOA ``record`` start (after MNAME and RNAME); ParseError for an RDATA
    that is not two names and 20 octets (RFC 1035 §3.3.13)."""
    at = name_end(wire, name_end(wire, record.rdata))
    if record.rdata + record.rdlength - at != SOA_NUMBERS.size:
        raise ParseError("malformed SOA")
    return at


def walk(wire: bytes) -> list[Record]:
    """Every resource record after the question section, in wire order. The message must frame
    exactly (no record may run past the end, and nothing may follow the last one) and keep within
    every bound of :mod:`tunneld.proto.dnsguard`."""
    return check(wire)


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
