"""ESP security associations (RFC 4303) with AEAD transforms, and RFC 3948 datagram classification.

The wire form produced by `seal` is the UDP payload of RFC 3948:

    SPI(4) | seq low 32 bits(4) | IV(8) | ciphertext(payload | padding | pad length | next header) | ICV(16)

The 8-byte IV is the 64-bit sequence number, which makes it unique per key for free (RFC 4106 §3.1
requires that; RFC 8750 made the same choice implicit). With ESN the high half of the sequence
number is authenticated through the AAD but never sent (RFC 4303 §2.2.1, RFC 4106 §5).

The batch forms are the fast path: every per-packet step is a handful of bytecodes, the cipher
context and all per-SA constants are bound to locals once per batch, and the output is a list of
`bytes` that a transport can hand to `sendmsg` as the iovecs of one GSO send without another copy.
(Writing into a preallocated arena with `encrypt_into` was measured and is slower in CPython:
each memoryview slice is itself a new object.) The run forms seal and open a whole run in one native call
with the GIL released where the optional `tunneld.crypto._gcm` is built (AES-GCM only); the `cryptography`
path stays the reference and the fallback (docs/fastpath.md, "Native forms").
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterable, Sequence, Sized
from enum import IntEnum
from itertools import chain, repeat
from typing import Final

import numpy as np
from cryptography.exceptions import InvalidTag

from tunneld.crypto.aead import AEAD, ICV_LEN, IV_LEN, get_suite
from tunneld.crypto.layout import SealLayout, strided
from tunneld.crypto.replay import DEFAULT_BLOCKS, ReplayWindow

try:
    from tunneld.crypto._gcm import GCM as _NativeGCM
except ImportError:  # not built (no compiler or no OpenSSL headers): the `cryptography` path runs
    _NativeGCM = None  # type: ignore[assignment,misc]
# TUNNELD_NATIVE_GCM=0 in a daemon's environment forces the reference path, read once at import: for
# measuring the two in one benchmark run (docs/fastpath.md), never needed for correctness.
if os.environ.get("TUNNELD_NATIVE_GCM") == "0":
    _NativeGCM = None  # type: ignore[assignment,misc]

NATIVE_GCM: Final = _NativeGCM is not None
"""Whether the batch AES-GCM extension is available to `seal_run` and `open_run`."""

NH_IPV4: Final = 4  # IANA protocol numbers used as ESP next header (RFC 4303 §2.6)
NH_IPV6: Final = 41
NH_NONE: Final = 59  # "no next header": a dummy / TFC packet that receivers drop (RFC 4303 §2.6)

HEADER_LEN: Final = 8 + IV_LEN  # SPI, seq-lo, IV
OVERHEAD_MAX: Final = HEADER_LEN + 3 + 2 + ICV_LEN  # header, worst-case alignment pad, trailer, ICV
MIN_WIRE_LEN: Final = HEADER_LEN + 4 + ICV_LEN  # the smallest aligned trailer is 4 bytes
MIN_SPI: Final = 256  # SPI 0 is local use, 1..255 are reserved by IANA (RFC 4303 §2.1)
_M32: Final = 0xFFFFFFFF
_HI: Final = 0xFFFFFFFF00000000
_2_32: Final = 1 << 32

_HDR = struct.Struct("!IIQ")  # SPI, seq-lo, IV (= 64-bit sequence number)
_AAD_ESN = struct.Struct("!IQ")  # SPI, seq-hi, seq-lo (RFC 4106 §5): seq-hi||seq-lo is the 64-bit seq
_AAD = struct.Struct("!II")  # SPI, seq
_NONCE = struct.Struct("!4sQ")  # salt || IV (RFC 4106 §4, RFC 7634 §2)
# Default pad contents are 1, 2, 3, ... (RFC 4303 §2.4); one entry per possible pad length.
_PADS: Final = tuple(bytes(range(1, n + 1)) for n in range(256))


# The datagram header as a NumPy record, to read the SPIs and sequence numbers of a whole GRO batch at once.
_HDR_DTYPE: Final = np.dtype([("spi", ">u4"), ("lo", ">u4"), ("iv", ">u8")])
_SPI_LO_DTYPE: Final = np.dtype([("spi", ">u4"), ("lo", ">u4")])
Buffer = bytes | bytearray | memoryview


def trailer(length: int, next_header: int = NH_IPV6) -> bytes:
    """The ESP trailer that follows an inner packet of `length` bytes: the default padding (1, 2, 3, ...)
    that 4-byte-aligns the end of the trailer, pad length and next header (RFC 4303 §2.4-2.6). This is
    what `seal` appends; `seal_run` takes plaintexts that already end in it."""
    pad = (-(length + 2)) & 3
    return _PADS[pad] + bytes((pad, next_header))


LAYOUT: Final = SealLayout(trailer, OVERHEAD_MAX, HEADER_LEN, ICV_LEN, NH_IPV6)
"""What `seal_run` expects of its plaintexts, for the code that lays them out (the TUN's segmenter)."""


def lay_out(plaintexts: Sequence[Buffer]) -> tuple[bytearray, int, int, int]:
    """Plaintexts (inner packets that already end in their `trailer`), all of one length but the last,
    which may be shorter, copied where `seal_run` seals them: returns the buffer, stride, count and the
    last plaintext's length, `seal_run`'s arguments. The TUN's segmenter lays runs out itself; this is
    for callers that hold packets (benchmarks, tests)."""
    k = len(plaintexts)
    if not k:
        raise ValueError("nothing to seal")
    first, last = len(plaintexts[0]), len(plaintexts[-1])
    if last > first or any(len(p) != first for p in plaintexts[1:-1]):
        raise ValueError("a run's plaintexts are all of one length but the last")
    stride = HEADER_LEN + first + ICV_LEN
    buf = bytearray((k - 1) * stride + HEADER_LEN + last + ICV_LEN)
    for i, p in enumerate(plaintexts):
        buf[i * stride + HEADER_LEN : i * stride + HEADER_LEN + len(p)] = p
    return buf, stride, k, last


@functools.cache
def _minimal_trailers(next_header: int) -> tuple[bytes, ...]:
    """The four trailers a sender using minimal padding produces, for pad lengths 0..3."""
    return tuple(_PADS[n] + bytes((n, next_header)) for n in range(4))


class ESPError(Exception):
    """Any reason an ESP packet is not accepted, or cannot be sent. Carries no key material."""


class Kind(IntEnum):
    """What a UDP/4500 payload is (RFC 3948 §2)."""

    MALFORMED = 0
    KEEPALIVE = 1  # one 0xFF byte (§2.3)
    CONTROL = 2  # non-ESP marker (four zero bytes) then a control message (§2.2)
    ESP = 3  # non-zero SPI (§2.1)


def classify(payload: bytes | bytearray | memoryview) -> Kind:
    """Demultiplex a UDP-encapsulated payload the way Linux `xfrm4_udp_encap_rcv` does."""
    n = len(payload)
    if n == 1:
        return Kind.KEEPALIVE if payload[0] == 0xFF else Kind.MALFORMED
    if n <= 4:
        return Kind.MALFORMED
    if payload[0] | payload[1] | payload[2] | payload[3] == 0:
        return Kind.CONTROL
    return Kind.ESP if n > 8 else Kind.MALFORMED


def peek_spi(payload: bytes | bytearray | memoryview) -> int:
    """The SPI of a payload that `classify` called ESP, for the SA lookup."""
    return int.from_bytes(payload[:4], "big")


class SecurityAssociation:
    """One direction of an ESP SA: seal on the sending side, open on the receiving side.

    The same object can do both (tests do), but a tunnel keeps one per direction because the two
    directions have different keys and SPIs.
    """

    __slots__ = ("_aead", "_gcm", "_trailers", "esn", "limit", "replay", "rx_auth_fail", "rx_dummy",
                 "rx_malformed", "rx_replay", "seq", "spi", "suite")

    def __init__(
        self,
        spi: int,
        key: bytes,
        salt: bytes,
        aead: str = "aes-256-gcm",
        esn: bool = True,
        window_blocks: int = DEFAULT_BLOCKS,
        native: bool = True,
    ) -> None:
        """`native=False` forces the reference `cryptography` path for `seal_run` and `open_run` even where
        the batch AES-GCM extension is built (the tests compare the two)."""
        if not MIN_SPI <= spi <= _M32:
            raise ValueError(f"SPI must be in {MIN_SPI}..{_M32} (RFC 4303 §2.1), got {spi}")
        self.spi = spi
        self.suite = get_suite(aead)
        self._aead = AEAD(self.suite, key, salt)
        use_native = native and _NativeGCM is not None and self.suite.name.startswith("aes-")
        self._gcm = _NativeGCM(key) if use_native else None
        self.esn = esn
        self.limit = 0xFFFFFFFFFFFFFFFF if esn else _M32
        self.seq = 0  # last sequence number sent; the first packet carries 1 (RFC 4303 §3.3.3)
        self.replay = ReplayWindow(esn=esn, blocks=window_blocks)
        # Trailer per (payload length mod 4): the pad that right-aligns pad length and next header
        # on a 4-byte boundary (RFC 4303 §2.4; the AEAD block size is 1), then the two trailer bytes.
        self._trailers: dict[int, list[bytes]] = {}
        self.rx_auth_fail = self.rx_malformed = self.rx_replay = self.rx_dummy = 0

    @property
    def layout(self) -> SealLayout:
        """What `seal_run` expects of its plaintexts (the same for every suite here: all are AEADs with
        a 16-byte ICV and a block size of 1)."""
        return LAYOUT

    def _trailer_table(self, next_header: int) -> list[bytes]:
        t = self._trailers.get(next_header)
        if t is None:
            if not 0 <= next_header <= 255:
                raise ValueError("next header is one byte")
            pads = [(-(r + 2)) & 3 for r in range(4)]
            t = self._trailers[next_header] = [_PADS[p] + bytes((p, next_header)) for p in pads]
        return t

    # -- sending ------------------------------------------------------------------------------

    def seal(self, inner: bytes, next_header: int = NH_IPV6) -> bytes:
        """Encrypt one packet; raises ESPError once the sequence number space is used up."""
        out: list[bytes] = []
        self.seal_many((inner,), next_header, out)
        return out[0]

    def seal_many(
        self, packets: Iterable[bytes], next_header: int = NH_IPV6, out: list[bytes] | None = None
    ) -> list[bytes]:
        """Encrypt many packets in one call, appending the wire payloads to `out` (returned)."""
        if out is None:
            out = []
        if not isinstance(packets, Sized):
            packets = list(packets)
        if self.seq + len(packets) > self.limit:
            raise ESPError("sequence number space exhausted: the SA must be rekeyed")
        trailers = self._trailer_table(next_header)
        encrypt = self._aead.encrypt
        salt = self._aead.salt
        spi = self.spi
        hdr_pack = _HDR.pack
        nonce_pack = _NONCE.pack
        append = out.append
        seq = self.seq
        m32 = _M32
        # The limit was checked above for the whole batch, so the loops only count.
        if self.esn:
            aad_pack = _AAD_ESN.pack
            for p in packets:
                seq += 1
                append(hdr_pack(spi, seq & m32, seq)
                       + encrypt(nonce_pack(salt, seq), p + trailers[len(p) & 3], aad_pack(spi, seq)))
        else:
            aad_pack2 = _AAD.pack
            for p in packets:
                seq += 1
                append(hdr_pack(spi, seq, seq)
                       + encrypt(nonce_pack(salt, seq), p + trailers[len(p) & 3], aad_pack2(spi, seq)))
        self.seq = seq
        return out

    def seal_run(self, buf: bytearray | memoryview, stride: int, count: int,
                 last: int) -> tuple[memoryview, int]:
        """Seal in place `count` datagrams laid out in `buf` as `LAYOUT` describes (what the TUN's segmenter
        makes): datagram i at `i * stride`, its plaintext (inner packet and trailer) after the 16 header
        bytes, `stride - 32` bytes long (`last` for the last), 16 bytes left after it for the ICV. Writes
        the headers and replaces each plaintext with ciphertext || ICV; returns the buffer and the datagram
        size, which is what one UDP GSO `sendmsg` takes (one iovec, no other copy).

        This is the vectorised form of `seal_many` for the offload path: the wire bytes are identical to
        `seal_many`'s for the same sequence numbers (tests/unit/test_runs.py). With the batch AES-GCM the
        whole run is one native call; otherwise the `cryptography` reference seals packet by packet.
        Raises ESPError once the sequence number space is used up, and ValueError for a layout that does
        not describe `buf`."""
        full = stride - HEADER_LEN - ICV_LEN
        if count < 1 or full < 0 or not 0 <= last <= full or \
                len(buf) != (count - 1) * stride + HEADER_LEN + last + ICV_LEN:
            raise ValueError("the layout does not describe the buffer")
        if self.seq + count > self.limit:
            raise ESPError("sequence number space exhausted: the SA must be rekeyed")
        s0 = self.seq + 1
        out = memoryview(buf)
        if self._gcm is not None:
            self._gcm.seal_esp(buf, stride, count, last, self._aead.salt, self.spi, s0, self.esn)
        else:
            salt, spi, encrypt_into = self._aead.salt, self.spi, self._aead.encrypt_into
            for i in range(count):
                seq, o = s0 + i, i * stride
                n = full if i < count - 1 else last
                plaintext = bytes(out[o + HEADER_LEN : o + HEADER_LEN + n])  # not sealed over itself
                _HDR.pack_into(out, o, spi, seq & _M32, seq)
                aad = _AAD_ESN.pack(spi, seq) if self.esn else _AAD.pack(spi, seq)
                encrypt_into(_NONCE.pack(salt, seq), plaintext, aad, out[o + HEADER_LEN : o + stride])
        self.seq = s0 + count - 1
        return out, stride

    # -- receiving ----------------------------------------------------------------------------

    def open(self, wire: bytes) -> tuple[int, bytes]:
        """Decrypt one packet to (next header, payload); raises ESPError on anything wrong.

        A packet with next header 59 is returned like any other so the caller sees and drops it.
        """
        nh, inner, err = self._open_one(wire)
        if err:
            raise ESPError(err)
        return nh, inner

    def _open_one(self, wire: bytes) -> tuple[int, bytes, str]:
        n = len(wire)
        if n < MIN_WIRE_LEN or (n - HEADER_LEN - ICV_LEN) & 3:
            self.rx_malformed += 1
            return 0, b"", "malformed: too short or trailer not 4-byte aligned"
        spi, lo, iv = _HDR.unpack_from(wire)
        if spi != self.spi:
            self.rx_malformed += 1
            return 0, b"", "wrong SPI"
        replay = self.replay
        seq = replay.infer(lo)
        if not replay.check(seq):
            self.rx_replay += 1
            return 0, b"", "replayed, too old or sequence number 0"
        aad = _AAD_ESN.pack(spi, seq) if self.esn else _AAD.pack(spi, lo)
        try:
            pt = self._aead.decrypt(_NONCE.pack(self._aead.salt, iv), wire[HEADER_LEN:], aad)
        except InvalidTag:
            self.rx_auth_fail += 1
            return 0, b"", "ICV check failed"
        pl = pt[-2]
        end = len(pt) - 2 - pl
        if end < 0 or not pt.startswith(_PADS[pl], end):
            # Authenticated but badly padded: the sender is broken, not an attacker; still drop,
            # and do not mark the window so a correct retransmission is not refused.
            self.rx_malformed += 1
            return 0, b"", "bad padding"
        replay.commit(seq)
        return pt[-1], pt[:end], ""

    def open_many(self, wires: Iterable[bytes], out: list[bytes] | None = None,
                  next_header: int = NH_IPV6) -> list[bytes]:
        """Decrypt many packets, appending the payloads of the good ones to `out` (returned).

        A tunnel SA carries one inner protocol, so only packets whose next header is `next_header`
        are returned: no per-packet tuple. Bad packets are dropped and counted in the rx_*
        attributes; dummy packets (next header 59) in rx_dummy, other next headers in rx_malformed.

        The replay window's infer/check/commit are inlined here (three method calls cost more than
        the rest of the loop); `open`, which goes through ReplayWindow's methods, is the reference
        this loop is tested against (tests/unit/test_esp.py::test_open_many_matches_open).
        """
        if out is None:
            out = []
        append = out.append
        replay = self.replay
        blocks = replay._blocks
        mask = replay._mask
        window = replay.window
        limit = replay.limit
        esn = self.esn
        decrypt = self._aead.decrypt
        salt = self._aead.salt
        nonce_pack = _NONCE.pack
        unpack = _HDR.unpack_from
        aad_pack = _AAD_ESN.pack
        aad_pack2 = _AAD.pack
        my_spi = self.spi
        pads = _PADS
        minimal = _minimal_trailers(next_header)
        top = replay.top
        hi_mask = _HI
        two32 = _2_32
        m32 = _M32
        min_len = MIN_WIRE_LEN
        wrap_ahead = two32 - window
        malformed = replay_drop = auth_fail = dummy = 0
        for w in wires:
            n = len(w)
            if n < min_len or n & 3:  # n & 3: 16-byte header + aligned trailer + 16-byte ICV
                malformed += 1
                continue
            spi, lo, iv = unpack(w)
            if spi != my_spi:
                malformed += 1
                continue
            if esn:
                # ReplayWindow.infer (RFC 4303 Appendix A2) in an equivalent form: take the
                # candidate in top's 2^32 subspace; it belongs to the next subspace if it is a
                # window or more behind top, to the previous one if it is almost 2^32 ahead.
                seq = (top & hi_mask) | lo
                if seq > top:
                    if seq - top > wrap_ahead and seq > m32:
                        seq -= two32
                elif top - seq >= window:
                    seq += two32
                aad = aad_pack(spi, seq)
            else:
                seq = lo
                aad = aad_pack2(spi, lo)
            # ReplayWindow.check
            if seq > top:
                if seq > limit:
                    replay_drop += 1
                    continue
            elif seq == 0 or top - seq >= window or (blocks[(seq >> 6) & mask] >> (seq & 63)) & 1:
                replay_drop += 1
                continue
            try:
                pt = decrypt(nonce_pack(salt, iv), w[16:], aad)  # 16 = HEADER_LEN
            except InvalidTag:
                auth_fail += 1
                continue
            if pt.endswith(minimal):
                # The common case in one C call: minimal padding (0..3 bytes of 1, 2, 3), pad
                # length and the expected next header. The four suffixes differ at [-2], so the
                # one that matched is the one for this pad length.
                end = len(pt) - 2 - pt[-2]
                nh = next_header
            else:
                pl = pt[-2]
                end = len(pt) - 2 - pl
                if end < 0 or not pt.startswith(pads[pl], end):
                    malformed += 1
                    continue
                nh = pt[-1]
            # ReplayWindow.commit
            if seq > top:
                cur = top >> 6
                new = seq >> 6
                if new != cur:
                    for i in range(cur + 1, min(new, cur + mask + 1) + 1):
                        blocks[i & mask] = 0
                top = seq
            blocks[(seq >> 6) & mask] |= 1 << (seq & 63)
            if nh == next_header:
                append(pt[:end])
            elif nh == NH_NONE:
                dummy += 1
            else:
                malformed += 1
        replay.top = top
        if malformed | replay_drop | auth_fail | dummy:
            self.rx_malformed += malformed
            self.rx_replay += replay_drop
            self.rx_auth_fail += auth_fail
            self.rx_dummy += dummy
        return out

    def open_run(self, data: Buffer, size: int,
                 next_header: int = NH_IPV6) -> tuple[memoryview, int, list[int]] | None:
        """The fast path for one UDP GRO receive: decrypt datagrams of `size` bytes laid back to back in
        `data` (the last may be shorter) into one buffer, "in place" of a list of packets.

        Returns `(arena, stride, lengths)`: inner packet i is `arena[i * stride : i * stride + lengths[i]]`.
        Returns None, having changed nothing (window, counters), unless the batch is the common case:
        every datagram carries this SA's SPI, the sequence numbers are consecutive and all above the
        window, every ICV verifies and every trailer is minimal padding with `next_header`. The caller
        then opens the datagrams one by one with `open_many`, which drops and counts whatever is wrong
        (so a forged packet in a batch costs the fast path, never correctness).

        With the batch AES-GCM the whole receive is one native call (headers, nonces, AADs, decryption and
        trailers); otherwise the per-packet work runs in C-level `map` calls and NumPy column operations,
        no bytecode per packet. The replay check happens before any decryption, the window moves only
        after all authenticated (RFC 4303 §3.4.3), as in `open_many`."""
        n = len(data)
        if size < MIN_WIRE_LEN or (size - HEADER_LEN - ICV_LEN) & 3 or n <= size:
            return None
        k = -(-n // size)
        tail = n - (k - 1) * size
        if tail < MIN_WIRE_LEN or (tail - HEADER_LEN - ICV_LEN) & 3:
            return None
        lo0 = int.from_bytes(data[4:8], "big")
        replay = self.replay
        seq0 = replay.infer(lo0)
        if seq0 <= replay.top or seq0 + k - 1 > replay.limit:
            return None
        stride = size - HEADER_LEN - ICV_LEN
        tpt = tail - HEADER_LEN - ICV_LEN  # the last datagram's plaintext length
        if self._gcm is not None:
            opened = self._gcm.open_esp(data, size, self._aead.salt, self.spi, seq0, self.esn, next_header)
            if opened is None:
                return None
            arena, full_len, tail_len = opened
            replay.commit_run(seq0, k)
            lengths = [full_len] * (k - 1)
            lengths.append(tail_len)
            return memoryview(arena), stride, lengths
        # Every datagram has our SPI and the next low sequence number (uint32 arithmetic wraps as the
        # sender's counter does): compared as bytes, one C call instead of NumPy reductions.
        hdrs = np.ndarray((k,), _HDR_DTYPE, data, 0, (size,))
        want = np.empty(k, _SPI_LO_DTYPE)
        want["spi"] = self.spi
        want["lo"] = np.arange(lo0, lo0 + k, dtype=np.uint64).astype(np.uint32)
        if np.ndarray((k, 8), np.uint8, data, 0, (size, 1)).tobytes() != want.tobytes():
            return None
        out = np.empty(k * stride, np.uint8).data  # not zero-filled: every byte is about to be written
        cts = chain(strided(HEADER_LEN, size, stride + ICV_LEN, k - 1),
                    (slice((k - 1) * size + HEADER_LEN, n),))
        outs = chain(strided(0, stride, stride, k - 1),
                     (slice((k - 1) * stride, (k - 1) * stride + tpt),))
        mv = memoryview(data)
        seqs = range(seq0, seq0 + k)
        spi = self.spi
        aads_ = map(_AAD_ESN.pack, repeat(spi, k), seqs) if self.esn else \
            map(_AAD.pack, repeat(spi, k), seqs)
        nonces = map(_NONCE.pack, repeat(self._aead.salt, k), hdrs["iv"].tolist())
        try:
            list(map(self._aead.decrypt_into, nonces, map(mv.__getitem__, cts), aads_,
                     map(out.__getitem__, outs)))
        except InvalidTag:
            return None
        # Trailers: the full slots must share one minimal padding (the usual case: equal inner lengths).
        full = np.ndarray((k - 1, stride), np.uint8, out, 0)
        pad = out[stride - 2]
        if pad > 3:
            return None
        suffix = _PADS[pad] + bytes((pad, next_header))
        if full[:, stride - 2 - pad:].tobytes() != suffix * (k - 1):
            return None
        tail_pt = out[(k - 1) * stride:(k - 1) * stride + tpt]
        if not bytes(tail_pt[-5:] if tpt >= 5 else tail_pt).endswith(_minimal_trailers(next_header)):
            return None
        tail_len = tpt - 2 - tail_pt[-2]
        replay.commit_run(seq0, k)
        lengths = [stride - 2 - pad] * (k - 1)
        lengths.append(tail_len)
        return out, stride, lengths

    @property
    def rx_dropped(self) -> int:
        return self.rx_auth_fail + self.rx_malformed + self.rx_replay


