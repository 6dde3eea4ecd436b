"""tunneld.crypto.kdf: HKDF-SHA256 derivations of the TSIG key, the handshake PSK and ESP KEYMAT.

Known answers come from two places that do not share code with tunneld.crypto.kdf: an RFC 5869 HKDF written
inline below from hmac + hashlib (itself checked against RFC 5869 Appendix A), and hex constants that are
also printed in docs/protocol.md for other implementations.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools

import pytest

from tunneld.crypto import kdf
from tunneld.crypto.kdf import (
    ESP_KEY_LENGTHS,
    derive_account_ca_seed,
    derive_esp_keymat,
    derive_front_key,
    derive_psk,
    derive_tsig_key,
    derive_turn_secret,
    normalize_domain,
)
from tunneld.proto.stun_wire import turn_rest_credentials

SECRET = bytes(range(32))
DOMAIN = "Example.COM."
TRAFFIC_KEY = bytes(range(32, 64))


def rfc5869_hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 §2.2 and §2.3, independent of tunneld.crypto.kdf and of cryptography's HKDF."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in itertools.count(1):
        if len(okm) >= length:
            break
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


# --- the inline helper is itself right -------------------------------------------------------------------


def test_inline_hkdf_rfc5869_case_1() -> None:
    okm = rfc5869_hkdf_sha256(
        ikm=bytes([0x0B] * 22),
        salt=bytes.fromhex("000102030405060708090a0b0c"),
        info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        length=42,
    )
    assert okm == bytes.fromhex(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_inline_hkdf_rfc5869_case_3_empty_salt_and_info() -> None:
    # Case 3 is the one that matters here: no salt, i.e. HashLen zero bytes, as every tunneld label uses.
    okm = rfc5869_hkdf_sha256(ikm=bytes([0x0B] * 22), salt=b"", info=b"", length=42)
    assert okm == bytes.fromhex(
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


# --- fixed known answers ---------------------------------------------------------------------------------

TSIG_KEY_HEX = "bcc43fe763c5185b93eb9df2cfcab2be7910643f65c087f27b21a155385da653"
PSK_HEX = "768dde4e452000d5ee0bad8cfef42b9db74f72d138aa586ab3e065ce9acdd3ec"
TURN_SECRET = "08b3277f255f6a01b25a31d6d1a067f9526d5525b2f82215636ed7708c88b82d"
ACCOUNT_CA_SEED_HEX = "4b644e12e185df6e8d6a0268fee2b54f281382691d5c8ca0b46d6144dcafd02e"
FRONT_KEY_HEX = "fd0300cf1789fd0b0fea569ae95ea8f20a1bdba32d6f5904fdd65e3be1ec1f28"
ESP_KEYMAT_HEX = {
    ("aes-128-gcm", "i2r"): ("05634a4017168de4248534499b5d7d4c", "a6c202ba"),
    ("aes-128-gcm", "r2i"): ("b20d680a0d0a53993b0987ea2a1e0a17", "5b8d92cd"),
    ("aes-256-gcm", "i2r"): ("ad25b721bc4fefe8d6ca32dce61268e5d21c46b398cf5c930a3f37f620f42a00", "3d06af46"),
    ("aes-256-gcm", "r2i"): ("e2405d04e367fad58e89d6820ac406c10d79443f6d288ab2ecaa6ab9eadc93d2", "4a8b0bfb"),
    ("chacha20-poly1305", "i2r"): (
        "2ebaf6622891e90ce6780196e82dd0da9af68c5a5181db09f19913d796513fa5",
        "6491fa18",
    ),
    ("chacha20-poly1305", "r2i"): (
        "85c1cd9bc6725cbf8ad2207d4e0df65b63d3b3cd57e7b9f994ecf2efa344ba02",
        "5387ac45",
    ),
}


def test_extract_step_intermediate_values() -> None:
    # The PRKs printed in docs/protocol.md: HMAC-SHA256 keyed with 32 zero bytes (no salt).
    prk_account = hmac.new(bytes(32), SECRET, hashlib.sha256).hexdigest()
    prk_traffic = hmac.new(bytes(32), TRAFFIC_KEY, hashlib.sha256).hexdigest()
    assert prk_account == "46bd320605c5a6b6163ab70bc6345b92a5f908e79fe58979c23ebb47d1a5e307"
    assert prk_traffic == "9724f70a32773a1840904e49bb789f73e0023efea2db9f987f43fc932319b1cb"


def test_tsig_key_known_answer() -> None:
    expected = rfc5869_hkdf_sha256(SECRET, b"", b"tunneld v1 tsig hmac-sha256 example.com", 32)
    assert expected.hex() == TSIG_KEY_HEX
    assert derive_tsig_key(SECRET, DOMAIN) == expected


def test_psk_known_answer() -> None:
    expected = rfc5869_hkdf_sha256(SECRET, b"", b"tunneld v1 handshake psk example.com", 32)
    assert expected.hex() == PSK_HEX
    assert derive_psk(SECRET, DOMAIN) == expected


def test_turn_secret_known_answer_and_its_rest_credentials() -> None:
    expected = rfc5869_hkdf_sha256(SECRET, b"", b"tunneld v1 turn rest secret example.com", 32)
    assert expected.hex() == TURN_SECRET
    assert derive_turn_secret(SECRET, DOMAIN) == TURN_SECRET
    # The vector of docs/protocol.md: coturn's use-auth-secret check, written out from hmac and base64.
    mac = hmac.new(TURN_SECRET.encode("ascii"), b"1700086400:laptop", hashlib.sha1).digest()
    assert base64.b64encode(mac) == b"XUGIx7/ivTVF4PKJw88nynxZveg="
    assert turn_rest_credentials(TURN_SECRET.encode("ascii"), "laptop", 1700086400) == (
        "1700086400:laptop", "XUGIx7/ivTVF4PKJw88nynxZveg=")


def test_account_ca_seed_known_answer() -> None:
    expected = rfc5869_hkdf_sha256(SECRET, b"", b"tunneld v1 account ca ed25519 example.com", 32)
    assert expected.hex() == ACCOUNT_CA_SEED_HEX
    assert derive_account_ca_seed(SECRET, DOMAIN) == expected


def test_front_key_known_answer_and_its_own_label() -> None:
    expected = rfc5869_hkdf_sha256(SECRET, b"", b"tunneld v1 front tsig example.com", 32)
    assert expected.hex() == FRONT_KEY_HEX
    assert derive_front_key(SECRET, DOMAIN) == expected
    assert derive_front_key(SECRET, "example.com") == expected  # normalized like every label
    # Its own label: no other account key equals it.
    others = {derive_tsig_key(SECRET, DOMAIN), derive_psk(SECRET, DOMAIN),
              derive_account_ca_seed(SECRET, DOMAIN), bytes.fromhex(derive_turn_secret(SECRET, DOMAIN))}
    assert expected not in others
    with pytest.raises(ValueError, match="account secret"):
        derive_front_key(SECRET[:31], DOMAIN)
    with pytest.raises(ValueError):
        derive_front_key(SECRET, "a..b")


@pytest.mark.parametrize(("suite", "direction"), sorted(ESP_KEYMAT_HEX), ids="-".join)
def test_esp_keymat_known_answer(suite: str, direction: str) -> None:
    keylen = {"aes-128-gcm": 16, "aes-256-gcm": 32, "chacha20-poly1305": 32}[suite]
    info = f"tunneld v1 esp {suite} {direction}".encode()
    keymat = rfc5869_hkdf_sha256(TRAFFIC_KEY, b"", info, keylen + 4)
    key_hex, salt_hex = ESP_KEYMAT_HEX[(suite, direction)]
    # RFC 4106 §8.1: the key comes first, the 4-byte salt last.
    assert (keymat[:keylen].hex(), keymat[keylen:].hex()) == (key_hex, salt_hex)
    key, salt = derive_esp_keymat(TRAFFIC_KEY, suite, direction)
    assert (key.hex(), salt.hex()) == (key_hex, salt_hex)
    assert len(key) == keylen
    assert len(salt) == 4


def test_every_suite_has_a_known_answer() -> None:
    assert {s for s, _ in ESP_KEYMAT_HEX} == set(ESP_KEY_LENGTHS)


def test_labels_are_the_documented_byte_strings() -> None:
    assert kdf.TSIG_INFO_PREFIX == b"tunneld v1 tsig hmac-sha256 "
    assert kdf.PSK_INFO_PREFIX == b"tunneld v1 handshake psk "
    assert kdf.TURN_INFO_PREFIX == b"tunneld v1 turn rest secret "
    assert kdf.ESP_INFO_PREFIX == b"tunneld v1 esp "
    assert kdf.ACCOUNT_CA_INFO_PREFIX == b"tunneld v1 account ca ed25519 "
    assert kdf.ACCOUNT_SECRET_LEN == 32


# --- separation ------------------------------------------------------------------------------------------


def test_distinct_labels_give_distinct_outputs() -> None:
    outputs = [derive_tsig_key(SECRET, DOMAIN), derive_psk(SECRET, DOMAIN),
               bytes.fromhex(derive_turn_secret(SECRET, DOMAIN)), derive_account_ca_seed(SECRET, DOMAIN)]
    for suite, direction in ESP_KEYMAT_HEX:
        key, salt = derive_esp_keymat(TRAFFIC_KEY, suite, direction)
        outputs.append(key + salt)
    # Also the ESP derivation from the secret itself must not collide with the account derivations.
    outputs.append(b"".join(derive_esp_keymat(SECRET, "aes-256-gcm", "i2r")))
    assert len({o[:16] for o in outputs}) == len(outputs)


def test_aes128_key_is_not_a_prefix_of_aes256_key() -> None:
    # The suite is in the label, so shorter keys are not truncations of longer ones.
    k128, _ = derive_esp_keymat(TRAFFIC_KEY, "aes-128-gcm", "i2r")
    k256, _ = derive_esp_keymat(TRAFFIC_KEY, "aes-256-gcm", "i2r")
    assert k256[:16] != k128


def test_different_domains_and_secrets_give_different_keys() -> None:
    assert derive_psk(SECRET, "example.com") != derive_psk(SECRET, "example.org")
    assert derive_tsig_key(SECRET, "example.com") != derive_tsig_key(bytes(32), "example.com")


# --- domain normalization --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("Example.COM.", "example.com"),
        ("example.com", "example.com"),
        ("EXAMPLE.COM", "example.com"),
        ("home.Example.com.", "home.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_normalize_domain(given: str, normal: str) -> None:
    assert normalize_domain(given) == normal


def test_spellings_of_one_domain_derive_the_same_keys() -> None:
    assert derive_psk(SECRET, "Example.COM.") == derive_psk(SECRET, "example.com")
    assert derive_tsig_key(SECRET, "EXAMPLE.com") == derive_tsig_key(SECRET, "example.com.")


def test_longest_name_is_accepted() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name) == 253
    assert normalize_domain(name + ".") == name


BAD_DOMAINS = {
    "empty": "",
    "root": ".",
    "two-trailing-dots": "example.com..",
    "empty-label": "a..b",
    "leading-dot": ".example.com",
    "label-64": "a" * 64 + ".com",
    "name-254": ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62]),
    "non-ascii": "bücher.example",
}


@pytest.mark.parametrize("bad", BAD_DOMAINS.values(), ids=BAD_DOMAINS.keys())
def test_normalize_domain_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_domain(bad)
    with pytest.raises(ValueError):
        derive_psk(SECRET, bad)


# --- wrong lengths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_wrong_secret_length_rejected_without_leaking_it(length: int) -> None:
    secret = bytes([0xA5]) * length
    for derive in (derive_tsig_key, derive_psk):
        with pytest.raises(ValueError) as info:
            derive(secret, "example.com")
        message = str(info.value)
        assert "a5a5" not in message.lower()
        assert repr(secret) not in message
        assert str(length) in message


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_wrong_traffic_key_length_rejected(length: int) -> None:
    key = bytes([0x5A]) * length
    with pytest.raises(ValueError) as info:
        derive_esp_keymat(key, "aes-256-gcm", "i2r")
    assert "5a5a" not in str(info.value).lower()
    assert repr(key) not in str(info.value)


@pytest.mark.parametrize(
    ("suite", "direction"),
    [("aes-192-gcm", "i2r"), ("AES-256-GCM", "i2r"), ("aes-256-gcm", "both"), ("aes-256-gcm", "I2R")],
)
def test_unknown_suite_or_direction_rejected(suite: str, direction: str) -> None:
    with pytest.raises(ValueError):
        derive_esp_keymat(TRAFFIC_KEY, suite, direction)
