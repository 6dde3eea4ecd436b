"""NAT-PMP (RFC 6886) on the wire: its constants, its messages, pure encoders and bounded parsers.

The port-mapping client (:mod:`tunneld.proto.portmap.mapper`) speaks PCP first and NAT-PMP to gateways that
only know version 0; the gateway side of each message is here too, for tests and simulations. Parsers raise
:class:`~tunneld.proto.errors.ParseError` and nothing else.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from tunneld.proto.errors import ParseError

__all__ = [
    "NATPMP_ADDRESS_RESPONSE_LEN",
    "NATPMP_DEFAULT_LIFETIME",
    "NATPMP_EPOCH_SLACK",
    "NATPMP_ERROR_RESPONSE_LEN",
    "NATPMP_INITIAL_RETRY",
    "NATPMP_MAP_RESPONSE_LEN",
    "NATPMP_MAX_ATTEMPTS",
    "NATPMP_OP_ADDRESS",
    "NATPMP_OP_MAP_TCP",
    "NATPMP_OP_MAP_UDP",
    "NATPMP_OP_RESPONSE",
    "NATPMP_RESULT_NETWORK_FAILURE",
    "NATPMP_RESULT_NOT_AUTHORIZED",
    "NATPMP_RESULT_OUT_OF_RESOURCES",
    "NATPMP_RESULT_SUCCESS",
    "NATPMP_RESULT_UNSUPPORTED_OPCODE",
    "NATPMP_RESULT_UNSUPPORTED_VERSION",
    "NATPMP_VERSION",
    "PORTMAP_ANNOUNCE_GROUP",
    "PORTMAP_CLIENT_PORT",
    "PORTMAP_SERVER_PORT",
    "NatPmpAddressResponse",
    "NatPmpMapResponse",
    "encode_natpmp_address_request",
    "encode_natpmp_address_response",
    "encode_natpmp_error",
    "encode_natpmp_map_request",
    "encode_natpmp_map_response",
    "natpmp_result_message",
    "parse_natpmp_response",
]

# Shared by both protocols: PCP took over NAT-PMP's ports and announcement group.
PORTMAP_SERVER_PORT: Final = 5351  # §3.1 (RFC 6887 §19.1): the gateway listens here
PORTMAP_CLIENT_PORT: Final = 5350  # §3.2.1 (RFC 6887 §14.1.3): announcements arrive here
PORTMAP_ANNOUNCE_GROUP: Final = "224.0.0.1"  # §3.2.1: the all-hosts group announcements are multicast to

NATPMP_VERSION: Final = 0  # §3
NATPMP_OP_ADDRESS: Final = 0  # §3.2: public address request
NATPMP_OP_MAP_UDP: Final = 1  # §3.3
NATPMP_OP_MAP_TCP: Final = 2  # §3.3
NATPMP_OP_RESPONSE: Final = 128  # §3.2: a response's opcode is 128 + the request's
NATPMP_ADDRESS_RESPONSE_LEN: Final = 12  # §3.2
NATPMP_MAP_RESPONSE_LEN: Final = 16  # §3.3
NATPMP_ERROR_RESPONSE_LEN: Final = 8  # §3.5: vers, op, result, SSSoE only (miniupnpd resplen=8)

NATPMP_RESULT_SUCCESS: Final = 0  # §3.5 result codes
NATPMP_RESULT_UNSUPPORTED_VERSION: Final = 1
NATPMP_RESULT_NOT_AUTHORIZED: Final = 2
NATPMP_RESULT_NETWORK_FAILURE: Final = 3
NATPMP_RESULT_OUT_OF_RESOURCES: Final = 4
NATPMP_RESULT_UNSUPPORTED_OPCODE: Final = 5

NATPMP_INITIAL_RETRY: Final = 0.250  # §3.1: first wait 250 ms, doubling each time
NATPMP_MAX_ATTEMPTS: Final = 9  # §3.1: after the 9th attempt (and its 64 s wait) there is no NAT-PMP
NATPMP_DEFAULT_LIFETIME: Final = 7200  # §3.3: the recommended requested lifetime (Apple NATMAP_DEFAULT_LEASE)
NATPMP_EPOCH_SLACK: Final = 2.0  # §3.6: seconds of slack in the 7/8 elapsed-time rule

_NATPMP_RESULTS: Final = {
    NATPMP_RESULT_SUCCESS: "success",
    NATPMP_RESULT_UNSUPPORTED_VERSION: (
        "unsupported version — the router does not speak this NAT-PMP version"),
    NATPMP_RESULT_NOT_AUTHORIZED: "not authorized — port mapping is disabled on the router",
    NATPMP_RESULT_NETWORK_FAILURE: "network failure — the router has no external address yet "
                                   "(its Internet connection may be down)",
    NATPMP_RESULT_OUT_OF_RESOURCES: "out of resources — the router cannot create more mappings",
    NATPMP_RESULT_UNSUPPORTED_OPCODE: "unsupported opcode — the router does not support this request",
}


def natpmp_result_message(code: int) -> str:
    """A status line for a NAT-PMP result code (§3.5)."""
    text = _NATPMP_RESULTS.get(code, "unknown result code")
    return f"NAT-PMP result {code}: {text}"


@dataclass(frozen=True)
class NatPmpAddressResponse:
    """Opcode 128. ``external_address`` is None in the short (8-byte) form of an error reply."""

    result: int
    epoch: int
    external_address: str | None


@dataclass(frozen=True)
class NatPmpMapResponse:
    """Opcode 129 (UDP) or 130 (TCP); ``opcode`` is the request's (1 or 2). Port and lifetime fields are
    None in the short (8-byte) form of an error reply, such as the "unsupported version" answer to PCP."""

    opcode: int
    result: int
    epoch: int
    internal_port: int | None
    external_port: int | None
    lifetime: int | None


def encode_natpmp_address_request() -> bytes:
    """§3.2: version 0, opcode 0 (2 bytes)."""
    return bytes((NATPMP_VERSION, NATPMP_OP_ADDRESS))


def encode_natpmp_map_request(internal_port: int, suggested_external_port: int, lifetime: int,
                              opcode: int = NATPMP_OP_MAP_UDP) -> bytes:
    """§3.3: version, opcode (1 UDP, 2 TCP), reserved 0, internal port, suggested external port, lifetime.

    Lifetime 0 with suggested port 0 deletes the mapping (§3.4)."""
    if opcode not in (NATPMP_OP_MAP_UDP, NATPMP_OP_MAP_TCP):
        raise ValueError("NAT-PMP map opcode must be 1 (UDP) or 2 (TCP)")
    return struct.pack("!BBHHHI", NATPMP_VERSION, opcode, 0, internal_port, suggested_external_port, lifetime)


def encode_natpmp_address_response(epoch: int, external_address: str, result: int = 0) -> bytes:
    """§3.2 (also the §3.2.1 announcement): the gateway's side, for tests and simulations."""
    return struct.pack("!BBHI4s", NATPMP_VERSION, NATPMP_OP_RESPONSE + NATPMP_OP_ADDRESS, result, epoch,
                       ipaddress.IPv4Address(external_address).packed)


def encode_natpmp_map_response(epoch: int, internal_port: int, external_port: int, lifetime: int,
                               result: int = 0, opcode: int = NATPMP_OP_MAP_UDP) -> bytes:
    """§3.3: the gateway's side, for tests and simulations."""
    return struct.pack("!BBHIHHI", NATPMP_VERSION, NATPMP_OP_RESPONSE + opcode, result, epoch,
                       internal_port, external_port, lifetime)


def encode_natpmp_error(request_opcode: int, result: int, epoch: int) -> bytes:
    """§3.5: the 8-byte error reply (version 0, 128 + opcode, result, SSSoE)."""
    return struct.pack("!BBHI", NATPMP_VERSION, NATPMP_OP_RESPONSE + request_opcode, result, epoch)


def parse_natpmp_response(data: bytes) -> NatPmpAddressResponse | NatPmpMapResponse:
    """Parse a NAT-PMP response or announcement.

    A success must have exactly its full size (12 bytes for an address response, 16 for a map response).
    An error may be the 8-byte short form or the full size. Raises ParseError for anything else: shorter
    than 8 bytes or than its success form ("truncated"), longer than its full form ("oversized"), version
    not 0 ("version"), a request ("not a response") or an unknown opcode ("opcode").
    """
    if len(data) < NATPMP_ERROR_RESPONSE_LEN:
        raise ParseError("truncated")
    version, op, result, epoch = struct.unpack_from("!BBHI", data)
    if version != NATPMP_VERSION:
        raise ParseError("version")
    if op < NATPMP_OP_RESPONSE:
        raise ParseError("not a response")
    request_op = op - NATPMP_OP_RESPONSE
    if request_op == NATPMP_OP_ADDRESS:
        full = NATPMP_ADDRESS_RESPONSE_LEN
    elif request_op in (NATPMP_OP_MAP_UDP, NATPMP_OP_MAP_TCP):
        full = NATPMP_MAP_RESPONSE_LEN
    else:
        raise ParseError("opcode")
    if len(data) > full:
        raise ParseError("oversized")
    if len(data) < full:
        if result == NATPMP_RESULT_SUCCESS or len(data) != NATPMP_ERROR_RESPONSE_LEN:
            raise ParseError("truncated")
        if request_op == NATPMP_OP_ADDRESS:
            return NatPmpAddressResponse(result, epoch, None)
        return NatPmpMapResponse(request_op, result, epoch, None, None, None)
    if request_op == NATPMP_OP_ADDRESS:
        return NatPmpAddressResponse(result, epoch, str(ipaddress.IPv4Address(data[8:12])))
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    return NatPmpMapResponse(request_op, result, epoch, internal, external, lifetime)
