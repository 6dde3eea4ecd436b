"""Fuzzing the STUN/TURN decoders with arbitrary bytes and mutations of valid messages.

Invariants: `is_stun` and `is_channel_data` return a bool for any bytes; `decode` and
`decode_channel_data` return a result or raise ParseError and nothing else; the typed accessors and
integrity checks of a decoded message never raise; a decoded message encodes to bytes that decode to the
same message, and a message we encoded is given back byte for byte.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.proto import stun_wire as sw
from tunneld.proto.errors import ParseError

TID = bytes(range(12))


def _genuine() -> list[bytes]:
    return [
        sw.encode(sw.BINDING, sw.SUCCESS, TID, [
            (sw.XOR_MAPPED_ADDRESS, sw.encode_xor_address(("192.0.2.1", 4500), TID)),
            (sw.SOFTWARE, b"tunneld"),
        ], integrity_key=b"key", fingerprint=True),
        sw.encode(sw.ALLOCATE, sw.ERROR, TID, [
            (sw.ERROR_CODE, sw.encode_error_code(401, "Unauthorized")),
            (sw.REALM, b"example.net"), (sw.NONCE, b"abcdef"),
            (sw.UNKNOWN_ATTRIBUTES, sw.encode_unknown_attributes([0x0024])),
        ], fingerprint=True),
        sw.encode(sw.SEND, sw.INDICATION, TID, [
            (sw.XOR_PEER_ADDRESS, sw.encode_xor_address(("2001:db8::1", 4500), TID)),
            (sw.DATA_ATTR, b"\x01\x02\x03\x04\x05"),
            (sw.CHANNEL_NUMBER, sw.encode_channel_number(0x4abc)),
            (sw.LIFETIME, sw.encode_u32(600)), (sw.REQUESTED_TRANSPORT, sw.encode_requested_transport()),
            (sw.MAPPED_ADDRESS, sw.encode_address(("198.51.100.1", 9))),
        ], integrity_sha256_key=b"k" * 32),
        sw.encode_channel_data(0x4001, b"\xaa" * 13),
    ]


GENUINE = _genuine()


def _mutate(base: bytes, i: int, v: int) -> bytes:
    i %= len(base)
    return base[:i] + bytes([v]) + base[i + 1:]


payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda tail: GENUINE[0][:8] + tail, st.binary(max_size=120)),  # header prefix, random rest
    st.builds(_mutate, st.sampled_from(GENUINE), st.integers(0, 10_000), st.integers(0, 255)),
    st.builds(lambda b, n: b[:n], st.sampled_from(GENUINE), st.integers(0, 200)),
    st.builds(lambda b, extra: b + extra, st.sampled_from(GENUINE), st.binary(max_size=12)),
)


def _check(data: bytes) -> None:
    assert isinstance(sw.is_stun(data), bool) and isinstance(sw.is_channel_data(data), bool)
    try:
        channel, app = sw.decode_channel_data(data)
    except ParseError:
        assert not sw.is_channel_data(data)
    else:
        assert sw.CHANNEL_MIN <= channel <= sw.CHANNEL_MAX
        assert sw.decode_channel_data(sw.encode_channel_data(channel, app)) == (channel, app)
    try:
        msg = sw.decode(data)
    except ParseError:
        return
    # Accessors and checks never raise on a decoded message.
    for accessor in (msg.xor_mapped_address, msg.xor_peer_address, msg.xor_relayed_address,
                     msg.mapped_address, msg.username, msg.realm, msg.nonce, msg.software, msg.error_code,
                     msg.unknown_attributes, msg.lifetime, msg.data, msg.requested_transport,
                     msg.channel_number):
        accessor()
    assert isinstance(sw.check_integrity(msg, b"key"), bool)
    assert isinstance(sw.check_integrity_sha256(msg, b"k" * 32), bool)
    assert isinstance(sw.check_fingerprint(msg), bool)
    again = msg.encode()
    assert sw.decode(again) == msg
    assert sw.decode(again).encode() == again


@pytest.mark.parametrize("raw", GENUINE[:3])
def test_genuine_messages_round_trip_byte_for_byte(raw: bytes) -> None:
    msg = sw.decode(raw)
    assert msg.encode() == raw
    assert sw.check_fingerprint(msg) or sw.check_integrity_sha256(msg, b"k" * 32)


@settings(max_examples=500, deadline=None)
@given(data=payloads)
def test_any_bytes_give_message_or_parse_error(data: bytes) -> None:
    _check(data)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          database=None)
@given(data=payloads)
def test_any_bytes_give_message_or_parse_error_10k(data: bytes) -> None:
    _check(data)
