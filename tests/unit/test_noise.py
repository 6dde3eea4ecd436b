"""tunneld.crypto.noise: Noise IK and IKpsk2 over 25519 / ChaChaPoly / BLAKE2s.

The known answers are the cacophony vectors in tests/data/noise_IK_IKpsk2_25519.json (public domain; see
tests/data/SOURCES.md). Each vector is replayed once per role against the recorded messages only, so
our initiator is checked without trusting our responder and vice versa.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tunneld.crypto.noise import (
    HASH,
    HMAC,
    KDF1,
    KDF2,
    KDF3,
    MAC,
    MAX_NONCE,
    CipherState,
    HandshakeState,
    NoiseError,
    Pattern,
    SymmetricState,
    aead_decrypt,
    aead_encrypt,
    dh,
    generate_keypair,
    public_key,
    xaead_decrypt,
    xaead_encrypt,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "noise_IK_IKpsk2_25519.json"
SUITE = "_25519_ChaChaPoly_BLAKE2s"

ALL_VECTORS: list[dict[str, Any]] = json.loads(DATA.read_text())["vectors"]
# The file also holds the same patterns over AESGCM and SHA256/SHA512/BLAKE2b; we implement one suite.
VECTORS = [v for v in ALL_VECTORS if v["protocol_name"].endswith(SUITE)]
BY_PATTERN = {v["protocol_name"].split("_")[1]: v for v in VECTORS}
PATTERNS: list[Pattern] = ["IK", "IKpsk2"]
HANDSHAKE_MESSAGES = 2

# Low-order points of Curve25519 and their non-canonical encodings (RFC 7748 §6.1 warns about them).
LOW_ORDER_POINTS = [
    bytes(32),
    bytes([1]) + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def pattern_of(vector: dict[str, Any]) -> Pattern:
    name = vector["protocol_name"].split("_")[1]
    assert name in PATTERNS
    return name  # type: ignore[no-any-return]


def from_vector(vector: dict[str, Any], initiator: bool, psk: bytes | None = None) -> HandshakeState:
    side = "init" if initiator else "resp"
    psks = vector.get(f"{side}_psks", [])
    assert len(psks) <= 1
    return HandshakeState(
        pattern_of(vector),
        initiator=initiator,
        prologue=h(vector[f"{side}_prologue"]),
        s=h(vector[f"{side}_static"]),
        rs=h(vector["init_remote_static"]) if initiator else None,
        psk=psk if psk is not None else (h(psks[0]) if psks else None),
        e=h(vector[f"{side}_ephemeral"]),
    )


def message(vector: dict[str, Any], index: int) -> tuple[bytes, bytes]:
    m = vector["messages"][index]
    return h(m["payload"]), h(m["ciphertext"])


def vector_id(vector: dict[str, Any]) -> str:
    return str(vector["protocol_name"])


# --- known answers ---------------------------------------------------------------------------------------


def test_vector_file_holds_our_two_protocols() -> None:
    assert sorted(v["protocol_name"] for v in VECTORS) == [
        "Noise_IK_25519_ChaChaPoly_BLAKE2s",
        "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s",
    ]
    for v in VECTORS:
        assert len(v["messages"]) > HANDSHAKE_MESSAGES + 1, "want transport messages in both directions"


@pytest.mark.parametrize("role", ["initiator", "responder"])
@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_cacophony_vector(vector: dict[str, Any], role: str) -> None:
    initiator = role == "initiator"
    hs = from_vector(vector, initiator)
    send: CipherState | None = None
    recv: CipherState | None = None
    for i in range(len(vector["messages"])):
        payload, ciphertext = message(vector, i)
        ours = (i % 2 == 0) == initiator  # messages alternate, starting with the initiator
        if i < HANDSHAKE_MESSAGES:
            assert not hs.complete
            if ours:
                assert hs.write_message(payload).hex() == ciphertext.hex()
            else:
                assert hs.read_message(ciphertext).hex() == payload.hex()
            if i == HANDSHAKE_MESSAGES - 1:
                assert hs.complete
                assert hs.handshake_hash.hex() == vector["handshake_hash"]
                send, recv = hs.split()
        else:
            # Transport messages use the split CipherStates with empty associated data (§5.2).
            assert send is not None and recv is not None
            if ours:
                assert send.encrypt_with_ad(b"", payload).hex() == ciphertext.hex()
            else:
                assert recv.decrypt_with_ad(b"", ciphertext).hex() == payload.hex()
    # What each side knows about the other afterwards.
    peer = "resp" if initiator else "init"
    assert hs.remote_static == public_key(h(vector[f"{peer}_static"]))
    assert hs.local_static == public_key(h(vector[f"{'init' if initiator else 'resp'}_static"]))


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_split_keys_match_split_cipher_states(vector: dict[str, Any]) -> None:
    i, r = from_vector(vector, True), from_vector(vector, False)
    r.read_message(i.write_message(message(vector, 0)[0]))
    i.read_message(r.write_message(message(vector, 1)[0]))
    assert i.split_keys() == r.split_keys()
    i_to_r, r_to_i = i.split_keys()
    assert (i.split()[0].k, i.split()[1].k) == (i_to_r, r_to_i)
    assert (r.split()[0].k, r.split()[1].k) == (r_to_i, i_to_r)
    # split() hands out the same objects each time, so nonces cannot be reused by calling it twice.
    assert i.split()[0] is i.split()[0]


# --- round trips with fresh keys -------------------------------------------------------------------------


def make_pair(
    pattern: Pattern, psk_i: bytes | None = None, psk_r: bytes | None = None, prologue: bytes = b"tunneld"
) -> tuple[HandshakeState, HandshakeState, bytes, bytes]:
    i_priv, i_pub = generate_keypair()
    r_priv, r_pub = generate_keypair()
    if pattern == "IKpsk2" and psk_i is None and psk_r is None:
        psk_i = psk_r = bytes(range(100, 132))
    i = HandshakeState(pattern, initiator=True, prologue=prologue, s=i_priv, rs=r_pub, psk=psk_i)
    r = HandshakeState(pattern, initiator=False, prologue=prologue, s=r_priv, psk=psk_r)
    return i, r, i_pub, r_pub


@pytest.mark.parametrize("pattern", PATTERNS)
def test_round_trip_with_random_keys(pattern: Pattern) -> None:
    i, r, i_pub, r_pub = make_pair(pattern)
    m1 = i.write_message(b"timestamp")
    assert r.read_message(m1) == b"timestamp"
    assert r.remote_static == i_pub
    m2 = r.write_message(b"")
    assert len(m2) == 32 + 16  # e, then the empty payload's tag: WireGuard's response body
    assert i.read_message(m2) == b""
    assert i.complete and r.complete
    assert i.handshake_hash == r.handshake_hash
    assert i.split_keys() == r.split_keys()
    assert i.remote_static == r_pub
    i_send, i_recv = i.split()
    r_send, r_recv = r.split()
    for n in range(3):
        assert r_recv.decrypt_with_ad(b"ad", i_send.encrypt_with_ad(b"ad", b"ping %d" % n)) == b"ping %d" % n
        assert i_recv.decrypt_with_ad(b"", r_send.encrypt_with_ad(b"", b"pong %d" % n)) == b"pong %d" % n


def test_ephemeral_is_fresh_when_not_supplied() -> None:
    i1, _, _, _ = make_pair("IKpsk2")
    i2, _, _, _ = make_pair("IKpsk2")
    assert i1.write_message()[:32] != i2.write_message()[:32]


def test_prologue_mismatch_fails_on_message_1() -> None:
    i_priv, _ = generate_keypair()
    r_priv, r_pub = generate_keypair()
    i = HandshakeState("IK", initiator=True, prologue=b"one", s=i_priv, rs=r_pub)
    r = HandshakeState("IK", initiator=False, prologue=b"two", s=r_priv)
    with pytest.raises(NoiseError):
        r.read_message(i.write_message())


@pytest.mark.parametrize("pattern", PATTERNS)
def test_wrong_responder_static_fails_on_message_1(pattern: Pattern) -> None:
    i, _, _, _ = make_pair(pattern)
    _, other_responder, _, _ = make_pair(pattern)
    with pytest.raises(NoiseError):
        other_responder.read_message(i.write_message())


# --- negative cases --------------------------------------------------------------------------------------


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def reader_for(vector: dict[str, Any], index: int) -> HandshakeState:
    """A fresh state that is about to read handshake message ``index`` of the vector."""
    if index == 0:
        return from_vector(vector, initiator=False)
    hs = from_vector(vector, initiator=True)
    hs.write_message(message(vector, 0)[0])
    return hs


def assert_no_secrets(exc: BaseException, *secrets: bytes) -> None:
    text = f"{exc!s} {exc!r}"
    for secret in secrets:
        assert secret.hex() not in text
        assert repr(secret) not in text


@pytest.mark.parametrize("index", range(HANDSHAKE_MESSAGES), ids=["msg1", "msg2"])
@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_every_flipped_bit_is_detected(vector: dict[str, Any], index: int) -> None:
    payload, good = message(vector, index)
    assert reader_for(vector, index).read_message(good) == payload
    for bit in range(len(good) * 8):
        hs = reader_for(vector, index)
        with pytest.raises(NoiseError) as info:
            hs.read_message(flip(good, bit))
        assert_no_secrets(info.value, *(h(v) for v in (vector["init_static"], vector["resp_static"])))
        # Even the top bit of the ephemeral, which X25519 ignores, is caught: it is hashed (and in psk
        # mode also mixed into the key) as sent.


@pytest.mark.parametrize("index", range(HANDSHAKE_MESSAGES), ids=["msg1", "msg2"])
@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_truncated_messages_are_rejected(vector: dict[str, Any], index: int) -> None:
    _, good = message(vector, index)
    for length in range(len(good)):
        with pytest.raises(NoiseError):
            reader_for(vector, index).read_message(good[:length])


@pytest.mark.parametrize("index", range(HANDSHAKE_MESSAGES), ids=["msg1", "msg2"])
@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_extended_messages_are_rejected(vector: dict[str, Any], index: int) -> None:
    _, good = message(vector, index)
    with pytest.raises(NoiseError):
        reader_for(vector, index).read_message(good + b"\x00")


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_state_is_dead_after_a_failure(vector: dict[str, Any]) -> None:
    # §5.3: a failed ReadMessage aborts the handshake. A short message fails before anything is mixed in,
    # so only the explicit poisoning stops the good message from being accepted afterwards.
    _, good = message(vector, 0)
    for bad in (good[:10], flip(good, 100)):
        hs = reader_for(vector, 0)
        with pytest.raises(NoiseError):
            hs.read_message(bad)
        with pytest.raises(NoiseError, match="already failed"):
            hs.read_message(good)
        with pytest.raises(NoiseError, match="already failed"):
            hs.write_message()


def test_wrong_psk_is_detected_by_the_initiator_on_message_2() -> None:
    # psk2 mixes the PSK in at the *end* of message 2, so the responder cannot notice a wrong PSK while
    # reading message 1: it decrypts the payload, answers, and believes the handshake complete. Only the
    # initiator, reading message 2, finds out. (The responder learns of it only when no valid transport
    # message follows, which is why WireGuard's responder waits for the first one before sending.)
    psk_i, psk_r = bytes([1]) * 32, bytes([2]) * 32
    i, r, _, _ = make_pair("IKpsk2", psk_i=psk_i, psk_r=psk_r)
    assert r.read_message(i.write_message(b"payload")) == b"payload"
    m2 = r.write_message(b"")
    assert r.complete
    with pytest.raises(NoiseError) as info:
        i.read_message(m2)
    assert not i.complete
    assert_no_secrets(info.value, psk_i, psk_r)


def test_write_out_of_turn() -> None:
    i, r, _, _ = make_pair("IKpsk2")
    with pytest.raises(NoiseError, match="turn"):
        r.write_message()
    with pytest.raises(NoiseError, match="turn"):
        i.read_message(bytes(96))
    m1 = i.write_message()
    with pytest.raises(NoiseError, match="turn"):
        i.write_message()
    r.read_message(m1)
    with pytest.raises(NoiseError, match="turn"):
        r.read_message(m1)
    i.read_message(r.write_message())
    for hs in (i, r):
        with pytest.raises(NoiseError, match="complete"):
            hs.write_message()
        with pytest.raises(NoiseError, match="complete"):
            hs.read_message(m1)


def test_split_before_completion() -> None:
    i, _, _, _ = make_pair("IK")
    with pytest.raises(NoiseError):
        i.split()
    with pytest.raises(NoiseError):
        i.split_keys()


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_low_order_ephemeral_in_message_1(pattern: Pattern, point: bytes) -> None:
    i, r, _, _ = make_pair(pattern)
    m1 = i.write_message()
    with pytest.raises(NoiseError, match="low-order"):
        r.read_message(point + m1[32:])


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_low_order_ephemeral_in_message_2(pattern: Pattern, point: bytes) -> None:
    i, r, _, _ = make_pair(pattern)
    r.read_message(i.write_message())
    m2 = r.write_message()
    with pytest.raises(NoiseError, match="low-order"):
        i.read_message(point + m2[32:])


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
def test_low_order_remote_static_is_refused_at_first_dh(point: bytes) -> None:
    priv, _ = generate_keypair()
    hs = HandshakeState("IK", initiator=True, prologue=b"", s=priv, rs=point)
    with pytest.raises(NoiseError, match="low-order"):
        hs.write_message()


# --- construction --------------------------------------------------------------------------------------


def test_constructor_validation() -> None:
    priv, pub = generate_keypair()
    psk = bytes(32)
    with pytest.raises(NoiseError):
        HandshakeState("IK", initiator=True, prologue=b"", s=priv)  # no rs
    with pytest.raises(NoiseError):
        HandshakeState("IK", initiator=False, prologue=b"", s=priv, rs=pub)  # responder learns rs
    with pytest.raises(NoiseError):
        HandshakeState("IKpsk2", initiator=True, prologue=b"", s=priv, rs=pub)  # no psk
    with pytest.raises(NoiseError):
        HandshakeState("IKpsk2", initiator=True, prologue=b"", s=priv, rs=pub, psk=psk[:31])
    with pytest.raises(NoiseError):
        HandshakeState("IK", initiator=True, prologue=b"", s=priv, rs=pub, psk=psk)  # psk without psk2
    with pytest.raises(NoiseError):
        HandshakeState("IK", initiator=True, prologue=b"", s=priv[:31], rs=pub)
    with pytest.raises(NoiseError):
        HandshakeState("IK", initiator=True, prologue=b"", s=priv, rs=pub[:31])
    with pytest.raises(NoiseError):
        HandshakeState("IK", initiator=True, prologue=b"", s=priv, rs=pub, e=priv[:31])
    with pytest.raises(NoiseError):
        HandshakeState("XX", initiator=True, prologue=b"", s=priv, rs=pub)  # type: ignore[arg-type]


def test_reprs_hide_keys() -> None:
    i, r, _, _ = make_pair("IKpsk2")
    r.read_message(i.write_message())
    i.read_message(r.write_message())
    send, _ = i.split()
    assert send.k is not None
    for obj in (i, r, send, SymmetricState(b"Noise_IK_25519_ChaChaPoly_BLAKE2s")):
        assert send.k.hex() not in repr(obj)
        assert repr(send.k) not in repr(obj)


# --- CipherState and SymmetricState ---------------------------------------------------------------------


def test_cipher_state_without_key_is_identity() -> None:
    cs = CipherState()
    assert cs.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cs.decrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cs.n == 0


def test_cipher_state_failed_decrypt_keeps_nonce() -> None:
    sender, receiver = CipherState(bytes(32)), CipherState(bytes(32))
    ct = sender.encrypt_with_ad(b"", b"x")
    with pytest.raises(NoiseError):
        receiver.decrypt_with_ad(b"", flip(ct, 0))
    assert receiver.n == 0
    assert receiver.decrypt_with_ad(b"", ct) == b"x"
    assert receiver.n == 1


def test_cipher_state_nonce_limit() -> None:
    cs = CipherState(bytes(32))
    cs.set_nonce(MAX_NONCE - 1)
    ct = cs.encrypt_with_ad(b"", b"last")  # 2^64-2 is the last usable nonce
    assert cs.n == MAX_NONCE
    with pytest.raises(NoiseError):
        cs.encrypt_with_ad(b"", b"one too many")
    rx = CipherState(bytes(32), n=MAX_NONCE - 1)
    assert rx.decrypt_with_ad(b"", ct) == b"last"
    with pytest.raises(NoiseError):
        rx.decrypt_with_ad(b"", ct)
    with pytest.raises(NoiseError):
        cs.set_nonce(2**64)


def test_cipher_state_uses_little_endian_counter_nonce() -> None:
    key = bytes(range(32))
    cs = CipherState(key, n=0x0102)
    # §12.3: 4 zero bytes, then the counter as little-endian 64-bit.
    expected = ChaCha20Poly1305(key).encrypt(bytes(4) + bytes([2, 1]) + bytes(6), b"data", b"ad")
    assert cs.encrypt_with_ad(b"ad", b"data") == expected
    assert aead_encrypt(key, 0x0102, b"data", b"ad") == expected
    assert aead_decrypt(key, 0x0102, expected, b"ad") == b"data"
    with pytest.raises(NoiseError):
        aead_decrypt(key, 0x0103, expected, b"ad")
    with pytest.raises(NoiseError):
        aead_decrypt(key, 0, b"short", b"")


def test_symmetric_state_initialization() -> None:
    long_name = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    ss = SymmetricState(long_name)
    assert ss.h == ss.ck == HASH(long_name)
    short = SymmetricState(b"Noise_NN_25519_ChaChaPoly_BLAKE2s"[:20])
    assert short.h == b"Noise_NN_25519_ChaCh" + bytes(12)  # padded, not hashed, when <= HASHLEN
    assert not ss.has_key()
    ss.mix_key(b"x")
    assert ss.has_key()


# --- primitives ------------------------------------------------------------------------------------------


def test_wireguard_initial_chaining_key_and_hash() -> None:
    # Whitepaper §5.4: C = Hash(Construction), H = Hash(C || Identifier). The values are the ones WireGuard
    # implementations precompute (e.g. boringtun's INITIAL_CHAIN_KEY / INITIAL_CHAIN_HASH).
    c0 = HASH(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    assert c0[:4] == bytes([96, 226, 109, 174])
    assert c0.hex() == "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
    h0 = HASH(c0 + b"WireGuard v1 zx2c4 Jason@zx2c4.com")
    assert h0.hex() == "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"
    # The same values fall out of the HandshakeState before the responder's key is mixed in.
    assert SymmetricState(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s").ck == c0


def rfc2104_hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """RFC 2104 written out, independent of the hmac module."""
    block = 64
    if len(key) > block:
        key = hashlib.blake2s(key).digest()
    key = key.ljust(block, b"\x00")
    inner = hashlib.blake2s(bytes(k ^ 0x36 for k in key) + data).digest()
    return hashlib.blake2s(bytes(k ^ 0x5C for k in key) + inner).digest()


@pytest.mark.parametrize("key_len", [0, 16, 32, 64, 65])
def test_hmac_is_rfc2104_over_blake2s(key_len: int) -> None:
    key = bytes(range(key_len))
    assert HMAC(key, b"message") == rfc2104_hmac_blake2s(key, b"message")


def test_kdf_chain() -> None:
    ck, ikm = bytes(range(32)), b"input"
    t0 = rfc2104_hmac_blake2s(ck, ikm)
    t1 = rfc2104_hmac_blake2s(t0, b"\x01")
    t2 = rfc2104_hmac_blake2s(t0, t1 + b"\x02")
    t3 = rfc2104_hmac_blake2s(t0, t2 + b"\x03")
    assert KDF1(ck, ikm) == t1
    assert KDF2(ck, ikm) == (t1, t2)
    assert KDF3(ck, ikm) == (t1, t2, t3)


def test_mac_is_keyed_blake2s_128() -> None:
    key = bytes(range(32))
    assert MAC(key, b"msg") == hashlib.blake2s(b"msg", key=key, digest_size=16).digest()
    assert len(MAC(key, b"msg")) == 16
    assert MAC(key, b"msg") != HMAC(key, b"msg")[:16]
    assert not hmac.compare_digest(MAC(key, b"msg"), MAC(key[::-1], b"msg"))
    with pytest.raises(NoiseError):
        MAC(bytes(33), b"msg")


def test_xaead_draft_irtf_cfrg_xchacha_a_3_1() -> None:
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    ad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
        b"sunscreen would be it."
    )
    expected = bytes.fromhex(
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
        "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
        "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
        "21f9664c97637da9768812f615c68b13b52e"
        "c0875924c1c7987947deafd8780acf49"
    )
    assert xaead_encrypt(key, nonce, plaintext, ad) == expected
    assert xaead_decrypt(key, nonce, expected, ad) == plaintext
    with pytest.raises(NoiseError):
        xaead_decrypt(key, nonce, flip(expected, 7), ad)
    with pytest.raises(NoiseError):
        xaead_decrypt(key, nonce, expected, ad + b"x")
    with pytest.raises(NoiseError):
        xaead_decrypt(key, nonce, expected[:15], ad)
    with pytest.raises(NoiseError):
        xaead_encrypt(key, nonce[:12], plaintext, ad)


def test_dh_error_does_not_leak_private_key() -> None:
    priv, _ = generate_keypair()
    with pytest.raises(NoiseError) as info:
        dh(priv, bytes(32))
    assert_no_secrets(info.value, priv)
