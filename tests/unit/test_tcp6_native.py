"""The C segmenter and coalescer (tunneld.fastpath._tcp6) on hostile input, against the reference forms.

Valid superpackets and runs are covered in test_runs.py (byte for byte against `segment` and `coalesce`).
Here the input is what a broken or hostile kernel, or a peer whose packets authenticated, could hand
over: random bytes, valid packets with bytes flipped or cut, layouts that do not fit their buffer. The C
forms must never crash or read outside their buffers; where they accept, they write what the reference
writes, and a declined coalesce leaves the arena untouched.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_offload import ACK, PSH, gso_header, tcp_packet
from tunneld.crypto.esp import LAYOUT
from tunneld.fastpath.coalesce import coalesce_run
from tunneld.fastpath.runs import RxRun
from tunneld.fastpath.segment import NATIVE_TCP6, complete, segment
from tunneld.proto.errors import ParseError

pytestmark = pytest.mark.skipif(not NATIVE_TCP6, reason="tunneld.fastpath._tcp6 is not built")

if NATIVE_TCP6:
    from tunneld.fastpath import _tcp6

MSS = 1340
_SP = tcp_packet(6, os.urandom(MSS * 12 + 77), seq=5000, flags=ACK | PSH, csum="partial")
_VNET = gso_header(_SP, MSS)


def _native_segments(vnet: bytes, packet: bytes) -> list[bytes] | None:
    got = _tcp6.segment(vnet, packet, LAYOUT.head, LAYOUT.tail, LAYOUT.next_header)
    if got is None:
        return None
    buf, stride, count, last = got
    assert len(buf) == (count - 1) * stride + LAYOUT.head + last + LAYOUT.tail
    full = stride - LAYOUT.head - LAYOUT.tail
    out = []
    for i in range(count):
        at = i * stride + LAYOUT.head
        pt = bytes(buf[at : at + (full if i < count - 1 else last)])
        assert pt[-1] == LAYOUT.next_header and pt[-2] <= 3
        out.append(pt[: len(pt) - 2 - pt[-2]])
    return out


def _agrees_with_segment(vnet: bytes, packet: bytes) -> None:
    got = _native_segments(vnet, packet)
    if got is None:
        return
    try:
        want = segment(vnet, packet)
    except ParseError:  # the C form accepted what the strict reference refuses
        pytest.fail("segment() refuses a packet the C segmenter accepted")
    assert got == want


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=12), st.binary(min_size=0, max_size=3000))
def test_segment_on_random_bytes(vnet: bytes, packet: bytes) -> None:
    _agrees_with_segment(vnet, packet)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 120), st.integers(1, 255)), max_size=4), st.integers(0, 3000),
       st.integers(0, 0xFFFF))
def test_segment_on_a_damaged_superpacket(flips: list[tuple[int, int]], cut: int, size: int) -> None:
    """Headers with flipped bytes (lengths, data offset, version, next header), a cut tail, any
    segment size: accepted only where the reference accepts too, and then the same segments."""
    packet = bytearray(_SP)
    for at, x in flips:
        packet[at] ^= x
    vnet = bytearray(_VNET)
    vnet[4:6] = size.to_bytes(2, "little")
    _agrees_with_segment(bytes(vnet), bytes(packet[: len(packet) - cut]))


def test_segment_refuses_arguments_out_of_range() -> None:
    for head, tail, nh in ((-1, 16, 41), (16, -1, 41), (16, 16, 256), (1000, 16, 41)):
        with pytest.raises(ValueError):
            _tcp6.segment(_VNET, _SP, head, tail, nh)


def _run_of(packets: list[bytes], pad: int = 4) -> RxRun:
    stride = max(map(len, packets)) + pad
    arena = bytearray(stride * len(packets))
    for i, p in enumerate(packets):
        arena[i * stride : i * stride + len(p)] = p
    return RxRun(arena, stride, [len(p) for p in packets])


_SEGS = segment(_VNET, _SP)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 13 * (MSS + 80)), st.integers(1, 255)), max_size=4))
def test_coalesce_on_a_damaged_run_agrees_with_numpy(flips: list[tuple[int, int]]) -> None:
    """Any byte of any segment flipped: the C form merges exactly when the NumPy form does, into the same
    bytes, and a declined run's arena is left as it was."""
    run = _run_of(_SEGS)
    for at, x in flips:
        run.arena[at % len(run.arena)] ^= x
    ref = coalesce_run(RxRun(bytearray(run.arena), run.stride, list(run.lengths)), native=False)
    before = bytes(run.arena)
    got = coalesce_run(run, native=True)
    assert (got is None) == (ref is None)
    if got is None or ref is None:
        assert bytes(run.arena) == before
        return
    assert b"".join(map(bytes, got)) == b"".join(map(bytes, ref))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=4000), st.integers(-5, 3000), st.integers(-5, 80),
       st.integers(-5, 3000), st.integers(-5, 3000))
def test_coalesce_on_random_layouts(arena: bytes, stride: int, count: int, full: int, last: int) -> None:
    """Layouts that do not fit the arena, negative or huge values: None, never a read past the end."""
    buf = bytearray(arena)
    got = _tcp6.coalesce(buf, stride, count, full, last)
    if got is not None:  # random bytes that happen to form a run: only within the buffer
        vnet, n = got
        assert len(vnet) == 10 and 0 < n <= len(buf)


def test_coalesce_needs_a_writable_arena() -> None:
    run = _run_of(_SEGS)
    with pytest.raises(TypeError):
        _tcp6.coalesce(bytes(run.arena), run.stride, len(_SEGS), run.lengths[0], run.lengths[-1])


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=10, max_size=10), st.binary(min_size=0, max_size=1600), st.booleans())
def test_complete_is_segment_for_what_is_not_a_superpacket(vnet: bytes, packet: bytes, native: bool) -> None:
    """Any header and packet: `complete` gives `segment`'s one packet, or None where `segment` has to
    decide (a superpacket, or checksum offsets outside the packet: segment raises ParseError)."""
    vnet = bytes([vnet[0] & 1, vnet[1] if vnet[1] in (0, 4) else 0]) + vnet[2:]  # mostly GSO_NONE
    got = complete(vnet, packet) if native else segment_py_complete(vnet, packet)
    if got is None:
        return
    assert [got] == segment(vnet, packet)


def segment_py_complete(vnet: bytes, packet: bytes) -> bytes | None:
    """The pure-Python branch of `complete` (the C form absent)."""
    from tunneld.fastpath import segment as seg_mod

    saved, seg_mod._tcp6 = seg_mod._tcp6, None  # type: ignore[assignment]
    try:
        return complete(vnet, packet)
    finally:
        seg_mod._tcp6 = saved


def test_complete_fills_the_checksum_a_udp_packet_left_to_us() -> None:
    """A UDP packet with CHECKSUM_PARTIAL, as the stack hands it to a TUN with checksum offload: the
    pseudo-header sum in the field, csum_start at the UDP header, csum_offset 6."""
    import struct

    src, dst = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
    body = os.urandom(64)
    length = 8 + len(body)
    pseudo = sum(struct.unpack("!16H", src + dst)) + length + 17
    partial = (pseudo & 0xFFFF) + (pseudo >> 16)
    partial = (partial & 0xFFFF) + (partial >> 16)
    udp = struct.pack("!HHHH", 4000, 5000, length, partial) + body
    packet = struct.pack("!IHBB", 6 << 28, length, 17, 64) + src + dst + udp
    vnet = struct.pack("<BBHHHH", 1, 0, 0, 0, 40, 6)
    done = complete(vnet, packet)
    assert done is not None and done == segment(vnet, packet)[0]
    words = struct.unpack(f"!{(len(done) - 40 + 32) // 2}H", src + dst + done[40:])
    total = sum(words) + length + 17
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF  # the receiver's check: the whole sum, checksum included, is all ones
