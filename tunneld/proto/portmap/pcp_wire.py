"""PCP (RFC 6887) on the wire: its constants, the MAP and ANNOUNCE messages, pure encoders, a bounded parser.

Only what a port-mapping client needs (MAP, §11; ANNOUNCE, §14.1); the gateway side of each message is here
too, for tests and simulations. The parser raises :class:`~tunneld.proto.errors.ParseError` and nothing else.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from tunneld.proto.errors import ParseError

__all__ = [
    "PCP_ANNOUNCE_MAX_DELAY",
    "PCP_EPOCH_BACKWARDS_TOLERANCE",
    "PCP_EPOCH_SLACK",
    "PCP_HEADER_LEN",
    "PCP_IRT",
    "PCP_MAP_BODY_LEN",
    "PCP_MAX_MESSAGE_LEN",
    "PCP_MRT",
    "PCP_NONCE_LEN",
    "PCP_OP_ANNOUNCE",
    "PCP_OP_MAP",
    "PCP_PROTO_UDP",
    "PCP_RAND",
    "PCP_RENEW_MAX_FRACTION",
    "PCP_RENEW_MIN_FRACTION",
    "PCP_RESULT_ADDRESS_MISMATCH",
    "PCP_RESULT_CANNOT_PROVIDE_EXTERNAL",
    "PCP_RESULT_EXCESSIVE_REMOTE_PEERS",
    "PCP_RESULT_MALFORMED_OPTION",
    "PCP_RESULT_MALFORMED_REQUEST",
    "PCP_RESULT_NETWORK_FAILURE",
    "PCP_RESULT_NOT_AUTHORIZED",
    "PCP_RESULT_NO_RESOURCES",
    "PCP_RESULT_SUCCESS",
    "PCP_RESULT_UNSUPP_OPCODE",
    "PCP_RESULT_UNSUPP_OPTION",
    "PCP_RESULT_UNSUPP_PROTOCOL",
    "PCP_RESULT_UNSUPP_VERSION",
    "PCP_RESULT_USER_EX_QUOTA",
    "PCP_R_BIT",
    "PCP_VERSION",
    "PcpMap",
    "PcpResponse",
    "encode_pcp_announce_request",
    "encode_pcp_map_request",
    "encode_pcp_map_response",
    "encode_pcp_response",
    "parse_pcp_response",
    "pcp_result_message",
]

PCP_VERSION: Final = 2  # §7 (NAT-PMP is version 0, §9)
PCP_OP_ANNOUNCE: Final = 0  # §14.1
PCP_OP_MAP: Final = 1  # §11
PCP_R_BIT: Final = 0x80  # §7.1, §7.2: set in responses
PCP_HEADER_LEN: Final = 24  # §7.1 request header and §7.2 response header
PCP_MAP_BODY_LEN: Final = 36  # §11.1
PCP_MAX_MESSAGE_LEN: Final = 1100  # §7, §8.3: longer responses are invalid
PCP_NONCE_LEN: Final = 12  # §11.1: 96-bit mapping nonce
PCP_PROTO_UDP: Final = 17  # §11.1 protocol field (IANA protocol numbers)

PCP_RESULT_SUCCESS: Final = 0  # §7.4 result codes
PCP_RESULT_UNSUPP_VERSION: Final = 1
PCP_RESULT_NOT_AUTHORIZED: Final = 2
PCP_RESULT_MALFORMED_REQUEST: Final = 3
PCP_RESULT_UNSUPP_OPCODE: Final = 4
PCP_RESULT_UNSUPP_OPTION: Final = 5
PCP_RESULT_MALFORMED_OPTION: Final = 6
PCP_RESULT_NETWORK_FAILURE: Final = 7
PCP_RESULT_NO_RESOURCES: Final = 8
PCP_RESULT_UNSUPP_PROTOCOL: Final = 9
PCP_RESULT_USER_EX_QUOTA: Final = 10
PCP_RESULT_CANNOT_PROVIDE_EXTERNAL: Final = 11
PCP_RESULT_ADDRESS_MISMATCH: Final = 12
PCP_RESULT_EXCESSIVE_REMOTE_PEERS: Final = 13

PCP_IRT: Final = 3.0  # §8.1.1: initial retransmission time, doubling
PCP_MRT: Final = 1024.0  # §8.1.1: maximum retransmission time (MRC = MRD = 0: no count or duration limit)
PCP_RAND: Final = 0.1  # §8.1.1: each interval randomised by ±10%
PCP_RENEW_MIN_FRACTION: Final = 0.5  # §11.2.1: renew between 1/2 ...
PCP_RENEW_MAX_FRACTION: Final = 0.625  # ... and 5/8 of the lifetime
PCP_ANNOUNCE_MAX_DELAY: Final = 5.0  # §14.1.3: wait a random 0-5 s before re-checking after an ANNOUNCE
PCP_EPOCH_SLACK: Final = 2.0  # §8.5: seconds of slack in both elapsed-time rules (plus 1/16 drift)
PCP_EPOCH_BACKWARDS_TOLERANCE: Final = 1  # §8.5: going backwards by up to one second is not invalid

_PCP_RESULTS: Final = {
    PCP_RESULT_SUCCESS: ("SUCCESS", "success"),
    PCP_RESULT_UNSUPP_VERSION: ("UNSUPP_VERSION", "the router does not support PCP version 2"),
    PCP_RESULT_NOT_AUTHORIZED: ("NOT_AUTHORIZED", "not authorized — port mapping is disabled on the "
                                "router or refused by its policy, or the port belongs to another client"),
    PCP_RESULT_MALFORMED_REQUEST: ("MALFORMED_REQUEST", "the router could not parse our request"),
    PCP_RESULT_UNSUPP_OPCODE: ("UNSUPP_OPCODE", "the router does not support the MAP operation"),
    PCP_RESULT_UNSUPP_OPTION: ("UNSUPP_OPTION", "the router does not support a mandatory option we sent"),
    PCP_RESULT_MALFORMED_OPTION: ("MALFORMED_OPTION", "the router found an option of ours malformed"),
    PCP_RESULT_NETWORK_FAILURE: ("NETWORK_FAILURE", "network failure — the router has no external "
                                 "address yet (its Internet connection may be down)"),
    PCP_RESULT_NO_RESOURCES: ("NO_RESOURCES", "out of resources — the router cannot create more mappings"),
    PCP_RESULT_UNSUPP_PROTOCOL: ("UNSUPP_PROTOCOL", "the router cannot map UDP"),
    PCP_RESULT_USER_EX_QUOTA: ("USER_EX_QUOTA", "this computer has used up its quota of mappings on "
                               "the router"),
    PCP_RESULT_CANNOT_PROVIDE_EXTERNAL: ("CANNOT_PROVIDE_EXTERNAL", "the router cannot provide the "
                                         "suggested external address or port"),
    PCP_RESULT_ADDRESS_MISMATCH: ("ADDRESS_MISMATCH", "the router saw a different source address than "
                                  "the one we sent (another NAT between us and the router?)"),
    PCP_RESULT_EXCESSIVE_REMOTE_PEERS: ("EXCESSIVE_REMOTE_PEERS", "the router cannot track more remote "
                                        "peers"),
}


def pcp_result_message(code: int) -> str:
    """A status line for a PCP result code (§7.4)."""
    name, text = _PCP_RESULTS.get(code, ("UNKNOWN", "unknown result code"))
    return f"PCP result {code} ({name}): {text}"


# -- addresses (§5): every address field is 16 bytes, IPv4 as IPv4-mapped IPv6 ------------------------------

_V4_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"
_ZERO_V4_MAPPED: Final = _V4_MAPPED_PREFIX + b"\x00\x00\x00\x00"  # ::ffff:0.0.0.0, §5, §11.1: no preference


def _v4_mapped(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return _V4_MAPPED_PREFIX + ip.packed
    return ip.packed


def _from_16(raw: bytes) -> str:
    if raw[:12] == _V4_MAPPED_PREFIX:
        return str(ipaddress.IPv4Address(raw[12:]))
    return str(ipaddress.IPv6Address(raw))


# -- messages ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PcpMap:
    """The MAP opcode body (§11.1): in a response, the *assigned* external port and address."""

    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_address: str


@dataclass(frozen=True)
class PcpResponse:
    """A PCP response (§7.2). ``map`` is None for ANNOUNCE and for a MAP error reply without a body;
    ``options`` are (code, data) pairs, parsed for framing only and otherwise ignored."""

    opcode: int
    result: int
    lifetime: int
    epoch: int
    map: PcpMap | None = None
    options: tuple[tuple[int, bytes], ...] = ()


def _pcp_request_header(opcode: int, lifetime: int, client_address: str) -> bytes:
    """§7.1: version 2, R=0 and opcode, 16 reserved bits, requested lifetime, client IP (16 bytes)."""
    return struct.pack("!BBHI16s", PCP_VERSION, opcode, 0, lifetime, _v4_mapped(client_address))


def encode_pcp_announce_request(client_address: str) -> bytes:
    """§14.1: an ANNOUNCE request, the common header alone with lifetime 0."""
    return _pcp_request_header(PCP_OP_ANNOUNCE, 0, client_address)


def encode_pcp_map_request(nonce: bytes, client_address: str, internal_port: int, lifetime: int,
                           suggested_external_port: int = 0,
                           suggested_external_address: str | None = None,
                           protocol: int = PCP_PROTO_UDP) -> bytes:
    """§11.1: the 24-byte header and the 36-byte MAP body (60 bytes).

    ``suggested_external_address`` None means "no preference", the all-zero ::ffff:0.0.0.0 (§11.1, §5).
    Lifetime 0, port 0 and no address suggested delete the mapping (§15); the nonce must be the
    mapping's."""
    if len(nonce) != PCP_NONCE_LEN:
        raise ValueError("PCP nonce must be 12 bytes")
    address = (_ZERO_V4_MAPPED if suggested_external_address is None
               else _v4_mapped(suggested_external_address))
    body = struct.pack("!12sB3xHH16s", nonce, protocol, internal_port, suggested_external_port, address)
    return _pcp_request_header(PCP_OP_MAP, lifetime, client_address) + body


def encode_pcp_response(opcode: int, result: int, lifetime: int, epoch: int, body: bytes = b"") -> bytes:
    """§7.2: the gateway's side, for tests and simulations (an unsolicited ANNOUNCE is opcode 0, body b"")."""
    return struct.pack("!BBBBII12x", PCP_VERSION, PCP_R_BIT | opcode, 0, result, lifetime, epoch) + body


def encode_pcp_map_response(nonce: bytes, internal_port: int, external_port: int, external_address: str,
                            lifetime: int, epoch: int, result: int = 0,
                            protocol: int = PCP_PROTO_UDP) -> bytes:
    """§11.1: the gateway's side, for tests and simulations."""
    body = struct.pack("!12sB3xHH16s", nonce, protocol, internal_port, external_port,
                       _v4_mapped(external_address))
    return encode_pcp_response(PCP_OP_MAP, result, lifetime, epoch, body)


def _parse_options(data: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    """§7.3: code(1), reserved(1), length(2), data padded to a multiple of 4."""
    options = []
    while offset < len(data):
        if offset + 4 > len(data):
            raise ParseError("truncated option")
        code, _reserved, length = struct.unpack_from("!BBH", data, offset)
        end = offset + 4 + length
        if end > len(data):
            raise ParseError("truncated option")
        options.append((code, data[offset + 4:end]))
        offset = end + (-length % 4)
    return tuple(options)


def parse_pcp_response(data: bytes) -> PcpResponse:
    """Parse a PCP response (§7.2, §8.3): MAP (§11.1) or ANNOUNCE (§14.1).

    Raises ParseError: shorter than 24 bytes or a MAP success without its body ("truncated"), longer than
    1100 bytes ("oversized"), not a multiple of 4 bytes ("length"), version not 2 ("version"), R bit clear
    ("not a response"), an opcode other than ANNOUNCE and MAP ("opcode"), a cut-off option. The reserved
    fields are ignored, as §7.2 and §11.1 require of a receiver.
    """
    if len(data) < PCP_HEADER_LEN:
        raise ParseError("truncated")
    if len(data) > PCP_MAX_MESSAGE_LEN:
        raise ParseError("oversized")
    if len(data) % 4:
        raise ParseError("length")
    version, r_op, _reserved, result, lifetime, epoch = struct.unpack_from("!BBBBII", data)
    if version != PCP_VERSION:
        raise ParseError("version")
    if not r_op & PCP_R_BIT:
        raise ParseError("not a response")
    opcode = r_op & ~PCP_R_BIT
    if opcode == PCP_OP_ANNOUNCE:
        return PcpResponse(opcode, result, lifetime, epoch, None, _parse_options(data, PCP_HEADER_LEN))
    if opcode != PCP_OP_MAP:
        raise ParseError("opcode")
    end = PCP_HEADER_LEN + PCP_MAP_BODY_LEN
    if len(data) < end:
        if result == PCP_RESULT_SUCCESS or len(data) != PCP_HEADER_LEN:
            raise ParseError("truncated")
        return PcpResponse(opcode, result, lifetime, epoch)  # an error reply that did not echo the body
    nonce, protocol, internal, external, address = struct.unpack_from("!12sB3xHH16s", data, PCP_HEADER_LEN)
    body = PcpMap(nonce, protocol, internal, external, _from_16(address))
    return PcpResponse(opcode, result, lifetime, epoch, body, _parse_options(data, end))
