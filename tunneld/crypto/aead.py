"""AEAD suites for ESP: AES-GCM (RFC 4106) and ChaCha20-Poly1305 (RFC 7634).

Both RFCs share one shape, which is why one class serves all three suites:
KEYMAT = key || 4-byte salt (RFC 4106 §8.1, RFC 7634 §2), nonce = salt || 8-byte explicit IV
(RFC 4106 §4, RFC 7634 §2), a 16-byte ICV. The cipher context is built once per key, because
building it (key schedule) costs as much as sealing a packet.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

SALT_LEN: Final = 4
IV_LEN: Final = 8
ICV_LEN: Final = 16


@dataclass(frozen=True)
class Suite:
    """One ESP AEAD transform: its name, key length and IKEv2 transform ID (IANA)."""

    name: str
    key_len: int
    transform_id: int

    @property
    def keymat_len(self) -> int:
        return self.key_len + SALT_LEN


SUITES: Final[dict[str, Suite]] = {
    "aes-128-gcm": Suite("aes-128-gcm", 16, 20),  # ENCR_AES_GCM_16 with a 128-bit key
    "aes-256-gcm": Suite("aes-256-gcm", 32, 20),  # ENCR_AES_GCM_16 with a 256-bit key
    "chacha20-poly1305": Suite("chacha20-poly1305", 32, 28),  # RFC 7634 §4
}
DEFAULT_SUITE: Final = "aes-256-gcm"


class AEADError(Exception):
    """Authentication failed or an argument was malformed; says nothing about the key."""


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise ValueError(f"unknown AEAD suite {name!r}; use one of {', '.join(SUITES)}") from None


_NONCE = struct.Struct("!4sQ")


class AEAD:
    """A keyed ESP AEAD: `seal`/`open` take the 64-bit IV as an integer.

    `encrypt` and `decrypt` are the underlying context methods (nonce, data, aad), exposed so the
    ESP batch loops can bind them to locals and skip one call layer per packet.
    """

    __slots__ = ("decrypt", "decrypt_into", "encrypt", "encrypt_into", "salt", "suite")

    def __init__(self, suite: str | Suite, key: bytes, salt: bytes) -> None:
        s = suite if isinstance(suite, Suite) else get_suite(suite)
        if len(key) != s.key_len:
            raise ValueError(f"{s.name} needs a {s.key_len}-byte key, got {len(key)} bytes")
        if len(salt) != SALT_LEN:
            raise ValueError(f"the ESP salt is {SALT_LEN} bytes, got {len(salt)}")
        ctx = ChaCha20Poly1305(key) if s.name == "chacha20-poly1305" else AESGCM(key)
        self.suite = s
        self.salt = bytes(salt)
        self.encrypt = ctx.encrypt
        self.decrypt = ctx.decrypt
        self.decrypt_into = ctx.decrypt_into  # (nonce, data, aad, out): plaintext into a caller's buffer
        self.encrypt_into = ctx.encrypt_into  # (nonce, data, aad, out): ciphertext and ICV into it

    @classmethod
    def from_keymat(cls, suite: str, keymat: bytes) -> AEAD:
        """Split RFC 4106 §8.1 KEYMAT: the salt is the *last* four bytes."""
        s = get_suite(suite)
        if len(keymat) != s.keymat_len:
            raise ValueError(f"{s.name} KEYMAT is {s.keymat_len} bytes, got {len(keymat)}")
        return cls(s, keymat[:-SALT_LEN], keymat[-SALT_LEN:])

    def nonce(self, iv: int) -> bytes:
        return _NONCE.pack(self.salt, iv)

    def seal(self, iv: int, plaintext: bytes, aad: bytes) -> bytes:
        """Return ciphertext || ICV."""
        return self.encrypt(_NONCE.pack(self.salt, iv), plaintext, aad)

    def open(self, iv: int, data: bytes, aad: bytes) -> bytes:
        """Return the plaintext of ciphertext || ICV, or raise AEADError."""
        if len(data) < ICV_LEN:
            raise AEADError("shorter than the ICV")
        try:
            return self.decrypt(_NONCE.pack(self.salt, iv), data, aad)
        except InvalidTag:
            raise AEADError("ICV check failed") from None
