"""The tunneld handshake's state machine: WireGuard's Noise IKpsk2, sans I/O.

A :class:`Handshaker` takes bytes, the time and the source address and returns bytes to send and
events; it opens no socket, reads no clock and draws randomness only through the ``rand`` it is given.
``now`` (monotonic seconds) drives the cookie lifetime, the cookie secret's rotation and the initiation
rate limit; ``now_wall`` (Unix seconds) is only for an initiation's TAI64N timestamp. The messages
themselves are :mod:`tunneld.proto.handshake_wire`'s.

The index each side puts in the ``sender`` field is the ESP SPI on which that side will *receive*, so
indices are drawn from ``INDEX_MIN .. 2**32 - 1`` (top bit set: an ESP packet to us then never looks like STUN
or TURN ChannelData on the shared socket) and never collide with one in local use. Behaviour
follows wireguard-go (device/noise-protocol.go, device/cookie.go), written afresh: mac1 (keyed also by
the account PSK) is checked first and a bad one dropped silently; under load (`handshake_load`: the rate
over time) a message without a valid mac2 gets a cookie reply, and one with it counts against its
source's rate; the X25519 work comes out of a per-batch budget; an initiation is accepted only with a
TAI64N timestamp greater than the last accepted from that peer, and at most one per peer per 1/50 s; a
response that fails authentication leaves the pending initiation intact. Network input never raises
out of :meth:`Handshaker.receive`: every rejection becomes a :class:`Dropped` event with a short
reason, counted in :attr:`Handshaker.drops`.
"""

from __future__ import annotations

import copy
import hmac
import os
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Final

from tunneld.crypto.esp import SecurityAssociation
from tunneld.crypto.kdf import derive_esp_keymat
from tunneld.crypto.noise import (
    DHLEN,
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
from tunneld.proto.handshake_load import HandshakeLoad
from tunneld.proto.handshake_wire import (
    COOKIE_LEN,
    COOKIE_REPLY_LEN,
    HEADER,
    HEADER2,
    IDENTIFIER,
    INITIATION_LEN,
    LABEL_COOKIE,
    LABEL_MAC1,
    MAC_LEN,
    MARKER,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESERVED,
    RESPONSE_LEN,
    TAI64_BASE,
    CookieReply,
    Initiation,
    Response,
    cookie_key,
    frame,
    mac1_key,
    parse_tai64n,
    source_bytes,
    tai64n,
    unframe,
)

__all__ = [
    "COOKIE_REFRESH_TIME",
    "COOKIE_REPLY_LEN",
    "HANDSHAKE_INITIATION_RATE",
    "IDENTIFIER",
    "INDEX_MIN",
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

COOKIE_REFRESH_TIME: Final = C.COOKIE_REFRESH_TIME
# The minimum gap between two initiations accepted from one peer (WireGuard's 50 per second).
HANDSHAKE_INITIATION_RATE: Final = 1.0 / C.HANDSHAKE_INITIATIONS_PER_SECOND

_MAX_INDEX_TRIES: Final = 64
# Our sender indices (= our inbound SPIs) have the top bit set, so the first byte of every ESP packet sent to
# us is 0x80-0xFF: never a STUN message (first two bits 00, RFC 8489 §5; RFC 7983 §7) nor TURN ChannelData
# (first byte 0x40-0x4F, RFC 8656 §12.4). Also above MIN_SPI (RFC 4303 §2.1's reserved 1..255).
INDEX_MIN: Final = 0x80000000


class HandshakeError(Exception):
    """A local misuse (unknown peer given to :meth:`Handshaker.initiate`, no free index, bad key length).

    Never raised for network input; that becomes :class:`Dropped`.
    """


class _Reject(Exception):
    """Internal: a well-formed message that is refused; the argument is the drop reason."""


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
        """(outbound SA, inbound SA) for ``suite``, with ESN, keyed by tunneld.crypto.kdf.derive_esp_keymat.

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
    """The peer is under load and sent a cookie; our next message to it carries mac2. Nothing to send.

    ``retry_now``: the cookie answers our pending initiation, which carried no mac2, so a new initiation
    sent now gets through at once (rather than at the next retransmission, rekey_timeout later, as in
    WireGuard). A cookie for a message that had mac2 does not ask for one, so cookies cannot make us loop.
    """

    peer: bytes
    retry_now: bool = False


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
    last_had_mac2: bool = False  # whether that message carried a mac2
    pending: _Pending | None = None


class Handshaker:
    """The handshake engine of one device: initiates to peers, answers initiations, handles cookies.

    ``private_key`` is our static X25519 key, ``psk`` the 32-byte account PSK (tunneld.crypto.kdf.derive_psk),
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
        load: HandshakeLoad | None = None,
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
        self._mac1_key = mac1_key(self._public, psk)
        self._cookie_key = cookie_key(self._public, psk)
        self._state: dict[bytes, _Peer] = {}
        self._pending: dict[int, _Pending] = {}
        self._sent_index: dict[int, bytes] = {}  # our sender index in the last message to a peer -> peer
        self._cookie_secret: bytes | None = None
        self._cookie_secret_at = 0.0
        self.drops: dict[str, int] = {}
        """Count of Dropped events by reason."""
        self.load = load or HandshakeLoad()
        """Load over time, the per-source limit and the per-batch work budget (`handshake_load`)."""

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
        message = self._finish(HEADER.pack(MSG_INITIATION, RESERVED, index) + noise, state, now, index)
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

        Never raises for bad input: it returns :class:`Dropped`. Each initiation or response with a valid
        mac1 counts towards the load (:attr:`load`); while under load (or ``under_load`` forces it), one
        without a valid mac2 for ``src`` is answered with :class:`SendCookie` instead of being processed,
        and one with it is subject to the per-source limit. The X25519 work then comes out of the
        current batch's budget.
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
        if (cookie := self._admit(message, msg.sender, msg.mac1, src, now, under_load)) is not None:
            return cookie
        if not self.load.take_work():
            raise _Reject("busy")
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
        body = HEADER2.pack(MSG_RESPONSE, RESERVED, index, msg.sender) + noise
        reply = self._finish(body, state, now, index)
        keys = self._keys(hs, peer, index, msg.sender, is_initiator=False)
        return InitiationReceived(peer, frame(reply), keys)

    def _on_response(self, message: bytes, src: tuple[str, int], now: float, under_load: bool) -> Event:
        msg = Response.parse(message)
        self._check_mac1(message)
        if (cookie := self._admit(message, msg.sender, msg.mac1, src, now, under_load)) is not None:
            return cookie
        pending = self._pending.get(msg.receiver)
        if pending is None:
            raise _Reject("unknown-index")
        if not self.load.take_work():
            raise _Reject("busy")
        # Work on a copy: HandshakeState is spent by a failed read, and a forged response (any device of
        # the account can make mac1) must not be able to kill the genuine handshake.
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
        pending = state.pending
        retry = pending is not None and pending.local_index == msg.receiver and not state.last_had_mac2
        return CookieReceived(state.public, retry)

    # -- helpers -------------------------------------------------------------------------------------------

    def _peer(self, peer: bytes) -> _Peer:
        state = self._state.get(peer)
        if state is None:
            psk = self._psk
            state = self._state[peer] = _Peer(peer, mac1_key(peer, psk), cookie_key(peer, psk))
        return state

    def _drop_pending(self, state: _Peer) -> None:
        if state.pending is not None:
            self._pending.pop(state.pending.local_index, None)
            state.pending = None

    def _allocate_index(self) -> int:
        for _ in range(_MAX_INDEX_TRIES):
            index = int.from_bytes(self._rand(4), "little") | INDEX_MIN
            if index not in self._pending and not self._index_in_use(index):
                return index
        raise HandshakeError("no free index")

    def _finish(self, body: bytes, state: _Peer, now: float, sender_index: int) -> bytes:
        """Append mac1 and mac2 to a message for ``state``'s peer and remember them for a cookie reply."""
        mac1 = MAC(state.mac1_key, body)
        cookie = state.cookie
        state.last_had_mac2 = cookie is not None and now - state.cookie_at < COOKIE_REFRESH_TIME
        mac2 = MAC(cookie, body + mac1) if cookie is not None and state.last_had_mac2 else bytes(MAC_LEN)
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

    def _admit(self, message: bytes, sender: int, mac1: bytes, src: tuple[str, int], now: float,
               forced: bool) -> SendCookie | None:
        """The load checks of a message whose mac1 is good: count it; under load, a cookie reply unless
        mac2 is valid for ``src``, and then the per-source limit (its source is proven by the cookie)."""
        if not (self.load.meter.arrived(now) or forced):
            return None
        if not self._mac2_valid(message, src, now):
            if not self.load.take_cookie(src[0], now):
                raise _Reject("cookie-busy")
            reply = self._cookie_reply(sender, mac1, src, now)
            self.load.cookie_replies += 1
            return SendCookie(reply)
        if not self.load.limiter.allow(src[0], now):
            raise _Reject("source-rate-limited")
        return None

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
