"""tunneld.proto.handshake: Noise IKpsk2 with WireGuard's messages behind the RFC 3948 non-ESP marker.

Two Handshakers talk to each other in memory. Randomness comes from a seeded generator (or a script of
exact values for the worked example in docs/protocol.md), and both clocks are plain numbers.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from tests.helpers import drbg
from tunneld.crypto.esp import MIN_SPI, Kind, SecurityAssociation, classify
from tunneld.crypto.kdf import derive_esp_keymat
from tunneld.crypto.noise import HASH, MAC, HandshakeState, SymmetricState, public_key, xaead_decrypt
from tunneld.proto.errors import ParseError
from tunneld.proto.handshake import (
    COOKIE_REPLY_LEN,
    HANDSHAKE_INITIATION_RATE,
    IDENTIFIER,
    INDEX_MIN,
    INITIATION_LEN,
    MARKER,
    RESPONSE_LEN,
    CookieReceived,
    CookieReply,
    Dropped,
    HandshakeError,
    Handshaker,
    Initiation,
    InitiationReceived,
    Response,
    ResponseReceived,
    SendCookie,
    SessionKeys,
    cookie_key,
    frame,
    mac1_key,
    parse_tai64n,
    source_bytes,
    tai64n,
    unframe,
)
from tunneld.proto.handshake_load import HandshakeLoad, LoadMeter, SourceLimiter
from tunneld.proto.stun_wire import is_channel_data, is_stun

I_PRIV = bytes([0x11]) * 32
R_PRIV = bytes([0x22]) * 32
PSK = bytes([0x33]) * 32
I_PUB = public_key(I_PRIV)
R_PUB = public_key(R_PRIV)
I_ADDR = ("192.0.2.1", 4500)
R_ADDR = ("198.51.100.2", 4500)
WALL = 1_700_000_000.25
# A flipped type byte turns a message into another type of the wrong length.
FRAMING_OR_MAC1 = {"unknown-type", "truncated", "oversized", "bad-reserved", "bad-index", "bad-mac1"}
SUITES = ("aes-128-gcm", "aes-256-gcm", "chacha20-poly1305")

WG_IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
WG_C0 = "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
WG_H0 = "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"


def scripted(chunks: Iterable[bytes]) -> Callable[[int], bytes]:
    """rand() that returns exactly these values, in order, and checks the requested lengths."""
    it = iter(chunks)

    def rand(n: int) -> bytes:
        chunk = next(it)
        assert len(chunk) == n, (n, chunk.hex())
        return chunk

    return rand


def make_pair(
    seed: int = 1, *, r_psk: bytes = PSK, r_peers: Iterable[bytes] = (I_PUB,), unmetered: bool = False
) -> tuple[Handshaker, Handshaker]:
    """Two Handshakers; ``unmetered`` for tests that send more than UNDER_LOAD_RATE messages a second on
    purpose, about something else than load (tests/unit/test_handshake_load.py is about load)."""
    def load() -> HandshakeLoad | None:
        return (HandshakeLoad(LoadMeter(rate=1_000_000), cookie_limiter=SourceLimiter(rate=1e6, burst=10**6))
                if unmetered else None)

    initiator = Handshaker(I_PRIV, PSK, {R_PUB}, rand=drbg(seed), load=load())
    responder = Handshaker(R_PRIV, r_psk, set(r_peers), rand=drbg(seed + 1000), load=load())
    return initiator, responder


def body(datagram: bytes) -> bytes:
    assert classify(datagram) is Kind.CONTROL
    return unframe(datagram)


def with_mac1(message: bytes, receiver_public: bytes) -> bytes:
    """Recompute mac1 as anyone holding the account PSK can (one of the account's devices); mac2 zero."""
    b = message[:-32]
    return b + MAC(mac1_key(receiver_public, PSK), b) + bytes(16)


def flip(message: bytes, bit: int) -> bytes:
    m = bytearray(message)
    m[bit // 8] ^= 1 << (bit % 8)
    return bytes(m)


def complete(
    initiator: Handshaker, responder: Handshaker, now: float = 10.0, wall: float = WALL
) -> tuple[SessionKeys, SessionKeys]:
    d1, _ = initiator.initiate(R_PUB, now, wall)
    ev1 = responder.receive(body(d1), I_ADDR, now)
    assert isinstance(ev1, InitiationReceived), ev1
    ev2 = initiator.receive(body(ev1.datagram), R_ADDR, now)
    assert isinstance(ev2, ResponseReceived), ev2
    return ev2.keys, ev1.keys


# -------------------------------------------------------------------------------------------------------
# Constants: the prologue is WireGuard's identifier step
# -------------------------------------------------------------------------------------------------------


def test_wireguard_initial_chaining_key_and_hash() -> None:
    """C0 = HASH(construction) begins 96, 226, 109, 174; H0 = HASH(C0 || identifier).

    The full values are WireGuard's (boringtun's INITIAL_CHAIN_KEY / INITIAL_CHAIN_HASH). Feeding the
    identifier to tunneld.crypto.noise as the prologue reproduces them, which is why tunneld passes its own
    identifier as the prologue.
    """
    c0 = HASH(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    assert list(c0[:4]) == [96, 226, 109, 174]
    assert c0.hex() == WG_C0
    ss = SymmetricState(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    assert ss.ck == c0 and ss.h == c0
    ss.mix_hash(WG_IDENTIFIER)
    assert ss.h.hex() == WG_H0 == HASH(c0 + WG_IDENTIFIER).hex()
    assert ss.ck == c0  # MixHash does not touch the chaining key
    # HandshakeState also mixes the pre-message "<- s", exactly WireGuard's H = HASH(H0 || S_pub_r).
    hs = HandshakeState("IKpsk2", True, WG_IDENTIFIER, I_PRIV, rs=R_PUB, psk=PSK)
    assert hs.handshake_hash == HASH(bytes.fromhex(WG_H0) + R_PUB)
    ours = HandshakeState("IKpsk2", True, IDENTIFIER, I_PRIV, rs=R_PUB, psk=PSK)
    assert ours.handshake_hash == HASH(HASH(c0 + IDENTIFIER) + R_PUB)
    assert IDENTIFIER == b"tunneld v1 esp-in-udp"


def test_tai64n() -> None:
    assert tai64n(0.0).hex() == "400000000000000a00000000"
    assert tai64n(WALL).hex() == "400000006553f10a0ee6b280"
    assert parse_tai64n(tai64n(WALL)) == WALL
    assert tai64n(WALL) < tai64n(WALL + 0.001) < tai64n(WALL + 1)
    assert tai64n(-1.5).hex() == "40000000000000081dcd6500"
    with pytest.raises(ParseError):
        parse_tai64n(bytes(11))
    with pytest.raises(ParseError):
        parse_tai64n(bytes(8) + (10**9).to_bytes(4, "big"))
    with pytest.raises(ValueError):
        tai64n(float("nan"))


def test_framing() -> None:
    assert frame(b"\x01abc") == MARKER + b"\x01abc"
    assert unframe(MARKER + b"\x01") == b"\x01"
    for bad in (b"", MARKER, b"\x00\x00\x00\x01\x01", b"\xff"):
        with pytest.raises(ParseError):
            unframe(bad)


def test_source_bytes() -> None:
    assert source_bytes(("192.0.2.1", 4500)) == bytes([192, 0, 2, 1, 0x94, 0x11])
    assert source_bytes(("::ffff:192.0.2.1", 4500)) == source_bytes(("192.0.2.1", 4500))
    assert source_bytes(("2001:db8::1", 1)) == bytes.fromhex("20010db8000000000000000000000001") + b"\x01\x00"
    assert source_bytes(("fe80::1%eth0", 9)) == source_bytes(("fe80::1", 9))
    for bad in (("not an address", 1), ("192.0.2.1", 70000)):
        with pytest.raises(ValueError):
            source_bytes(bad)


# -------------------------------------------------------------------------------------------------------
# The happy path
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
def test_handshake_keys_esp_both_ways(suite: str) -> None:
    initiator, responder = make_pair()
    d1, pending = initiator.initiate(R_PUB, 10.0, WALL)
    assert len(d1) == 4 + INITIATION_LEN and classify(d1) is Kind.CONTROL
    assert initiator.pending(R_PUB) == pending
    ev1 = responder.receive(body(d1), I_ADDR, 10.0)
    assert isinstance(ev1, InitiationReceived)
    assert ev1.peer == I_PUB
    assert len(ev1.datagram) == 4 + RESPONSE_LEN and classify(ev1.datagram) is Kind.CONTROL
    ev2 = initiator.receive(body(ev1.datagram), R_ADDR, 10.05)
    assert isinstance(ev2, ResponseReceived)
    assert ev2.peer == R_PUB
    assert initiator.pending(R_PUB) is None
    ik, rk = ev2.keys, ev1.keys

    # Same split keys and transcript; indices crossed; each index a usable SPI.
    assert (ik.i2r, ik.r2i, ik.handshake_hash) == (rk.i2r, rk.r2i, rk.handshake_hash)
    assert ik.i2r != ik.r2i
    assert ik.is_initiator and not rk.is_initiator
    assert ik.local_index == pending.local_index == rk.remote_index
    assert rk.local_index == ik.remote_index
    assert ik.local_index >= MIN_SPI and rk.local_index >= MIN_SPI
    assert ik.local_index >= INDEX_MIN and rk.local_index >= INDEX_MIN
    assert Initiation.parse(body(d1)).sender == ik.local_index
    resp = Response.parse(body(ev1.datagram))
    assert (resp.sender, resp.receiver) == (rk.local_index, ik.local_index)

    i_out, i_in = ik.security_associations(suite)
    r_out, r_in = rk.security_associations(suite)
    assert (i_out.spi, i_in.spi) == (rk.local_index, ik.local_index)
    assert (r_out.spi, r_in.spi) == (ik.local_index, rk.local_index)
    assert i_out.esn and i_in.esn
    for n in range(3):
        packet = bytes([n]) * (40 + n)
        wire = i_out.seal(packet)
        assert classify(wire) is Kind.ESP and int.from_bytes(wire[:4], "big") == rk.local_index
        assert r_in.open(wire) == (41, packet)
        wire = r_out.seal(packet)
        assert int.from_bytes(wire[:4], "big") == ik.local_index
        assert i_in.open(wire) == (41, packet)
    # The two directions have different keys: an SA cannot open its own direction's packets.
    assert classify(i_out.seal(b"x")) is Kind.ESP
    key_i2r, _ = derive_esp_keymat(ik.i2r, suite, "i2r")
    key_r2i, _ = derive_esp_keymat(ik.r2i, suite, "r2i")
    assert key_i2r != key_r2i
    assert initiator.drops == {} and responder.drops == {}


def test_keys_not_in_repr() -> None:
    ik, _ = complete(*make_pair())
    text = repr(ik)
    assert ik.i2r.hex() not in text and ik.r2i.hex() not in text and "i2r" not in text


def test_indices_avoid_reserved_and_used_spis() -> None:
    used = {0x8A0B0C0D}
    # ephemeral, then index candidates: one that is an SPI in use once its top bit is set, then a small one
    # (reserved SPI 5 as drawn: the top bit makes it 0x80000005)
    values = [bytes(32)] + [i.to_bytes(4, "little") for i in (0x0A0B0C0D, 5)]
    hs = Handshaker(I_PRIV, PSK, {R_PUB}, index_in_use=used.__contains__, rand=scripted(values))
    _, pending = hs.initiate(R_PUB, 0.0, WALL)
    assert pending.local_index == 0x80000005
    # Exhaustion is a local error, not a crash in receive.
    stuck = Handshaker(I_PRIV, PSK, {R_PUB}, index_in_use=lambda i: True)
    with pytest.raises(HandshakeError):
        stuck.initiate(R_PUB, 0.0, WALL)
    full = Handshaker(R_PRIV, PSK, {I_PUB}, index_in_use=lambda i: True)
    d1, _ = Handshaker(I_PRIV, PSK, {R_PUB}).initiate(R_PUB, 0.0, WALL)
    assert full.receive(body(d1), I_ADDR, 0.0) == Dropped("no-free-index")


def test_indices_have_the_top_bit_set_so_esp_to_us_never_looks_like_stun_or_channel_data() -> None:
    """Every index we draw is an inbound SPI in 0x80000000..0xFFFFFFFF: the first byte of an ESP packet sent
    to us is then 0x80-0xFF, never STUN's (top bits 00) nor TURN ChannelData's (0x40-0x4F)."""
    hs = Handshaker(I_PRIV, PSK, {R_PUB})
    indices = set()
    for _ in range(200):
        _, pending = hs.initiate(R_PUB, 0.0, WALL)
        indices.add(pending.local_index)
    assert len(indices) == 200 and INDEX_MIN == 0x80000000
    assert all(INDEX_MIN <= i <= 0xFFFFFFFF for i in indices)
    sa = SecurityAssociation(min(indices), bytes(32), bytes(4))
    wire = sa.seal(bytes(40))
    assert wire[0] >= 0x80 and not is_stun(wire) and not is_channel_data(wire)


def test_bad_constructor_and_initiate_arguments() -> None:
    with pytest.raises(HandshakeError):
        Handshaker(bytes(31), PSK, set())
    with pytest.raises(HandshakeError):
        Handshaker(I_PRIV, bytes(16), set())
    hs = Handshaker(I_PRIV, PSK, {R_PUB, I_PUB})
    for peer in (bytes(32), R_PUB[:31], I_PUB):  # unknown, wrong length, ourselves
        with pytest.raises(HandshakeError):
            hs.initiate(peer, 0.0, WALL)


def test_retransmission_replaces_pending() -> None:
    initiator, responder = make_pair()
    d_old, p_old = initiator.initiate(R_PUB, 10.0, WALL)
    d_new, p_new = initiator.initiate(R_PUB, 15.0, WALL + 5)
    assert p_old.local_index != p_new.local_index
    ev_old = responder.receive(body(d_old), I_ADDR, 10.0)
    assert isinstance(ev_old, InitiationReceived)
    # The response to the superseded initiation names an index that is no longer pending.
    assert initiator.receive(body(ev_old.datagram), R_ADDR, 15.1) == Dropped("unknown-index")
    ev_new = responder.receive(body(d_new), I_ADDR, 15.0)
    assert isinstance(ev_new, InitiationReceived)
    assert isinstance(initiator.receive(body(ev_new.datagram), R_ADDR, 15.1), ResponseReceived)
    # A duplicate response after completion has nothing pending either.
    assert initiator.receive(body(ev_new.datagram), R_ADDR, 15.2) == Dropped("unknown-index")


def test_cancel_and_forget() -> None:
    initiator, responder = make_pair()
    d1, _ = initiator.initiate(R_PUB, 10.0, WALL)
    initiator.cancel(R_PUB)
    assert initiator.pending(R_PUB) is None
    ev1 = responder.receive(body(d1), I_ADDR, 10.0)
    assert isinstance(ev1, InitiationReceived)
    assert initiator.receive(body(ev1.datagram), R_ADDR, 10.1) == Dropped("unknown-index")
    # forget() clears the replay state: the same initiation is accepted again by a forgetful responder.
    responder.forget(I_PUB)
    assert isinstance(responder.receive(body(d1), I_ADDR, 11.0), InitiationReceived)
    initiator.forget(R_PUB)
    initiator.forget(R_PUB)
    initiator.cancel(I_PUB)


# -------------------------------------------------------------------------------------------------------
# Rejections
# -------------------------------------------------------------------------------------------------------


def test_every_bit_flip_of_an_initiation() -> None:
    initiator, _ = make_pair()
    d1, _ = initiator.initiate(R_PUB, 10.0, WALL)
    m1 = body(d1)
    mac2_start = INITIATION_LEN - 16
    for bit in range(INITIATION_LEN * 8):
        responder = Handshaker(R_PRIV, PSK, {I_PUB}, rand=drbg(bit))
        ev = responder.receive(flip(m1, bit), I_ADDR, 10.0)
        if bit // 8 < mac2_start:
            assert isinstance(ev, Dropped), bit
            assert ev.reason in FRAMING_OR_MAC1, (bit, ev)
        else:
            # mac2 is only looked at under load (WireGuard does the same): with no load the message is
            # still good; under load a wrong mac2 earns a cookie reply, not processing.
            assert isinstance(ev, InitiationReceived), bit
            loaded = Handshaker(R_PRIV, PSK, {I_PUB}, rand=drbg(bit))
            assert isinstance(loaded.receive(flip(m1, bit), I_ADDR, 10.0, under_load=True), SendCookie)


def test_every_bit_flip_under_a_recomputed_mac1_of_an_initiation() -> None:
    """An insider (the account PSK) can fix mac1 up; the Noise AEADs must still refuse."""
    initiator, _ = make_pair()
    d1, pending = initiator.initiate(R_PUB, 10.0, WALL)
    m1 = body(d1)
    for bit in range(32, (INITIATION_LEN - 32) * 8):
        responder = Handshaker(R_PRIV, PSK, {I_PUB}, rand=drbg(bit))
        ev = responder.receive(with_mac1(flip(m1, bit), R_PUB), I_ADDR, 10.0)
        if bit < 64:
            # The sender index is outside the Noise transcript (as in WireGuard): the message is accepted
            # with another index, and the session simply fails because the ESP goes to the wrong SPI.
            if isinstance(ev, Dropped):
                assert ev.reason == "bad-index"
            else:
                assert isinstance(ev, InitiationReceived)
                assert ev.keys.remote_index == pending.local_index ^ (1 << (bit - 32))
        else:
            assert ev == Dropped("decrypt-failed"), bit


def test_every_bit_flip_of_a_response() -> None:
    initiator, responder = make_pair(unmetered=True)
    d1, pending = initiator.initiate(R_PUB, 10.0, WALL)
    ev1 = responder.receive(body(d1), I_ADDR, 10.0)
    assert isinstance(ev1, InitiationReceived)
    m2 = body(ev1.datagram)
    mac2_start = RESPONSE_LEN - 16
    for bit in range(mac2_start * 8):
        ev = initiator.receive(flip(m2, bit), R_ADDR, 10.1)
        assert isinstance(ev, Dropped), bit
        assert ev.reason in FRAMING_OR_MAC1, (bit, ev)
    for bit in range(96, (RESPONSE_LEN - 32) * 8):
        # Past the indices, a recomputed mac1 does not help: the AEAD refuses.
        ev = initiator.receive(with_mac1(flip(m2, bit), I_PUB), R_ADDR, 10.1)
        assert ev == Dropped("decrypt-failed"), bit
    for bit in range(64, 96):  # the receiver index
        ev = initiator.receive(with_mac1(flip(m2, bit), I_PUB), R_ADDR, 10.1)
        assert ev == Dropped("unknown-index"), bit
    for bit in range(mac2_start * 8, RESPONSE_LEN * 8):
        assert isinstance(initiator.receive(flip(m2, bit), R_ADDR, 10.1, under_load=True), SendCookie)
    # None of that disturbed the pending initiation: the genuine response still completes it.
    assert initiator.pending(R_PUB) == pending
    ev2 = initiator.receive(m2, R_ADDR, 10.2)
    assert isinstance(ev2, ResponseReceived)
    assert ev2.keys.i2r == ev1.keys.i2r
    assert initiator.drops["decrypt-failed"] == (RESPONSE_LEN - 32 - 12) * 8


def test_response_sender_index_is_not_authenticated() -> None:
    """As in WireGuard, only mac1 covers the indices (an insider can fix it up); the session then fails."""
    initiator, responder = make_pair()
    d1, _ = initiator.initiate(R_PUB, 10.0, WALL)
    ev1 = responder.receive(body(d1), I_ADDR, 10.0)
    assert isinstance(ev1, InitiationReceived)
    ev2 = initiator.receive(with_mac1(flip(body(ev1.datagram), 40), I_PUB), R_ADDR, 10.1)
    assert isinstance(ev2, ResponseReceived)
    assert ev2.keys.remote_index == ev1.keys.local_index ^ (1 << 8)


def test_mac2_flip_of_a_response_without_load_is_accepted() -> None:
    for bit in (0, 77, 127):
        initiator, responder = make_pair(bit)
        d1, _ = initiator.initiate(R_PUB, 10.0, WALL)
        ev1 = responder.receive(body(d1), I_ADDR, 10.0)
        assert isinstance(ev1, InitiationReceived)
        ev = initiator.receive(flip(body(ev1.datagram), (RESPONSE_LEN - 16) * 8 + bit), R_ADDR, 10.1)
        assert isinstance(ev, ResponseReceived)


def test_truncated_and_oversized_messages() -> None:
    initiator, responder = make_pair()
    d1, _ = initiator.initiate(R_PUB, 10.0, WALL)
    ev1 = responder.receive(body(d1), I_ADDR, 10.0)
    assert isinstance(ev1, InitiationReceived)
    loaded = Handshaker(R_PRIV, PSK, {I_PUB}, rand=drbg(7))
    d1b, _ = initiator.initiate(R_PUB, 11.0, WALL + 1)
    cookie = loaded.receive(body(d1b), I_ADDR, 11.0, under_load=True)
    assert isinstance(cookie, SendCookie)
    assert len(cookie.datagram) == 4 + COOKIE_REPLY_LEN and classify(cookie.datagram) is Kind.CONTROL
    for message in (body(d1), body(ev1.datagram), body(cookie.datagram)):
        for n in range(len(message)):
            # Both sides, so each message type meets the parser of its natural receiver and the other.
            for hs in (initiator, responder):
                assert hs.receive(message[:n], I_ADDR, 12.0) == Dropped("truncated"), n
        for extra in (b"\x00", bytes(100)):
            for hs in (initiator, responder):
                assert hs.receive(message + extra, I_ADDR, 12.0) == Dropped("oversized")
    for t in (0, 4, 5, 255):
        assert responder.receive(bytes([t]) + bytes(147), I_ADDR, 12.0) == Dropped("unknown-type")
    assert responder.drops["truncated"] > 0 and responder.drops["unknown-type"] == 4


def test_parsers_raise_parse_error_only() -> None:
    rng = random.Random(5)
    parsers: list[tuple[Callable[[bytes], Initiation | Response | CookieReply], int, int]] = [
        (Initiation.parse, 1, INITIATION_LEN),
        (Response.parse, 2, RESPONSE_LEN),
        (CookieReply.parse, 3, COOKIE_REPLY_LEN),
    ]
    for parse, kind, length in parsers:
        parsed_ok = 0
        for _ in range(300):
            data = rng.randbytes(rng.choice((length, length, length - 1, rng.randrange(200))))
            if data and rng.random() < 0.8:
                data = bytes([kind if rng.random() < 0.9 else rng.randrange(256)]) + bytes(3) + data[4:]
            try:
                parsed = parse(data)
            except ParseError:
                continue
            parsed_ok += 1
            assert parsed.encode() == data
        assert parsed_ok > 50


def test_random_garbage_is_dropped_never_raised() -> None:
    rng = random.Random(9)
    initiator, responder = make_pair()
    initiator.initiate(R_PUB, 10.0, WALL)
    for _ in range(2000):
        t = rng.choice((1, 2, 3))
        n = rng.choice((INITIATION_LEN, RESPONSE_LEN, COOKIE_REPLY_LEN, rng.randrange(1, 200)))
        data = bytes([t, 0, 0, 0]) + bytes(rng.getrandbits(8) for _ in range(max(0, n - 4)))
        for hs in (initiator, responder):
            for load in (False, True):
                ev = hs.receive(data, ("2001:db8::9", 1234), 10.0, under_load=load)
                assert isinstance(ev, Dropped | SendCookie)


def test_unknown_peer() -> None:
    initiator, responder = make_pair(r_peers=())
    d1, _ = initiator.initiate(R_PUB, 10.0, WALL)
    assert responder.receive(body(d1), I_ADDR, 10.0) == Dropped("unknown-peer")
    # Peers are looked up live: once added, the same initiation is accepted.
    responder_peers: set[bytes] = set()
    responder = Handshaker(R_PRIV, PSK, responder_peers)
    assert responder.receive(body(d1), I_ADDR, 10.0) == Dropped("unknown-peer")
    responder_peers.add(I_PUB)
    assert isinstance(responder.receive(body(d1), I_ADDR, 10.0), InitiationReceived)


def test_initiation_to_someone_else_fails_mac1() -> None:
    other_priv = bytes([0x99]) * 32
    initiator = Handshaker(I_PRIV, PSK, {public_key(other_priv)})
    d1, _ = initiator.initiate(public_key(other_priv), 10.0, WALL)
    _, responder = make_pair()
    assert responder.receive(body(d1), I_ADDR, 10.0) == Dropped("bad-mac1")
    # Even with mac1 fixed up for the responder, the Noise message was for another static key.
    assert responder.receive(with_mac1(body(d1), R_PUB), I_ADDR, 10.0) == Dropped("decrypt-failed")


def test_wrong_psk() -> None:
    """mac1 is keyed by the PSK too: a device of another account fails it, before any X25519 work."""
    initiator, responder = make_pair(r_psk=bytes([0x34]) * 32)
    d1, pending = initiator.initiate(R_PUB, 10.0, WALL)
    assert responder.receive(body(d1), I_ADDR, 10.0) == Dropped("bad-mac1")
    assert responder.load.worked == 0 and responder.load.meter.recent(10.0) == 0
    # Even with mac1 made with the other PSK, psk2 still refuses: the PSK is mixed in after message 1,
    # so the responder answers, and the initiator cannot read the response.
    b = body(d1)[:-32]
    fixed = b + MAC(mac1_key(R_PUB, bytes([0x34]) * 32), b) + bytes(16)
    ev1 = responder.receive(fixed, I_ADDR, 10.0)
    assert isinstance(ev1, InitiationReceived)
    assert initiator.receive(body(ev1.datagram), R_ADDR, 10.1) == Dropped("bad-mac1")
    m2 = body(ev1.datagram)[:-32]
    m2 = m2 + MAC(mac1_key(I_PUB, PSK), m2) + bytes(16)
    assert initiator.receive(m2, R_ADDR, 10.1) == Dropped("decrypt-failed")
    assert initiator.pending(R_PUB) == pending


def test_a_stranger_with_the_public_key_cannot_pass_mac1() -> None:
    """WireGuard's mac1 needs only the receiver's public key, which our DNS records publish; ours needs
    the account PSK as well. A stranger's initiations, however well formed, cost one BLAKE2s each."""
    stranger_priv = bytes([0x55]) * 32
    stranger = Handshaker(stranger_priv, bytes([0x99]) * 32, {R_PUB}, rand=drbg(3))
    _, responder = make_pair(r_peers=(I_PUB, public_key(stranger_priv)))
    d1, _ = stranger.initiate(R_PUB, 10.0, WALL)
    b = body(d1)[:-32]
    wireguards = b + MAC(HASH(b"mac1----" + R_PUB), b) + bytes(16)
    for message in (body(d1), wireguards):
        assert responder.receive(message, I_ADDR, 10.0) == Dropped("bad-mac1")
        assert responder.receive(message, I_ADDR, 10.0, under_load=True) == Dropped("bad-mac1")  # no cookie
    assert responder.load.worked == 0 and responder.load.cookie_replies == 0


def test_replayed_initiation() -> None:
    initiator, responder = make_pair()
    d1, _ = initiator.initiate(R_PUB, 10.0, WALL)
    assert isinstance(responder.receive(body(d1), I_ADDR, 10.0), InitiationReceived)
    assert responder.receive(body(d1), I_ADDR, 20.0) == Dropped("replay")
    assert responder.receive(body(d1), ("203.0.113.5", 999), 30.0) == Dropped("replay")
    assert responder.drops == {"replay": 2}


def test_older_and_equal_timestamps_are_replays() -> None:
    initiator, responder = make_pair()
    d_old, _ = initiator.initiate(R_PUB, 10.0, WALL)
    d_same, _ = initiator.initiate(R_PUB, 10.5, WALL + 1)
    d_new, _ = initiator.initiate(R_PUB, 11.0, WALL + 1)
    d_newer, _ = initiator.initiate(R_PUB, 12.0, WALL + 1.000001)
    assert isinstance(responder.receive(body(d_new), I_ADDR, 11.0), InitiationReceived)
    assert responder.receive(body(d_old), I_ADDR, 12.0) == Dropped("replay")  # older
    assert responder.receive(body(d_same), I_ADDR, 12.0) == Dropped("replay")  # not strictly greater
    assert isinstance(responder.receive(body(d_newer), I_ADDR, 12.0), InitiationReceived)


def test_rate_limit() -> None:
    initiator, responder = make_pair(unmetered=True)
    accepted = 0
    for k in range(200):  # 200 fresh initiations in one second, every 5 ms
        d1, _ = initiator.initiate(R_PUB, 100.0 + k * 0.005, WALL + k * 0.005)
        ev = responder.receive(body(d1), I_ADDR, 100.0 + k * 0.005)
        if isinstance(ev, InitiationReceived):
            accepted += 1
        else:
            assert ev == Dropped("rate-limited")
    assert 40 <= accepted <= 50
    # Once the interval has passed, the next one is accepted.
    d1, _ = initiator.initiate(R_PUB, 102.0, WALL + 2)
    assert isinstance(responder.receive(body(d1), I_ADDR, 102.0), InitiationReceived)
    d2, _ = initiator.initiate(R_PUB, 102.0, WALL + 2.001)
    soon, later = 102.0 + HANDSHAKE_INITIATION_RATE / 2, 102.0 + 2 * HANDSHAKE_INITIATION_RATE
    assert responder.receive(body(d2), I_ADDR, soon) == Dropped("rate-limited")
    # A rate-limited initiation did not consume its timestamp: it is accepted once the interval is over.
    assert isinstance(responder.receive(body(d2), I_ADDR, later), InitiationReceived)


def test_rate_limit_is_per_peer() -> None:
    other_priv = bytes([0x77]) * 32
    responder = Handshaker(R_PRIV, PSK, {I_PUB, public_key(other_priv)})
    a = Handshaker(I_PRIV, PSK, {R_PUB})
    b = Handshaker(other_priv, PSK, {R_PUB})
    for hs in (a, b):
        d1, _ = hs.initiate(R_PUB, 5.0, WALL)
        assert isinstance(responder.receive(body(d1), I_ADDR, 5.0), InitiationReceived)


# -------------------------------------------------------------------------------------------------------
# Cookies
# -------------------------------------------------------------------------------------------------------


def test_cookie_flow_for_initiations() -> None:
    initiator, responder = make_pair()
    d1, p1 = initiator.initiate(R_PUB, 10.0, WALL)
    assert body(d1)[-16:] == bytes(16)  # no cookie yet: mac2 is zero
    ev = responder.receive(body(d1), I_ADDR, 10.0, under_load=True)
    assert isinstance(ev, SendCookie)
    reply = CookieReply.parse(body(ev.datagram))
    assert reply.receiver == p1.local_index
    # The cookie is MAC(secret, source) encrypted under HASH("cookie--" || responder public || psk),
    # AD = mac1.
    cookie = xaead_decrypt(cookie_key(R_PUB, PSK), reply.nonce, reply.encrypted_cookie, body(d1)[-32:-16])
    assert len(cookie) == 16
    assert initiator.receive(body(ev.datagram), R_ADDR, 10.1) == CookieReceived(R_PUB, retry_now=True)
    # The same reply again is refused: one cookie per message sent.
    assert initiator.receive(body(ev.datagram), R_ADDR, 10.1) == Dropped("unexpected-cookie")

    d2, _ = initiator.initiate(R_PUB, 15.0, WALL + 5)
    m2 = body(d2)
    assert m2[-16:] == MAC(cookie, m2[:-16])
    ev2 = responder.receive(m2, I_ADDR, 15.0, under_load=True)
    assert isinstance(ev2, InitiationReceived)
    assert isinstance(initiator.receive(body(ev2.datagram), R_ADDR, 15.1), ResponseReceived)

    # The cookie is bound to the source address and port.
    d3, _ = initiator.initiate(R_PUB, 20.0, WALL + 10)
    assert isinstance(responder.receive(body(d3), ("192.0.2.1", 4501), 20.0, under_load=True), SendCookie)


def test_cookie_reply_rejections() -> None:
    initiator, responder = make_pair()
    d1, _ = initiator.initiate(R_PUB, 10.0, WALL)
    ev = responder.receive(body(d1), I_ADDR, 10.0, under_load=True)
    assert isinstance(ev, SendCookie)
    m = body(ev.datagram)
    for bit in range(32, COOKIE_REPLY_LEN * 8):
        got = initiator.receive(flip(m, bit), R_ADDR, 10.1)
        expected = "unknown-index" if bit < 64 else "bad-cookie"
        assert got == Dropped(expected), bit
    assert initiator.receive(body(ev.datagram), R_ADDR, 10.1) == CookieReceived(R_PUB, retry_now=True)
    # A cookie reply for an earlier message (the AD is the mac1 of the last message sent) is refused.
    initiator2, responder2 = make_pair(3)
    d_a, _ = initiator2.initiate(R_PUB, 10.0, WALL)
    ev_a = responder2.receive(body(d_a), I_ADDR, 10.0, under_load=True)
    assert isinstance(ev_a, SendCookie)
    initiator2.initiate(R_PUB, 11.0, WALL + 1)
    assert initiator2.receive(body(ev_a.datagram), R_ADDR, 11.1) == Dropped("unknown-index")
    # A bad source address under load is a drop, not an exception.
    d_b, _ = initiator2.initiate(R_PUB, 12.0, WALL + 2)
    assert responder2.receive(body(d_b), ("nonsense", 1), 12.0, under_load=True) == Dropped("bad-source")


def test_cookie_older_than_120_s_is_not_used() -> None:
    initiator, responder = make_pair()
    d1, _ = initiator.initiate(R_PUB, 0.0, WALL)
    ev = responder.receive(body(d1), I_ADDR, 0.0, under_load=True)
    assert isinstance(ev, SendCookie)
    assert initiator.receive(body(ev.datagram), R_ADDR, 0.0) == CookieReceived(R_PUB, retry_now=True)
    d2, _ = initiator.initiate(R_PUB, 119.5, WALL + 1)
    assert body(d2)[-16:] != bytes(16)
    d3, _ = initiator.initiate(R_PUB, 120.0, WALL + 2)
    assert body(d3)[-16:] == bytes(16)


def test_cookie_secret_rotates_after_120_s() -> None:
    initiator, responder = make_pair()
    # t=0: the responder makes its secret while answering someone (here: this initiator, first time).
    d1, _ = initiator.initiate(R_PUB, 0.0, WALL)
    assert isinstance(responder.receive(body(d1), I_ADDR, 0.0, under_load=True), SendCookie)
    # t=100: a second cookie under the same (100 s old) secret; the initiator's copy is fresh.
    d2, _ = initiator.initiate(R_PUB, 100.0, WALL + 100)
    ev = responder.receive(body(d2), I_ADDR, 100.0, under_load=True)
    assert isinstance(ev, SendCookie)
    assert initiator.receive(body(ev.datagram), R_ADDR, 100.0) == CookieReceived(R_PUB, retry_now=True)
    # t=110: valid (secret 110 s old).
    d3, _ = initiator.initiate(R_PUB, 110.0, WALL + 110)
    assert isinstance(responder.receive(body(d3), I_ADDR, 110.0, under_load=True), InitiationReceived)
    # t=125: the initiator still uses its 25-s-old cookie, but the secret has expired: a new cookie.
    d4, _ = initiator.initiate(R_PUB, 125.0, WALL + 125)
    assert body(d4)[-16:] != bytes(16)
    ev4 = responder.receive(body(d4), I_ADDR, 125.0, under_load=True)
    assert isinstance(ev4, SendCookie)
    # d4 carried mac2 already: no immediate retry (cookies cannot make an initiator loop).
    assert initiator.receive(body(ev4.datagram), R_ADDR, 125.0) == CookieReceived(R_PUB)
    d5, _ = initiator.initiate(R_PUB, 126.0, WALL + 126)
    assert isinstance(responder.receive(body(d5), I_ADDR, 126.0, under_load=True), InitiationReceived)


def test_cookie_flow_for_responses() -> None:
    """An initiator under load answers a response without mac2 with a cookie; the responder keeps it."""
    initiator, responder = make_pair()
    d1, _ = initiator.initiate(R_PUB, 10.0, WALL)
    ev1 = responder.receive(body(d1), I_ADDR, 10.0)
    assert isinstance(ev1, InitiationReceived)
    ev = initiator.receive(body(ev1.datagram), R_ADDR, 10.1, under_load=True)
    assert isinstance(ev, SendCookie)
    assert CookieReply.parse(body(ev.datagram)).receiver == ev1.keys.local_index
    assert responder.receive(body(ev.datagram), I_ADDR, 10.2) == CookieReceived(I_PUB)
    # The initiator retries; the new response carries mac2 and gets through the loaded initiator.
    d2, _ = initiator.initiate(R_PUB, 15.0, WALL + 5)
    ev2 = responder.receive(body(d2), I_ADDR, 15.0)
    assert isinstance(ev2, InitiationReceived)
    assert body(ev2.datagram)[-16:] != bytes(16)
    assert isinstance(initiator.receive(body(ev2.datagram), R_ADDR, 15.1, under_load=True), ResponseReceived)


# -------------------------------------------------------------------------------------------------------
# The worked example in docs/protocol.md
# -------------------------------------------------------------------------------------------------------

EXAMPLE = {
    "initiator_public": "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f13",
    "responder_public": "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20",
    "initiation": (
        "000000000100000001020384ff2ee45601ec1b67310c7790404585ae697331ee"
        "e1c1f8cf2419731c1fff3e6b3b6f1324884f7dfcb616f1440bce015ad114bc97"
        "a5052c5972a42150ca66244e1b9de66909d5ee16196b50a2ec9e46b70ed41251"
        "d4d6d77924f81ab18114d4de3c0f732c45971868dd6fc43d00ab7de9111adbc9"
        "c8affe13430f371f00000000000000000000000000000000"
    ),
    "response": (
        "0000000002000000050607880102038438ab664bd86f77d7e66bdd9ae0792913"
        "a94fd8b33a1260027e4b46c1f4884c674bf0a548524991022f1bab473177aa56"
        "a015b7f6673e7a915be653d06cf89b2000000000000000000000000000000000"
    ),
    "cookie_reply": (
        "0000000003000000010203847777777777777777777777777777777777777777"
        "77777777428f6dca9f547e9c2c16d8fac507613e6ee06d361aba756235fa88e8"
        "d5b77d82"
    ),
    "i2r": "2177a14cf336f1f30ee0a4797cf26797017dae77cbea489248bc3298bea5f869",
    "r2i": "a3109f7f0c20e0ee4b829f8bc301eb1235feb3b04ddfb7f34a5189e65a2ea192",
    "esp_i2r_key": "02317b943a96271a4c8ac0f31a36922c8f598e1e98a8a68f671d3121db719265",
    "esp_i2r_salt": "736e398d",
    "esp_r2i_key": "e9109168877d421d80dade1130a3b9cc56ca40b76b66404d561288075c42835d",
    "esp_r2i_salt": "041045ad",
}


def run_example() -> dict[str, str]:
    i_eph, r_eph = bytes([0x44]) * 32, bytes([0x55]) * 32
    initiator = Handshaker(I_PRIV, PSK, {R_PUB}, rand=scripted([i_eph, bytes.fromhex("01020304")]))
    responder = Handshaker(
        R_PRIV, PSK, {I_PUB},
        rand=scripted([bytes([0x66]) * 32, bytes([0x77]) * 24, r_eph, bytes.fromhex("05060708")]),
    )
    d1, _ = initiator.initiate(R_PUB, 10.0, WALL)
    cookie = responder.receive(body(d1), I_ADDR, 10.0, under_load=True)
    assert isinstance(cookie, SendCookie)
    ev1 = responder.receive(body(d1), I_ADDR, 10.0)
    assert isinstance(ev1, InitiationReceived)
    ev2 = initiator.receive(body(ev1.datagram), R_ADDR, 10.0)
    assert isinstance(ev2, ResponseReceived)
    k = ev2.keys
    i2r_key, i2r_salt = derive_esp_keymat(k.i2r, "aes-256-gcm", "i2r")
    r2i_key, r2i_salt = derive_esp_keymat(k.r2i, "aes-256-gcm", "r2i")
    return {
        "initiator_public": I_PUB.hex(),
        "responder_public": R_PUB.hex(),
        "initiation": d1.hex(),
        "response": ev1.datagram.hex(),
        "cookie_reply": cookie.datagram.hex(),
        "i2r": k.i2r.hex(),
        "r2i": k.r2i.hex(),
        "esp_i2r_key": i2r_key.hex(),
        "esp_i2r_salt": i2r_salt.hex(),
        "esp_r2i_key": r2i_key.hex(),
        "esp_r2i_salt": r2i_salt.hex(),
    }


def test_protocol_doc_example() -> None:
    assert run_example() == EXAMPLE
    # Cross-checks of the pinned bytes against the formulas in the document, not through Handshaker.
    m1 = bytes.fromhex(EXAMPLE["initiation"])[4:]
    noise1 = HandshakeState("IKpsk2", True, IDENTIFIER, I_PRIV, rs=R_PUB, psk=PSK, e=bytes([0x44]) * 32)
    assert noise1.write_message(tai64n(WALL)) == m1[8:116]
    assert m1[:8] == bytes.fromhex("0100000001020384")
    assert m1[116:132] == MAC(HASH(b"mac1----" + R_PUB + PSK), m1[:116])
    m2 = bytes.fromhex(EXAMPLE["response"])[4:]
    assert m2[:12] == bytes.fromhex("020000000506078801020384")
    assert m2[60:76] == MAC(HASH(b"mac1----" + I_PUB + PSK), m2[:60])
    noise2 = HandshakeState("IKpsk2", False, IDENTIFIER, R_PRIV, psk=PSK, e=bytes([0x55]) * 32)
    assert noise2.read_message(m1[8:116]) == tai64n(WALL)
    assert noise2.write_message(b"") == m2[12:60]
    assert noise2.split_keys() == (bytes.fromhex(EXAMPLE["i2r"]), bytes.fromhex(EXAMPLE["r2i"]))
    m3 = bytes.fromhex(EXAMPLE["cookie_reply"])[4:]
    cookie = MAC(bytes([0x66]) * 32, bytes([192, 0, 2, 1]) + (4500).to_bytes(2, "little"))
    assert xaead_decrypt(HASH(b"cookie--" + R_PUB + PSK), m3[8:32], m3[32:], m1[116:132]) == cookie
    # The intermediate values the document quotes.
    assert IDENTIFIER.hex() == "74756e6e656c64207631206573702d696e2d756470"
    assert public_key(bytes([0x44]) * 32).hex() == m1[8:40].hex() == (
        "ff2ee45601ec1b67310c7790404585ae697331eee1c1f8cf2419731c1fff3e6b"
    )
    assert public_key(bytes([0x55]) * 32).hex() == m2[12:44].hex() == (
        "38ab664bd86f77d7e66bdd9ae0792913a94fd8b33a1260027e4b46c1f4884c67"
    )
    assert mac1_key(R_PUB, PSK).hex() == "3526b4ba99d4a9bedd4e75296974b161a8716a82b96a69e2ab88621db059a799"
    assert mac1_key(I_PUB, PSK).hex() == "502ee653a41e372d6a4c5e90257c5d4bfb5c4b963d179c6a402f289c0bc26c8e"
    assert cookie_key(R_PUB, PSK).hex() == "fc407fbbc4f486b5bc5f95ae73da9e73cca020544b20af57172da92394474e03"
    # The same keys and mac1 from hashlib's BLAKE2s directly, not through tunneld.crypto.noise.
    assert mac1_key(R_PUB, PSK) == hashlib.blake2s(b"mac1----" + R_PUB + PSK).digest()
    assert cookie_key(R_PUB, PSK) == hashlib.blake2s(b"cookie--" + R_PUB + PSK).digest()
    assert m1[116:132] == hashlib.blake2s(m1[:116], key=mac1_key(R_PUB, PSK), digest_size=16).digest()
    assert cookie.hex() == "131708a50a7e0b2daa12faed33d98b12"
    assert tai64n(WALL).hex() == "400000006553f10a0ee6b280"


def test_protocol_doc_quotes_the_pinned_example() -> None:
    """Every pinned hex string appears in docs/protocol.md."""
    docs = Path(__file__).resolve().parents[2] / "docs"
    text = (docs / "protocol.md").read_text()
    flat = "".join(text.split())
    # In the annotated dumps, each line starts with a field's hex and ends with a comment; join the hex.
    dumps = ""
    for line in text.splitlines():
        for token in line.split():
            if not all(c in "0123456789abcdef" for c in token):
                break
            dumps += token
    for name, value in EXAMPLE.items():
        if name in ("initiation", "response", "cookie_reply"):
            assert value in dumps, name
        else:
            assert value in flat, name

