"""tunneld.crypto.noise.dh against the Wycheproof X25519 vectors (tests/data/wycheproof_x25519_test.json).

Every case with a non-zero expected secret must be computed exactly, "valid" and "acceptable" alike
(twist points, non-canonical encodings); every case whose expected secret is all zero (low-order public
keys, RFC 7748 §6.1) must raise NoiseError instead of returning it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tunneld.crypto.noise import NoiseError, dh, generate_keypair, public_key

DATA = Path(__file__).resolve().parent.parent / "data" / "wycheproof_x25519_test.json"


def _load() -> list[dict[str, Any]]:
    doc = json.loads(DATA.read_text())
    assert doc["algorithm"] == "XDH"
    cases: list[dict[str, Any]] = []
    for group in doc["testGroups"]:
        assert group["curve"] == "curve25519"
        cases.extend(group["tests"])
    assert len(cases) == doc["numberOfTests"]
    return cases


CASES = _load()
ZERO = bytes(32)


def _id(case: dict[str, Any]) -> str:
    return f"tc{case['tcId']}-{case['result']}-{'+'.join(case['flags'])}"


def test_vector_file_has_both_kinds_of_case() -> None:
    results = {c["result"] for c in CASES}
    assert results <= {"valid", "acceptable"}, "an 'invalid' case would need its own rule here"
    assert sum(bytes.fromhex(c["shared"]) == ZERO for c in CASES) >= 10
    assert sum(c["result"] == "valid" for c in CASES) >= 200


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_wycheproof(case: dict[str, Any]) -> None:
    private = bytes.fromhex(case["private"])
    public = bytes.fromhex(case["public"])
    shared = bytes.fromhex(case["shared"])
    if shared == ZERO:
        with pytest.raises(NoiseError):
            dh(private, public)
    else:
        assert dh(private, public) == shared


@pytest.mark.parametrize(("priv_len", "pub_len"), [(31, 32), (32, 31), (33, 32), (32, 33), (0, 0)])
def test_wrong_key_lengths(priv_len: int, pub_len: int) -> None:
    with pytest.raises(NoiseError):
        dh(bytes([9]) * priv_len, bytes([9]) * pub_len)


def test_generated_keys_agree() -> None:
    a_priv, a_pub = generate_keypair()
    b_priv, b_pub = generate_keypair()
    assert public_key(a_priv) == a_pub
    assert dh(a_priv, b_pub) == dh(b_priv, a_pub)
    # Stored clamped (RFC 7748 §5).
    assert a_priv[0] & 7 == 0
    assert a_priv[31] & 0xC0 == 0x40


def test_rfc7748_section_6_1() -> None:
    # The Diffie-Hellman example of RFC 7748 §6.1.
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    alice_pub = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    bob_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert public_key(alice) == alice_pub
    assert public_key(bob) == bob_pub
    assert dh(alice, bob_pub) == shared
    assert dh(bob, alice_pub) == shared
