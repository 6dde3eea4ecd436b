"""EDNS(0) option classes for dnspython: the Update Lease option (RFC 9664).

:class:`UpdateLeaseOption` renders the option when building a message. Importing this module does *not*
register it with ``dns.edns``: that registry is process-wide, and a registered class changes how every
parser in the process treats the option (a malformed one would make ``dns.message.from_wire`` raise
instead of yielding a ``GenericOption``, which the rendezvous server answers with FORMERR). Readers should
decode ``GenericOption`` data with :func:`decode_update_lease`; :func:`register` exists for tools that
want dnspython to build the class itself. The LLQ option (code 1) lives in :mod:`tunneld.proto.llq`.

Layout (RFC 9664 §4, PROTOCOLS.md section 4): OPTION-CODE 2, OPTION-LENGTH 4 (LEASE) or 8 (LEASE,
KEY-LEASE), both unsigned 32-bit seconds, big-endian. In the 4-byte form LEASE covers every RR of the
update, KEY records included.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import dns.edns
import dns.exception
import dns.wire

__all__ = [
    "UPDATE_LEASE_OPTION_CODE",
    "UpdateLeaseOption",
    "decode_update_lease",
    "encode_update_lease",
    "register",
]

UPDATE_LEASE_OPTION_CODE: Final = 2
"""RFC 9664 §4 (IANA: "UL")."""

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
    """(LEASE, KEY-LEASE or None) from the option data; ValueError unless it is 4 or 8 bytes long."""
    if len(data) == 4:
        return struct.unpack("!I", data)[0], None
    if len(data) == 8:
        lease, key_lease = struct.unpack("!II", data)
        return lease, key_lease
    raise ValueError("update lease option must be 4 or 8 bytes")


class UpdateLeaseOption(dns.edns.Option):
    """RFC 9664 Update Lease: ``lease`` seconds, and ``key_lease`` seconds in the 8-byte form (else None)."""

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
        except ValueError as e:
            # dnspython's exception classes have an unannotated __init__.
            raise dns.exception.FormError(str(e)) from None  # type: ignore[no-untyped-call]
        return cls(lease, key_lease)


def register() -> None:
    """Make dnspython parse option code 2 as :class:`UpdateLeaseOption` in this whole process (opt-in:
    see the module docstring for why importing does not do this)."""
    dns.edns.register_type(UpdateLeaseOption, dns.edns.OptionType.make(UPDATE_LEASE_OPTION_CODE))
