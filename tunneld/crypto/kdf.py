"""Key derivations for tunneld: HKDF-SHA256 (RFC 5869) with one versioned label per purpose.

Two roots feed everything:

- the 32-byte *account secret* shared by a user's devices gives the TSIG key for DNS UPDATE, the Noise
  handshake PSK, the TURN relay's shared secret, the seed of the account CA's Ed25519 key and the TSIG key
  between the rendezvous front and the zone's primary (:func:`derive_tsig_key`, :func:`derive_psk`,
  :func:`derive_turn_secret`, :func:`derive_account_ca_seed`, :func:`derive_front_key`);
- each completed Noise handshake gives two 32-byte traffic keys (``HandshakeState.split_keys()``), and
  each of those gives the KEYMAT of one ESP security association (:func:`derive_esp_keymat`).

Every derivation uses HKDF-SHA256 with no salt (RFC 5869 §2.2: a string of HashLen zero bytes) and a
distinct ``info`` label beginning ``tunneld v1``, so no two purposes can ever share a key, and a future
change of construction can bump the version without colliding with this one. The exact byte strings and
test vectors are in docs/protocol.md ("Key derivation"); changing any of them breaks interoperability
between devices.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "ACCOUNT_CA_INFO_PREFIX",
    "ACCOUNT_CA_SEED_LEN",
    "ACCOUNT_SECRET_LEN",
    "ESP_DIRECTIONS",
    "ESP_INFO_PREFIX",
    "ESP_KEY_LENGTHS",
    "ESP_SALT_LEN",
    "FRONT_INFO_PREFIX",
    "FRONT_KEY_LEN",
    "PSK_INFO_PREFIX",
    "PSK_LEN",
    "TRAFFIC_KEY_LEN",
    "TSIG_INFO_PREFIX",
    "TSIG_KEY_LEN",
    "TURN_INFO_PREFIX",
    "TURN_SECRET_LEN",
    "derive_account_ca_seed",
    "derive_esp_keymat",
    "derive_front_key",
    "derive_psk",
    "derive_tsig_key",
    "derive_turn_secret",
    "normalize_domain",
]

TSIG_INFO_PREFIX: Final = b"tunneld v1 tsig hmac-sha256 "
"""HKDF info prefix for the TSIG (RFC 8945) hmac-sha256 key; the normalized account domain follows."""

PSK_INFO_PREFIX: Final = b"tunneld v1 handshake psk "
"""HKDF info prefix for the Noise IKpsk2 pre-shared key; the normalized account domain follows."""

TURN_INFO_PREFIX: Final = b"tunneld v1 turn rest secret "
"""HKDF info prefix for the TURN REST shared secret (coturn's static-auth-secret); the domain follows."""

ACCOUNT_CA_INFO_PREFIX: Final = b"tunneld v1 account ca ed25519 "
"""HKDF info prefix for the account CA's Ed25519 seed (RFC 8032 §5.1.5); the normalized domain follows."""

FRONT_INFO_PREFIX: Final = b"tunneld v1 front tsig "
"""HKDF info prefix for the front's TSIG hmac-sha256 key with the zone's primary (key name
``front.<domain>.``); the normalized account domain follows."""

ESP_INFO_PREFIX: Final = b"tunneld v1 esp "
"""HKDF info prefix for ESP KEYMAT; ``<suite> <direction>`` follows, e.g. ``aes-256-gcm i2r``."""

ACCOUNT_SECRET_LEN: Final = 32
"""Length of the account secret shared by a user's devices."""
TSIG_KEY_LEN: Final = 32
"""Length of the derived TSIG hmac-sha256 key (SHA-256's output length, RFC 8945 §6)."""
PSK_LEN: Final = 32
"""Length of the Noise pre-shared key (Noise rev 34 §9: always 32 bytes)."""
TURN_SECRET_LEN: Final = 32
"""Bytes of HKDF output behind the TURN secret (its text is their 64 lower-case hex digits)."""
FRONT_KEY_LEN: Final = 32
"""Length of the front's TSIG hmac-sha256 key (SHA-256's output length, RFC 8945 §6)."""
ACCOUNT_CA_SEED_LEN: Final = 32
"""Length of an Ed25519 private key (its seed, RFC 8032 §5.1.5)."""
TRAFFIC_KEY_LEN: Final = 32
"""Length of each Noise split key that ESP keys are derived from."""
ESP_SALT_LEN: Final = 4
"""Salt length for both AES-GCM (RFC 4106 §8.1) and ChaCha20-Poly1305 (RFC 7634 §2) in ESP."""

ESP_KEY_LENGTHS: Final[Mapping[str, int]] = MappingProxyType(
    {"aes-128-gcm": 16, "aes-256-gcm": 32, "chacha20-poly1305": 32}
)
"""ESP suites by name, with their cipher key length in bytes (the salt comes on top)."""

ESP_DIRECTIONS: Final = frozenset({"i2r", "r2i"})
"""Traffic directions: initiator to responder and responder to initiator (the Noise split order)."""

_MAX_NAME = 253
_MAX_LABEL = 63
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\Z")  # RFC 1123 §2.1, lower case (normalized)


def normalize_domain(domain: str) -> str:
    """The canonical spelling of an account domain, as it enters every label.

    Lower-cased (ASCII only: DNS compares names case-insensitively, RFC 4343) and without the one trailing
    dot of an absolute name, so ``Example.COM.`` and ``example.com`` give the same keys. Internationalised
    names must already be in their ASCII (punycode) form. Empty names, empty labels, labels over 63 bytes
    and names over 253 bytes are rejected with ValueError (RFC 1035 §2.3.4 limits), and so is every label
    that is not LDH (letters, digits, inner hyphens: RFC 1123 §2.1), so the name is safe to write into a
    BIND stanza or a TOML file. Underscore labels are ours alone (``_dns-update._udp``), never a domain's.
    """
    if not domain.isascii():
        raise ValueError("domain must be ASCII (use the punycode form of an internationalised name)")
    name = domain.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("domain is empty")
    if len(name) > _MAX_NAME:
        raise ValueError(f"domain is longer than {_MAX_NAME} characters")
    for label in name.split("."):
        if not label:
            raise ValueError("domain has an empty label")
        if len(label) > _MAX_LABEL:
            raise ValueError(f"domain has a label longer than {_MAX_LABEL} characters")
        if not _LDH_LABEL.match(label):
            raise ValueError("domain labels may hold only letters, digits and hyphens, not at either end")
    return name


def _hkdf_sha256(ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def _check_len(value: bytes, expected: int, what: str) -> None:
    # Name the length only; the value itself is secret.
    if len(value) != expected:
        raise ValueError(f"{what} must be {expected} bytes, got {len(value)}")


def derive_tsig_key(secret: bytes, domain: str) -> bytes:
    """The 32-byte TSIG hmac-sha256 key for the account (key name = the domain).

    ``HKDF-SHA256(ikm=secret, salt=none, info=TSIG_INFO_PREFIX + domain, L=32)``.
    """
    _check_len(secret, ACCOUNT_SECRET_LEN, "account secret")
    info = TSIG_INFO_PREFIX + normalize_domain(domain).encode("ascii")
    return _hkdf_sha256(secret, info, TSIG_KEY_LEN)


def derive_psk(secret: bytes, domain: str) -> bytes:
    """The 32-byte Noise IKpsk2 pre-shared key for the account.

    ``HKDF-SHA256(ikm=secret, salt=none, info=PSK_INFO_PREFIX + domain, L=32)``. Only devices holding the
    account secret can complete a handshake, on top of knowing each other's static keys.
    """
    _check_len(secret, ACCOUNT_SECRET_LEN, "account secret")
    info = PSK_INFO_PREFIX + normalize_domain(domain).encode("ascii")
    return _hkdf_sha256(secret, info, PSK_LEN)


def derive_turn_secret(secret: bytes, domain: str) -> str:
    """The account's TURN REST shared secret: what coturn's ``static-auth-secret`` holds (printed by
    ``tunneld account new``), and, as ASCII bytes, the HMAC-SHA1 key of the relay credentials.

    ``hex(HKDF-SHA256(ikm=secret, salt=none, info=TURN_INFO_PREFIX + domain, L=32))``: hex, because the
    relay's configuration takes the secret as text and uses that text itself as the key. A relay operator
    holding it can mint relay credentials, nothing more: the TSIG key and the PSK stay out of reach.
    """
    _check_len(secret, ACCOUNT_SECRET_LEN, "account secret")
    info = TURN_INFO_PREFIX + normalize_domain(domain).encode("ascii")
    return _hkdf_sha256(secret, info, TURN_SECRET_LEN).hex()


def derive_account_ca_seed(secret: bytes, domain: str) -> bytes:
    """The 32-byte Ed25519 seed of the account CA's key (tunneld.accountca builds the certificate).

    ``HKDF-SHA256(ikm=secret, salt=none, info=ACCOUNT_CA_INFO_PREFIX + domain, L=32)``. Every device holding
    the secret derives the same key, and the key reveals nothing of the TSIG key or the PSK.
    """
    _check_len(secret, ACCOUNT_SECRET_LEN, "account secret")
    info = ACCOUNT_CA_INFO_PREFIX + normalize_domain(domain).encode("ascii")
    return _hkdf_sha256(secret, info, ACCOUNT_CA_SEED_LEN)


def derive_front_key(secret: bytes, domain: str) -> bytes:
    """The 32-byte TSIG hmac-sha256 key between the rendezvous front and the zone's primary (key name
    ``front.<domain>.``): the front's UPDATEs, the primary's NOTIFYs and every zone transfer are signed
    with it.

    ``HKDF-SHA256(ikm=secret, salt=none, info=FRONT_INFO_PREFIX + domain, L=32)``. Derived rather than
    random so that ``tunneld account new`` can print every stanza from the secret alone; a device's key
    (:func:`derive_tsig_key`) cannot update the primary, and this one reveals nothing of it.
    """
    _check_len(secret, ACCOUNT_SECRET_LEN, "account secret")
    info = FRONT_INFO_PREFIX + normalize_domain(domain).encode("ascii")
    return _hkdf_sha256(secret, info, FRONT_KEY_LEN)


def derive_esp_keymat(traffic_key: bytes, suite: str, direction: str) -> tuple[bytes, bytes]:
    """(key, salt) for one ESP SA from one Noise split key.

    ``KEYMAT = HKDF-SHA256(ikm=traffic_key, salt=none, info=ESP_INFO_PREFIX + suite + " " + direction,
    L=keylen + 4)``; the key is the first ``keylen`` bytes and the salt the last 4, the layout of RFC 4106
    §8.1 (AES-GCM) and RFC 7634 §2 (ChaCha20-Poly1305), so the pair can be handed to Linux xfrm or any
    other ESP implementation as one KEYMAT blob. ``traffic_key`` is ``split_keys()[0]`` for "i2r" and
    ``split_keys()[1]`` for "r2i"; the direction is in the label as well so that a mix-up of the two keys
    still cannot produce the same SA keys in both directions.
    """
    _check_len(traffic_key, TRAFFIC_KEY_LEN, "traffic key")
    keylen = ESP_KEY_LENGTHS.get(suite)
    if keylen is None:
        raise ValueError(f"unknown ESP suite {suite!r}; expected one of {sorted(ESP_KEY_LENGTHS)}")
    if direction not in ESP_DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected 'i2r' or 'r2i'")
    info = ESP_INFO_PREFIX + suite.encode("ascii") + b" " + direction.encode("ascii")
    keymat = _hkdf_sha256(traffic_key, info, keylen + ESP_SALT_LEN)
    return keymat[:keylen], keymat[keylen:]
