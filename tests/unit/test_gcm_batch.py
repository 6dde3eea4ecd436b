"""The batch AES-GCM extension (tunneld.crypto._gcm) against the `cryptography` path, byte for byte.

The reference is the `cryptography` package's AESGCM, one call per packet, which `seal_run`/`open_run`
use when the extension is not built or `native=False`. Checked: random runs (inner sizes 0..1500, 1..64
packets, 128- and 256-bit keys, ESN on and off) sealed and opened both ways; a flipped bit in any packet
is caught and the failing packet named; the published known answers (Wycheproof AES-GCM, the McGrew
draft's ESP cases; tests/data/SOURCES.md); hostile input to `open_run` (hypothesis).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.crypto.esp import HEADER_LEN, ICV_LEN, NATIVE_GCM, SecurityAssociation, lay_out, trailer

if NATIVE_GCM:
    from tunneld.crypto._gcm import GCM

DATA = Path(__file__).resolve().parent.parent / "data"
SUITES = ("aes-128-gcm", "aes-256-gcm")


pytestmark = pytest.mark.skipif(not NATIVE_GCM, reason="tunneld.crypto._gcm is not built")


def _pair(suite: str, rng: random.Random) -> tuple[bytes, bytes]:
    key_len = 16 if suite == "aes-128-gcm" else 32
    return rng.randbytes(key_len), rng.randbytes(4)


def _sa(suite: str, key: bytes, salt: bytes, esn: bool, native: bool, seq: int = 0) -> SecurityAssociation:
    s = SecurityAssociation(0x1000, key, salt, aead=suite, esn=esn, native=native)
    s.seq = seq
    s.replay.top = seq
    return s


def _packets(arena: memoryview, stride: int, lengths: list[int]) -> list[bytes]:
    return [bytes(arena[i * stride:i * stride + n]) for i, n in enumerate(lengths)]


def _random_runs(seed: int, count: int) -> list[tuple[str, bool, int, int, int, int]]:
    rng = random.Random(seed)
    return [(rng.choice(SUITES), rng.random() < 0.5, rng.randint(0, 1500), rng.randint(1, 64),
             rng.randint(0, 1500), rng.choice((0, 1, (1 << 32) - 5, (1 << 40) + 3)))
            for _ in range(count)]


@pytest.mark.parametrize(("suite", "esn", "size", "count", "last", "seq"), _random_runs(16, 40))
def test_seal_run_and_open_run_match_reference(suite: str, esn: bool, size: int, count: int, last: int,
                                               seq: int) -> None:
    rng = random.Random(size * 65 + count)
    key, salt = _pair(suite, rng)
    if not esn:
        seq %= 1 << 31
    last = min(last, size)
    inner = [rng.randbytes(size) for _ in range(count - 1)] + [rng.randbytes(last)]
    plaintexts = [p + trailer(len(p)) for p in inner]
    fast, ref = _sa(suite, key, salt, esn, True, seq), _sa(suite, key, salt, esn, False, seq)
    assert fast._gcm is not None and ref._gcm is None
    buf, stride = fast.seal_run(*lay_out(plaintexts))
    want, want_stride = ref.seal_run(*lay_out(plaintexts))
    assert (bytes(buf), stride) == (bytes(want), want_stride)
    assert fast.seq == ref.seq == seq + count
    # Opened both ways: the same packets, the same window afterwards.
    rx_fast, rx_ref = _sa(suite, key, salt, esn, True, seq), _sa(suite, key, salt, esn, False, seq)
    if count == 1:  # a run is at least two datagrams (open_run needs data longer than one size)
        return
    a, b = rx_fast.open_run(bytes(buf), stride), rx_ref.open_run(bytes(buf), stride)
    assert a is not None and b is not None
    assert (a[1], a[2]) == (b[1], b[2])
    assert _packets(a[0], a[1], a[2]) == _packets(b[0], b[1], b[2]) == inner
    assert rx_fast.replay.top == rx_ref.replay.top == seq + count


def _raw_run(rng: random.Random, key_len: int, count: int, aad_len: int) -> tuple[
        bytes, bytes, bytes, list[bytes], list[bytes]]:
    key = rng.randbytes(key_len)
    nonces = rng.randbytes(12 * count)
    aads = rng.randbytes(aad_len * count)
    pts = [rng.randbytes(rng.randint(0, 1500)) for _ in range(count)]
    ctx = AESGCM(key)
    cts = [ctx.encrypt(nonces[12 * i:12 * i + 12], p, aads[aad_len * i:aad_len * (i + 1)] or None)
           for i, p in enumerate(pts)]
    return key, nonces, aads, pts, cts


@pytest.mark.parametrize("seed", range(12))
def test_raw_seal_and_open_match_aesgcm(seed: int) -> None:
    """Unequal lengths, any AAD length up to 16 (ESP uses 8 and 12): the primitive knows nothing of ESP."""
    rng = random.Random(seed)
    count, aad_len = rng.randint(1, 64), rng.choice((0, 8, 12, 16))
    key, nonces, aads, pts, cts = _raw_run(rng, rng.choice((16, 32)), count, aad_len)
    stride, start = 1500 + ICV_LEN + 7, 5
    out = bytearray(start + count * stride)
    GCM(key).seal(nonces, aads, aad_len, pts, out, start, stride)
    assert [bytes(out[start + i * stride:start + i * stride + len(c)]) for i, c in enumerate(cts)] == cts
    # Open from the same arena: each datagram's length is `length`, the last's `last_length`; so that the
    # lengths vary, open each packet as a run of one (and the whole run when the lengths agree).
    gcm = GCM(key)
    for i, c in enumerate(cts):
        dst = bytearray(len(c) - ICV_LEN)
        assert gcm.open(nonces[12 * i:12 * i + 12], aads[aad_len * i:aad_len * (i + 1)], aad_len,
                        out, start + i * stride, stride, len(c), len(c), dst, stride) == -1
        assert bytes(dst) == pts[i]


@pytest.mark.parametrize("seed", range(8))
def test_open_names_the_packet_with_a_flipped_bit(seed: int) -> None:
    rng = random.Random(seed)
    count, length = rng.randint(2, 64), rng.randint(ICV_LEN, 1500)
    key, nonces = rng.randbytes(32), rng.randbytes(12 * count)
    aads = rng.randbytes(12 * count)
    ctx = AESGCM(key)
    data = bytearray(b"".join(ctx.encrypt(nonces[12 * i:12 * i + 12], rng.randbytes(length - ICV_LEN),
                                          aads[12 * i:12 * i + 12]) for i in range(count)))
    gcm = GCM(key)
    out = bytearray(count * length)
    assert gcm.open(nonces, aads, 12, bytes(data), 0, length, length, length, out, length) == -1
    bad = rng.randrange(count)
    bit = rng.randrange(length * 8)
    data[bad * length + bit // 8] ^= 1 << (bit % 8)
    assert gcm.open(nonces, aads, 12, bytes(data), 0, length, length, length, out, length) == bad
    # A wrong AAD (here: the ESN high half, authenticated but never sent) fails the same way.
    wrong = bytearray(aads)
    wrong[12 * bad + 4] ^= 0x80
    data[bad * length + bit // 8] ^= 1 << (bit % 8)
    assert gcm.open(nonces, bytes(wrong), 12, bytes(data), 0, length, length, length, out, length) == bad


def test_open_run_with_a_flipped_bit_changes_nothing() -> None:
    rng = random.Random(7)
    key, salt = rng.randbytes(32), rng.randbytes(4)
    inner = [rng.randbytes(1400) for _ in range(20)]
    ref = _sa("aes-256-gcm", key, salt, True, False)
    buf, size = ref.seal_run(*lay_out([p + trailer(1400) for p in inner]))
    for bad in (0, 9, 19):
        data = bytearray(buf)
        data[bad * size + HEADER_LEN + 100] ^= 4
        for native in (True, False):
            rx = _sa("aes-256-gcm", key, salt, True, native)
            assert rx.open_run(bytes(data), size) is None
            assert rx.replay.top == 0 and rx.rx_auth_fail == 0


def _wycheproof() -> list[Any]:
    doc = json.loads((DATA / "wycheproof_aes_gcm_test.json").read_text(encoding="utf-8"))
    return [t for g in doc["testGroups"] if g["ivSize"] == 96 and g["keySize"] in (128, 256)
            for t in g["tests"]]


def test_wycheproof_aes_gcm() -> None:
    cases = _wycheproof()
    assert len(cases) == 133  # as test_aead_wycheproof.py counts them
    for t in cases:
        key, iv, aad, msg = (bytes.fromhex(t[f]) for f in ("key", "iv", "aad", "msg"))
        wire = bytes.fromhex(t["ct"] + t["tag"])
        gcm = GCM(key)
        if len(aad) > 16:  # ESP AADs are 8 or 12 bytes; the primitive takes at most 16
            with pytest.raises(ValueError):
                gcm.open(iv, aad, len(aad), wire, 0, len(wire), len(wire), len(wire), bytearray(len(msg)), 0)
            continue
        out = bytearray(len(msg))
        failed = gcm.open(iv, aad, len(aad), wire, 0, len(wire), len(wire), len(wire), out, len(msg))
        assert failed == (-1 if t["result"] == "valid" else 0), t["tcId"]
        if t["result"] == "valid":
            assert bytes(out) == msg
            sealed = bytearray(len(wire))
            gcm.seal(iv, aad, len(aad), [msg], sealed, 0, len(wire))
            assert bytes(sealed) == wire, t["tcId"]


def test_esp_known_answers() -> None:
    doc = json.loads((DATA / "esp_known_answers.json").read_text(encoding="utf-8"))
    cases = [c for c in doc["cases"] if c["aead"].startswith("aes-")]
    assert len(cases) == 3
    for c in cases:
        hi = c["seq_hi"]
        aad = (c["spi"].to_bytes(4, "big") + (b"" if hi is None else hi.to_bytes(4, "big"))
               + c["seq_lo"].to_bytes(4, "big"))
        nonce = bytes.fromhex(c["salt"] + c["iv"])
        pt, wire = bytes.fromhex(c["plaintext"]), bytes.fromhex(c["ciphertext_and_icv"])
        gcm = GCM(bytes.fromhex(c["key"]))
        sealed = bytearray(len(wire))
        gcm.seal(nonce, aad, len(aad), [pt], sealed, 0, len(wire))
        assert bytes(sealed) == wire, c["name"]
        out = bytearray(len(pt))
        assert gcm.open(nonce, aad, len(aad), wire, 0, len(wire), len(wire), len(wire), out, len(pt)) == -1
        assert bytes(out) == pt


def test_layouts_that_do_not_fit_are_refused() -> None:
    gcm = GCM(bytes(16))
    nonces = bytes(24)
    with pytest.raises(ValueError):
        GCM(bytes(24))
    with pytest.raises(ValueError):
        gcm.seal(nonces, bytes(16), 8, [b"x" * 10, b"y"], bytearray(40), 0, 20)  # 10+16 > stride 20
    with pytest.raises(ValueError):
        gcm.seal(nonces, bytes(16), 8, [b"x"], bytearray(100), 0, 40)  # one plaintext, two nonces
    with pytest.raises(ValueError):
        gcm.seal(nonces, bytes(15), 8, [b"x", b"y"], bytearray(100), 0, 40)  # AADs short
    with pytest.raises(ValueError):
        gcm.seal(bytes(13), bytes(8), 8, [b"x"], bytearray(100), 0, 40)  # not whole nonces
    with pytest.raises(ValueError):
        gcm.open(nonces, bytes(16), 8, bytes(60), 0, 30, 30, 31, bytearray(100), 14)  # past data
    with pytest.raises(ValueError):
        gcm.open(nonces, bytes(16), 8, bytes(60), 0, 30, 30, 30, bytearray(27), 14)  # past out
    with pytest.raises(ValueError):
        gcm.open(nonces, bytes(16), 8, bytes(60), 0, 30, 15, 15, bytearray(100), 14)  # shorter than a tag
    with pytest.raises(TypeError):
        gcm.seal(nonces, bytes(16), 8, [b"x", b"y"], b"read-only" * 10, 0, 40)
    with pytest.raises(ValueError, match="without a key"):
        GCM.__new__(GCM).seal(nonces, bytes(16), 8, [b"x", b"y"], bytearray(100), 0, 40)


_KEY, _SALT = bytes(range(16)), b"\xa0\xa1\xa2\xa3"
_GOOD, _SIZE = _sa("aes-128-gcm", _KEY, _SALT, True, False).seal_run(
    *lay_out([bytes(1200) + trailer(1200)] * 8))


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=0, max_size=4000), st.integers(0, 1600))
def test_open_run_on_hostile_input_agrees_with_reference(data: bytes, size: int) -> None:
    a = _sa("aes-128-gcm", _KEY, _SALT, True, True).open_run(data, size)
    b = _sa("aes-128-gcm", _KEY, _SALT, True, False).open_run(data, size)
    assert (a is None) == (b is None)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_GOOD) - 1), st.integers(1, 255)), max_size=3),
       st.integers(0, 3 * _SIZE))
def test_open_run_on_a_tampered_run_agrees_with_reference(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_GOOD)
    for at, x in flips:
        data[at] ^= x
    wire = bytes(data[:len(data) - cut])
    fast, ref = _sa("aes-128-gcm", _KEY, _SALT, True, True), _sa("aes-128-gcm", _KEY, _SALT, True, False)
    a, b = fast.open_run(wire, _SIZE), ref.open_run(wire, _SIZE)
    assert (a is None) == (b is None)
    if a is not None and b is not None:
        assert _packets(a[0], a[1], a[2]) == _packets(b[0], b[1], b[2])
    assert (fast.replay.top, fast.rx_dropped) == (ref.replay.top, ref.rx_dropped)
    if not flips and cut == 0:
        assert a is not None and np.frombuffer(a[0], np.uint8)[:1200].sum() == 0


@pytest.mark.parametrize("esn", [False, True])
def test_a_batch_sealed_run_opens_in_scapy(esn: bool) -> None:
    """ESP on the wire stays standard: every datagram of a run sealed by the extension opens with an
    independent implementation (scapy), across the 2^32 boundary with ESN."""
    ipsec = pytest.importorskip("scapy.layers.ipsec")
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6

    key, salt, spi = bytes(range(32)), bytes.fromhex("a0a1a2a3"), 0xC0DE
    tx = SecurityAssociation(spi, key, salt, esn=esn)
    assert tx._gcm is not None
    tx.seq = (1 << 32) - 3 if esn else 7
    inner = [bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1000 + i, dport=22)) + bytes(60)
             for i in range(6)]
    buf, size = tx.seal_run(*lay_out([p + trailer(len(p)) for p in inner]))
    rx = ipsec.SecurityAssociation(ipsec.ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=key + salt,
                                   auth_algo="NULL", tunnel_header=IP(src="203.0.113.1", dst="203.0.113.2"),
                                   nat_t_header=UDP(sport=4500, dport=4500), esn_en=esn)
    first = tx.seq - len(inner) + 1
    for i, p in enumerate(inner):
        wire = bytes(buf[i * size:(i + 1) * size])
        datagram = bytes(IP(src="203.0.113.2", dst="203.0.113.1") / UDP(sport=4500, dport=4500) / wire)
        opened = rx.decrypt(IP(datagram), esn=(first + i) >> 32)
        assert isinstance(opened, IPv6) and bytes(opened) == p


def test_without_the_extension_the_reference_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the extension is not built, esp.py leaves it None: the same bytes come out."""
    from tunneld.crypto import esp

    plaintexts = [bytes(100) + trailer(100)] * 3
    want, _ = _sa("aes-128-gcm", _KEY, _SALT, True, True).seal_run(*lay_out(plaintexts))
    monkeypatch.setattr(esp, "_NativeGCM", None)
    s = _sa("aes-128-gcm", _KEY, _SALT, True, True)
    assert s._gcm is None
    got, _ = s.seal_run(*lay_out(plaintexts))
    assert bytes(got) == bytes(want)


def test_the_gil_is_released_during_a_run() -> None:
    """While one thread seals, another runs Python and finds the contexts in use: that can only be seen
    if the call let go of the GIL (held throughout, the flag would be set and cleared unseen)."""
    import threading

    gcm = GCM(bytes(32))
    k = 64
    nonces, aads, plaintexts = bytes(12 * k), bytes(12 * k), [bytes(1400)] * k
    out = bytearray(k * 1416)
    stop = threading.Event()

    def sealer() -> None:
        for _ in range(2000):  # bounded: about a second or two of sealing at most
            if stop.is_set():
                return
            gcm.seal(nonces, aads, 12, plaintexts, out, 0, 1416)

    t = threading.Thread(target=sealer)
    t.start()
    seen = False
    try:
        while t.is_alive() and not seen:
            try:
                gcm.seal(bytes(12), bytes(12), 12, [b"x"], bytearray(17), 0, 17)
            except RuntimeError as e:
                seen = "two threads" in str(e)
    finally:
        stop.set()
        t.join(timeout=30)
    assert seen
    assert not t.is_alive()


def test_esp_layouts_that_do_not_fit_are_refused() -> None:
    """`seal_esp` checks that the layout describes its buffer exactly before sealing anything;
    `open_esp` refuses bad arguments and declines (None) a receive that is not a run."""
    gcm, salt = GCM(bytes(16)), bytes(4)
    stride, count, last = 16 + 40 + 16, 3, 20
    size = (count - 1) * stride + 16 + last + 16
    for buf, st_, n, ln in ((bytearray(size + 1), stride, count, last), (bytearray(size), stride, count, 41),
                            (bytearray(size), 31, count, last), (bytearray(size), stride, 0, last),
                            (bytearray(size), stride, count, -1)):
        with pytest.raises(ValueError):
            gcm.seal_esp(buf, st_, n, ln, salt, 0x1000, 1, True)
        assert not any(buf)
    with pytest.raises(ValueError):
        gcm.seal_esp(bytearray(size), stride, count, last, bytes(3), 0x1000, 1, True)  # salt
    with pytest.raises(ValueError):
        gcm.seal_esp(bytearray(size), stride, count, last, salt, 0x1000, 2**64 - 2, True)  # wraps
    with pytest.raises(TypeError):
        gcm.seal_esp(bytes(size), stride, count, last, salt, 0x1000, 1, True)  # read-only
    with pytest.raises(ValueError):
        gcm.open_esp(bytes(200), 72, bytes(5), 0x1000, 1, True, 41)
    with pytest.raises(ValueError):
        gcm.open_esp(bytes(200), 72, salt, 0x1000, 1, True, 300)
    for data, sz in ((bytes(200), 35), (bytes(72), 72), (bytes(150), 72), (bytes(0), 72), (bytes(200), -1)):
        assert gcm.open_esp(data, sz, salt, 0x1000, 1, True, 41) is None


def test_seal_esp_and_open_esp_are_seal_many_and_open_many() -> None:
    """The ESP-level calls build headers, nonces and AADs themselves: the wire bytes of `seal_many`, and
    back the packets `open_many` gives, here with ESN across 2^32."""
    rng = random.Random(5)
    key, salt = rng.randbytes(32), rng.randbytes(4)
    inner = [rng.randbytes(1000) for _ in range(5)] + [rng.randbytes(333)]
    ref = _sa("aes-256-gcm", key, salt, True, False, (1 << 32) - 3)
    wires = ref.seal_many(inner)
    buf, stride, count, last = lay_out([p + trailer(len(p)) for p in inner])
    GCM(key).seal_esp(buf, stride, count, last, salt, 0x1000, (1 << 32) - 2, True)
    assert bytes(buf) == b"".join(wires)
    opened = GCM(key).open_esp(bytes(buf), stride, salt, 0x1000, (1 << 32) - 2, True, 41)
    assert opened is not None
    arena, full, tail = opened
    assert (full, tail) == (1000, 333)
    assert _packets(memoryview(arena), stride - 32, [full] * 5 + [tail]) == inner
    assert GCM(key).open_esp(bytes(buf), stride, salt, 0x1000, (1 << 32) - 1, True, 41) is None  # wrong seq
    assert GCM(key).open_esp(bytes(buf), stride, salt, 0x1000, (1 << 32) - 2, False, 41) is None  # no ESN
    assert GCM(key).open_esp(bytes(buf), stride, salt, 0x1000, (1 << 32) - 2, True, 4) is None  # next header
