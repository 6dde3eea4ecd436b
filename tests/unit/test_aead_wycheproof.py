"""tunneld.crypto.aead.AEAD against Project Wycheproof's AES-GCM and ChaCha20-Poly1305 vectors.

Only the groups that ESP can use are run: a 96-bit nonce (ivSize 96) and, for AES-GCM, 128- or 256-bit
keys (the "aes-128-gcm"/"aes-256-gcm" suites; 192-bit keys are not offered). The 12-byte Wycheproof
nonce maps onto ESP's salt(4) || explicit IV(8) (RFC 4106 §4, RFC 7634 §2), so each vector is fed in
the way an ESP packet would be: salt = iv[:4], IV = int(iv[4:]).

Data: tests/data/wycheproof_*_test.json, copied byte for byte from C2SP/wycheproof (Apache-2.0,
tests/data/LICENSE.wycheproof; provenance in tests/data/SOURCES.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tunneld.crypto.aead import AEAD, ICV_LEN, AEADError

DATA = Path(__file__).resolve().parent.parent / "data"

# (short name used in test ids, file, "algorithm" field, keySize in bits -> our suite)
SOURCES = (
    ("aes-gcm", "wycheproof_aes_gcm_test.json", "AES-GCM", {128: "aes-128-gcm", 256: "aes-256-gcm"}),
    ("chacha20-poly1305", "wycheproof_chacha20_poly1305_test.json", "CHACHA20-POLY1305",
     {256: "chacha20-poly1305"}),
)

# What the files hold in the selected groups, counted once by hand from the JSON and written down here,
# so that a loader mistake (wrong field name, wrong unit for ivSize, ...) cannot silently run nothing.
# AES-GCM: the ivSize 96 / keySize 128 group has 67 tests, the ivSize 96 / keySize 256 group 66.
# ChaCha20-Poly1305: one ivSize 96 / keySize 256 group of 316 tests (the other 9 tests have bad nonces).
EXPECTED_COUNTS = {"aes-gcm": 133, "chacha20-poly1305": 316}

# Every "invalid" vector in the selected groups is a decryption-side one: a valid (key, nonce) with a
# corrupted tag. Wycheproof also has encryption-side invalid cases (bad nonce sizes: "InvalidNonceSize",
# "ZeroLengthIv", ...), but all of those live in groups with ivSize != 96, which ESP cannot express and
# which are not selected. If a newer data file ever put another kind of invalid case into these groups,
# test_invalid_cases_are_decryption_side fails, instead of this module guessing what to do with it.
DECRYPT_SIDE_INVALID_FLAGS = frozenset({"ModifiedTag"})


def _load() -> tuple[list[Any], dict[str, int]]:
    cases: list[Any] = []
    counts: dict[str, int] = {}
    for short, filename, algorithm, suites in SOURCES:
        doc = json.loads((DATA / filename).read_text(encoding="utf-8"))
        assert doc["algorithm"] == algorithm, filename
        assert sum(len(g["tests"]) for g in doc["testGroups"]) == doc["numberOfTests"], filename
        counts[short] = 0
        for group in doc["testGroups"]:
            if group["type"] != "AeadTest" or group["ivSize"] != 96 or group["keySize"] not in suites:
                continue
            assert group["tagSize"] == 8 * ICV_LEN, group
            suite = suites[group["keySize"]]
            for t in group["tests"]:
                counts[short] += 1
                cases.append(pytest.param(suite, t, id=f"{short}-tc{t['tcId']}"))
    return cases, counts


CASES, COUNTS = _load()
VALID = [c for c in CASES if c.values[1]["result"] == "valid"]
INVALID = [c for c in CASES if c.values[1]["result"] == "invalid"]


def _split(t: dict[str, Any]) -> tuple[bytes, bytes, int, bytes, bytes, bytes]:
    key = bytes.fromhex(t["key"])
    nonce = bytes.fromhex(t["iv"])
    assert len(nonce) == 12
    return (key, nonce[:4], int.from_bytes(nonce[4:], "big"), bytes.fromhex(t["aad"]),
            bytes.fromhex(t["msg"]), bytes.fromhex(t["ct"]) + bytes.fromhex(t["tag"]))


def test_case_counts() -> None:
    assert COUNTS == EXPECTED_COUNTS
    assert len(CASES) == sum(EXPECTED_COUNTS.values())
    # Every case is either valid or invalid: the selected groups hold no "acceptable" results.
    assert len(VALID) + len(INVALID) == len(CASES)
    assert len({c.id for c in CASES}) == len(CASES)


def test_invalid_cases_are_decryption_side() -> None:
    for c in INVALID:
        assert set(c.values[1]["flags"]) <= DECRYPT_SIDE_INVALID_FLAGS, c.id


@pytest.mark.parametrize(("suite", "t"), VALID)
def test_valid(suite: str, t: dict[str, Any]) -> None:
    key, salt, iv, aad, msg, ct_tag = _split(t)
    aead = AEAD(suite, key, salt)
    assert aead.nonce(iv) == bytes.fromhex(t["iv"])
    assert aead.seal(iv, msg, aad) == ct_tag
    assert aead.open(iv, ct_tag, aad) == msg


@pytest.mark.parametrize(("suite", "t"), INVALID)
def test_invalid(suite: str, t: dict[str, Any]) -> None:
    key, salt, iv, aad, msg, ct_tag = _split(t)
    aead = AEAD(suite, key, salt)
    with pytest.raises(AEADError):
        aead.open(iv, ct_tag, aad)
    # The vector really is "right ciphertext, wrong tag": sealing msg reproduces the ciphertext but
    # not the tag. So the rejection above is the tag check at work, not some other failure.
    sealed = aead.seal(iv, msg, aad)
    assert sealed[:-ICV_LEN] == ct_tag[:-ICV_LEN]
    assert sealed[-ICV_LEN:] != ct_tag[-ICV_LEN:]
