"""STUN/TURN wire codec: RFC 5769 known answers, encoding, strict decoding, credentials, ChannelData.

The four vectors are RFC 5769 ("Test Vectors for Session Traversal Utilities for NAT (STUN)") §2.1-§2.4,
https://www.rfc-editor.org/rfc/rfc5769, copied as hex; a fifth is RFC 8489 Appendix B.1 (SHA-256).
Their MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT must check, and re-encoding their attributes with our
own integrity code (padding with the byte the vector uses: RFC 8489 §14 lets a sender pad with anything,
and the MACs cover the padding) must give the vectors byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from tunneld.proto import stun_wire as sw
from tunneld.proto.errors import ParseError

TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"

# RFC 5769 §2.1 Sample Request (SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME "evtj:h6vY" padded with
# spaces, MESSAGE-INTEGRITY, FINGERPRINT); short-term password above.
SAMPLE_REQUEST = bytes.fromhex(
    "00010058" "2112a442" "b7e7a701" "bc34d686" "fa87dfae"
    "80220010" "5354554e" "20746573" "7420636c" "69656e74"
    "00240004" "6e0001ff"
    "80290008" "932ff9b1" "51263b36"
    "00060009" "6576746a" "3a683676" "59202020"
    "00080014" "9aeaa70c" "bfd8cb56" "781ef2b5" "b2d3f249" "c1b571a2"
    "80280004" "e57a3bcf"
)
# RFC 5769 §2.2 Sample IPv4 Response: SOFTWARE "test vector", XOR-MAPPED-ADDRESS 192.0.2.1:32853.
SAMPLE_IPV4_RESPONSE = bytes.fromhex(
    "0101003c" "2112a442" "b7e7a701" "bc34d686" "fa87dfae"
    "8022000b" "74657374" "20766563" "746f7220"
    "00200008" "0001a147" "e112a643"
    "00080014" "2b91f599" "fd9e90c3" "8c7489f9" "2af9ba53" "f06be7d7"
    "80280004" "c07d4c96"
)
# RFC 5769 §2.3 Sample IPv6 Response: XOR-MAPPED-ADDRESS [2001:db8:1234:5678:11:2233:4455:6677]:32853.
SAMPLE_IPV6_RESPONSE = bytes.fromhex(
    "01010048" "2112a442" "b7e7a701" "bc34d686" "fa87dfae"
    "8022000b" "74657374" "20766563" "746f7220"
    "00200014" "0002a147" "0113a9fa" "a5d3f179" "bc25f4b5" "bed2b9d9"
    "00080014" "a382954e" "4be67bf1" "1784c97c" "8292c275" "bfe3ed41"
    "80280004" "c8fb0b4c"
)
# RFC 5769 §2.4 Sample Request with Long-Term Authentication: USERNAME "マトリックス", NONCE, REALM
# "example.org", password "TheMatrIX" (after SASLprep).
LT_TID = bytes.fromhex("78ad3433c6ad72c029da412e")
LT_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
SAMPLE_LONG_TERM = bytes.fromhex(
    "00010060" "2112a442" "78ad3433" "c6ad72c0" "29da412e"
    "00060012" "e3839ee3" "8388e383" "aae38383" "e382afe3" "82b90000"
    "0015001c" "662f2f34" "39396b39" "35346436" "4f4c3334" "6f4c3946" "53547679" "36347341"
    "0014000b" "6578616d" "706c652e" "6f726700"
    "00080014" "f6702465" "6dd64a3e" "02b8e071" "2e85c9a2" "8ca89666"
)


def test_rfc5769_sample_request() -> None:
    msg = sw.decode(SAMPLE_REQUEST)
    assert (msg.method, msg.cls, msg.transaction_id) == (sw.BINDING, sw.REQUEST, TID)
    assert msg.software() == "STUN test client"
    assert msg.username() == "evtj:h6vY"
    assert msg.get(0x0024) == bytes.fromhex("6e0001ff")  # PRIORITY (RFC 8445), kept as an unknown type
    key = sw.short_term_key(PASSWORD)
    assert sw.check_integrity(msg, key)
    assert sw.check_fingerprint(msg)
    assert not sw.check_integrity(msg, b"wrong")
    assert not sw.check_integrity_sha256(msg, key)  # absent
    assert msg.unknown_required([sw.USERNAME, sw.MESSAGE_INTEGRITY]) == (0x0024,)
    # Rebuilt with our integrity and fingerprint code (the vector pads with spaces): byte for byte.
    rebuilt = sw.encode(msg.method, msg.cls, TID, msg.attributes[:4], integrity_key=key, fingerprint=True,
                        fill=b" ")
    assert rebuilt == SAMPLE_REQUEST
    zero = sw.decode(sw.encode(msg.method, msg.cls, TID, msg.attributes[:4], integrity_key=key,
                               fingerprint=True))
    # Zero padding: the same values, another MAC (the MAC covers the padding).
    assert zero.attributes[:4] == msg.attributes[:4]
    assert zero.get(sw.MESSAGE_INTEGRITY) != msg.get(sw.MESSAGE_INTEGRITY)
    assert sw.check_integrity(zero, key) and sw.check_fingerprint(zero)


@pytest.mark.parametrize(("vector", "address"), [
    (SAMPLE_IPV4_RESPONSE, ("192.0.2.1", 32853)),
    (SAMPLE_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
], ids=["ipv4", "ipv6"])
def test_rfc5769_responses(vector: bytes, address: tuple[str, int]) -> None:
    msg = sw.decode(vector)
    assert (msg.method, msg.cls) == (sw.BINDING, sw.SUCCESS)
    assert msg.software() == "test vector"
    assert msg.xor_mapped_address() == address
    key = sw.short_term_key(PASSWORD)
    assert sw.check_integrity(msg, key) and sw.check_fingerprint(msg)
    # Our encoder, from the decoded values, gives the vector byte for byte (it pads with a space).
    attrs = [(sw.SOFTWARE, b"test vector"), (sw.XOR_MAPPED_ADDRESS, sw.encode_xor_address(address, TID))]
    ours = sw.encode(sw.BINDING, sw.SUCCESS, TID, attrs, integrity_key=key, fingerprint=True, fill=b" ")
    assert ours == vector


def test_rfc5769_long_term_request() -> None:
    msg = sw.decode(SAMPLE_LONG_TERM)
    assert msg.username() == LT_USERNAME
    assert msg.nonce() == "f//499k954d6OL34oL9FSTvy64sA"
    assert msg.realm() == "example.org"
    key = sw.long_term_key(LT_USERNAME, "example.org", "TheMatrIX")
    assert sw.check_integrity(msg, key)
    assert not sw.check_fingerprint(msg)  # none in this vector
    ours = sw.encode(sw.BINDING, sw.REQUEST, LT_TID, msg.attributes[:3], integrity_key=key)
    assert ours == SAMPLE_LONG_TERM


# RFC 8489 Appendix B.1: the long-term request of RFC 5769 §2.4 redone with USERHASH, a longer NONCE,
# PASSWORD-ALGORITHM SHA-256 (0x0002) and MESSAGE-INTEGRITY-SHA256.
SAMPLE_LONG_TERM_SHA256 = bytes.fromhex(
    "00010090" "2112a442" "78ad3433" "c6ad72c0" "29da412e"
    "001e0020" "4a3cf38f" "ef6992bd" "a952c678" "0417da0f" "24819415" "569e60b2" "05c46e41" "407f1704"
    "00150029" "6f624d61" "744a6f73" "32414141" "43662f2f" "3439396b" "39353464" "364f4c33" "346f4c39"
    "46535476" "79363473" "41000000"
    "0014000b" "6578616d" "706c652e" "6f726700"
    "001d0004" "00020000"
    "001c0020" "b5c7bf00" "5b6c52a2" "1c51c5e8" "92f81924" "136296cb" "927c4314" "9309278c" "c6518e65"
)


def test_rfc8489_long_term_sha256_request() -> None:
    msg = sw.decode(SAMPLE_LONG_TERM_SHA256)
    assert msg.get(sw.USERHASH) == sw.userhash(LT_USERNAME, "example.org")
    assert msg.nonce() == "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA"
    key = sw.long_term_key(LT_USERNAME, "example.org", "TheMatrIX", sha256=True)
    assert sw.check_integrity_sha256(msg, key)
    assert not sw.check_integrity_sha256(msg, sw.long_term_key(LT_USERNAME, "example.org", "TheMatrIX"))
    assert not sw.check_integrity(msg, key)  # no SHA-1 MAC in this one
    ours = sw.encode(sw.BINDING, sw.REQUEST, LT_TID, msg.attributes[:4], integrity_sha256_key=key)
    assert ours == SAMPLE_LONG_TERM_SHA256


def test_message_type_bits() -> None:
    # RFC 8489 §5: Binding request 0x0001, success 0x0101, error 0x0111; indication 0x0011.
    assert sw.message_type(sw.BINDING, sw.REQUEST) == 0x0001
    assert sw.message_type(sw.BINDING, sw.SUCCESS) == 0x0101
    assert sw.message_type(sw.BINDING, sw.ERROR) == 0x0111
    assert sw.message_type(sw.BINDING, sw.INDICATION) == 0x0011
    # RFC 8656: Allocate request 0x0003, Send indication 0x0016, Data indication 0x0017.
    assert sw.message_type(sw.ALLOCATE, sw.REQUEST) == 0x0003
    assert sw.message_type(sw.SEND, sw.INDICATION) == 0x0016
    assert sw.message_type(sw.DATA, sw.INDICATION) == 0x0017
    assert sw.message_type(sw.CHANNEL_BIND, sw.SUCCESS) == 0x0109
    for method in (0, 1, 0x7F, 0x80, 0xABC, 0xFFF):
        for cls in range(4):
            assert sw.split_type(sw.message_type(method, cls)) == (method, cls)


def test_sha256_integrity_and_both() -> None:
    key = sw.long_term_key("u", "r", "p", sha256=True)
    assert key == hashlib.sha256(b"u:r:p").digest()
    raw = sw.encode(sw.ALLOCATE, sw.REQUEST, TID, [(sw.USERNAME, b"u")],
                    integrity_key=b"k1", integrity_sha256_key=key, fingerprint=True)
    msg = sw.decode(raw)
    assert [t for t, _ in msg.attributes] == [sw.USERNAME, sw.MESSAGE_INTEGRITY,
                                               sw.MESSAGE_INTEGRITY_SHA256, sw.FINGERPRINT]
    assert sw.check_integrity(msg, b"k1") and sw.check_integrity_sha256(msg, key)
    assert sw.check_fingerprint(msg)
    flipped = bytearray(raw)
    flipped[25] ^= 1  # inside USERNAME
    bad = sw.decode(bytes(flipped))
    assert not sw.check_integrity(bad, b"k1") and not sw.check_integrity_sha256(bad, key)
    assert not sw.check_fingerprint(bad)


def test_turn_attributes_round_trip() -> None:
    peer = ("2001:db8::7", 4500)
    relayed = ("198.51.100.2", 50000)
    attrs = [
        (sw.XOR_PEER_ADDRESS, sw.encode_xor_address(peer, TID)),
        (sw.XOR_RELAYED_ADDRESS, sw.encode_xor_address(relayed, TID)),
        (sw.MAPPED_ADDRESS, sw.encode_address(("192.0.2.9", 1))),
        (sw.LIFETIME, sw.encode_u32(600)),
        (sw.REQUESTED_TRANSPORT, sw.encode_requested_transport()),
        (sw.CHANNEL_NUMBER, sw.encode_channel_number(0x4001)),
        (sw.DATA_ATTR, b"\x01\x02\x03"),
        (sw.ERROR_CODE, sw.encode_error_code(438, "Stale Nonce")),
        (sw.UNKNOWN_ATTRIBUTES, sw.encode_unknown_attributes([0x0024, 0x7777, 0x0001])),
    ]
    raw = sw.encode(sw.ALLOCATE, sw.ERROR, TID, attrs)
    msg = sw.decode(raw)
    assert msg.xor_peer_address() == peer
    assert msg.xor_relayed_address() == relayed
    assert msg.mapped_address() == ("192.0.2.9", 1)
    assert msg.lifetime() == 600
    assert msg.requested_transport() == sw.PROTOCOL_UDP
    assert msg.channel_number() == 0x4001
    assert msg.data() == b"\x01\x02\x03"
    assert msg.error_code() == (438, "Stale Nonce")
    assert msg.unknown_attributes() == (0x0024, 0x7777, 0x0001)
    assert msg.xor_mapped_address() is None and msg.username() is None
    assert msg.encode() == raw and sw.decode(msg.encode()) == msg
    assert len(raw) % 4 == 0 and sw.is_stun(raw)


def test_attributes_after_integrity_are_ignored_and_fingerprint_is_last() -> None:
    # RFC 8489 §14.5: after MESSAGE-INTEGRITY only -SHA256 and FINGERPRINT count.
    raw = sw.encode(sw.BINDING, sw.REQUEST, TID, [(sw.USERNAME, b"a"), (sw.MESSAGE_INTEGRITY, bytes(20)),
                                                   (sw.SOFTWARE, b"late")])
    assert sw.decode(raw).software() is None
    # Ignored means not even checked: a malformed address after MESSAGE-INTEGRITY does not spoil the message.
    late = sw.encode(sw.BINDING, sw.REQUEST, TID, [(sw.MESSAGE_INTEGRITY, bytes(20)),
                                                    (sw.XOR_MAPPED_ADDRESS, b"\0\7\0\0")])
    assert sw.decode(late).attributes == ((sw.MESSAGE_INTEGRITY, bytes(20)),)
    with pytest.raises(ParseError):
        sw.decode(sw.encode(sw.BINDING, sw.REQUEST, TID, [(sw.FINGERPRINT, bytes(4)), (sw.SOFTWARE, b"x")]))


@pytest.mark.parametrize("raw", [
    b"",
    SAMPLE_IPV4_RESPONSE[:19],
    SAMPLE_IPV4_RESPONSE[:-4],  # length field disagrees with the datagram
    b"\x80" + SAMPLE_IPV4_RESPONSE[1:],  # top bits set
    SAMPLE_IPV4_RESPONSE[:4] + b"\x21\x12\xa4\x43" + SAMPLE_IPV4_RESPONSE[8:],  # wrong cookie
    bytes.fromhex("00010004") + sw.COOKIE_BYTES + TID + bytes.fromhex("80220008"),  # attribute truncated
    bytes.fromhex("00010008") + sw.COOKIE_BYTES + TID + bytes.fromhex("0020000400010000"),  # short addr
    bytes.fromhex("0001000c") + sw.COOKIE_BYTES + TID + bytes.fromhex("002000080003a147e112a643"),  # fam 3
    bytes.fromhex("00010008") + sw.COOKIE_BYTES + TID + bytes.fromhex("00060002ff fe 0000"),  # bad utf-8
    bytes.fromhex("00010008") + sw.COOKIE_BYTES + TID + bytes.fromhex("000c00043fff0000"),  # channel
    bytes.fromhex("00010008") + sw.COOKIE_BYTES + TID + bytes.fromhex("0009000400000200"),  # class 2
    bytes.fromhex("00010008") + sw.COOKIE_BYTES + TID + bytes.fromhex("0008000400000000"),  # MI length
    bytes.fromhex("00010000") + sw.COOKIE_BYTES + TID + bytes(sw.MAX_MESSAGE),  # oversized
], ids=lambda raw: raw.hex()[:16] + f"-{len(raw)}")
def test_malformed_raises_parse_error(raw: bytes) -> None:
    with pytest.raises(ParseError):
        sw.decode(raw)


def test_attribute_count_is_bounded() -> None:
    ok = sw.encode(sw.BINDING, sw.REQUEST, TID, [(0x8fff, b"")] * sw.MAX_ATTRIBUTES)
    assert len(sw.decode(ok).attributes) == sw.MAX_ATTRIBUTES
    with pytest.raises(ParseError, match="too many"):
        sw.decode(sw.encode(sw.BINDING, sw.REQUEST, TID, [(0x8fff, b"")] * (sw.MAX_ATTRIBUTES + 1)))
    # Ignored attributes (after MESSAGE-INTEGRITY) count too.
    ignored = [(sw.MESSAGE_INTEGRITY, bytes(20))] + [(0x8fff, b"")] * sw.MAX_ATTRIBUTES
    with pytest.raises(ParseError, match="too many"):
        sw.decode(sw.encode(sw.BINDING, sw.REQUEST, TID, ignored))


def test_classification() -> None:
    for vector in (SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE, SAMPLE_LONG_TERM):
        assert sw.is_stun(vector) and not sw.is_channel_data(vector)
    cd = sw.encode_channel_data(0x4000, b"\x12\x34\x56\x78\x9a")
    assert cd == bytes.fromhex("40000005123456789a000000")
    assert sw.is_channel_data(cd) and sw.is_channel_data(cd[:-3]) and not sw.is_stun(cd)
    assert sw.decode_channel_data(cd) == (0x4000, b"\x12\x34\x56\x78\x9a")
    assert sw.decode_channel_data(cd[:-3]) == (0x4000, b"\x12\x34\x56\x78\x9a")  # unpadded over UDP
    assert sw.decode_channel_data(sw.encode_channel_data(0x4FFF, b"")) == (0x4FFF, b"")
    # Neither: the handshake's non-ESP marker, a keepalive, an ESP packet (SPI 0x12345678).
    esp = bytes.fromhex("12345678 00000001") + bytes(40)
    for other in (bytes(4) + b"\x01" + bytes(40), b"\xff", esp):
        assert not sw.is_stun(other) and not sw.is_channel_data(other)
    for bad in (cd[:-4], cd + b"\0\0\0\0", b"\x50\x00" + cd[2:], b"\x3f\xff" + cd[2:]):
        assert not sw.is_channel_data(bad)
        with pytest.raises(ParseError):
            sw.decode_channel_data(bad)
    with pytest.raises(ValueError):
        sw.encode_channel_data(0x5000, b"")


def test_turn_rest_credentials() -> None:
    # The convention of coturn's use-auth-secret: username "expiry:user", password b64(HMAC-SHA1).
    username, password = sw.turn_rest_credentials(b"north", "laptop", 1700000000)
    assert username == "1700000000:laptop"
    expected = base64.b64encode(hmac.new(b"north", b"1700000000:laptop", hashlib.sha1).digest()).decode()
    assert password == expected and len(base64.b64decode(password)) == 20
    assert sw.long_term_key("u", "r", "p") == hashlib.md5(b"u:r:p").digest()


def test_encode_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        sw.encode(sw.BINDING, sw.REQUEST, b"short")
    with pytest.raises(ValueError):
        sw.encode(sw.BINDING, sw.REQUEST, TID, [(sw.DATA_ATTR, bytes(sw.MAX_MESSAGE))])
    with pytest.raises(ValueError):
        sw.message_type(0x1000, 0)
    with pytest.raises(ValueError):
        sw.encode_error_code(200, "no")
