"""The handshake's wire: WireGuard's three messages behind the RFC 3948 §2.2 non-ESP marker, with their
framing, TAI64N timestamps and MAC keys (docs/protocol.md has them byte by byte). Parsing raises only
ParseError; the state machine is `tunneld.proto.handshake`."""

from __future__ import annotations

import math
import socket
import struct
from dataclasses import dataclass
from typing import Final

from tunneld.crypto.esp import MIN_SPI
from tunneld.crypto.noise import HASH
from tunneld.proto.errors import ParseError

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
RESERVED: Final = b"\x00\x00\x00"

# Little-endian like WireGuard; the first byte is the type, then 3 reserved zero bytes.
INITIATION = struct.Struct("<B3sI32s48s28s16s16s")
RESPONSE = struct.Struct("<B3sII32s16s16s16s")
COOKIE_REPLY = struct.Struct("<B3sI24s32s")
HEADER = struct.Struct("<B3sI")
HEADER2 = struct.Struct("<B3sII")
assert INITIATION.size == INITIATION_LEN
assert RESPONSE.size == RESPONSE_LEN
assert COOKIE_REPLY.size == COOKIE_REPLY_LEN

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


def mac1_key(receiver_public: bytes, psk: bytes) -> bytes:
    """``HASH("mac1----" || receiver's static public key || psk)``: the key of mac1 on messages to that
    receiver. WireGuard's key is the public key alone; ours adds the account PSK, so that only the
    account's devices can make a message that passes mac1 (docs/protocol.md, "mac1 and mac2")."""
    return HASH(LABEL_MAC1 + receiver_public + psk)


def cookie_key(cookie_sender_public: bytes, psk: bytes) -> bytes:
    """``HASH("cookie--" || static public key of the side that sends the cookie reply || psk)``: the
    XAEAD key of a cookie reply (WireGuard's, with the account PSK added as for mac1)."""
    return HASH(LABEL_COOKIE + cookie_sender_public + psk)


_V4_MAPPED: Final = bytes(10) + b"\xff\xff"


def packed_address(host: str) -> bytes | None:
    """``host`` packed, an IPv4-mapped IPv6 address as its IPv4 address, a zone (``%eth0``) ignored; None
    if it is not an address. inet_pton, not ipaddress: this runs for every handshake message under load."""
    host = host.split("%", 1)[0]
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    return packed[12:] if len(packed) == 16 and packed[:12] == _V4_MAPPED else packed


def source_bytes(src: tuple[str, int]) -> bytes:
    """What a cookie is bound to: the packed source address, then the port as 2 little-endian bytes.

    (wireguard-go's ``netip.AddrPort.MarshalBinary``.) An IPv4-mapped IPv6 address counts as the IPv4
    address, so a dual-stack socket and an IPv4 socket give the same cookie; an IPv6 zone (``%eth0``) is
    ignored. ValueError for a bad address.
    """
    port = src[1]
    if not 0 <= port <= 0xFFFF:
        raise ValueError("port out of range")
    packed = packed_address(src[0])
    if packed is None:
        raise ValueError("not an address")
    return packed + port.to_bytes(2, "little")


def _check_frame(message: bytes, length: int) -> None:
    if len(message) < length:
        raise ParseError("truncated")
    if len(message) > length:
        raise ParseError("oversized")
    if message[1:4] != RESERVED:
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
        t, _, sender, eph, static, ts, mac1, mac2 = INITIATION.unpack(message)
        if t != MSG_INITIATION:
            raise ParseError("bad-type")
        _check_index(sender)
        return cls(sender, eph, static, ts, mac1, mac2)

    def encode(self) -> bytes:
        return INITIATION.pack(
            MSG_INITIATION, RESERVED, self.sender, self.ephemeral, self.encrypted_static,
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
        t, _, sender, receiver, eph, empty, mac1, mac2 = RESPONSE.unpack(message)
        if t != MSG_RESPONSE:
            raise ParseError("bad-type")
        _check_index(sender)
        return cls(sender, receiver, eph, empty, mac1, mac2)

    def encode(self) -> bytes:
        return RESPONSE.pack(
            MSG_RESPONSE, RESERVED, self.sender, self.receiver, self.ephemeral, self.encrypted_nothing,
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
        t, _, receiver, nonce, enc = COOKIE_REPLY.unpack(message)
        if t != MSG_COOKIE_REPLY:
            raise ParseError("bad-type")
        return cls(receiver, nonce, enc)

    def encode(self) -> bytes:
        return COOKIE_REPLY.pack(
            MSG_COOKIE_REPLY, RESERVED, self.receiver, self.nonce, self.encrypted_cookie
        )
