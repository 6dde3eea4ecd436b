"""Port mapping on the default gateway: PCP (RFC 6887) MAP first, NAT-PMP (RFC 6886) as the fall-back.

Sans-I/O, like :mod:`tunneld.proto.handshake`: a :class:`PortMapper` takes datagrams, their source and
``now`` (monotonic seconds) as arguments and returns :class:`Transmit` tuples; it never reads a clock,
never touches a socket and draws randomness (PCP nonces, retransmission jitter, renewal and ANNOUNCE
delays) only through the injected ``rand``. The daemon owns one UDP socket towards the gateway's port
5351 and one bound to 224.0.0.1:5350 for announcements, calls :meth:`PortMapper.poll` at
:meth:`PortMapper.deadline`, and publishes :attr:`MapperState.endpoint` (in DNS SRV) when it changes.

The wire formats are pure ``encode_*`` / ``parse_*`` functions; every parser raises
:class:`~tunneld.proto.errors.ParseError` (and nothing else) for truncated, oversized, wrong-version or
wrong-opcode input. Facts and their sources: PROTOCOLS.md section 2; constants live in
:mod:`tunneld.proto.constants` with their RFC sections.

Behaviour of :class:`PortMapper` (one UDP mapping: tunneld's listen port):

- **PCP first.** The first request is a PCP MAP (version 2). A NAT-PMP-only gateway answers any version it
  does not know with a version-0 "unsupported version" reply (RFC 6886 §3.5, RFC 6887 §9); on that reply
  the mapper switches to NAT-PMP at once (public address request + UDP map request), as mDNSResponder does.
  It then stays on NAT-PMP (renewals included) until a PCP ANNOUNCE shows the gateway now speaks PCP.
- **Retransmission.** NAT-PMP: 250 ms, doubling; after the 9th attempt and its 64 s wait the status says
  "no NAT-PMP", but like mDNSResponder it keeps trying with the interval still doubling up to 15 min.
  PCP (§8.1.1): RT = (1 + RAND) * IRT, then RT = (1 + RAND) * min(2 * RTprev, MRT), IRT 3 s, MRT 1024 s,
  RAND uniform in ±0.1, no count or duration limit.
- **Lifetimes.** Only the *granted* lifetime and the *granted* external port count: the published endpoint
  carries the granted port. NAT-PMP renews at half the granted lifetime, PCP at a random point between
  1/2 and 5/8 of it (§11.2.1), never sooner than 2 s. Every request after the first suggests the last
  granted external port (and, for PCP, the last external address), so a mapping lost with a router crash
  comes back on the same port. A success with lifetime 0 or external port 0 is a failure. An unrenewed
  mapping that reaches its expiry is withdrawn (endpoint event) and re-requested.
- **Errors.** Every result code has a status message (:func:`natpmp_result_message`,
  :func:`pcp_result_message`). After an error the request is retried after 30 s, doubling to 15 min, or
  after the lifetime of a PCP error reply if that is longer (§7.4: how long before retrying).
- **Epoch (gateway lost its state).** NAT-PMP §3.6: SSSoE went backwards, or grew by less than 7/8 of
  our elapsed time minus 2 s. PCP §8.5: went backwards by more than 1 s, or client_delta + 2 <
  server_delta - server_delta/16, or server_delta + 2 < client_delta - client_delta/16. (Our times are
  floats; the RFC's +2 slack covers whole-second rounding.) On detection the mapping is re-created at once
  with a fresh PCP nonce and the previously granted port suggested -- except when the revealing packet is
  itself a successful MAP answer for our mapping: that mapping is fresh on the rebooted gateway, so it is
  kept (re-sending under a new nonce would collide with it, §11.3), and for NAT-PMP only the address is
  re-read.
- **Announcements** (224.0.0.1:5350, source must be the gateway): a NAT-PMP address announcement
  (opcode 128) updates the external address and triggers an immediate re-check (address + mapping); a PCP
  ANNOUNCE triggers a re-check after a random 0-5 s (§14.1.3), with a new nonce if its epoch shows lost
  state. The ~10 repeats of one announcement re-check once (64 s hold-off) unless they carry news.
- **Double NAT.** An external address of 0.0.0.0, RFC 1918, RFC 6598 (100.64/10), loopback, link-local or
  0/8 is refused: ``double_nat`` is set with a message and no endpoint is published.
- **Shutdown.** :meth:`PortMapper.stop` sends one delete: lifetime 0 and suggested port 0 (NAT-PMP §3.4;
  PCP §15 with the mapping's nonce and suggested address ::ffff:0.0.0.0).
- **Robustness.** Datagrams whose source is not the gateway (port 5351 for responses), parse errors, PCP
  answers with a foreign nonce, answers for other mappings and stale answers of the protocol not in use
  are counted in :attr:`PortMapper.counters` and dropped; nothing from the network raises.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple

from tunneld.proto import constants as C
from tunneld.proto.errors import ParseError

__all__ = [
    "NATPMP",
    "PCP",
    "Endpoint",
    "EndpointChanged",
    "MapperState",
    "NatPmpAddressResponse",
    "NatPmpMapResponse",
    "PcpMap",
    "PcpResponse",
    "PortMapper",
    "Transmit",
    "encode_natpmp_address_request",
    "encode_natpmp_address_response",
    "encode_natpmp_error",
    "encode_natpmp_map_request",
    "encode_natpmp_map_response",
    "encode_pcp_announce_request",
    "encode_pcp_map_request",
    "encode_pcp_map_response",
    "encode_pcp_response",
    "external_address_problem",
    "natpmp_result_message",
    "parse_natpmp_response",
    "parse_pcp_response",
    "pcp_result_message",
]

NATPMP: Final = "nat-pmp"
PCP: Final = "pcp"

Addr = tuple[str, int]


class Transmit(NamedTuple):
    """A datagram to send: to ``host``:``port`` (always the gateway's 5351)."""

    host: str
    port: int
    payload: bytes


# -- addresses ---------------------------------------------------------------------------------------------

_V4_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"
_ZERO_V4_MAPPED: Final = _V4_MAPPED_PREFIX + b"\x00\x00\x00\x00"  # ::ffff:0.0.0.0, RFC 6887 §5, §11.1


def _v4_mapped(address: str) -> bytes:
    """IPv4 as an IPv4-mapped IPv6 address (RFC 6887 §5); IPv6 as itself."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return _V4_MAPPED_PREFIX + ip.packed
    return ip.packed


def _from_16(raw: bytes) -> str:
    if raw[:12] == _V4_MAPPED_PREFIX:
        return str(ipaddress.IPv4Address(raw[12:]))
    return str(ipaddress.IPv6Address(raw))


# External addresses that mean "this gateway is behind another NAT" (or has no address at all).
_NOT_PUBLIC_V4: Final = (
    (ipaddress.IPv4Network("10.0.0.0/8"), "RFC 1918 private"),
    (ipaddress.IPv4Network("172.16.0.0/12"), "RFC 1918 private"),
    (ipaddress.IPv4Network("192.168.0.0/16"), "RFC 1918 private"),
    (ipaddress.IPv4Network("100.64.0.0/10"), "RFC 6598 carrier-grade NAT"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "loopback"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "RFC 3927 link-local"),
    (ipaddress.IPv4Network("0.0.0.0/8"), "RFC 1122 'this network'"),
)


def external_address_problem(address: str) -> str | None:
    """Why ``address`` cannot be a public external address (a status message), or None if it can."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        return (f"double NAT or no WAN address: the gateway reports external address {address}; it has no "
                "usable public address (its own uplink is down or behind another NAT), nothing is published")
    if isinstance(ip, ipaddress.IPv4Address):
        for net, what in _NOT_PUBLIC_V4:
            if ip in net:
                return (f"double NAT: the gateway's external address {address} is {what}, so another NAT "
                        "sits upstream and a mapping on this gateway cannot be reached from the Internet; "
                        "nothing is published")
        return None
    if ip.is_private or ip.is_link_local or ip.is_loopback:
        return f"double NAT: the gateway's external address {address} is not global; nothing is published"
    return None


# -- result codes ------------------------------------------------------------------------------------------

_NATPMP_RESULTS: Final = {
    C.NATPMP_RESULT_SUCCESS: "success",
    C.NATPMP_RESULT_UNSUPPORTED_VERSION: (
        "unsupported version — the router does not speak this NAT-PMP version"),
    C.NATPMP_RESULT_NOT_AUTHORIZED: "not authorized — port mapping is disabled on the router",
    C.NATPMP_RESULT_NETWORK_FAILURE: "network failure — the router has no external address yet "
                                     "(its Internet connection may be down)",
    C.NATPMP_RESULT_OUT_OF_RESOURCES: "out of resources — the router cannot create more mappings",
    C.NATPMP_RESULT_UNSUPPORTED_OPCODE: "unsupported opcode — the router does not support this request",
}

_PCP_RESULTS: Final = {
    C.PCP_RESULT_SUCCESS: ("SUCCESS", "success"),
    C.PCP_RESULT_UNSUPP_VERSION: ("UNSUPP_VERSION", "the router does not support PCP version 2"),
    C.PCP_RESULT_NOT_AUTHORIZED: ("NOT_AUTHORIZED", "not authorized — port mapping is disabled on the "
                                  "router or refused by its policy, or the port belongs to another client"),
    C.PCP_RESULT_MALFORMED_REQUEST: ("MALFORMED_REQUEST", "the router could not parse our request"),
    C.PCP_RESULT_UNSUPP_OPCODE: ("UNSUPP_OPCODE", "the router does not support the MAP operation"),
    C.PCP_RESULT_UNSUPP_OPTION: ("UNSUPP_OPTION", "the router does not support a mandatory option we sent"),
    C.PCP_RESULT_MALFORMED_OPTION: ("MALFORMED_OPTION", "the router found an option of ours malformed"),
    C.PCP_RESULT_NETWORK_FAILURE: ("NETWORK_FAILURE", "network failure — the router has no external "
                                   "address yet (its Internet connection may be down)"),
    C.PCP_RESULT_NO_RESOURCES: ("NO_RESOURCES", "out of resources — the router cannot create more mappings"),
    C.PCP_RESULT_UNSUPP_PROTOCOL: ("UNSUPP_PROTOCOL", "the router cannot map UDP"),
    C.PCP_RESULT_USER_EX_QUOTA: ("USER_EX_QUOTA", "this computer has used up its quota of mappings on "
                                 "the router"),
    C.PCP_RESULT_CANNOT_PROVIDE_EXTERNAL: ("CANNOT_PROVIDE_EXTERNAL", "the router cannot provide the "
                                           "suggested external address or port"),
    C.PCP_RESULT_ADDRESS_MISMATCH: ("ADDRESS_MISMATCH", "the router saw a different source address than "
                                    "the one we sent (another NAT between us and the router?)"),
    C.PCP_RESULT_EXCESSIVE_REMOTE_PEERS: ("EXCESSIVE_REMOTE_PEERS", "the router cannot track more remote "
                                          "peers"),
}


def natpmp_result_message(code: int) -> str:
    """A status line for a NAT-PMP result code (RFC 6886 §3.5)."""
    text = _NATPMP_RESULTS.get(code, "unknown result code")
    return f"NAT-PMP result {code}: {text}"


def pcp_result_message(code: int) -> str:
    """A status line for a PCP result code (RFC 6887 §7.4)."""
    name, text = _PCP_RESULTS.get(code, ("UNKNOWN", "unknown result code"))
    return f"PCP result {code} ({name}): {text}"


# -- NAT-PMP messages (RFC 6886 §3) -------------------------------------------------------------------------


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
    return bytes((C.NATPMP_VERSION, C.NATPMP_OP_ADDRESS))


def encode_natpmp_map_request(internal_port: int, suggested_external_port: int, lifetime: int,
                              opcode: int = C.NATPMP_OP_MAP_UDP) -> bytes:
    """§3.3: version, opcode (1 UDP, 2 TCP), reserved 0, internal port, suggested external port, lifetime.

    Lifetime 0 with suggested port 0 deletes the mapping (§3.4)."""
    if opcode not in (C.NATPMP_OP_MAP_UDP, C.NATPMP_OP_MAP_TCP):
        raise ValueError("NAT-PMP map opcode must be 1 (UDP) or 2 (TCP)")
    return struct.pack("!BBHHHI", C.NATPMP_VERSION, opcode, 0, internal_port, suggested_external_port,
                       lifetime)


def encode_natpmp_address_response(epoch: int, external_address: str, result: int = 0) -> bytes:
    """§3.2 (also the §3.2.1 announcement): the gateway's side, for tests and simulations."""
    return struct.pack("!BBHI4s", C.NATPMP_VERSION, C.NATPMP_OP_RESPONSE + C.NATPMP_OP_ADDRESS, result, epoch,
                       ipaddress.IPv4Address(external_address).packed)


def encode_natpmp_map_response(epoch: int, internal_port: int, external_port: int, lifetime: int,
                               result: int = 0, opcode: int = C.NATPMP_OP_MAP_UDP) -> bytes:
    """§3.3: the gateway's side, for tests and simulations."""
    return struct.pack("!BBHIHHI", C.NATPMP_VERSION, C.NATPMP_OP_RESPONSE + opcode, result, epoch,
                       internal_port, external_port, lifetime)


def encode_natpmp_error(request_opcode: int, result: int, epoch: int) -> bytes:
    """§3.5: the 8-byte error reply (version 0, 128 + opcode, result, SSSoE)."""
    return struct.pack("!BBHI", C.NATPMP_VERSION, C.NATPMP_OP_RESPONSE + request_opcode, result, epoch)


def parse_natpmp_response(data: bytes) -> NatPmpAddressResponse | NatPmpMapResponse:
    """Parse a NAT-PMP response or announcement.

    A success must have exactly its full size (12 bytes for an address response, 16 for a map response).
    An error may be the 8-byte short form or the full size. Raises ParseError for anything else: shorter
    than 8 bytes or than its success form ("truncated"), longer than its full form ("oversized"), version
    not 0 ("version"), a request ("not a response") or an unknown opcode ("opcode").
    """
    if len(data) < C.NATPMP_ERROR_RESPONSE_LEN:
        raise ParseError("truncated")
    version, op, result, epoch = struct.unpack_from("!BBHI", data)
    if version != C.NATPMP_VERSION:
        raise ParseError("version")
    if op < C.NATPMP_OP_RESPONSE:
        raise ParseError("not a response")
    request_op = op - C.NATPMP_OP_RESPONSE
    if request_op == C.NATPMP_OP_ADDRESS:
        full = C.NATPMP_ADDRESS_RESPONSE_LEN
    elif request_op in (C.NATPMP_OP_MAP_UDP, C.NATPMP_OP_MAP_TCP):
        full = C.NATPMP_MAP_RESPONSE_LEN
    else:
        raise ParseError("opcode")
    if len(data) > full:
        raise ParseError("oversized")
    if len(data) < full:
        if result == C.NATPMP_RESULT_SUCCESS or len(data) != C.NATPMP_ERROR_RESPONSE_LEN:
            raise ParseError("truncated")
        if request_op == C.NATPMP_OP_ADDRESS:
            return NatPmpAddressResponse(result, epoch, None)
        return NatPmpMapResponse(request_op, result, epoch, None, None, None)
    if request_op == C.NATPMP_OP_ADDRESS:
        return NatPmpAddressResponse(result, epoch, str(ipaddress.IPv4Address(data[8:12])))
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    return NatPmpMapResponse(request_op, result, epoch, internal, external, lifetime)


# -- PCP messages (RFC 6887 §7, §11, §14) ------------------------------------------------------------


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
    return struct.pack("!BBHI16s", C.PCP_VERSION, opcode, 0, lifetime, _v4_mapped(client_address))


def encode_pcp_announce_request(client_address: str) -> bytes:
    """§14.1: an ANNOUNCE request, the common header alone with lifetime 0."""
    return _pcp_request_header(C.PCP_OP_ANNOUNCE, 0, client_address)


def encode_pcp_map_request(nonce: bytes, client_address: str, internal_port: int, lifetime: int,
                           suggested_external_port: int = 0,
                           suggested_external_address: str | None = None,
                           protocol: int = C.PCP_PROTO_UDP) -> bytes:
    """§11.1: the 24-byte header and the 36-byte MAP body (60 bytes).

    ``suggested_external_address`` None means "no preference", the all-zero ::ffff:0.0.0.0 (§11.1, §5).
    Lifetime 0, port 0 and no address suggested delete the mapping (§15); the nonce must be the
    mapping's."""
    if len(nonce) != C.PCP_NONCE_LEN:
        raise ValueError("PCP nonce must be 12 bytes")
    address = (_ZERO_V4_MAPPED if suggested_external_address is None
               else _v4_mapped(suggested_external_address))
    body = struct.pack("!12sB3xHH16s", nonce, protocol, internal_port, suggested_external_port, address)
    return _pcp_request_header(C.PCP_OP_MAP, lifetime, client_address) + body


def encode_pcp_response(opcode: int, result: int, lifetime: int, epoch: int, body: bytes = b"") -> bytes:
    """§7.2: the gateway's side, for tests and simulations (an unsolicited ANNOUNCE is opcode 0, body b"")."""
    return struct.pack("!BBBBII12x", C.PCP_VERSION, C.PCP_R_BIT | opcode, 0, result, lifetime, epoch) + body


def encode_pcp_map_response(nonce: bytes, internal_port: int, external_port: int, external_address: str,
                            lifetime: int, epoch: int, result: int = 0,
                            protocol: int = C.PCP_PROTO_UDP) -> bytes:
    """§11.1: the gateway's side, for tests and simulations."""
    body = struct.pack("!12sB3xHH16s", nonce, protocol, internal_port, external_port,
                       _v4_mapped(external_address))
    return encode_pcp_response(C.PCP_OP_MAP, result, lifetime, epoch, body)


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
    if len(data) < C.PCP_HEADER_LEN:
        raise ParseError("truncated")
    if len(data) > C.PCP_MAX_MESSAGE_LEN:
        raise ParseError("oversized")
    if len(data) % 4:
        raise ParseError("length")
    version, r_op, _reserved, result, lifetime, epoch = struct.unpack_from("!BBBBII", data)
    if version != C.PCP_VERSION:
        raise ParseError("version")
    if not r_op & C.PCP_R_BIT:
        raise ParseError("not a response")
    opcode = r_op & ~C.PCP_R_BIT
    if opcode == C.PCP_OP_ANNOUNCE:
        return PcpResponse(opcode, result, lifetime, epoch, None, _parse_options(data, C.PCP_HEADER_LEN))
    if opcode != C.PCP_OP_MAP:
        raise ParseError("opcode")
    end = C.PCP_HEADER_LEN + C.PCP_MAP_BODY_LEN
    if len(data) < end:
        if result == C.PCP_RESULT_SUCCESS or len(data) != C.PCP_HEADER_LEN:
            raise ParseError("truncated")
        return PcpResponse(opcode, result, lifetime, epoch)  # an error reply that did not echo the body
    nonce, protocol, internal, external, address = struct.unpack_from("!12sB3xHH16s", data, C.PCP_HEADER_LEN)
    body = PcpMap(nonce, protocol, internal, external, _from_16(address))
    return PcpResponse(opcode, result, lifetime, epoch, body, _parse_options(data, end))


# -- the state machine --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """The public endpoint to publish: the gateway's external address and the *granted* external port."""

    address: str
    port: int


@dataclass(frozen=True)
class EndpointChanged:
    """The public endpoint appeared (old None), changed, or disappeared (new None) at time ``at``."""

    old: Endpoint | None
    new: Endpoint | None
    at: float


@dataclass(frozen=True)
class MapperState:
    """A status snapshot. ``protocol`` is the one the gateway has answered in (None before any answer);
    ``result_code`` is the last result code (None for conditions without one, such as no answer)."""

    protocol: str | None
    gateway: str
    internal_port: int
    external_address: str | None
    external_port: int | None
    lifetime: int | None
    expires_at: float | None
    endpoint: Endpoint | None
    result_code: int | None
    result_message: str
    double_nat: bool
    double_nat_message: str | None
    no_answer: bool


@dataclass
class _Retry:
    """One request under retransmission: what to send, how often it went, when next."""

    protocol: str
    payload: bytes
    attempts: int = 0
    interval: float = 0.0
    next_at: float = 0.0


@dataclass
class _Epoch:
    at: float  # our time when the previous packet arrived
    epoch: int  # its SSSoE / Epoch Time


@dataclass
class _Status:
    code: int | None = None
    message: str = "not started"
    no_answer: bool = False


class PortMapper:
    """PCP/NAT-PMP client state for one UDP mapping (see the module docstring for the behaviour).

    ``rand(n)`` returns n random bytes (``os.urandom`` by default); ``on_change`` is called with each
    :class:`EndpointChanged`, which is also appended to :attr:`events` (the adapter drains it).
    """

    def __init__(self, internal_address: str, internal_port: int, gateway: str,
                 lifetime: int = C.NATPMP_DEFAULT_LIFETIME, rand: Callable[[int], bytes] = os.urandom,
                 suggested_external_port: int | None = None,
                 on_change: Callable[[EndpointChanged], None] | None = None) -> None:
        ipaddress.IPv4Address(internal_address)  # ValueError early for a bad configuration
        ipaddress.IPv4Address(gateway)
        if not 0 < internal_port < 65536:
            raise ValueError("internal port out of range")
        if lifetime <= 0:
            raise ValueError("requested lifetime must be positive (0 deletes)")
        self.internal_address = internal_address
        self.internal_port = internal_port
        self.gateway = gateway
        self.requested_lifetime = lifetime
        self.rand = rand
        self.on_change = on_change
        self.events: list[EndpointChanged] = []
        self.counters: Counter[str] = Counter()
        self.wire: str = PCP  # the protocol we send
        self.protocol: str | None = None  # the protocol the gateway has answered in
        self._suggested_port = internal_port if suggested_external_port is None else suggested_external_port
        self._nonce = self._new_nonce()
        self._map: _Retry | None = None
        self._addr: _Retry | None = None  # NAT-PMP only: PCP's MAP answer carries the address
        self._next_attempt: float | None = None  # renewal, or retry after an error
        self._expires_at: float | None = None
        self._recheck_at: float | None = None  # delayed re-check after a PCP ANNOUNCE
        self._last_recheck: float | None = None
        self._error_backoff = 0.0
        self._epochs: dict[str, _Epoch] = {}
        self._external_address: str | None = None
        self._external_port: int | None = None
        self._lifetime: int | None = None
        self._double_nat: str | None = None
        self._endpoint: Endpoint | None = None
        self._status = _Status()
        self._started = False
        self._stopped = False

    # -- public API --------------------------------------------------------------------------------------

    @property
    def nonce(self) -> bytes:
        """The current PCP mapping nonce (§11.1)."""
        return self._nonce

    @property
    def state(self) -> MapperState:
        s = self._status
        return MapperState(
            protocol=self.protocol, gateway=self.gateway, internal_port=self.internal_port,
            external_address=self._external_address, external_port=self._external_port,
            lifetime=self._lifetime, expires_at=self._expires_at, endpoint=self._endpoint,
            result_code=s.code, result_message=s.message, double_nat=self._double_nat is not None,
            double_nat_message=self._double_nat, no_answer=s.no_answer)

    def start(self, now: float) -> list[Transmit]:
        """Send the first request (PCP MAP)."""
        if self._started:
            return []
        self._started = True
        self._set_status(None, f"asking gateway {self.gateway} for a mapping (PCP)")
        return self._begin(now)

    def receive(self, payload: bytes, src: Addr, now: float) -> list[Transmit]:
        """A datagram from the gateway's port 5351; anything else is counted and dropped."""
        if not self._started or self._stopped:
            self.counters["not running"] += 1
            return []
        if src != (self.gateway, C.PORTMAP_SERVER_PORT):
            self.counters["wrong source"] += 1
            return []
        try:
            if payload[:1] == b"\x00":
                return self._on_natpmp(parse_natpmp_response(payload), now)
            if payload[:1] == bytes((C.PCP_VERSION,)):
                pcp = parse_pcp_response(payload)
                if pcp.opcode == C.PCP_OP_ANNOUNCE:
                    return self._on_pcp_announce(pcp, now)
                return self._on_pcp_map(pcp, now)
            raise ParseError("truncated" if not payload else "version")
        except ParseError as e:
            self.counters[f"parse error: {e}"] += 1
            return []

    def announcement(self, payload: bytes, src: Addr, now: float) -> list[Transmit]:
        """A datagram received on 224.0.0.1:5350: a NAT-PMP address announcement or a PCP ANNOUNCE."""
        if not self._started or self._stopped:
            self.counters["not running"] += 1
            return []
        if src[0] != self.gateway:
            self.counters["wrong source"] += 1
            return []
        try:
            if payload[:1] == b"\x00":
                msg = parse_natpmp_response(payload)
                if not isinstance(msg, NatPmpAddressResponse):
                    raise ParseError("opcode")
                return self._on_natpmp_announce(msg, now)
            if payload[:1] == bytes((C.PCP_VERSION,)):
                pcp = parse_pcp_response(payload)
                if pcp.opcode != C.PCP_OP_ANNOUNCE:
                    raise ParseError("opcode")
                return self._on_pcp_announce(pcp, now)
            raise ParseError("truncated" if not payload else "version")
        except ParseError as e:
            self.counters[f"parse error: {e}"] += 1
            return []

    def poll(self, now: float) -> list[Transmit]:
        """Run the timers that are due: expiry, re-check, renewal or error retry, retransmissions."""
        if not self._started or self._stopped:
            return []
        out: list[Transmit] = []
        if self._expires_at is not None and now >= self._expires_at:
            self._expire(now)
        recheck = self._recheck_at is not None and now >= self._recheck_at
        if recheck:
            self._recheck_at = None
            self._last_recheck = now
        if recheck or (self._next_attempt is not None and now >= self._next_attempt):
            out += self._begin(now)
        for retry in (self._addr, self._map):
            if retry is not None and now >= retry.next_at:
                if retry.protocol == PCP and self.protocol is None and \
                        retry.attempts >= C.PCP_SILENT_FALLBACK_ATTEMPTS:
                    # Some NAT-PMP-only routers drop PCP silently instead of answering version 0
                    # (RFC 6886 §3.5 says they should): after two unanswered PCP requests from a
                    # gateway that never answered anything, ask in NAT-PMP too. A PCP ANNOUNCE
                    # switches back.
                    self.wire = NATPMP
                    self.counters["fell back to NAT-PMP after PCP silence"] += 1
                    self._set_status(None, f"no answer to PCP from {self.gateway}; trying NAT-PMP")
                    out += self._begin(now)
                    break
                self._on_timeout(retry)
                out.append(self._send(retry, now))
        return out

    def deadline(self) -> float | None:
        """When :meth:`poll` next has work, or None."""
        if not self._started or self._stopped:
            return None
        times = [t for t in (self._expires_at, self._recheck_at, self._next_attempt) if t is not None]
        times += [r.next_at for r in (self._addr, self._map) if r is not None]
        return min(times, default=None)

    def stop(self, now: float) -> list[Transmit]:
        """Delete the mapping (lifetime 0, suggested port 0) in the protocol in use; sent once."""
        if not self._started or self._stopped:
            return []
        self._stopped = True
        if self.wire == PCP:
            payload = encode_pcp_map_request(self._nonce, self.internal_address, self.internal_port, 0)
        else:
            payload = encode_natpmp_map_request(self.internal_port, 0, 0)
        self._map = self._addr = None
        self._next_attempt = self._expires_at = self._recheck_at = None
        self._external_port = self._lifetime = None
        self._set_status(None, "mapping deleted (shutting down)")
        self._update_endpoint(now)
        return [Transmit(self.gateway, C.PORTMAP_SERVER_PORT, payload)]

    # -- sending -----------------------------------------------------------------------------------------

    def _new_nonce(self) -> bytes:
        nonce = self.rand(C.PCP_NONCE_LEN)
        if len(nonce) != C.PCP_NONCE_LEN:
            raise ValueError("rand returned the wrong number of bytes")
        return nonce

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * int.from_bytes(self.rand(4), "big") / 2**32

    def _map_payload(self) -> bytes:
        if self.wire == PCP:
            suggested = self._external_address if self._double_nat is None else None
            return encode_pcp_map_request(self._nonce, self.internal_address, self.internal_port,
                                          self.requested_lifetime, self._suggested_port, suggested)
        return encode_natpmp_map_request(self.internal_port, self._suggested_port, self.requested_lifetime)

    def _begin(self, now: float, map_: bool = True, addr: bool = True) -> list[Transmit]:
        """Start fresh requests (first attempt now): the mapping and, for NAT-PMP, the public address."""
        out = []
        if self.wire == PCP:
            self._addr = None
        elif addr:
            self._addr = _Retry(NATPMP, encode_natpmp_address_request())
            out.append(self._send(self._addr, now))
        if map_:
            self._next_attempt = None  # the answer schedules the renewal (or the retry after an error)
            self._map = _Retry(self.wire, self._map_payload())
            out.append(self._send(self._map, now))
        return out

    def _send(self, retry: _Retry, now: float) -> Transmit:
        retry.attempts += 1
        if retry.protocol == NATPMP:
            # §3.1: 250 ms, doubling; mDNSResponder keeps doubling after the 9th attempt, up to 15 min.
            retry.interval = min(C.NATPMP_INITIAL_RETRY * 2 ** (retry.attempts - 1),
                                 C.NATPMP_MAX_RETRY_INTERVAL)
        else:
            # RFC 6887 §8.1.1: RT = (1 + RAND) * IRT, then RT = (1 + RAND) * MIN(2 * RTprev, MRT).
            base = C.PCP_IRT if retry.attempts == 1 else min(2 * retry.interval, C.PCP_MRT)
            retry.interval = base * (1 + self._uniform(-C.PCP_RAND, C.PCP_RAND))
        retry.next_at = now + retry.interval
        return Transmit(self.gateway, C.PORTMAP_SERVER_PORT, retry.payload)

    def _on_timeout(self, retry: _Retry) -> None:
        """A retransmission timer fired without an answer: update the status before re-sending."""
        if retry.protocol == NATPMP and retry.attempts == C.NATPMP_MAX_ATTEMPTS:
            self._status = _Status(None, f"no NAT-PMP: gateway {self.gateway} did not answer "
                                   f"{C.NATPMP_MAX_ATTEMPTS} attempts over 64 s; still retrying, "
                                   "at most every 15 min", no_answer=True)
        elif retry.protocol == PCP and retry.attempts >= 3 and self.protocol is None:
            self._status = _Status(None, f"no answer from gateway {self.gateway} to {retry.attempts} PCP "
                                   "requests; still retrying", no_answer=True)

    # -- receiving ---------------------------------------------------------------------------------------

    def _epoch_lost(self, protocol: str, epoch: int, now: float) -> bool:
        """Record this packet's epoch; True if it shows the gateway lost state (NAT-PMP §3.6, PCP §8.5)."""
        prev = self._epochs.get(protocol)
        self._epochs[protocol] = _Epoch(now, epoch)
        if prev is None:
            return False
        ours = now - prev.at
        theirs = epoch - prev.epoch
        if protocol == NATPMP:
            return epoch < prev.epoch or theirs + C.NATPMP_EPOCH_SLACK < ours - ours / 8
        if epoch + C.PCP_EPOCH_BACKWARDS_TOLERANCE < prev.epoch:
            return True
        return (ours + C.PCP_EPOCH_SLACK < theirs - theirs / 16
                or theirs + C.PCP_EPOCH_SLACK < ours - ours / 16)

    def _on_natpmp(self, msg: NatPmpAddressResponse | NatPmpMapResponse, now: float) -> list[Transmit]:
        if msg.result == C.NATPMP_RESULT_UNSUPPORTED_VERSION:
            if self.wire != PCP:
                # We speak version 0 now: this is a late answer to an earlier PCP retransmission.
                self.counters["stale unsupported-version reply"] += 1
                return []
            # RFC 6887 §9: a NAT-PMP-only gateway. Re-send every pending operation as NAT-PMP, now.
            self.wire = NATPMP
            self.counters["fell back to NAT-PMP"] += 1
            self._epochs.pop(NATPMP, None)
            self._epoch_lost(NATPMP, msg.epoch, now)
            self._set_status(None, f"gateway {self.gateway} does not speak PCP; using NAT-PMP")
            return self._begin(now)
        if self.wire != NATPMP:
            self.counters["stale NAT-PMP reply"] += 1
            return []
        if isinstance(msg, NatPmpMapResponse) and (
                msg.opcode != C.NATPMP_OP_MAP_UDP
                or msg.internal_port not in (None, self.internal_port)):
            self.counters["other mapping"] += 1
            return []
        lost = self._epoch_lost(NATPMP, msg.epoch, now)
        self.protocol = NATPMP
        if isinstance(msg, NatPmpAddressResponse):
            ok = self._on_natpmp_address(msg, now)
            return self._recreate(now, addr=not ok) if lost else []
        ok = self._on_natpmp_map(msg, now)
        return self._recreate(now, map_=not ok) if lost else []

    def _on_natpmp_address(self, msg: NatPmpAddressResponse, now: float) -> bool:
        self._addr = None
        if msg.result != C.NATPMP_RESULT_SUCCESS or msg.external_address is None:
            self._fail(now, msg.result, natpmp_result_message(msg.result))
            return False
        self._set_external_address(msg.external_address, now)
        return True

    def _on_natpmp_map(self, msg: NatPmpMapResponse, now: float) -> bool:
        self._map = None
        if msg.result != C.NATPMP_RESULT_SUCCESS or msg.external_port is None or msg.lifetime is None:
            self._fail(now, msg.result, natpmp_result_message(msg.result))
            return False
        if msg.lifetime == 0 or msg.external_port == 0:
            self._fail(now, msg.result, "NAT-PMP result 0 but no mapping granted (lifetime or external "
                       "port 0): treated as a failure")
            return False
        self._granted(now, msg.external_port, msg.lifetime)
        return True

    def _on_pcp_map(self, msg: PcpResponse, now: float) -> list[Transmit]:
        if self.wire != PCP:
            self.counters["stale PCP reply"] += 1
            return []
        if msg.map is not None:
            if msg.map.nonce != self._nonce:
                self.counters["nonce mismatch"] += 1
                return []
            if msg.map.protocol != C.PCP_PROTO_UDP or msg.map.internal_port != self.internal_port:
                self.counters["other mapping"] += 1
                return []
        lost = self._epoch_lost(PCP, msg.epoch, now)
        self.protocol = PCP
        self._map = None
        if msg.result != C.PCP_RESULT_SUCCESS or msg.map is None:
            self._fail(now, msg.result, pcp_result_message(msg.result), hint=msg.lifetime)
            return self._recreate(now) if lost else []
        if msg.lifetime == 0 or msg.map.external_port == 0:
            self._fail(now, msg.result, "PCP result 0 but no mapping granted (lifetime or external port 0): "
                       "treated as a failure")
            return self._recreate(now) if lost else []
        if lost:
            # The gateway lost its state, but this answer is a mapping it holds now: keep it (§8.5, §11.3).
            self.counters["gateway lost state"] += 1
        self._set_external_address(msg.map.external_address, now)
        self._granted(now, msg.map.external_port, msg.lifetime)
        return []

    def _on_natpmp_announce(self, msg: NatPmpAddressResponse, now: float) -> list[Transmit]:
        if msg.result != C.NATPMP_RESULT_SUCCESS or msg.external_address is None:
            self.counters["announcement with error"] += 1
            return []
        lost = self._epoch_lost(NATPMP, msg.epoch, now)
        news = lost or msg.external_address != self._external_address
        if self.wire == NATPMP:
            self._set_external_address(msg.external_address, now)  # an announcement is authoritative
        if lost:
            self.counters["gateway lost state"] += 1
            self._nonce = self._new_nonce()
        if not news and self._recently_rechecked(now):
            self.counters["repeated announcement"] += 1
            return []
        self._last_recheck = now
        self._recheck_at = None
        return self._begin(now)

    def _on_pcp_announce(self, msg: PcpResponse, now: float) -> list[Transmit]:
        lost = self._epoch_lost(PCP, msg.epoch, now)
        if self.wire != PCP:
            # The gateway speaks PCP now (a firmware update?): use it from the next request.
            self.wire = PCP
            self._epochs.pop(NATPMP, None)
            lost = True
        if lost:
            self.counters["gateway lost state"] += 1
            self._nonce = self._new_nonce()
        elif self._recheck_at is not None or self._recently_rechecked(now):
            self.counters["repeated announcement"] += 1
            return []
        # §14.1.3: wait a random 0-5 s so that the gateway's clients do not all answer at once. When
        # the epoch proves the gateway lost its state, our mapping is already gone and inbound
        # traffic is failing: spread over 0-1 s only (our choice; a home gateway has few clients).
        spread = C.PCP_ANNOUNCE_LOST_STATE_DELAY if lost else C.PCP_ANNOUNCE_MAX_DELAY
        at = now + self._uniform(0.0, spread)
        self._recheck_at = at if self._recheck_at is None else min(at, self._recheck_at)
        self._last_recheck = now
        return []

    def _recently_rechecked(self, now: float) -> bool:
        return self._last_recheck is not None and now - self._last_recheck < C.PORTMAP_ANNOUNCE_HOLDOFF

    # -- outcomes ----------------------------------------------------------------------------------------

    def _recreate(self, now: float, map_: bool = True, addr: bool = True) -> list[Transmit]:
        """The gateway lost its state: re-create at once, suggesting the port it granted before."""
        self.counters["gateway lost state"] += 1
        if map_:
            self._nonce = self._new_nonce()
            what = f"re-creating the mapping on external port {self._suggested_port}"
        else:
            what = "the mapping was just granted again; re-reading the external address"
        self._set_status(self._status.code, f"gateway {self.gateway} lost its state (epoch check); {what}")
        return self._begin(now, map_=map_, addr=addr)

    def _granted(self, now: float, external_port: int, lifetime: int) -> None:
        self._external_port = external_port
        self._suggested_port = external_port  # renewals and re-creations ask for the same port
        self._lifetime = lifetime
        self._expires_at = now + lifetime
        self._error_backoff = 0.0
        if self.wire == NATPMP:
            renew = lifetime / 2
        else:
            renew = lifetime * self._uniform(C.PCP_RENEW_MIN_FRACTION, C.PCP_RENEW_MAX_FRACTION)
        self._next_attempt = now + max(renew, C.NATPMP_MIN_RENEW_INTERVAL)
        name = "PCP" if self.wire == PCP else "NAT-PMP"
        self._set_status(0, f"{name}: UDP port {self.internal_port} mapped to external port {external_port} "
                         f"for {lifetime} s")
        self._update_endpoint(now)

    def _fail(self, now: float, code: int | None, message: str, hint: int = 0) -> None:
        """An error answer: report it, stop the pending requests, retry later (30 s doubling to 15 min)."""
        self._map = self._addr = None
        self._error_backoff = min(max(self._error_backoff * 2, C.PORTMAP_ERROR_RETRY),
                                  C.NATPMP_MAX_RETRY_INTERVAL)
        self._next_attempt = now + max(float(hint), self._error_backoff)
        self._set_status(code, message)

    def _expire(self, now: float) -> None:
        self._expires_at = None
        self._external_port = self._lifetime = None
        self._set_status(self._status.code, "the mapping expired without being renewed; re-requesting "
                         f"external port {self._suggested_port}")
        self._update_endpoint(now)

    def _set_external_address(self, address: str, now: float) -> None:
        self._external_address = address
        self._double_nat = external_address_problem(address)
        self._update_endpoint(now)

    def _set_status(self, code: int | None, message: str) -> None:
        self._status = _Status(code, message)

    def _update_endpoint(self, now: float) -> None:
        endpoint = None
        if (self._external_address is not None and self._external_port is not None
                and self._double_nat is None and not self._stopped):
            endpoint = Endpoint(self._external_address, self._external_port)
        if endpoint != self._endpoint:
            event = EndpointChanged(self._endpoint, endpoint, now)
            self._endpoint = endpoint
            self.events.append(event)
            if self.on_change is not None:
                self.on_change(event)

