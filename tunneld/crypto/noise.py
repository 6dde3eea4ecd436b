"""The Noise Protocol Framework (revision 34), as far as tunneld needs it.

Two handshake patterns are supported, both over 25519 / ChaChaPoly / BLAKE2s:

- ``IK``     -- ``Noise_IK_25519_ChaChaPoly_BLAKE2s``
- ``IKpsk2`` -- ``Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s``, the WireGuard construction (whitepaper §5.4).

This module is pure: it opens no sockets, reads no clock and draws randomness only when the caller does
not supply a key (the ephemeral in :class:`HandshakeState`, :func:`generate_keypair`). WireGuard's message
framing (indices, mac1/mac2, TAI64N timestamps) lives in the protocol layer above; this module provides the
primitives it needs (:func:`MAC`, :func:`xaead_encrypt`) but does not frame anything itself.

Every failure raises :class:`NoiseError`, and no exception message ever contains key material.
Section numbers below refer to the Noise specification, revision 34 (2018-07-11).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Final, Literal

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "DHLEN",
    "HASH",
    "HASHLEN",
    "HMAC",
    "KDF1",
    "KDF2",
    "KDF3",
    "KEYLEN",
    "MAC",
    "MAX_NONCE",
    "PROTOCOL_NAMES",
    "TAGLEN",
    "XNONCELEN",
    "CipherState",
    "HandshakeState",
    "NoiseError",
    "Pattern",
    "SymmetricState",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "generate_keypair",
    "public_key",
    "xaead_decrypt",
    "xaead_encrypt",
]

DHLEN: Final = 32
"""Length of X25519 public keys and shared secrets (§12.1)."""
HASHLEN: Final = 32
"""BLAKE2s-256 output length (§12.7)."""
KEYLEN: Final = 32
"""ChaChaPoly key length (§4.2: cipher keys are always 32 bytes)."""
TAGLEN: Final = 16
"""Poly1305 tag length (§4.2: ciphertexts are 16 bytes longer than plaintexts)."""
XNONCELEN: Final = 24
"""XChaCha20-Poly1305 nonce length (WireGuard cookie replies, whitepaper §5.4.7)."""
MAX_NONCE: Final = 2**64 - 1
"""Reserved nonce value (§5.1): a CipherState must never encrypt or decrypt with it."""

Pattern = Literal["IK", "IKpsk2"]

PROTOCOL_NAMES: Final[dict[str, bytes]] = {
    "IK": b"Noise_IK_25519_ChaChaPoly_BLAKE2s",
    "IKpsk2": b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s",
}
"""Full protocol names (§8); they seed the handshake via InitializeSymmetric."""

# Handshake patterns as token lists (§7.5 for IK, §9.2 for the psk2 modifier). Both have the pre-message
# "<- s": the responder's static key is known to the initiator before the first message.
_PATTERNS: Final[dict[str, tuple[tuple[str, ...], ...]]] = {
    "IK": (("e", "es", "s", "ss"), ("e", "ee", "se")),
    "IKpsk2": (("e", "es", "s", "ss"), ("e", "ee", "se", "psk")),
}

_ZERO_DH: Final = bytes(DHLEN)


class NoiseError(Exception):
    """Any failure in this module: bad tag, bad length, message out of turn, low-order point.

    Messages describe what went wrong in general terms only; they never include keys or plaintexts, so a
    NoiseError can be logged as is.
    """


# --------------------------------------------------------------------------------------------------------
# Primitives (§4 crypto functions; WireGuard whitepaper §5.4 for MAC and XAEAD)
# --------------------------------------------------------------------------------------------------------


def HASH(data: bytes) -> bytes:
    """BLAKE2s with a 32-byte digest (§12.7), WireGuard's Hash."""
    return hashlib.blake2s(data).digest()


def MAC(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s with a 16-byte digest: WireGuard's Mac, for mac1/mac2 and cookies (whitepaper §5.4.4).

    This is BLAKE2s's own keyed mode, not HMAC; the key may be at most 32 bytes.
    """
    if len(key) > 32:
        raise NoiseError("MAC key longer than 32 bytes")
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def HMAC(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s (RFC 2104 with BLAKE2s, block length 64; Noise §4.3), the building block of HKDF."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def _hkdf(chaining_key: bytes, input_key_material: bytes, outputs: int) -> tuple[bytes, ...]:
    # Noise §4.3 HKDF: RFC 5869 with the chaining key as salt, empty info, and the outputs chained.
    temp_key = HMAC(chaining_key, input_key_material)
    out: list[bytes] = []
    prev = b""
    for i in range(1, outputs + 1):
        prev = HMAC(temp_key, prev + bytes([i]))
        out.append(prev)
    return tuple(out)


def KDF1(key: bytes, data: bytes) -> bytes:
    """WireGuard's Kdf1: the first HKDF output (Noise §4.3 with num_outputs == 1)."""
    (t1,) = _hkdf(key, data, 1)
    return t1


def KDF2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """WireGuard's Kdf2: MixKey and Split use two HKDF outputs (§5.2)."""
    t1, t2 = _hkdf(key, data, 2)
    return t1, t2


def KDF3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """WireGuard's Kdf3: MixKeyAndHash uses three HKDF outputs (§5.2)."""
    t1, t2, t3 = _hkdf(key, data, 3)
    return t1, t2, t3


def dh(private_key: bytes, public: bytes) -> bytes:
    """X25519 (RFC 7748), refusing an all-zero result.

    Noise §4.1 lets DH either return a harmless value or signal an error for invalid public keys; we
    follow RFC 7748 §6.1 and WireGuard and reject an all-zero result, so a peer cannot force a predictable
    shared secret. The caller's own private key is clamped by the X25519 function itself.
    """
    if len(private_key) != DHLEN or len(public) != DHLEN:
        raise NoiseError("X25519 keys must be 32 bytes")
    try:
        shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
            X25519PublicKey.from_public_bytes(public)
        )
    except ValueError:
        # OpenSSL refuses the all-zero output itself; report it the same way as our own check below.
        raise NoiseError("X25519 result is all zero (low-order public key)") from None
    if hmac.compare_digest(shared, _ZERO_DH):
        raise NoiseError("X25519 result is all zero (low-order public key)")
    return shared


def public_key(private_key: bytes) -> bytes:
    """The X25519 public key for a 32-byte private key."""
    if len(private_key) != DHLEN:
        raise NoiseError("X25519 private key must be 32 bytes")
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh (private, public) X25519 key pair from os.urandom.

    The private key is returned clamped (RFC 7748 §5), as WireGuard stores it; X25519 clamps anyway, so
    this only makes the stored bytes canonical.
    """
    raw = bytearray(os.urandom(DHLEN))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    private_key = bytes(raw)
    return private_key, public_key(private_key)


def _nonce(counter: int) -> bytes:
    # §12.3 ChaChaPoly: 32 bits of zeros followed by the little-endian 64-bit counter.
    if not 0 <= counter <= MAX_NONCE:
        raise NoiseError("nonce counter out of range")
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """ChaCha20-Poly1305 (RFC 8439) with the Noise nonce layout; returns ciphertext || tag."""
    if len(key) != KEYLEN:
        raise NoiseError("AEAD key must be 32 bytes")
    return ChaCha20Poly1305(key).encrypt(_nonce(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """Inverse of :func:`aead_encrypt`; a bad tag or short input raises NoiseError."""
    if len(key) != KEYLEN:
        raise NoiseError("AEAD key must be 32 bytes")
    if len(ciphertext) < TAGLEN:
        raise NoiseError("ciphertext shorter than the authentication tag")
    try:
        return ChaCha20Poly1305(key).decrypt(_nonce(counter), ciphertext, ad)
    except InvalidTag:
        raise NoiseError("authentication failed") from None


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha) with a 24-byte nonce: WireGuard's cookie reply."""
    if len(key) != KEYLEN or len(nonce) != XNONCELEN:
        raise NoiseError("XAEAD needs a 32-byte key and a 24-byte nonce")
    return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Inverse of :func:`xaead_encrypt`; a bad tag or short input raises NoiseError."""
    if len(key) != KEYLEN or len(nonce) != XNONCELEN:
        raise NoiseError("XAEAD needs a 32-byte key and a 24-byte nonce")
    if len(ciphertext) < TAGLEN:
        raise NoiseError("ciphertext shorter than the authentication tag")
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except nacl.exceptions.CryptoError:
        raise NoiseError("authentication failed") from None


# --------------------------------------------------------------------------------------------------------
# State objects (§5)
# --------------------------------------------------------------------------------------------------------


class CipherState:
    """A key and an implicit 64-bit nonce (§5.1).

    With no key, encryption is the identity, as the spec requires for the first handshake tokens.
    A failed decryption leaves the nonce unchanged (§5.1), so a forged packet cannot desynchronise us.
    """

    __slots__ = ("k", "n")

    def __init__(self, k: bytes | None = None, n: int = 0) -> None:
        if k is not None and len(k) != KEYLEN:
            raise NoiseError("cipher key must be 32 bytes")
        self.k: bytes | None = k
        self.n: int = n

    def __repr__(self) -> str:
        # Never show the key.
        return f"CipherState(has_key={self.has_key()}, n={self.n})"

    def has_key(self) -> bool:
        return self.k is not None

    def set_nonce(self, n: int) -> None:
        """SetNonce (§5.1), for transports that carry an explicit counter."""
        if not 0 <= n <= MAX_NONCE:
            raise NoiseError("nonce out of range")
        self.n = n

    def _check_nonce(self) -> None:
        # §5.1: 2^64-1 is reserved; running into it means the key is exhausted and must be replaced.
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce space exhausted; rekey")

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.k is None:
            return plaintext
        self._check_nonce()
        ciphertext = aead_encrypt(self.k, self.n, plaintext, ad)
        self.n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self.k is None:
            return ciphertext
        self._check_nonce()
        plaintext = aead_decrypt(self.k, self.n, ciphertext, ad)
        self.n += 1
        return plaintext


class SymmetricState:
    """The chaining key ``ck`` and handshake hash ``h`` with the cipher they key (§5.2)."""

    __slots__ = ("_cipher", "ck", "h")

    def __init__(self, protocol_name: bytes) -> None:
        # InitializeSymmetric: names longer than HASHLEN are hashed, shorter ones zero-padded. Both of
        # our names are longer than 32 bytes, so in practice h = HASH(name).
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = HASH(protocol_name)
        self.ck = self.h
        self._cipher = CipherState()

    def __repr__(self) -> str:
        return f"SymmetricState(has_key={self._cipher.has_key()})"

    def has_key(self) -> bool:
        return self._cipher.has_key()

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_k = KDF2(self.ck, input_key_material)
        self._cipher = CipherState(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = HASH(self.h + data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        """Used for the ``psk`` token (§9.2)."""
        self.ck, temp_h, temp_k = KDF3(self.ck, input_key_material)
        self.mix_hash(temp_h)
        self._cipher = CipherState(temp_k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self._cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self._cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split_keys(self) -> tuple[bytes, bytes]:
        """The two transport keys of Split (§5.2): (initiator->responder, responder->initiator)."""
        return KDF2(self.ck, b"")

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = self.split_keys()
        return CipherState(k1), CipherState(k2)


class HandshakeState:
    """One side of an IK or IKpsk2 handshake (§5.3).

    The initiator writes message 1 and reads message 2; the responder the reverse. Once both messages
    have been processed, :attr:`complete` is true and :meth:`split` / :meth:`split_keys` give the
    transport keys. After any failure the object is poisoned: every later call raises NoiseError. A
    rejected message may already have been mixed into ``ck`` and ``h``, after which the state can never
    match the peer's; saying so at once beats a misleading error later. Start a new handshake instead
    (WireGuard likewise builds fresh state for every initiation).
    """

    def __init__(
        self,
        pattern: Pattern,
        initiator: bool,
        prologue: bytes,
        s: bytes,
        rs: bytes | None = None,
        psk: bytes | None = None,
        e: bytes | None = None,
    ) -> None:
        if pattern not in _PATTERNS:
            raise NoiseError("unsupported handshake pattern")
        if len(s) != DHLEN:
            raise NoiseError("static private key must be 32 bytes")
        if e is not None and len(e) != DHLEN:
            raise NoiseError("ephemeral private key must be 32 bytes")
        if rs is not None and len(rs) != DHLEN:
            raise NoiseError("remote static public key must be 32 bytes")
        if initiator and rs is None:
            raise NoiseError("the IK initiator must know the responder's static public key")
        if not initiator and rs is not None:
            raise NoiseError("the IK responder learns the initiator's static key from message 1")
        self._psk_mode = "psk" in pattern
        if self._psk_mode:
            if psk is None or len(psk) != 32:
                raise NoiseError("a psk handshake needs a 32-byte pre-shared key")
        elif psk is not None:
            raise NoiseError("a pre-shared key was given for a pattern without psk")

        self._pattern: Pattern = pattern
        self._initiator = initiator
        self._s = s
        self._s_pub = public_key(s)
        self._e = e
        self._e_pub: bytes | None = None
        self._rs = rs
        self._re: bytes | None = None
        self._psk = psk
        self._messages = _PATTERNS[pattern]
        self._index = 0
        self._failed = False
        self._send: CipherState | None = None
        self._recv: CipherState | None = None
        self._keys: tuple[bytes, bytes] | None = None

        self._ss = SymmetricState(PROTOCOL_NAMES[pattern])
        self._ss.mix_hash(prologue)
        # Pre-message "<- s" (§5.3 Initialize: pre-message public keys are hashed in after the prologue).
        responder_static = rs if initiator else self._s_pub
        assert responder_static is not None
        self._ss.mix_hash(responder_static)
        self._h_final: bytes | None = None

    def __repr__(self) -> str:
        role = "initiator" if self._initiator else "responder"
        return f"HandshakeState({self._pattern}, {role}, message={self._index}, complete={self.complete})"

    # -- public state --------------------------------------------------------------------------------------

    @property
    def pattern(self) -> Pattern:
        return self._pattern

    @property
    def initiator(self) -> bool:
        return self._initiator

    @property
    def complete(self) -> bool:
        return self._keys is not None

    @property
    def handshake_hash(self) -> bytes:
        """GetHandshakeHash (§5.2): the final ``h`` binds the whole transcript; usable for channel binding.

        Before completion this is the running hash, which is of little use except in tests.
        """
        return self._h_final if self._h_final is not None else self._ss.h

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key: given to the initiator, learned by the responder from message 1."""
        return self._rs

    @property
    def local_static(self) -> bytes:
        """Our own static public key."""
        return self._s_pub

    def split(self) -> tuple[CipherState, CipherState]:
        """(send, receive) CipherStates for this side (§5.2 Split, oriented by role).

        The same two objects are returned on every call, so their nonces can never be reused by asking
        twice.
        """
        if self._send is None or self._recv is None:
            raise NoiseError("handshake not complete")
        return self._send, self._recv

    def split_keys(self) -> tuple[bytes, bytes]:
        """(initiator->responder key, responder->initiator key), the same tuple on both sides.

        Not swapped by role, unlike :meth:`split`, so both peers can feed it into the same derivation
        (tunneld derives its ESP SAs from these; see tunneld.crypto.kdf.derive_esp_keymat).
        """
        if self._keys is None:
            raise NoiseError("handshake not complete")
        return self._keys

    # -- message processing --------------------------------------------------------------------------------

    def _my_turn_to_write(self) -> bool:
        # Message 0 goes initiator -> responder, message 1 back.
        return (self._index % 2 == 0) == self._initiator

    def _check_turn(self, writing: bool) -> None:
        if self._failed:
            raise NoiseError("handshake already failed")
        if self._index >= len(self._messages):
            raise NoiseError("handshake already complete")
        if self._my_turn_to_write() != writing:
            raise NoiseError("message out of turn")

    def _dh_token(self, token: str) -> bytes:
        # §5.3 / §7.1: "es" is DH(e, rs) for the initiator and DH(s, re) for the responder, etc.; the first
        # letter names the initiator's key, the second the responder's.
        first, second = token[0], token[1]
        local = first if self._initiator else second
        remote = second if self._initiator else first
        local_private = self._e if local == "e" else self._s
        remote_public = self._re if remote == "e" else self._rs
        if local_private is None or remote_public is None:
            raise NoiseError("handshake key missing")
        return dh(local_private, remote_public)

    def write_message(self, payload: bytes = b"") -> bytes:
        """WriteMessage (§5.3): process this side's next token list and encrypt ``payload``."""
        self._check_turn(writing=True)
        try:
            out = bytearray()
            for token in self._messages[self._index]:
                if token == "e":
                    if self._e is None:
                        self._e = generate_keypair()[0]
                    self._e_pub = public_key(self._e)
                    out += self._e_pub
                    self._ss.mix_hash(self._e_pub)
                    if self._psk_mode:
                        # §9.2: in psk handshakes "e" also calls MixKey(e.public_key).
                        self._ss.mix_key(self._e_pub)
                elif token == "s":
                    out += self._ss.encrypt_and_hash(self._s_pub)
                elif token == "psk":
                    assert self._psk is not None
                    self._ss.mix_key_and_hash(self._psk)
                else:
                    self._ss.mix_key(self._dh_token(token))
            out += self._ss.encrypt_and_hash(payload)
        except BaseException:
            self._failed = True
            raise
        self._advance()
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """ReadMessage (§5.3): process the peer's next token list and return the decrypted payload."""
        self._check_turn(writing=False)
        try:
            view = memoryview(message)
            for token in self._messages[self._index]:
                if token == "e":
                    if len(view) < DHLEN:
                        raise NoiseError("message too short")
                    self._re = bytes(view[:DHLEN])
                    view = view[DHLEN:]
                    self._ss.mix_hash(self._re)
                    if self._psk_mode:
                        self._ss.mix_key(self._re)
                elif token == "s":
                    n = DHLEN + TAGLEN if self._ss.has_key() else DHLEN
                    if len(view) < n:
                        raise NoiseError("message too short")
                    self._rs = self._ss.decrypt_and_hash(bytes(view[:n]))
                    view = view[n:]
                elif token == "psk":
                    assert self._psk is not None
                    self._ss.mix_key_and_hash(self._psk)
                else:
                    self._ss.mix_key(self._dh_token(token))
            if self._ss.has_key() and len(view) < TAGLEN:
                raise NoiseError("message too short")
            payload = self._ss.decrypt_and_hash(bytes(view))
        except BaseException:
            self._failed = True
            raise
        self._advance()
        return payload

    def _advance(self) -> None:
        self._index += 1
        if self._index == len(self._messages):
            keys = self._ss.split_keys()
            send, recv = CipherState(keys[0]), CipherState(keys[1])
            if not self._initiator:
                send, recv = recv, send
            self._keys = keys
            self._send, self._recv = send, recv
            self._h_final = self._ss.h
            # Drop what is no longer needed (the HandshakeState has no further use after Split). Python cannot
            # wipe bytes, but at least nothing here keeps the chaining key or ephemeral alive.
            self._ss = SymmetricState(b"")
            self._e = None
            self._psk = None
