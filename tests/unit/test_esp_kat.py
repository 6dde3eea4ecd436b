"""tunneld.crypto.esp.SecurityAssociation against published whole-packet ESP known answers.

tests/data/esp_known_answers.json holds RFC 7634 Appendix A (ChaCha20-Poly1305) and three
draft-mcgrew-gcm-test-01 cases (AES-GCM, two of them with extended sequence numbers); provenance in
tests/data/SOURCES.md. Each case gives key, salt, SPI, sequence number, IV, the ESP plaintext
(payload || padding || pad length || next header) and ciphertext || ICV; the packet on the wire is
SPI | seq_lo | IV | ciphertext || ICV (RFC 4303 §2, RFC 4106 §3).

The last test pins the worked example printed in docs/protocol.md.
"""

from __future__ import annotations

import ipaddress
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tunneld.crypto.aead import AEAD
from tunneld.crypto.esp import NH_IPV6, ESPError, SecurityAssociation

DATA = Path(__file__).resolve().parent.parent / "data"
DOCS = Path(__file__).resolve().parent.parent.parent / "docs"
_DOC = json.loads((DATA / "esp_known_answers.json").read_text(encoding="utf-8"))
CASES = _DOC["cases"]
IDS = ["rfc7634-appendix-a", "mcgrew-case2", "mcgrew-case1-esn", "mcgrew-aes256-esn"]


def test_case_count() -> None:
    # Four cases in the file; guards against a parse change that would parametrize over nothing.
    assert len(CASES) == len(IDS) == 4
    assert [c["aead"] for c in CASES] == ["chacha20-poly1305", "aes-128-gcm", "aes-128-gcm", "aes-256-gcm"]


def _wire(c: dict[str, Any]) -> bytes:
    return (struct.pack("!II", c["spi"], c["seq_lo"]) + bytes.fromhex(c["iv"])
            + bytes.fromhex(c["ciphertext_and_icv"]))


def _receiver(c: dict[str, Any]) -> SecurityAssociation:
    esn = c["seq_hi"] is not None
    sa = SecurityAssociation(c["spi"], bytes.fromhex(c["key"]), bytes.fromhex(c["salt"]),
                             aead=c["aead"], esn=esn)
    if esn:
        # With ESN only the low 32 bits of the sequence number are on the wire; the high half is never
        # sent and the receiver infers it from where its replay window is (RFC 4303 §2.2.1 and
        # Appendix A2). A fresh SA's window sits at 0, so it would infer seq_hi = 0 and the ICV check
        # would fail. Pretend the packet just before this one was received: then inference yields the
        # case's seq_hi (for mcgrew case 1, seq_lo = 0, this is the step over a 2^32 boundary).
        full = (c["seq_hi"] << 32) | c["seq_lo"]
        if full - 1 > 0:
            sa.replay.top = full - 1
        assert sa.replay.infer(c["seq_lo"]) == full
    return sa


def _expected_payload(plaintext: bytes) -> bytes:
    pad_len = plaintext[-2]
    # The default padding is 1, 2, 3, ... (RFC 4303 §2.4); all four cases use it, which our receiver checks.
    assert plaintext[len(plaintext) - 2 - pad_len:-2] == bytes(range(1, pad_len + 1))
    return plaintext[: len(plaintext) - 2 - pad_len]


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_open(c: dict[str, Any]) -> None:
    plaintext = bytes.fromhex(c["plaintext"])
    sa = _receiver(c)
    nh, payload = sa.open(_wire(c))
    assert payload == _expected_payload(plaintext)
    if c["name"].startswith("RFC 7634"):
        # Only RFC 7634's packet has a meaningful next header (4, an IPv4 packet); the McGrew draft's
        # trailers do not always carry a sensible one, so we do not assert on theirs (see "about").
        assert nh == 4
    assert sa.rx_dropped == 0


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_open_many_agrees(c: dict[str, Any]) -> None:
    # The batch receive path inlines the replay logic; it must accept the same packet. It filters on
    # the next header, so it is given the one the trailer carries (this asserts nothing about its value).
    plaintext = bytes.fromhex(c["plaintext"])
    sa = _receiver(c)
    assert sa.open_many([_wire(c)], next_header=plaintext[-1]) == [_expected_payload(plaintext)]
    assert sa.rx_dropped == 0


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_aead_seal_reproduces_ciphertext(c: dict[str, Any]) -> None:
    # RFC 4106 §5 (and RFC 7634 §2.1, which reuses it): AAD = SPI || seq, or SPI || seq_hi || seq_lo
    # with ESN. Built here from the case fields, not with tunneld.crypto.esp's own structs.
    if c["seq_hi"] is None:
        aad = struct.pack("!II", c["spi"], c["seq_lo"])
    else:
        aad = struct.pack("!III", c["spi"], c["seq_hi"], c["seq_lo"])
    aead = AEAD(c["aead"], bytes.fromhex(c["key"]), bytes.fromhex(c["salt"]))
    iv = int.from_bytes(bytes.fromhex(c["iv"]), "big")
    ct_icv = bytes.fromhex(c["ciphertext_and_icv"])
    assert aead.seal(iv, bytes.fromhex(c["plaintext"]), aad) == ct_icv
    assert aead.open(iv, ct_icv, aad) == bytes.fromhex(c["plaintext"])


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_flipped_bit_rejected(c: dict[str, Any]) -> None:
    # One flipped bit anywhere (SPI, seq, IV, ciphertext, ICV) must be refused, and refusing it must
    # leave the replay window as it was (RFC 4303 §3.4.3: mark the window only after the ICV verified).
    wire = _wire(c)
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 1 << (i % 8)
        sa = _receiver(c)
        before = sa.replay.snapshot()
        with pytest.raises(ESPError):
            sa.open(bytes(bad))
        assert sa.replay.snapshot() == before, f"byte {i}"
        assert sa.rx_dropped == 1


# -- the worked example in docs/protocol.md -------------------------------------------------------

DOC_KEY = bytes(range(32))
DOC_SALT = bytes.fromhex("a0a1a2a3")
DOC_SPI = 0x1000
DOC_SEQ = (1 << 32) + 1
# A minimal IPv6 header: version 6, payload length 0, next header 59 (none), hop limit 64, fd00::1 -> fd00::2.
DOC_INNER = (bytes.fromhex("6000000000003b40") + ipaddress.IPv6Address("fd00::1").packed
             + ipaddress.IPv6Address("fd00::2").packed)
DOC_WIRE = bytes.fromhex(
    "00001000"  # SPI
    "00000001"  # low 32 bits of the sequence number
    "0000000100000001"  # IV = the whole 64-bit sequence number
    "bc98eba6f75e1fc01531c0cf1d8d2c134f2cb1fdfd114bc9b22ab1db939a31091f217f7d12d2fe076455b7e1"  # ct
    "4bb1a4e14e22dc3d9938eb26c7ac099e"  # ICV
)


def test_protocol_doc_example() -> None:
    sa = SecurityAssociation(DOC_SPI, DOC_KEY, DOC_SALT, aead="aes-256-gcm", esn=True)
    sa.seq = DOC_SEQ - 1  # the last sequence number sent; seal uses the next one
    wire = sa.seal(DOC_INNER, NH_IPV6)
    assert sa.seq == DOC_SEQ
    assert wire == DOC_WIRE

    # The same bytes from the RFCs alone, with cryptography's AESGCM directly: nonce = salt || IV,
    # AAD = SPI || seq_hi || seq_lo, plaintext = inner || 01 02 (pad) || 02 (pad length) || 29 (41, IPv6).
    nonce = DOC_SALT + DOC_SEQ.to_bytes(8, "big")
    aad = struct.pack("!III", DOC_SPI, DOC_SEQ >> 32, DOC_SEQ & 0xFFFFFFFF)
    plaintext = DOC_INNER + bytes.fromhex("01020229")
    assert AESGCM(DOC_KEY).encrypt(nonce, plaintext, aad) == DOC_WIRE[16:]

    # And a receiver whose window already sits in the second 2^32 subspace opens it.
    rx = SecurityAssociation(DOC_SPI, DOC_KEY, DOC_SALT, aead="aes-256-gcm", esn=True)
    rx.replay.top = DOC_SEQ - 1
    assert rx.open(DOC_WIRE) == (NH_IPV6, DOC_INNER)


def _doc_hex_runs(text: str) -> str:
    """The hex that starts each line of the doc's code blocks, concatenated (annotations dropped)."""
    runs = []
    for block in re.findall(r"```\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            first = line.split(maxsplit=1)[0] if line.strip() else ""
            if re.fullmatch(r"(?:[0-9a-f]{2})+", first):
                runs.append(first)
    return "".join(runs)


def test_protocol_doc_shows_this_example() -> None:
    # The example is printed in docs/protocol.md; the exact 76 bytes must appear there.
    docs = [DOCS / "protocol.md"]
    assert any(DOC_WIRE.hex() in _doc_hex_runs(d.read_text(encoding="utf-8")) for d in docs), (
        "no doc under docs/ prints the ESP worked example of test_protocol_doc_example"
    )
