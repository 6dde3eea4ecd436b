"""The tunneld handshake: WireGuard's Noise IKpsk2 messages behind the RFC 3948 non-ESP marker.

Sans-I/O, in the style of h11 and aioquic: a :class:`Handshaker` takes bytes, the time and the source
address as arguments and returns bytes to send and events; it opens no socket, reads no clock, keeps no
global state, and draws randomness only through the ``rand`` callable it was given (``os.urandom`` by
default). Two clocks are passed in: ``now``, a monotonic time in seconds that drives the cookie lifetime,
the cookie secret's rotation and the initiation rate limit, and ``now_wall``, Unix time in seconds, used
only for the TAI64N timestamp of an initiation.

Wire format (docs/protocol.md has it byte by byte, with a worked example): a UDP/4500 payload is
the four zero bytes of the RFC 3948 non-ESP marker followed by one of WireGuard's three handshake messages
(initiation, 148 bytes; response, 92 bytes; cookie reply, 64 bytes), unchanged except that our Noise
prologue is :data:`IDENTIFIER` instead of WireGuard's, so a tunneld peer and a WireGuard peer can never
complete a handshake by accident.

The index each side puts in the ``sender`` field is the ESP SPI on which that side will *receive*; the
peer sends ESP with it. So indices are drawn in ``crypto.esp.MIN_SPI .. 2**32 - 1`` and never collide with
one in local use (the ``index_in_use`` callback, plus the Handshaker's own pending initiations). On the
handshake wire an index is little-endian, as in WireGuard; in the ESP header the same number is big-endian
(RFC 4303).

Behaviour follows wireguard-go (device/noise-protocol.go, device/cookie.go), written afresh:

- mac1 is always checked first (cheap, keyed by our static public key); a bad mac1 is dropped silently.
- Under load (the ``under_load`` flag), a message whose mac2 is not valid for its source address is
  answered with a cookie reply instead of being processed; the sender keeps the cookie for 120 s and puts
  mac2 on its next message.
- The responder accepts an initiation only if its TAI64N timestamp is strictly greater than the greatest
  one already accepted from that peer, and at most one initiation per peer per 1/50 s.
- A response that fails authentication leaves the pending initiation intact, so a forged response cannot
  cancel a genuine handshake.

Network input never raises out of :meth:`Handshaker.receive`: malformed messages raise :class:`ParseError`
internally, every rejection becomes a :class:`Dropped` event with a short reason, and the reasons are
counted in :attr:`Handshaker.drops`.
"""

from __future__ import annotations

import copy
import hmac
import ipaddress
import math
import os
import struct
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Final

from crypto.esp import MIN_SPI, SecurityAssociation
from crypto.kdf import derive_esp_keymat
from crypto.noise import (
    DHLEN,
    HASH,
    MAC,
    TAGLEN,
    XNONCELEN,
    HandshakeState,
    NoiseError,
    public_key,
    xaead_decrypt,
    xaead_encrypt,
)
from tunneld.proto import constants as C
from tunneld.proto.errors import ParseError

__all__ = [
    "COOKIE_REFRESH_TIME",
    "COOKIE_REPLY_LEN",
    "HANDSHAKE_INITIATION_RATE",
    "IDENTIFIER",
    "INITIATION_LEN",
    "LABEL_COOKIE",
    "LABEL_MAC1",
    "MARKER",
    "MSG_COOKIE_REPLY",
    "MSG_INITIATION",
    "MSG_RESPONSE",
    "RESPONSE_LEN",
    "TAI64_BASE",
    "CookieReceived",
    "CookieReply",
    "Dropped",
    "Event",
    "HandshakeError",
    "Handshaker",
    "Initiation",
    "InitiationReceived",
    "PendingInitiation",
    "Response",
    "ResponseReceived",
    "SendCookie",
    "SessionKeys",
    "cookie_key",
    "frame",
    "mac1_key",
    "parse_tai64n",
    "source_bytes",
    "tai64n",
    "unframe",
]

MARKER: Final = b"\x00\x00\x00\x00"
"""The RFC 3948 §2.2 non-ESP marker that precedes every handshake message in a UDP payload."""
IDENTIFIER: Final = b"tunneld v1 esp-in-udp"
"""Our Noise prologue, in the place of WireGuard's ``"WireGuard v1 zx2c4 Jason@zx2c4.com"``."""
LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

MSG_INITIATION: Final = 1
MSG_RESPONSE: Final = 2
MSG_COOKIE_REPLY: Final = 3

INITIATION_LEN: Final = 148
RESPONSE_LEN: Final = 92
COOKIE_REPLY_LEN: Final = 64
MAC_LEN: Final = 16
TIMESTAMP_LEN: Final = 12
COOKIE_LEN: Final = 16

TAI64_BASE: Final = 0x400000000000000A
"""TAI64 label of the Unix epoch (1970-01-01 00:00:10 TAI), as in WireGuard's tai64n package."""
COOKIE_REFRESH_TIME: Final = C.COOKIE_REFRESH_TIME
# The minimum gap between two initiations accepted from one peer (WireGuard's 50 per second).
HANDSHAKE_INITIATION_RATE: Final = 1.0 / C.HANDSHAKE_INITIATIONS_PER_SECOND

_MAX_INDEX_TRIES: Final = 64
_RESERVED: Final = b"\x00\x00\x00"
_M32: Final = 0xFFFFFFFF

# Little-endian like WireGuard; the first byte is the type, then 3 reserved zero bytes.
_INITIATION = struct.Struct("<B3sI32s48s28s16s16s")
_RESPONSE = struct.Struct("<B3sII32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<B3sI24s32s")
_HEADER = struct.Struct("<B3sI")
_HEADER2 = struct.Struct("<B3sII")
assert _INITIATION.size == INITIATION_LEN
assert _RESPONSE.size == RESPONSE_LEN
assert _COOKIE_REPLY.size == COOKIE_REPLY_LEN


class HandshakeError(Exception):
    """A local misuse (unknown peer given to :meth:`Handshaker.initiate`, no free index, bad key length).

    Never raised for network input; that becomes :class:`Dropped`.
    """


class _Reject(Exception):
    """Internal: a well-formed message that is refused; the argument is the drop reason."""


# --------------------------------------------------------------------------------------------------------
# Framing, timestamps and MAC keys
# --------------------------------------------------------------------------------------------------------


def frame(message: bytes) -> bytes:
    """The UDP payload carrying ``message``: the non-ESP marker, then the message."""
    return MARKER + message


def unframe(payload: bytes) -> bytes:
    """The message behind the non-ESP marker of a UDP payload; ParseError if there is no marker."""
    if len(payload) <= len(MARKER) or payload[:4] != MARKER:
        raise ParseError("no-marker")
    return payload[4:]


def tai64n(now_wall: float) -> bytes:
    """The 12-byte TAI64N label of a Unix time: big-endian ``TAI64_BASE + seconds``, then nanoseconds.

    Like WireGuard we ignore leap seconds (the label is only compared, never converted back). Unlike
    wireguard-go we do not round the nanoseconds down to 2**24 ns, so two initiations are distinct whenever
    the caller's clock moved at all.
    """
    if not math.isfinite(now_wall):
        raise ValueError("wall-clock time must be finite")
    seconds = math.floor(now_wall)
    nanos = min(int((now_wall - seconds) * 1_000_000_000), 999_999_999)
    return (TAI64_BASE + seconds).to_bytes(8, "big") + nanos.to_bytes(4, "big")


def parse_tai64n(label: bytes) -> float:
    """Inverse of :func:`tai64n` (for logs and tests); ParseError unless 12 bytes with nanoseconds < 10**9."""
    if len(label) != TIMESTAMP_LEN:
        raise ParseError("bad-timestamp")
    nanos = int.from_bytes(label[8:], "big")
    if nanos >= 1_000_000_000:
        raise ParseError("bad-timestamp")
    return int.from_bytes(label[:8], "big") - TAI64_BASE + nanos / 1_000_000_000


def mac1_key(receiver_public: bytes) -> bytes:
    """``HASH("mac1----" || receiver's static public key)``: the key of mac1 on messages to that receiver."""
    return HASH(LABEL_MAC1 + receiver_public)


def cookie_key(cookie_sender_public: bytes) -> bytes:
    """``HASH("cookie--" || static public key of the side that sends the cookie reply)``: the XAEAD key."""
    return HASH(LABEL_COOKIE + cookie_sender_public)


def source_bytes(src: tuple[str, int]) -> bytes:
    """What a cookie is bound to: the packed source address, then the port as 2 little-endian bytes.

    (wireguard-go's ``netip.AddrPort.MarshalBinary``.) An IPv4-mapped IPv6 address counts as the IPv4
    address, so a dual-stack socket and an IPv4 socket give the same cookie; an IPv6 zone (``%eth0``) is
    ignored. ValueError for a bad address.
    """
    host, port = src[0], src[1]
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if not 0 <= port <= 0xFFFF:
        raise ValueError("port out of range")
    return addr.packed + port.to_bytes(2, "little")


def _check_frame(message: bytes, length: int) -> None:
    if len(message) < length:
        raise ParseError("truncated")
    if len(message) > length:
        raise ParseError("oversized")
    if message[1:4] != _RESERVED:
        raise ParseError("bad-reserved")


def _check_index(index: int) -> None:
    # A sender index becomes the peer's outbound ESP SPI, so it must be a usable SPI (RFC 4303 §2.1).
    if index < MIN_SPI:
        raise ParseError("bad-index")


# --------------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Initiation:
    """Message type 1: ``type, reserved[3], sender, ephemeral[32], static[48], timestamp[28], mac1, mac2``."""

    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes

    @classmethod
    def parse(cls, message: bytes) -> Initiation:
        _check_frame(message, INITIATION_LEN)
        t, _, sender, eph, static, ts, mac1, mac2 = _INITIATION.unpack(message)
        if t != MSG_INITIATION:
            raise ParseError("bad-type")
        _check_index(sender)
        return cls(sender, eph, static, ts, mac1, mac2)

    def encode(self) -> bytes:
        return _INITIATION.pack(
            MSG_INITIATION, _RESERVED, self.sender, self.ephemeral, self.encrypted_static,
            self.encrypted_timestamp, self.mac1, self.mac2,
        )


@dataclass(frozen=True, slots=True)
class Response:
    """Message type 2: ``type, reserved[3], sender, receiver, ephemeral[32], empty[16], mac1, mac2``."""

    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes

    @classmethod
    def parse(cls, message: bytes) -> Response:
        _check_frame(message, RESPONSE_LEN)
        t, _, sender, receiver, eph, empty, mac1, mac2 = _RESPONSE.unpack(message)
        if t != MSG_RESPONSE:
            raise ParseError("bad-type")
        _check_index(sender)
        return cls(sender, receiver, eph, empty, mac1, mac2)

    def encode(self) -> bytes:
        return _RESPONSE.pack(
            MSG_RESPONSE, _RESERVED, self.sender, self.receiver, self.ephemeral, self.encrypted_nothing,
            self.mac1, self.mac2,
        )


@dataclass(frozen=True, slots=True)
class CookieReply:
    """Message type 3: ``type, reserved[3], receiver, nonce[24], encrypted cookie[32]``."""

    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    @classmethod
    def parse(cls, message: bytes) -> CookieReply:
        _check_frame(message, COOKIE_REPLY_LEN)
        t, _, receiver, nonce, enc = _COOKIE_REPLY.unpack(message)
        if t != MSG_COOKIE_REPLY:
            raise ParseError("bad-type")
        return cls(receiver, nonce, enc)

    def encode(self) -> bytes:
        return _COOKIE_REPLY.pack(
            MSG_COOKIE_REPLY, _RESERVED, self.receiver, self.nonce, self.encrypted_cookie
        )


# --------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The outcome of a completed handshake, from one side's point of view.

    ``local_index`` is the SPI we receive ESP on; ``remote_index`` the SPI the peer receives on, i.e. the
    one we send with. ``i2r`` / ``r2i`` are the Noise split keys (``HandshakeState.split_keys()``), the
    same pair on both sides. Keys are kept out of ``repr``.
    """

    peer: bytes
    local_index: int
    remote_index: int
    is_initiator: bool
    i2r: bytes = field(repr=False)
    r2i: bytes = field(repr=False)
    handshake_hash: bytes = field(repr=False)

    def security_associations(
        self, suite: str = "aes-256-gcm"
    ) -> tuple[SecurityAssociation, SecurityAssociation]:
        """(outbound SA, inbound SA) for ``suite``, with ESN, keyed by crypto.kdf.derive_esp_keymat.

        The initiator sends with the i2r KEYMAT and receives with r2i; the responder the reverse. The
        outbound SA carries ``remote_index`` as its SPI and the inbound one ``local_index``.
        """
        i2r_key, i2r_salt = derive_esp_keymat(self.i2r, suite, "i2r")
        r2i_key, r2i_salt = derive_esp_keymat(self.r2i, suite, "r2i")
        if self.is_initiator:
            out_key, out_salt, in_key, in_salt = i2r_key, i2r_salt, r2i_key, r2i_salt
        else:
            out_key, out_salt, in_key, in_salt = r2i_key, r2i_salt, i2r_key, i2r_salt
        outbound = SecurityAssociation(self.remote_index, out_key, out_salt, aead=suite, esn=True)
        inbound = SecurityAssociation(self.local_index, in_key, in_salt, aead=suite, esn=True)
        return outbound, inbound


@dataclass(frozen=True, slots=True)
class PendingInitiation:
    """What :meth:`Handshaker.initiate` started: the index we will receive on and when it was sent.

    The Handshaker keeps the Noise state itself (looked up by ``local_index`` when the response arrives);
    this record is for the caller's retransmission timer. A new ``initiate`` for the same peer replaces it.
    """

    peer: bytes
    local_index: int
    started: float


@dataclass(frozen=True, slots=True)
class InitiationReceived:
    """We were the responder: send ``datagram`` (the response) to the source; ``keys`` are ready.

    The responder has no key confirmation yet: the peer proves it holds the keys (and the PSK) only with
    its first ESP packet on the new inbound SA, so the caller should not send on the new outbound SA
    before then (WireGuard's rule).
    """

    peer: bytes
    datagram: bytes
    keys: SessionKeys


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """We were the initiator and the handshake is complete: ``keys`` are ready and confirmed."""

    peer: bytes
    keys: SessionKeys


@dataclass(frozen=True, slots=True)
class CookieReceived:
    """The peer is under load and sent a cookie; our next message to it carries mac2. Nothing to send."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class SendCookie:
    """We are under load and the message lacked a valid mac2: send ``datagram`` (a cookie reply) back."""

    datagram: bytes


@dataclass(frozen=True, slots=True)
class Dropped:
    """The message was refused; ``reason`` is a short fixed string (also counted in Handshaker.drops)."""

    reason: str


Event = InitiationReceived | ResponseReceived | CookieReceived | SendCookie | Dropped


# --------------------------------------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    hs: HandshakeState
    peer: bytes
    local_index: int
    started: float


@dataclass(slots=True)
class _Peer:
    public: bytes
    mac1_key: bytes
    cookie_key: bytes
    last_timestamp: bytes = b""  # greatest TAI64N accepted from this peer (b"" sorts before any)
    last_initiation_at: float | None = None  # `now` of the last accepted initiation (rate limit)
    cookie: bytes | None = None  # the latest cookie the peer gave us, and when
    cookie_at: float = 0.0
    last_mac1: bytes | None = None  # mac1 of the last message we sent it: the AD of a cookie reply
    last_sent_index: int | None = None  # our sender index in that message
    pending: _Pending | None = None


class Handshaker:
    """The handshake engine of one device: initiates to peers, answers initiations, handles cookies.

    ``private_key`` is our static X25519 key, ``psk`` the 32-byte account PSK (crypto.kdf.derive_psk),
    ``peers`` any container of the static public keys allowed to connect (a set, a dict...; looked up
    with ``in``, so the caller can change it at any time). ``index_in_use(i)`` says whether ``i`` is
    already an inbound SPI locally; the Handshaker adds its own pending initiations. ``rand`` is the only
    source of randomness.

    Order of ``rand`` draws (fixed, so examples are reproducible): :meth:`initiate` draws the 32-byte
    ephemeral private key, then 4 bytes per index candidate; :meth:`receive` of an initiation draws the
    responder's ephemeral (32) as soon as mac1 and the cookie check have passed, then the index (4 per
    candidate); a cookie reply draws a new secret (32) if the old one is missing or 120 s old, then the
    nonce (24).
    """

    def __init__(
        self,
        private_key: bytes,
        psk: bytes,
        peers: Container[bytes],
        index_in_use: Callable[[int], bool] = lambda index: False,
        rand: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if len(private_key) != DHLEN:
            raise HandshakeError("static private key must be 32 bytes")
        if len(psk) != 32:
            raise HandshakeError("psk must be 32 bytes")
        self._private = private_key
        self._public = public_key(private_key)
        self._psk = psk
        self._peers = peers
        self._index_in_use = index_in_use
        self._rand = rand
        self._mac1_key = mac1_key(self._public)
        self._cookie_key = cookie_key(self._public)
        self._state: dict[bytes, _Peer] = {}
        self._pending: dict[int, _Pending] = {}
        self._sent_index: dict[int, bytes] = {}  # our sender index in the last message to a peer -> peer
        self._cookie_secret: bytes | None = None
        self._cookie_secret_at = 0.0
        self.drops: dict[str, int] = {}
        """Count of Dropped events by reason."""

    def __repr__(self) -> str:
        return f"Handshaker(public={self._public.hex()[:16]}..., pending={len(self._pending)})"

    @property
    def public_key(self) -> bytes:
        """Our static public key."""
        return self._public

    # -- initiating ----------------------------------------------------------------------------------------

    def initiate(self, peer: bytes, now: float, now_wall: float) -> tuple[bytes, PendingInitiation]:
        """Start a handshake with ``peer``: (UDP payload to send, pending record).

        Each retransmission is a fresh call (new ephemeral, timestamp and index, as in WireGuard); it
        replaces the previous pending initiation to that peer, whose index is released. mac2 is set if the
        peer gave us a cookie less than COOKIE_REFRESH_TIME ago. Raises HandshakeError for a peer not in
        ``peers`` or when no free index can be found.
        """
        if len(peer) != DHLEN or peer not in self._peers or peer == self._public:
            raise HandshakeError("not a known peer")
        state = self._peer(peer)
        ephemeral = self._rand(DHLEN)
        index = self._allocate_index()
        self._drop_pending(state)
        hs = HandshakeState("IKpsk2", True, IDENTIFIER, self._private, rs=peer, psk=self._psk, e=ephemeral)
        noise = hs.write_message(tai64n(now_wall))
        message = self._finish(_HEADER.pack(MSG_INITIATION, _RESERVED, index) + noise, state, now, index)
        pending = _Pending(hs, peer, index, now)
        state.pending = pending
        self._pending[index] = pending
        return frame(message), PendingInitiation(peer, index, now)

    def cancel(self, peer: bytes) -> None:
        """Forget the pending initiation to ``peer`` (if any): a late response to it is then dropped."""
        state = self._state.get(peer)
        if state is not None:
            self._drop_pending(state)

    def forget(self, peer: bytes) -> None:
        """Forget everything about ``peer``: pending initiation, cookie, last timestamp, rate limit."""
        state = self._state.pop(peer, None)
        if state is not None:
            self._drop_pending(state)
            if state.last_sent_index is not None and self._sent_index.get(state.last_sent_index) == peer:
                del self._sent_index[state.last_sent_index]

    def pending(self, peer: bytes) -> PendingInitiation | None:
        """The initiation to ``peer`` awaiting its response, if any."""
        state = self._state.get(peer)
        if state is None or state.pending is None:
            return None
        p = state.pending
        return PendingInitiation(p.peer, p.local_index, p.started)

    # -- receiving -----------------------------------------------------------------------------------------

    def receive(self, message: bytes, src: tuple[str, int], now: float, under_load: bool = False) -> Event:
        """Process one handshake message (the bytes after the non-ESP marker) from ``src``.

        Never raises for bad input: it returns :class:`Dropped`. ``under_load`` is the caller's DoS signal
        (for example, a backlog of handshake messages); while it is true, initiations and responses without
        a valid mac2 for ``src`` are answered with :class:`SendCookie` instead of being processed.
        """
        event: Event
        try:
            if not message:
                raise ParseError("truncated")
            kind = message[0]
            if kind == MSG_INITIATION:
                event = self._on_initiation(message, src, now, under_load)
            elif kind == MSG_RESPONSE:
                event = self._on_response(message, src, now, under_load)
            elif kind == MSG_COOKIE_REPLY:
                event = self._on_cookie_reply(message, now)
            else:
                raise ParseError("unknown-type")
        except (ParseError, _Reject) as exc:
            event = Dropped(str(exc))
        if isinstance(event, Dropped):
            self.drops[event.reason] = self.drops.get(event.reason, 0) + 1
        return event

    def _on_initiation(self, message: bytes, src: tuple[str, int], now: float, under_load: bool) -> Event:
        msg = Initiation.parse(message)
        self._check_mac1(message)
        if under_load and not self._mac2_valid(message, src, now):
            return SendCookie(self._cookie_reply(msg.sender, msg.mac1, src, now))
        hs = HandshakeState("IKpsk2", False, IDENTIFIER, self._private, psk=self._psk, e=self._rand(DHLEN))
        try:
            timestamp = hs.read_message(msg.ephemeral + msg.encrypted_static + msg.encrypted_timestamp)
        except NoiseError:
            raise _Reject("decrypt-failed") from None
        peer = hs.remote_static
        if peer is None or peer == self._public or peer not in self._peers:
            raise _Reject("unknown-peer")
        state = self._peer(peer)
        # Replay first, then flood, as wireguard-go; neither updates the peer's state.
        if timestamp <= state.last_timestamp:
            raise _Reject("replay")
        last = state.last_initiation_at
        if last is not None and now - last <= HANDSHAKE_INITIATION_RATE:
            raise _Reject("rate-limited")
        try:
            index = self._allocate_index()
        except HandshakeError:
            raise _Reject("no-free-index") from None
        state.last_timestamp = timestamp
        state.last_initiation_at = now
        noise = hs.write_message(b"")
        body = _HEADER2.pack(MSG_RESPONSE, _RESERVED, index, msg.sender) + noise
        reply = self._finish(body, state, now, index)
        keys = self._keys(hs, peer, index, msg.sender, is_initiator=False)
        return InitiationReceived(peer, frame(reply), keys)

    def _on_response(self, message: bytes, src: tuple[str, int], now: float, under_load: bool) -> Event:
        msg = Response.parse(message)
        self._check_mac1(message)
        if under_load and not self._mac2_valid(message, src, now):
            return SendCookie(self._cookie_reply(msg.sender, msg.mac1, src, now))
        pending = self._pending.get(msg.receiver)
        if pending is None:
            raise _Reject("unknown-index")
        # Work on a copy: HandshakeState is spent by a failed read, and a forged response (mac1 is keyed
        # by a public value) must not be able to kill the genuine handshake.
        hs = copy.deepcopy(pending.hs)
        try:
            hs.read_message(msg.ephemeral + msg.encrypted_nothing)
        except NoiseError:
            raise _Reject("decrypt-failed") from None
        state = self._peer(pending.peer)
        self._drop_pending(state)
        keys = self._keys(hs, pending.peer, pending.local_index, msg.sender, is_initiator=True)
        return ResponseReceived(pending.peer, keys)

    def _on_cookie_reply(self, message: bytes, now: float) -> Event:
        msg = CookieReply.parse(message)
        peer = self._sent_index.get(msg.receiver)
        state = self._state.get(peer) if peer is not None else None
        if state is None:
            raise _Reject("unknown-index")
        if state.last_mac1 is None:
            raise _Reject("unexpected-cookie")
        try:
            cookie = xaead_decrypt(state.cookie_key, msg.nonce, msg.encrypted_cookie, state.last_mac1)
        except NoiseError:
            raise _Reject("bad-cookie") from None
        state.cookie = cookie
        state.cookie_at = now
        state.last_mac1 = None  # one cookie reply per message sent, as wireguard-go
        return CookieReceived(state.public)

    # -- helpers -------------------------------------------------------------------------------------------

    def _peer(self, peer: bytes) -> _Peer:
        state = self._state.get(peer)
        if state is None:
            state = self._state[peer] = _Peer(peer, mac1_key(peer), cookie_key(peer))
        return state

    def _drop_pending(self, state: _Peer) -> None:
        if state.pending is not None:
            self._pending.pop(state.pending.local_index, None)
            state.pending = None

    def _allocate_index(self) -> int:
        for _ in range(_MAX_INDEX_TRIES):
            index = int.from_bytes(self._rand(4), "little")
            if index >= MIN_SPI and index not in self._pending and not self._index_in_use(index):
                return index
        raise HandshakeError("no free index")

    def _finish(self, body: bytes, state: _Peer, now: float, sender_index: int) -> bytes:
        """Append mac1 and mac2 to a message for ``state``'s peer and remember them for a cookie reply."""
        mac1 = MAC(state.mac1_key, body)
        cookie = state.cookie
        if cookie is not None and now - state.cookie_at < COOKIE_REFRESH_TIME:
            mac2 = MAC(cookie, body + mac1)
        else:
            mac2 = bytes(MAC_LEN)
        state.last_mac1 = mac1
        if state.last_sent_index is not None and self._sent_index.get(state.last_sent_index) == state.public:
            del self._sent_index[state.last_sent_index]
        state.last_sent_index = sender_index
        self._sent_index[sender_index] = state.public
        return body + mac1 + mac2

    def _check_mac1(self, message: bytes) -> None:
        body, mac1 = message[: -2 * MAC_LEN], message[-2 * MAC_LEN : -MAC_LEN]
        if not hmac.compare_digest(MAC(self._mac1_key, body), mac1):
            raise _Reject("bad-mac1")

    def _secret_fresh(self, now: float) -> bool:
        return self._cookie_secret is not None and now - self._cookie_secret_at < COOKIE_REFRESH_TIME

    def _cookie_for(self, src: tuple[str, int]) -> bytes:
        assert self._cookie_secret is not None
        try:
            return MAC(self._cookie_secret, source_bytes(src))
        except ValueError:
            raise _Reject("bad-source") from None

    def _mac2_valid(self, message: bytes, src: tuple[str, int], now: float) -> bool:
        if not self._secret_fresh(now):
            return False
        cookie = self._cookie_for(src)
        return hmac.compare_digest(MAC(cookie, message[:-MAC_LEN]), message[-MAC_LEN:])

    def _cookie_reply(self, receiver: int, mac1: bytes, src: tuple[str, int], now: float) -> bytes:
        if not self._secret_fresh(now):
            self._cookie_secret = self._rand(32)
            self._cookie_secret_at = now
        cookie = self._cookie_for(src)
        nonce = self._rand(XNONCELEN)
        encrypted = xaead_encrypt(self._cookie_key, nonce, cookie, mac1)
        assert len(encrypted) == COOKIE_LEN + TAGLEN
        return frame(CookieReply(receiver, nonce, encrypted).encode())

    @staticmethod
    def _keys(hs: HandshakeState, peer: bytes, local: int, remote: int, is_initiator: bool) -> SessionKeys:
        i2r, r2i = hs.split_keys()
        return SessionKeys(peer, local, remote, is_initiator, i2r, r2i, hs.handshake_hash)
