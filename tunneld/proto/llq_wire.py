"""The wire of DNS Long-Lived Queries (RFC 8764): the EDNS(0) LLQ option and message parsing.

Shared by the client (:mod:`tunneld.proto.llq`) and the rendezvous server (:mod:`tunneld.dnsserver.llq`).
Importing this module registers :class:`LLQOption` with dnspython for option code 1 (process-wide, the way
dnspython registers ``CookieOption``), so messages carrying the option parse and render. The option's data
is 18 bytes (§3.2): VERSION u16 (1) | OPCODE u16 | ERROR u16 | LLQ-ID u64 | LEASE u32 (some documents show
a 16-byte layout without ERROR: wrong).
"""

from __future__ import annotations

import struct
from typing import Any, Final

import dns.edns
import dns.exception
import dns.message
import dns.wire

from tunneld.proto.dnsguard import parse
from tunneld.proto.dnswire import ANSWER, walk
from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import TsigError, TsigSession

__all__ = [
    "LLQ_ERR_BAD_VERS",
    "LLQ_ERR_FORMAT",
    "LLQ_ERR_NO_ERROR",
    "LLQ_ERR_NO_SUCH_LLQ",
    "LLQ_ERR_SERV_FULL",
    "LLQ_ERR_STATIC",
    "LLQ_ERR_UNKNOWN",
    "LLQ_MAX_TRIES",
    "LLQ_OPTION_CODE",
    "LLQ_OPTION_LEN",
    "LLQ_OP_EVENT",
    "LLQ_OP_REFRESH",
    "LLQ_OP_SETUP",
    "LLQ_REMOVE_TTL",
    "LLQ_UDP_PAYLOAD",
    "LLQ_VERSION",
    "UDP_PAYLOAD",
    "LLQOption",
    "answer_ttls",
    "error_name",
    "find_llq_option",
    "parse_llq_option",
    "parse_message",
    "read_answer",
]

# -- constants (RFC 8764 §3.2 unless said otherwise) -------------------------------------------------------

LLQ_OPTION_CODE: Final = 1  # RFC 8764 §3.1
LLQ_OPTION_LEN: Final = 18  # §3.2: version, opcode, error (u16 each), ID (u64), lease (u32)
LLQ_VERSION: Final = 1  # §3.2
LLQ_OP_SETUP: Final = 1  # §3.2 LLQ-OPCODE
LLQ_OP_REFRESH: Final = 2
LLQ_OP_EVENT: Final = 3
LLQ_ERR_NO_ERROR: Final = 0  # §3.2 LLQ-ERROR
LLQ_ERR_SERV_FULL: Final = 1
LLQ_ERR_STATIC: Final = 2
LLQ_ERR_FORMAT: Final = 3
LLQ_ERR_NO_SUCH_LLQ: Final = 4
LLQ_ERR_BAD_VERS: Final = 5
LLQ_ERR_UNKNOWN: Final = 6
LLQ_REMOVE_TTL: Final = 0xFFFFFFFF  # an event RR with this TTL is a removal (§7)
LLQ_UDP_PAYLOAD: Final = 1440  # Apple's OPT class
UDP_PAYLOAD: Final = 1232  # the EDNS size our client offers and events never exceed (DNS Flag Day 2020)
LLQ_MAX_TRIES: Final = 3  # §5.1, Apple kLLQ_MAX_TRIES: sends of one request (the server: of one event)

_ERROR_NAMES: Final = {
    LLQ_ERR_NO_ERROR: "NO-ERROR",
    LLQ_ERR_SERV_FULL: "SERV-FULL",
    LLQ_ERR_STATIC: "STATIC",
    LLQ_ERR_FORMAT: "FORMAT-ERR",
    LLQ_ERR_NO_SUCH_LLQ: "NO-SUCH-LLQ",
    LLQ_ERR_BAD_VERS: "BAD-VERS",
    LLQ_ERR_UNKNOWN: "UNKNOWN-ERR",
}
_OPCODE_NAMES: Final = {LLQ_OP_SETUP: "SETUP", LLQ_OP_REFRESH: "REFRESH", LLQ_OP_EVENT: "EVENT"}

_LLQ_STRUCT: Final = struct.Struct("!HHHQI")


def error_name(code: int) -> str:
    return f"LLQ-ERROR {code} ({_ERROR_NAMES.get(code, 'unknown')})"


# -- the option --------------------------------------------------------------------------------------------


class LLQOption(dns.edns.Option):
    """The LLQ EDNS(0) option (code 1): 18 bytes of data, all fields unsigned big-endian."""

    def __init__(self, version: int = LLQ_VERSION, opcode: int = LLQ_OP_SETUP, error: int = 0,
                 llq_id: int = 0, lease: int = 0) -> None:
        super().__init__(dns.edns.OptionType.make(LLQ_OPTION_CODE))
        for name, value, bits in (("version", version, 16), ("opcode", opcode, 16), ("error", error, 16),
                                  ("llq_id", llq_id, 64), ("lease", lease, 32)):
            if not 0 <= value < 1 << bits:
                raise ValueError(f"LLQ {name} out of range")
        self.version = version
        self.opcode = opcode
        self.error = error
        self.llq_id = llq_id
        self.lease = lease

    def to_wire(self, file: Any | None = None) -> bytes | None:
        data = _LLQ_STRUCT.pack(self.version, self.opcode, self.error, self.llq_id, self.lease)
        if file:
            file.write(data)
            return None
        return data

    def to_bytes(self) -> bytes:
        """The 18 option data bytes (without option code and length)."""
        return _LLQ_STRUCT.pack(self.version, self.opcode, self.error, self.llq_id, self.lease)

    def to_text(self) -> str:
        op = _OPCODE_NAMES.get(self.opcode, str(self.opcode))
        return (f"LLQ v{self.version} {op} error {self.error} id {self.llq_id:#018x} lease {self.lease}")

    def __repr__(self) -> str:
        return (f"LLQOption(version={self.version}, opcode={self.opcode}, error={self.error}, "
                f"llq_id={self.llq_id:#x}, lease={self.lease})")

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    @classmethod
    def from_wire_parser(cls, otype: dns.edns.OptionType | str, parser: dns.wire.Parser) -> dns.edns.Option:
        """dnspython's hook; a wrong length raises dnspython's own FormError (wrapped by
        :func:`parse_message`)."""
        data = parser.get_remaining()
        if len(data) != LLQ_OPTION_LEN:
            # dnspython's exception classes are untyped.
            raise dns.exception.FormError("LLQ option must be 18 bytes")  # type: ignore[no-untyped-call]
        return cls(*_LLQ_STRUCT.unpack(data))


def parse_llq_option(data: bytes) -> LLQOption:
    """Parse the 18 option data bytes; ParseError("LLQ option length") for any other length."""
    if len(data) != LLQ_OPTION_LEN:
        raise ParseError("LLQ option length")
    return LLQOption(*_LLQ_STRUCT.unpack(data))


dns.edns.register_type(LLQOption, dns.edns.OptionType.make(LLQ_OPTION_CODE))


# -- messages ----------------------------------------------------------------------------------------------


def answer_ttls(wire: bytes) -> list[int]:
    """The raw TTLs of the answer section, in order (dnspython turns TTLs above 0x7FFFFFFF into 0)."""
    return [r.ttl for r in walk(wire) if r.section == ANSWER]


def parse_message(wire: bytes) -> dns.message.Message:
    """Parse a DNS message, bounded first (:mod:`tunneld.proto.dnsguard`), with one RR per RRset (so
    per-RR TTLs survive) and TSIG validation off.

    Raises ParseError and nothing else: the guard's reason ("truncated" for a message that ends early),
    or "malformed DNS message" for anything dnspython rejects (a malformed LLQ option included)."""
    return parse(wire, one_rr_per_rrset=True)


def read_answer(wire: bytes, tsig: TsigSession | None,
                now: float) -> tuple[dns.message.Message, list[int]] | str:
    """A server's answer, its signature checked first with ``tsig`` (if any), then parsed once with its raw
    answer TTLs (one per record). For a message to drop instead: the name to count it under ("tsig
    rejected", or "parse error: <why>"). The LLQ client and the DNS Push client read answers this way."""
    if tsig is not None:
        try:
            tsig.verify(wire, now)
        except (TsigError, ParseError):
            return "tsig rejected"
    try:
        msg = parse_message(wire)
        ttls = answer_ttls(wire)
    except ParseError as e:
        return f"parse error: {e}"
    if len(ttls) != len(msg.answer):  # one RR per RRset, so they must line up
        return "parse error: answer count"
    return msg, ttls


def find_llq_option(message: dns.message.Message) -> LLQOption | None:
    """The first LLQ option in the message's OPT RR (option i belongs to question i; we ask one)."""
    for option in message.options:
        if isinstance(option, LLQOption):
            return option
    return None
