"""STUN (RFC 8489) and TURN (RFC 8656) messages on the wire: header, attributes, integrity, ChannelData.

Pure functions and one frozen `Message`; no state machines (the Binding client and the TURN client are
built on this). Decoding is bounded before parsing and raises only `ParseError`. How STUN and ChannelData
are told apart from ESP-in-UDP and our handshake on one socket is explained in docs/protocol.md
("STUN and TURN messages").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tunneld.proto.core import Address
from tunneld.proto.errors import ParseError

# --- Header (RFC 8489 §5) ---------------------------------------------------------------------------
MAGIC_COOKIE = 0x2112A442  # §5
COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
HEADER_LEN = 20  # §5: type 2, length 2, cookie 4, transaction ID 12
TRANSACTION_ID_LEN = 12  # §5: 96 bits
ATTR_HEADER_LEN = 4  # §14: type 2, length 2

# Bounds (ours). The largest message we expect over UDP is a TURN Data indication or Send request carrying
# one full-size ESP datagram (at most 1472 bytes on a 1500-byte path) plus a 20-byte header and at most
# 32 bytes of XOR-PEER-ADDRESS (IPv6), DATA header and padding; 2048 covers that with room, and anything
# larger cannot be a single unfragmented datagram of ours. No message of ours has more than about ten
# attributes.
MAX_MESSAGE = 2048
MAX_ATTRIBUTES = 32

# Classes (§5: C1 is type bit 8, C0 is type bit 4).
REQUEST = 0b00
INDICATION = 0b01
SUCCESS = 0b10
ERROR = 0b11

# Methods: Binding (RFC 8489 §18.2); TURN's (RFC 8656 §17).
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA = 0x007
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009

# Comprehension-required attributes (0x0000-0x7FFF), RFC 8489 §18.3.
MAPPED_ADDRESS = 0x0001  # §14.1
USERNAME = 0x0006  # §14.3
MESSAGE_INTEGRITY = 0x0008  # §14.5
ERROR_CODE = 0x0009  # §14.8
UNKNOWN_ATTRIBUTES = 0x000A  # §14.13
REALM = 0x0014  # §14.9
NONCE = 0x0015  # §14.10
MESSAGE_INTEGRITY_SHA256 = 0x001C  # §14.6
PASSWORD_ALGORITHM = 0x001D  # §14.12
USERHASH = 0x001E  # §14.4
XOR_MAPPED_ADDRESS = 0x0020  # §14.2
# Comprehension-optional attributes (0x8000-0xFFFF), RFC 8489 §18.3.
PASSWORD_ALGORITHMS = 0x8002  # §14.11
ALTERNATE_DOMAIN = 0x8003  # §14.16
SOFTWARE = 0x8022  # §14.14
ALTERNATE_SERVER = 0x8023  # §14.15
FINGERPRINT = 0x8028  # §14.7
# TURN attributes, RFC 8656 §18.
CHANNEL_NUMBER = 0x000C  # §18.1
LIFETIME = 0x000D  # §18.2
XOR_PEER_ADDRESS = 0x0012  # §18.3
DATA_ATTR = 0x0013  # §18.4 (DATA; named apart from the Data method)
XOR_RELAYED_ADDRESS = 0x0016  # §18.5
REQUESTED_ADDRESS_FAMILY = 0x0017  # §18.6
EVEN_PORT = 0x0018  # §18.7
REQUESTED_TRANSPORT = 0x0019  # §18.8
DONT_FRAGMENT = 0x001A  # §18.9
RESERVATION_TOKEN = 0x0022  # §18.10
ADDITIONAL_ADDRESS_FAMILY = 0x8000  # §18.11
ADDRESS_ERROR_CODE = 0x8001  # §18.12
ICMP = 0x8004  # §18.13

PROTOCOL_UDP = 17  # RFC 8656 §18.8: REQUESTED-TRANSPORT carries an IANA protocol number

FAMILY_IPV4 = 0x01  # RFC 8489 §14.1
FAMILY_IPV6 = 0x02

HMAC_SHA1_LEN = 20  # §14.5
HMAC_SHA256_LEN = 32  # §14.6: we send and accept only the full 32 bytes
FINGERPRINT_XOR = 0x5354554E  # §14.7: "STUN"
MAX_TEXT = 763  # §14.9, §14.10, §14.14: REALM, NONCE, SOFTWARE < 763 bytes (USERNAME < 509, §14.3)

# ChannelData (RFC 8656 §12.4).
CHANNEL_MIN = 0x4000  # §12: channel numbers 0x4000 through 0x4FFF
CHANNEL_MAX = 0x4FFF
CHANNEL_HEADER_LEN = 4

Attribute = tuple[int, bytes]


def _pad(n: int) -> int:
    """Bytes of padding after an attribute value of n bytes (§14: values are padded to 4 bytes)."""
    return -n & 3


# --- Message type ------------------------------------------------------------------------------------

def message_type(method: int, cls: int) -> int:
    """The 14-bit type: method bits M0-M11 interleaved with class bits C0 (bit 4) and C1 (bit 8), §5."""
    if not 0 <= method <= 0xFFF or not 0 <= cls <= 3:
        raise ValueError("method or class out of range")
    return ((method & 0x00F) | ((method & 0x070) << 1) | ((method & 0xF80) << 2)
            | ((cls & 1) << 4) | ((cls & 2) << 7))


def split_type(mtype: int) -> tuple[int, int]:
    """(method, class) of a 14-bit message type; the inverse of `message_type`."""
    method = (mtype & 0x000F) | ((mtype & 0x00E0) >> 1) | ((mtype & 0x3E00) >> 2)
    cls = ((mtype >> 4) & 1) | ((mtype >> 7) & 2)
    return method, cls


# --- Classification ----------------------------------------------------------------------------------

def is_stun(datagram: bytes | bytearray | memoryview) -> bool:
    """True if the datagram looks like one whole STUN message (first two bits zero, magic cookie, length).

    Cheap, no parsing: used to demultiplex one UDP socket before any other classification.
    """
    n = len(datagram)
    if n < HEADER_LEN or n > MAX_MESSAGE or datagram[0] & 0xC0:
        return False
    length = (datagram[2] << 8) | datagram[3]
    return length + HEADER_LEN == n and length & 3 == 0 and bytes(datagram[4:8]) == COOKIE_BYTES


def is_channel_data(datagram: bytes | bytearray | memoryview) -> bool:
    """True if the datagram is one whole ChannelData message (channel 0x4000-0x4FFF, length, padding)."""
    n = len(datagram)
    if n < CHANNEL_HEADER_LEN or n > MAX_MESSAGE:
        return False
    channel = (datagram[0] << 8) | datagram[1]
    length = (datagram[2] << 8) | datagram[3]
    body = n - CHANNEL_HEADER_LEN
    return CHANNEL_MIN <= channel <= CHANNEL_MAX and length <= body <= length + _pad(length)


# --- ChannelData (RFC 8656 §12.4) ----------------------------------------------------------------------

def encode_channel_data(channel: int, data: bytes) -> bytes:
    """A ChannelData message, padded to 4 bytes (§12.5: over UDP the padding is optional; we always pad)."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise ValueError("channel number out of range")
    if len(data) > MAX_MESSAGE - CHANNEL_HEADER_LEN - 3:
        raise ValueError("channel data too long")
    return (channel.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data + bytes(_pad(len(data))))


def decode_channel_data(datagram: bytes) -> tuple[int, bytes]:
    """(channel, application data) of a ChannelData message; padding is ignored (§12.5)."""
    if not is_channel_data(datagram):
        raise ParseError("not channel data")
    length = int.from_bytes(datagram[2:4], "big")
    channel = int.from_bytes(datagram[0:2], "big")
    return channel, bytes(datagram[CHANNEL_HEADER_LEN:CHANNEL_HEADER_LEN + length])


# --- Attribute values ----------------------------------------------------------------------------------

def encode_address(address: Address) -> bytes:
    """A MAPPED-ADDRESS (or ALTERNATE-SERVER) value, §14.1."""
    host, port = address
    ip = ipaddress.ip_address(host)
    family = FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6
    return bytes([0, family]) + port.to_bytes(2, "big") + ip.packed


def decode_address(value: bytes) -> Address:
    """The (host, port) of a MAPPED-ADDRESS value; the first byte is ignored (§14.1)."""
    if len(value) == 8 and value[1] == FAMILY_IPV4:
        return str(ipaddress.IPv4Address(value[4:8])), int.from_bytes(value[2:4], "big")
    if len(value) == 20 and value[1] == FAMILY_IPV6:
        return str(ipaddress.IPv6Address(value[4:20])), int.from_bytes(value[2:4], "big")
    raise ParseError("bad address")


def _xor_mask(family: int, transaction_id: bytes) -> bytes:
    """The XOR mask of §14.2: port with the cookie's top 16 bits, address with cookie (+ transaction ID)."""
    return COOKIE_BYTES + (transaction_id if family == FAMILY_IPV6 else b"")


def encode_xor_address(address: Address, transaction_id: bytes) -> bytes:
    """An XOR-MAPPED-ADDRESS (XOR-PEER-ADDRESS, XOR-RELAYED-ADDRESS) value, RFC 8489 §14.2."""
    plain = encode_address(address)
    mask = _xor_mask(plain[1], transaction_id)
    x = bytes(a ^ b for a, b in zip(plain[2:4], mask[:2], strict=True))
    return plain[:2] + x + bytes(a ^ b for a, b in zip(plain[4:], mask, strict=True))


def decode_xor_address(value: bytes, transaction_id: bytes) -> Address:
    """The (host, port) of an XOR-*-ADDRESS value; XOR is its own inverse."""
    if len(value) not in (8, 20) or value[1] not in (FAMILY_IPV4, FAMILY_IPV6):
        raise ParseError("bad address")
    mask = _xor_mask(value[1], transaction_id)
    if len(value) != 4 + len(mask):
        raise ParseError("bad address")
    port = bytes(a ^ b for a, b in zip(value[2:4], mask[:2], strict=True))
    return decode_address(value[:2] + port + bytes(a ^ b for a, b in zip(value[4:], mask, strict=True)))


def encode_error_code(code: int, reason: str) -> bytes:
    """An ERROR-CODE value, §14.8: class (hundreds) and number (0-99), then a UTF-8 reason phrase."""
    if not 300 <= code <= 699:
        raise ValueError("error code out of range")
    return bytes([0, 0, code // 100, code % 100]) + reason.encode()


def decode_error_code(value: bytes) -> tuple[int, str]:
    """(code, reason) of an ERROR-CODE value."""
    if not 4 <= len(value) <= 4 + MAX_TEXT:
        raise ParseError("bad error code")
    cls, number = value[2] & 0x07, value[3]
    if not 3 <= cls <= 6 or number > 99:
        raise ParseError("bad error code")
    return cls * 100 + number, _text(value[4:])


def encode_unknown_attributes(types: Iterable[int]) -> bytes:
    """An UNKNOWN-ATTRIBUTES value, §14.13: 16-bit attribute types."""
    return b"".join(t.to_bytes(2, "big") for t in types)


def decode_unknown_attributes(value: bytes) -> tuple[int, ...]:
    if len(value) % 2:
        raise ParseError("bad unknown attributes")
    return tuple(int.from_bytes(value[i:i + 2], "big") for i in range(0, len(value), 2))


def _text(value: bytes) -> str:
    if len(value) > MAX_TEXT:
        raise ParseError("text too long")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise ParseError("bad utf-8") from None


def _u32(value: bytes) -> int:
    if len(value) != 4:
        raise ParseError("bad length")
    return int.from_bytes(value, "big")


def encode_u32(n: int) -> bytes:
    """A LIFETIME value (RFC 8656 §18.2): seconds."""
    return n.to_bytes(4, "big")


def encode_requested_transport(protocol: int = PROTOCOL_UDP) -> bytes:
    """A REQUESTED-TRANSPORT value (RFC 8656 §18.8): protocol number, then 3 reserved bytes."""
    return bytes([protocol, 0, 0, 0])


def encode_channel_number(channel: int) -> bytes:
    """A CHANNEL-NUMBER value (RFC 8656 §18.1): channel, then 2 reserved bytes."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise ValueError("channel number out of range")
    return channel.to_bytes(2, "big") + b"\0\0"


# Values we can check at decode time, so typed accessors never raise. XOR addresses need the transaction
# ID and are checked in `decode`.
def _check_channel(value: bytes) -> object:
    if len(value) != 4 or not CHANNEL_MIN <= int.from_bytes(value[:2], "big") <= CHANNEL_MAX:
        raise ParseError("bad channel number")
    return None


def _check_len(n: int) -> Callable[[bytes], object]:
    def check(value: bytes) -> object:
        if len(value) != n:
            raise ParseError("bad length")
        return None
    return check


_CHECKS: dict[int, Callable[[bytes], object]] = {
    MAPPED_ADDRESS: decode_address,
    ALTERNATE_SERVER: decode_address,
    USERNAME: _text,
    REALM: _text,
    NONCE: _text,
    SOFTWARE: _text,
    ERROR_CODE: decode_error_code,
    UNKNOWN_ATTRIBUTES: decode_unknown_attributes,
    MESSAGE_INTEGRITY: _check_len(HMAC_SHA1_LEN),
    MESSAGE_INTEGRITY_SHA256: _check_len(HMAC_SHA256_LEN),
    FINGERPRINT: _check_len(4),
    LIFETIME: _u32,
    REQUESTED_TRANSPORT: _check_len(4),
    CHANNEL_NUMBER: _check_channel,
}
_XOR_ADDRESSES = (XOR_MAPPED_ADDRESS, XOR_PEER_ADDRESS, XOR_RELAYED_ADDRESS)


# --- Message -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    """A decoded STUN message. `attributes` holds (type, value) pairs in wire order, values unpadded.

    Attributes after MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are dropped
    (RFC 8489 §14.5). `raw` and `offsets` (where each attribute starts) serve the integrity checks.
    """

    method: int
    cls: int
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()
    raw: bytes = field(default=b"", compare=False, repr=False)
    offsets: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def get(self, attr_type: int) -> bytes | None:
        """The value of the first attribute of this type (§14: only the first one counts)."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    def _xor(self, attr_type: int) -> Address | None:
        v = self.get(attr_type)
        return None if v is None else decode_xor_address(v, self.transaction_id)

    def _str(self, attr_type: int) -> str | None:
        v = self.get(attr_type)
        return None if v is None else v.decode()

    def xor_mapped_address(self) -> Address | None:
        return self._xor(XOR_MAPPED_ADDRESS)

    def xor_peer_address(self) -> Address | None:
        return self._xor(XOR_PEER_ADDRESS)

    def xor_relayed_address(self) -> Address | None:
        return self._xor(XOR_RELAYED_ADDRESS)

    def mapped_address(self) -> Address | None:
        v = self.get(MAPPED_ADDRESS)
        return None if v is None else decode_address(v)

    def username(self) -> str | None:
        return self._str(USERNAME)

    def realm(self) -> str | None:
        return self._str(REALM)

    def nonce(self) -> str | None:
        return self._str(NONCE)

    def software(self) -> str | None:
        return self._str(SOFTWARE)

    def error_code(self) -> tuple[int, str] | None:
        v = self.get(ERROR_CODE)
        return None if v is None else decode_error_code(v)

    def unknown_attributes(self) -> tuple[int, ...]:
        v = self.get(UNKNOWN_ATTRIBUTES)
        return () if v is None else decode_unknown_attributes(v)

    def lifetime(self) -> int | None:
        v = self.get(LIFETIME)
        return None if v is None else _u32(v)

    def data(self) -> bytes | None:
        return self.get(DATA_ATTR)

    def requested_transport(self) -> int | None:
        v = self.get(REQUESTED_TRANSPORT)
        return None if v is None else v[0]

    def channel_number(self) -> int | None:
        v = self.get(CHANNEL_NUMBER)
        return None if v is None else int.from_bytes(v[:2], "big")

    def unknown_required(self, known: Iterable[int]) -> tuple[int, ...]:
        """Comprehension-required types (< 0x8000) not in `known`: answer a request with 420 (§6.3.1)."""
        ok = set(known)
        return tuple(dict.fromkeys(t for t, _ in self.attributes if t < 0x8000 and t not in ok))

    def encode(self) -> bytes:
        """The message's bytes, attributes as they are (MESSAGE-INTEGRITY etc. copied, not computed)."""
        return encode(self.method, self.cls, self.transaction_id, self.attributes)


def _header(method: int, cls: int, transaction_id: bytes, length: int) -> bytes:
    return (message_type(method, cls).to_bytes(2, "big") + length.to_bytes(2, "big") + COOKIE_BYTES
            + transaction_id)


def _tlv(attr_type: int, value: bytes, fill: bytes = b"\0") -> bytes:
    return attr_type.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value + fill * _pad(len(value))


def encode(
    method: int,
    cls: int,
    transaction_id: bytes,
    attributes: Iterable[Attribute] = (),
    *,
    integrity_key: bytes | None = None,
    integrity_sha256_key: bytes | None = None,
    fingerprint: bool = False,
    fill: bytes = b"\0",
) -> bytes:
    """A STUN message; with a key, MESSAGE-INTEGRITY (§14.5) and/or -SHA256 (§14.6) are appended and computed,
    then FINGERPRINT (§14.7) if asked: in that order, as §14 requires. Padding is `fill` (one byte: any
    value is allowed, §14; only the RFC 5769 vectors need other than zero)."""
    if len(transaction_id) != TRANSACTION_ID_LEN:
        raise ValueError("transaction ID must be 12 bytes")
    if len(fill) != 1:
        raise ValueError("fill must be one byte")
    body = b"".join(_tlv(t, v, fill) for t, v in attributes)
    for attr_type, key, digest, size in (
        (MESSAGE_INTEGRITY, integrity_key, hashlib.sha1, HMAC_SHA1_LEN),
        (MESSAGE_INTEGRITY_SHA256, integrity_sha256_key, hashlib.sha256, HMAC_SHA256_LEN),
    ):
        if key is not None:
            head = _header(method, cls, transaction_id, len(body) + ATTR_HEADER_LEN + size)
            body += _tlv(attr_type, hmac.new(key, head + body, digest).digest())
    if fingerprint:
        head = _header(method, cls, transaction_id, len(body) + 8)
        body += _tlv(FINGERPRINT, _crc(head + body).to_bytes(4, "big"))
    if HEADER_LEN + len(body) > MAX_MESSAGE:
        raise ValueError("message too long")
    return _header(method, cls, transaction_id, len(body)) + body


def decode(datagram: bytes) -> Message:
    """Parse one STUN message (bounded: at most MAX_MESSAGE bytes and MAX_ATTRIBUTES attributes).

    Known attribute values are checked here, so the typed accessors of the result never raise.
    """
    if not is_stun(datagram):
        raise ParseError("not stun")
    data = bytes(datagram)
    method, cls = split_type(int.from_bytes(data[0:2], "big"))
    tid = data[8:HEADER_LEN]
    attrs: list[Attribute] = []
    offsets: list[int] = []
    pos, count, seen_mi, seen_mi256, seen_fp = HEADER_LEN, 0, False, False, False
    while pos < len(data):
        count += 1
        if count > MAX_ATTRIBUTES:
            raise ParseError("too many attributes")
        if seen_fp:
            raise ParseError("attribute after fingerprint")  # §14.7: FINGERPRINT is last
        attr_type = int.from_bytes(data[pos:pos + 2], "big")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + ATTR_HEADER_LEN + length
        if end > len(data):
            raise ParseError("attribute truncated")
        value = data[pos + ATTR_HEADER_LEN:end]
        keep = (not seen_mi and not seen_mi256) or attr_type == FINGERPRINT or (
            attr_type == MESSAGE_INTEGRITY_SHA256 and not seen_mi256)
        if keep:  # §14.5, §14.6: later attributes are ignored, except those that may follow
            check = _CHECKS.get(attr_type)
            if check is not None:
                check(value)
            elif attr_type in _XOR_ADDRESSES:
                decode_xor_address(value, tid)
            attrs.append((attr_type, value))
            offsets.append(pos)
        seen_mi |= attr_type == MESSAGE_INTEGRITY
        seen_mi256 |= attr_type == MESSAGE_INTEGRITY_SHA256
        seen_fp |= attr_type == FINGERPRINT and keep
        pos = end + _pad(length)
    if pos != len(data):
        raise ParseError("bad padding")
    return Message(method, cls, tid, tuple(attrs), data, tuple(offsets))


# --- Integrity and fingerprint ------------------------------------------------------------------------

def _crc(data: bytes) -> int:
    return zlib.crc32(data) ^ FINGERPRINT_XOR


def _covered(msg: Message, attr_type: int, size: int) -> tuple[bytes, bytes] | None:
    """(bytes the attribute covers with the length adjusted to end just after it, its value), §14.5."""
    for (t, value), offset in zip(msg.attributes, msg.offsets, strict=True):
        if t == attr_type:
            head = msg.raw[:2] + (offset - HEADER_LEN + ATTR_HEADER_LEN + size).to_bytes(2, "big")
            return head + msg.raw[4:offset], value
    return None


def check_integrity(msg: Message, key: bytes) -> bool:
    """True if the message has a MESSAGE-INTEGRITY (HMAC-SHA1, §14.5) that is correct under `key`."""
    covered = _covered(msg, MESSAGE_INTEGRITY, HMAC_SHA1_LEN)
    return covered is not None and hmac.compare_digest(
        hmac.new(key, covered[0], hashlib.sha1).digest(), covered[1])


def check_integrity_sha256(msg: Message, key: bytes) -> bool:
    """True if the message has a MESSAGE-INTEGRITY-SHA256 (§14.6, full 32 bytes) correct under `key`."""
    covered = _covered(msg, MESSAGE_INTEGRITY_SHA256, HMAC_SHA256_LEN)
    return covered is not None and hmac.compare_digest(
        hmac.new(key, covered[0], hashlib.sha256).digest(), covered[1])


def check_fingerprint(msg: Message) -> bool:
    """True if the message ends with a correct FINGERPRINT (CRC-32 XOR 0x5354554E over all before it)."""
    covered = _covered(msg, FINGERPRINT, 4)
    return covered is not None and _crc(covered[0]).to_bytes(4, "big") == covered[1]


# --- Credentials -------------------------------------------------------------------------------------

def short_term_key(password: str) -> bytes:
    """The short-term credential key (§9.1.2): the password (OpaqueString processing is the caller's)."""
    return password.encode()


def long_term_key(username: str, realm: str, password: str, *, sha256: bool = False) -> bytes:
    """The long-term credential key (§9.2.2): MD5(username ":" realm ":" password), or SHA-256 of the same
    when PASSWORD-ALGORITHM selects SHA-256 (§9.2.2, §14.12). coturn uses the MD5 form."""
    text = f"{username}:{realm}:{password}".encode()
    return hashlib.sha256(text).digest() if sha256 else hashlib.md5(text, usedforsecurity=False).digest()


def userhash(username: str, realm: str) -> bytes:
    """A USERHASH value (§14.4): SHA-256(username ":" realm), sent instead of USERNAME for anonymity."""
    return hashlib.sha256(f"{username}:{realm}".encode()).digest()


def turn_rest_credentials(secret: bytes, user: str, expiry: int) -> tuple[str, str]:
    """(username, password) by the TURN REST convention coturn's `use-auth-secret` checks:
    username "EXPIRY:USER" (Unix seconds), password base64(HMAC-SHA1(secret, username))."""
    username = f"{expiry}:{user}"
    return username, base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()
