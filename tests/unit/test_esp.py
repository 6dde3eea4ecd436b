"""ESP security associations: round trips, rejections, sequence limits, RFC 3948 classification."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.crypto.aead import AEAD, SUITES
from tunneld.crypto.esp import (
    HEADER_LEN,
    NH_IPV6,
    NH_NONE,
    ESPError,
    Kind,
    SecurityAssociation,
    classify,
    peek_spi,
)

KEY32 = bytes(range(32))
SALT = bytes.fromhex("a0a1a2a3")
INNER = bytes.fromhex("6000000000103a40") + bytes(32) + b"sixteen byte msg"


def pair(suite: str = "aes-256-gcm", esn: bool = True, blocks: int = 128) -> tuple[SecurityAssociation, ...]:
    key = KEY32[: SUITES[suite].key_len]
    return (SecurityAssociation(0x1000, key, SALT, aead=suite, esn=esn, window_blocks=blocks),
            SecurityAssociation(0x1000, key, SALT, aead=suite, esn=esn, window_blocks=blocks))


@pytest.mark.parametrize("suite", sorted(SUITES))
@pytest.mark.parametrize("esn", [True, False])
def test_round_trip_every_length(suite: str, esn: bool) -> None:
    tx, rx = pair(suite, esn)
    for n in range(70):
        inner = bytes(range(n))
        wire = tx.seal(inner, next_header=NH_IPV6)
        assert (len(wire) - HEADER_LEN - 16) % 4 == 0, "trailer must end on a 4-byte boundary"
        assert rx.open(wire) == (NH_IPV6, inner)


def test_wire_layout() -> None:
    tx, _ = pair()
    tx.seq = (7 << 32) | 41
    wire = tx.seal(INNER)
    spi, lo, iv = struct.unpack_from("!IIQ", wire)
    assert (spi, lo, iv) == (0x1000, 42, (7 << 32) | 42)  # IV is the 64-bit sequence number
    # Decrypt independently with the AEAD: AAD = SPI || seq-hi || seq-lo, nonce = salt || IV.
    aead = AEAD("aes-256-gcm", KEY32, SALT)
    pt = aead.open(iv, wire[HEADER_LEN:], struct.pack("!III", 0x1000, 7, 42))
    pad = (-(len(INNER) + 2)) % 4
    assert pt == INNER + bytes(range(1, pad + 1)) + bytes([pad, NH_IPV6])


def test_sequence_starts_at_one_and_never_wraps() -> None:
    tx, _ = pair(esn=False)
    assert struct.unpack_from("!I", tx.seal(b"x"), 4)[0] == 1
    tx.seq = 0xFFFFFFFE
    tx.seal(b"x")  # carries 2^32 - 1, the last allowed
    with pytest.raises(ESPError):
        tx.seal(b"x")
    assert tx.seq == 0xFFFFFFFF, "a refused seal must not consume a number"
    tx_esn, _ = pair(esn=True)
    tx_esn.seq = (1 << 64) - 2
    tx_esn.seal(b"x")
    with pytest.raises(ESPError):
        tx_esn.seal_many([b"x", b"y"])


def test_seal_many_equals_seal() -> None:
    a, _ = pair()
    b, _ = pair()
    packets = [bytes([i]) * i for i in range(1, 40)]
    assert a.seal_many(packets) == [b.seal(p) for p in packets]


def test_seal_many_takes_any_iterable_and_checks_the_limit_first() -> None:
    a, rx = pair()
    assert rx.open_many(a.seal_many(p for p in (b"a", b"bb"))) == [b"a", b"bb"]
    a.seq = (1 << 64) - 3
    with pytest.raises(ESPError):
        a.seal_many(iter([b"1", b"2", b"3"]))
    assert a.seq == (1 << 64) - 3, "a refused batch seals nothing"


def test_dummy_next_header_59() -> None:
    tx, rx = pair()
    wire = tx.seal(b"", next_header=NH_NONE)
    assert rx.open(wire) == (NH_NONE, b"")  # recognised, the caller drops it
    tx2, rx2 = pair()
    out = rx2.open_many([tx2.seal(b"", next_header=NH_NONE), tx2.seal(INNER)])
    assert out == [INNER]
    assert rx2.rx_dummy == 1


def test_open_many_drops_unexpected_next_header() -> None:
    tx, rx = pair()
    assert rx.open_many([tx.seal(INNER, next_header=4)]) == []
    assert rx.rx_malformed == 1


def _reject(rx: SecurityAssociation, wire: bytes) -> None:
    before = rx.replay.snapshot()
    with pytest.raises(ESPError):
        rx.open(wire)
    assert rx.replay.snapshot() == before, "a rejected packet must leave the window unchanged"
    assert rx.open_many([wire]) == []
    assert rx.replay.snapshot() == before


@pytest.mark.parametrize("esn", [True, False])
def test_every_single_bit_flip_is_rejected(esn: bool) -> None:
    tx, rx = pair(esn=esn)
    rx.open(tx.seal(b"first"))  # a non-empty window, so the snapshot means something
    wire = tx.seal(INNER)
    for i in range(len(wire)):
        for bit in range(8):
            bad = bytearray(wire)
            bad[i] ^= 1 << bit
            _reject(rx, bytes(bad))
    assert rx.open(wire) == (NH_IPV6, INNER), "the genuine packet is still accepted afterwards"


def test_every_truncation_is_rejected() -> None:
    tx, rx = pair()
    wire = tx.seal(INNER)
    for n in range(len(wire)):
        _reject(rx, wire[:n])
    _reject(rx, wire + b"\x00")


def test_wrong_spi_replay_and_duplicates() -> None:
    tx, rx = pair()
    other = SecurityAssociation(0x2000, KEY32, SALT)
    _reject(rx, other.seal(INNER))
    wire = tx.seal(INNER)
    rx.open(wire)
    _reject(rx, wire)
    assert rx.rx_replay == 2  # once by open, once by open_many


def _forge(seq: int, plaintext: bytes, spi: int = 0x1000) -> bytes:
    """A correctly authenticated packet with chosen fields, built from the AEAD directly."""
    aead = AEAD("aes-256-gcm", KEY32, SALT)
    aad = struct.pack("!III", spi, seq >> 32, seq & 0xFFFFFFFF)
    return struct.pack("!IIQ", spi, seq & 0xFFFFFFFF, seq) + aead.seal(seq, plaintext, aad)


def test_sequence_zero_is_rejected_even_when_authentic() -> None:
    _, rx = pair()
    _reject(rx, _forge(0, INNER + bytes([1, 2, 2, NH_IPV6])))


@pytest.mark.parametrize(
    "trailer",
    [
        pytest.param(bytes([1, 3, 2, NH_IPV6]), id="wrong-pad-byte"),
        pytest.param(bytes([0, 0, 2, NH_IPV6]), id="zero-pad-bytes"),
        pytest.param(bytes([1, 2, 200, NH_IPV6]), id="pad-length-past-start"),
    ],
)
def test_bad_padding_is_rejected(trailer: bytes) -> None:
    _, rx = pair()
    _reject(rx, _forge(1, INNER + trailer))
    assert rx.rx_malformed == 2


def test_extra_padding_is_accepted() -> None:
    # Senders MAY pad more than alignment needs (RFC 4303 §2.4, traffic-flow confidentiality).
    _, rx = pair()
    pad = bytes(range(1, 15))
    assert rx.open(_forge(1, INNER + pad + bytes([14, NH_IPV6]))) == (NH_IPV6, INNER)


def test_ciphertext_not_aligned_is_rejected() -> None:
    _, rx = pair()
    _reject(rx, _forge(1, INNER + bytes([1, 2, 2, NH_IPV6, 0])))


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"\xff", Kind.KEEPALIVE),
        (b"\xfe", Kind.MALFORMED),
        (b"", Kind.MALFORMED),
        (b"\x00\x00\x00\x00", Kind.MALFORMED),  # marker with no message
        (b"\x00\x00\x00\x00\x01", Kind.CONTROL),
        (b"\x00\x00\x10\x00abcde", Kind.ESP),
        (b"\x00\x00\x10\x00abcd", Kind.MALFORMED),  # SPI and sequence number only: no payload
        (b"\xff\xff", Kind.MALFORMED),
    ],
)
def test_classify(payload: bytes, kind: Kind) -> None:
    assert classify(payload) is kind


def test_classify_and_peek_sealed() -> None:
    tx, _ = pair()
    wire = tx.seal(INNER)
    assert classify(wire) is Kind.ESP
    assert peek_spi(wire) == 0x1000


@settings(max_examples=150, deadline=None)
@given(
    base=st.sampled_from([0, (1 << 32) - 150, (5 << 32) - 20]),
    arrivals=st.lists(st.integers(min_value=1, max_value=600), min_size=1, max_size=120),
    esn=st.booleans(),
)
def test_open_many_matches_open(base: int, arrivals: list[int], esn: bool) -> None:
    """The inlined window in open_many and the ReplayWindow methods used by open agree, packet by
    packet, over random arrival orders with duplicates, across the 2^32 boundary."""
    if not esn:
        base = 0
    tx, _ = pair(esn=esn, blocks=4)  # window 192: arrivals span more than a window
    sealed: dict[int, bytes] = {}
    for off in sorted(set(arrivals)):
        tx.seq = base + off - 1
        sealed[off] = tx.seal(off.to_bytes(2, "big"))
    _, one = pair(esn=esn, blocks=4)
    _, many = pair(esn=esn, blocks=4)
    for off in arrivals:
        try:
            got_one = [one.open(sealed[off])[1]]
        except ESPError:
            got_one = []
        assert many.open_many([sealed[off]]) == got_one, off
        assert many.replay.snapshot() == one.replay.snapshot()
    # And in one batch, the same acceptances as one by one.
    _, batch = pair(esn=esn, blocks=4)
    wires = [sealed[o] for o in arrivals]
    assert batch.open_many(wires) == _one_by_one(esn, wires)


def _one_by_one(esn: bool, wires: list[bytes]) -> list[bytes]:
    _, rx = pair(esn=esn, blocks=4)
    out = []
    for w in wires:
        with contextlib.suppress(ESPError):
            out.append(rx.open(w)[1])
    return out
