"""TUN offload, sans I/O: segmentation of GSO superpackets and GRO-style coalescing (issue 6).

Checksums are checked against a straightforward RFC 1071 loop written here (independent of the module's
modular-arithmetic shortcut) and against scapy's own checksum computation.
"""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.fastpath.coalesce import coalesce
from tunneld.fastpath.headers import (
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    MAX_COALESCE_SEGMENTS,
    NEEDS_CSUM,
    VNET_HDR_LEN,
    VnetHeader,
)
from tunneld.fastpath.segment import segment
from tunneld.proto.errors import ParseError

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
SRC6 = bytes.fromhex("fd00000000000000000000000000000a")
DST6 = bytes.fromhex("fd00000000000000000000000000000b")
SRC4 = bytes([10, 0, 0, 1])
DST4 = bytes([10, 0, 0, 2])
NONE_HDR = bytes(VNET_HDR_LEN)


# --- independent reference -------------------------------------------------------------------------------


def rfc1071(data: bytes) -> int:
    """RFC 1071 §4.1, literally: 16-bit big-endian words, end-around carry, complement."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def fold(data: bytes) -> int:
    """The folded, uncomplemented sum (a partial checksum as the kernel stores it)."""
    return ~rfc1071(data) & 0xFFFF


def pseudo(pkt: bytes, tcp_len: int, proto: int = 6) -> bytes:
    if pkt[0] >> 4 == 6:
        return pkt[8:40] + struct.pack("!IxxxB", tcp_len, proto)  # RFC 8200 §8.1
    return pkt[12:20] + struct.pack("!xBH", proto, tcp_len)  # RFC 9293 §3.1


def ip_header_len(pkt: bytes) -> int:
    return 40 if pkt[0] >> 4 == 6 else (pkt[0] & 15) * 4


def tcp_checksum_ok(pkt: bytes) -> bool:
    ihl = ip_header_len(pkt)
    return rfc1071(pseudo(pkt, len(pkt) - ihl) + pkt[ihl:]) == 0


def tcp_checksum_expected(pkt: bytes) -> int:
    ihl = ip_header_len(pkt)
    tcp = pkt[ihl:]
    return rfc1071(pseudo(pkt, len(tcp)) + tcp[:16] + b"\0\0" + tcp[18:])


# --- packet builders ---------------------------------------------------------------------------------------


def tcp_packet(
    version: int,
    payload: bytes,
    *,
    seq: int = 1000,
    ack: int = 5000,
    flags: int = ACK,
    options: bytes = b"",
    sport: int = 40000,
    dport: int = 443,
    ip_id: int = 7,
    df: bool = True,
    tos: int = 0,
    flow: int = 0x12345,
    window: int = 512,
    csum: str = "full",
) -> bytes:
    """An IPv4/IPv6 + TCP packet. ``csum``: "full" (valid), "partial" (pseudo-header sum, as a
    CHECKSUM_PARTIAL skb from the kernel), "bad"."""
    assert len(options) % 4 == 0
    thl = 20 + len(options)
    tcp = (
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (thl // 4) << 4, flags, window, 0, 0)
        + options
        + payload
    )
    if version == 6:
        ip = struct.pack("!IHBB", (6 << 28) | (tos << 20) | flow, len(tcp), 6, 64) + SRC6 + DST6
    else:
        hdr = struct.pack("!BBHHHBBH", 0x45, tos, 20 + len(tcp), ip_id, 0x4000 if df else 0, 64, 6, 0)
        hdr += SRC4 + DST4
        ip = hdr[:10] + struct.pack("!H", rfc1071(hdr)) + hdr[12:]
    pkt = ip + tcp
    ihl = len(ip)
    if csum == "partial":
        c = fold(pseudo(pkt, len(tcp)))
    else:
        c = rfc1071(pseudo(pkt, len(tcp)) + tcp)
        if csum == "bad":
            c ^= 0x5555
    return pkt[: ihl + 16] + struct.pack("!H", c) + pkt[ihl + 18 :]


def gso_header(pkt: bytes, gso_size: int) -> bytes:
    """The header the kernel would put before a TSO superpacket read from the TUN."""
    ihl = ip_header_len(pkt)
    thl = (pkt[ihl + 12] >> 4) * 4
    gso = GSO_TCPV6 if pkt[0] >> 4 == 6 else GSO_TCPV4
    if pkt[ihl + 13] & CWR:
        gso |= GSO_ECN
    return VnetHeader(NEEDS_CSUM, gso, ihl + thl, gso_size, ihl, 16).encode()


def udp6(payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 5353, 5353, 8 + len(payload), 0) + payload
    return struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + SRC6 + DST6 + udp


def icmp6_echo() -> bytes:
    body = struct.pack("!BBHHH", 128, 0, 0, 1, 1) + b"ping"
    return struct.pack("!IHBB", 6 << 28, len(body), 58, 64) + SRC6 + DST6 + body


def split_payload(payload: bytes, size: int) -> list[bytes]:
    return [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]


def segments_of(version: int, payload: bytes, size: int, **kw: object) -> list[bytes]:
    """Independently built segments (the "wire" view), for coalescing tests."""
    seq = int(kw.pop("seq", 1000))  # type: ignore[call-overload]
    ip_id = int(kw.pop("ip_id", 7))  # type: ignore[call-overload]
    parts = split_payload(payload, size)
    return [
        tcp_packet(version, p, seq=seq + i * size, ip_id=ip_id + i, **kw)  # type: ignore[arg-type]
        for i, p in enumerate(parts)
    ]


# --- virtio-net header -------------------------------------------------------------------------------------


def test_vnet_header_layout_is_little_endian_virtio_net_hdr() -> None:
    h = VnetHeader(NEEDS_CSUM, GSO_TCPV6 | GSO_ECN, 74, 1400, 40, 16)
    wire = h.encode()
    assert wire == bytes([1, 0x84]) + struct.pack("<HHHH", 74, 1400, 40, 16)
    assert len(wire) == VNET_HDR_LEN
    assert VnetHeader.decode(wire + b"packet") == h
    with pytest.raises(ParseError):
        VnetHeader.decode(wire[:9])


# --- segmentation ------------------------------------------------------------------------------------------

OPTIONS = st.sampled_from([b"", bytes.fromhex("0101080a0000000100000002"), bytes.fromhex("020405b4")])


@st.composite
def superpackets(draw: st.DrawFn) -> tuple[int, bytes, int, dict[str, int | bytes]]:
    version = draw(st.sampled_from([4, 6]))
    gso_size = draw(st.integers(min_value=1, max_value=1500))
    nseg = draw(st.integers(min_value=1, max_value=MAX_COALESCE_SEGMENTS))
    hl = (20 if version == 4 else 40) + 20 + 12
    max_payload = 65535 - hl
    total = min(max_payload, (nseg - 1) * gso_size + draw(st.integers(min_value=1, max_value=gso_size)))
    payload = draw(st.binary(min_size=total, max_size=total)) if total < 64 else os.urandom(total)
    fields: dict[str, int | bytes] = {
        "seq": draw(st.integers(min_value=0, max_value=2**32 - 1)),
        "ack": draw(st.integers(min_value=0, max_value=2**32 - 1)),
        "flags": ACK | draw(st.sampled_from([0, FIN, PSH, CWR, ECE, FIN | PSH, PSH | CWR, FIN | PSH | CWR])),
        "options": draw(OPTIONS),
        "ip_id": draw(st.integers(min_value=0, max_value=0xFFFF)),
        "df": draw(st.booleans()),
        "tos": draw(st.integers(min_value=0, max_value=255)),
    }
    return version, payload, gso_size, fields


@settings(max_examples=60, deadline=None)
@given(superpackets())
def test_segment_then_coalesce_is_identity(case: tuple[int, bytes, int, dict[str, int | bytes]]) -> None:
    version, payload, gso_size, fields = case
    original = tcp_packet(version, payload, csum="partial", **fields)  # type: ignore[arg-type]
    vnet = gso_header(original, gso_size)
    segs = segment(vnet, original)
    ihl = 40 if version == 6 else 20
    thl = 20 + len(fields["options"])  # type: ignore[arg-type]
    hl = ihl + thl
    parts = split_payload(payload, gso_size)
    assert len(segs) == len(parts)
    seq0, flags0, id0 = int(fields["seq"]), int(fields["flags"]), int(fields["ip_id"])
    for i, (seg, part) in enumerate(zip(segs, parts, strict=True)):
        assert seg[hl:] == part
        # Every header byte is the original's except lengths, seq, flags, checksums (and IPv4 ID).
        assert tcp_checksum_ok(seg)
        assert struct.unpack_from("!H", seg, ihl + 16)[0] == tcp_checksum_expected(seg)
        assert struct.unpack_from("!I", seg, ihl + 4)[0] == (seq0 + i * gso_size) & 0xFFFFFFFF
        want = flags0
        if i:
            want &= ~CWR
        if i != len(parts) - 1:
            want &= ~(FIN | PSH)
        assert seg[ihl + 13] == want
        assert seg[ihl : ihl + 4] == original[ihl : ihl + 4]  # ports
        assert seg[ihl + 8 : ihl + 13] == original[ihl + 8 : ihl + 13]  # ack, data offset
        assert seg[ihl + 14 : ihl + 16] == original[ihl + 14 : ihl + 16]  # window
        assert seg[ihl + 18 : hl] == original[ihl + 18 : hl]  # urgent pointer, options
        if version == 6:
            assert struct.unpack_from("!H", seg, 4)[0] == len(seg) - 40
            assert seg[:4] == original[:4] and seg[6:40] == original[6:40]
        else:
            assert struct.unpack_from("!H", seg, 2)[0] == len(seg)
            assert struct.unpack_from("!H", seg, 4)[0] == (id0 + i) & 0xFFFF
            assert rfc1071(seg[:20]) == 0
            assert seg[:2] == original[:2] and seg[6:10] == original[6:10] and seg[12:20] == original[12:20]
    merged = coalesce(segs)
    if len(segs) == 1:
        assert merged == [(NONE_HDR, segs[0])]
        return
    # The kernel's TSO input is exactly what GRO rebuilds: same header, same bytes.
    assert merged == [(vnet, original)]
    # And the merged packet splits back into the very same segments.
    assert segment(*merged[0]) == segs


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([4, 6]), st.integers(min_value=0, max_value=3000))
def test_gso_none_with_needs_csum_completes_the_checksum(version: int, size: int) -> None:
    pkt = tcp_packet(version, os.urandom(size), csum="partial")
    ihl = 40 if version == 6 else 20
    out = segment(VnetHeader(NEEDS_CSUM, GSO_NONE, 0, 0, ihl, 16).encode(), pkt)
    assert len(out) == 1
    assert tcp_checksum_ok(out[0])
    assert out[0][: ihl + 16] == pkt[: ihl + 16] and out[0][ihl + 18 :] == pkt[ihl + 18 :]


def test_gso_none_udp_partial_checksum_never_becomes_zero() -> None:
    for _ in range(50):
        pkt = bytearray(udp6(os.urandom(33)))
        udp_len = len(pkt) - 40
        struct.pack_into("!H", pkt, 46, fold(pseudo(bytes(pkt), udp_len, 17)))
        (out,) = segment(VnetHeader(NEEDS_CSUM, GSO_NONE, 0, 0, 40, 6).encode(), bytes(pkt))
        assert rfc1071(pseudo(out, udp_len, 17) + out[40:]) == 0
        assert out[46:48] != b"\0\0"


def test_gso_none_without_flags_is_untouched() -> None:
    pkt = tcp_packet(6, b"x" * 100, csum="bad")
    assert segment(NONE_HDR, pkt) == [pkt]


def test_mss_caps_the_segment_size() -> None:
    pkt = tcp_packet(6, os.urandom(10000), csum="partial")
    segs = segment(gso_header(pkt, 1400), pkt, mss=1000)
    assert [len(s) - 60 for s in segs] == [1000] * 10
    assert all(tcp_checksum_ok(s) for s in segs)


def test_scapy_agrees_with_our_checksums() -> None:
    scapy_all = pytest.importorskip("scapy.all")
    for version in (4, 6):
        pkt = tcp_packet(
            version, os.urandom(4001), flags=ACK | PSH, csum="partial", options=b"\x01\x01\x01\x00"
        )
        segs = segment(gso_header(pkt, 1300), pkt)
        assert len(segs) == 4
        for seg in segs:
            ip = scapy_all.IPv6(seg) if version == 6 else scapy_all.IP(seg)
            tcp = ip[scapy_all.TCP]
            ours_tcp = tcp.chksum
            del tcp.chksum
            if version == 4:
                ours_ip = ip.chksum
                del ip.chksum
            rebuilt = (scapy_all.IPv6 if version == 6 else scapy_all.IP)(bytes(ip))
            assert rebuilt[scapy_all.TCP].chksum == ours_tcp
            if version == 4:
                assert rebuilt.chksum == ours_ip
            assert bytes(rebuilt) == seg


@pytest.mark.parametrize(
    ("vnet", "packet"),
    [
        (VnetHeader(NEEDS_CSUM, GSO_TCPV6, 60, 1400, 40, 16).encode(), tcp_packet(6, b"a" * 3000)[:50]),
        (VnetHeader(NEEDS_CSUM, GSO_TCPV6, 60, 1400, 40, 16).encode(), tcp_packet(6, b"a" * 3000)[:-1]),
        (VnetHeader(NEEDS_CSUM, GSO_TCPV4, 40, 1400, 20, 16).encode(), tcp_packet(4, b"a" * 3000)[:-7]),
        (VnetHeader(NEEDS_CSUM, GSO_TCPV4, 40, 1400, 20, 16).encode(), tcp_packet(6, b"a" * 3000)),
        (VnetHeader(NEEDS_CSUM, GSO_TCPV6, 40, 1400, 20, 16).encode(), tcp_packet(4, b"a" * 3000)),
        (VnetHeader(NEEDS_CSUM, GSO_TCPV6, 60, 1400, 40, 16).encode(), b"\x50" + bytes(100)),
        (VnetHeader(NEEDS_CSUM, GSO_TCPV6, 60, 1400, 40, 16).encode(), b""),
        (VnetHeader(NEEDS_CSUM, GSO_TCPV6, 60, 0, 40, 16).encode(), tcp_packet(6, b"a" * 3000)),
        (VnetHeader(NEEDS_CSUM, GSO_UDP, 48, 1400, 40, 6).encode(), udp6(b"a" * 3000)),
        (VnetHeader(NEEDS_CSUM, GSO_TCPV6, 48, 1400, 40, 6).encode(), udp6(b"a" * 3000)),
        (VnetHeader(NEEDS_CSUM, GSO_NONE, 0, 0, 40, 16).encode(), tcp_packet(6, b"")[:55]),
        (b"\x01\x04", tcp_packet(6, b"a" * 3000)),
    ],
)
def test_malformed_input_raises_parse_error(vnet: bytes, packet: bytes) -> None:
    with pytest.raises(ParseError):
        segment(vnet, packet)


def test_inconsistent_tcp_and_ip_header_lengths_raise() -> None:
    pkt = bytearray(tcp_packet(4, b"a" * 3000))
    pkt[0] = 0x44  # IHL 16 bytes
    with pytest.raises(ParseError):
        segment(gso_header(bytes(tcp_packet(4, b"a" * 3000)), 1400), bytes(pkt))
    pkt = bytearray(tcp_packet(6, b"a" * 3000))
    pkt[52] = 0x40  # data offset 16 bytes
    with pytest.raises(ParseError):
        segment(gso_header(tcp_packet(6, b"a" * 3000), 1400), bytes(pkt))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([GSO_TCPV4, GSO_TCPV6]))
def test_garbage_never_escapes_as_anything_but_parse_error(data: bytes, gso: int) -> None:
    with contextlib.suppress(ParseError):
        segment(VnetHeader(NEEDS_CSUM, gso, 60, 16, 40, 16).encode(), data)
    coalesce([data, data])  # never raises: garbage passes through


# --- coalescing --------------------------------------------------------------------------------------------


def test_coalesce_merges_one_flow_with_partial_checksum_header() -> None:
    payload = os.urandom(1400 * 44 + 700)
    segs = segments_of(6, payload, 1400, flags=ACK)
    ((vnet, pkt),) = coalesce(segs)
    h = VnetHeader.decode(vnet)
    assert h == VnetHeader(NEEDS_CSUM, GSO_TCPV6, 60, 1400, 40, 16)
    assert pkt[60:] == payload
    assert struct.unpack_from("!H", pkt, 4)[0] == len(pkt) - 40
    assert struct.unpack_from("!H", pkt, 56)[0] == fold(pseudo(pkt, len(pkt) - 40))
    # Completing the partial checksum (what the kernel does) gives a valid packet.
    (done,) = segment(VnetHeader(NEEDS_CSUM, GSO_NONE, 0, 0, 40, 16).encode(), pkt)
    assert tcp_checksum_ok(done)


def test_coalesce_does_not_merge_across_a_sequence_gap() -> None:
    segs = segments_of(6, os.urandom(1400 * 4), 1400)
    out = coalesce(segs[:2] + segs[3:])
    assert [len(p) - 60 for _, p in out] == [2800, 1400]
    assert VnetHeader.decode(out[1][0]).gso_type == GSO_NONE


def test_coalesce_keeps_flows_apart_and_in_order() -> None:
    a = segments_of(6, os.urandom(1400 * 3), 1400, sport=1)
    b = segments_of(6, os.urandom(1400 * 3), 1400, sport=2)
    interleaved = [x for pair in zip(a, b, strict=True) for x in pair]
    out = coalesce(interleaved)
    assert [p for _, p in out] == [coalesce(a)[0][1], coalesce(b)[0][1]]
    assert out[0][1][60:] == b"".join(s[60:] for s in a)


@pytest.mark.parametrize(
    "mutate",
    [
        {"ack": 6000},
        {"sport": 1},
        {"flags": ACK | ECE},
        {"options": b"\x01\x01\x01\x00"},
        {"tos": 1},
        {"flow": 7},
    ],
)
def test_coalesce_splits_where_a_header_field_changes(mutate: dict[str, object]) -> None:
    payload = os.urandom(1400 * 4)
    segs = segments_of(6, payload, 1400)
    changed = segments_of(6, payload, 1400, **mutate)
    out = coalesce(segs[:2] + changed[2:])
    assert len(out) == 2
    assert out[0][1][60:] == payload[:2800]


def test_psh_or_fin_in_the_middle_ends_the_run() -> None:
    payload = os.urandom(1400 * 4)
    for flag in (PSH, FIN):
        segs = segments_of(6, payload, 1400)
        segs[1] = segments_of(6, payload, 1400, flags=ACK | flag)[1]
        out = coalesce(segs)
        assert len(out) == 2
        assert out[0][1][53] == ACK | flag  # the PSH/FIN of the run's last segment is kept
        assert VnetHeader.decode(out[0][0]).gso_type == GSO_TCPV6


def test_cwr_only_on_the_first_segment_of_a_run() -> None:
    payload = os.urandom(1400 * 3)
    segs = segments_of(6, payload, 1400)
    cwr = segments_of(6, payload, 1400, flags=ACK | CWR)
    assert len(coalesce([cwr[0], *segs[1:]])) == 1
    assert VnetHeader.decode(coalesce([cwr[0], *segs[1:]])[0][0]).gso_type == GSO_TCPV6 | GSO_ECN
    assert len(coalesce([segs[0], cwr[1], segs[2]])) == 2


def test_a_shorter_segment_that_is_not_last_ends_the_run() -> None:
    segs = [
        tcp_packet(6, b"a" * 1400, seq=0),
        tcp_packet(6, b"b" * 1000, seq=1400),
        tcp_packet(6, b"c" * 1400, seq=2400),
    ]
    out = coalesce(segs)
    assert [(VnetHeader.decode(v).gso_size, len(p) - 60) for v, p in out] == [(1400, 2400), (0, 1400)]


def test_a_longer_segment_does_not_join() -> None:
    segs = [tcp_packet(6, b"a" * 1000, seq=0), tcp_packet(6, b"b" * 1400, seq=1000)]
    assert [p for _, p in coalesce(segs)] == segs


def test_ipv4_id_must_increment_unless_df() -> None:
    payload = os.urandom(2800)
    segs = segments_of(4, payload, 1400, df=False)
    assert len(coalesce(segs)) == 1
    bad = [segs[0], tcp_packet(4, payload[1400:], seq=2400, ip_id=99, df=False)]
    assert len(coalesce(bad)) == 2
    df = [tcp_packet(4, payload[:1400], seq=1000, ip_id=0), tcp_packet(4, payload[1400:], seq=2400, ip_id=0)]
    ((vnet, pkt),) = coalesce(df)
    assert VnetHeader.decode(vnet).gso_type == GSO_TCPV4
    assert rfc1071(pkt[:20]) == 0 and struct.unpack_from("!H", pkt, 2)[0] == len(pkt)


def test_corrupt_segments_are_never_merged() -> None:
    payload = os.urandom(1400 * 3)
    segs = segments_of(6, payload, 1400)
    bad = segments_of(6, payload, 1400, csum="bad")
    out = coalesce([bad[0], segs[1], segs[2]])
    assert out[0] == (NONE_HDR, bad[0]) and len(out) == 2
    out = coalesce([segs[0], bad[1], segs[2]])
    assert [p for _, p in out] == [segs[0], bad[1], segs[2]]


def test_caps_on_segments_and_length() -> None:
    segs = segments_of(6, os.urandom(100 * 200), 100)
    out = coalesce(segs)
    assert [(len(p) - 60) // 100 for _, p in out] == [64, 64, 64, 8]
    big = segments_of(6, os.urandom(1500 * 50), 1500)
    out = coalesce(big)
    assert all(len(p) - 40 <= 65535 for _, p in out)
    assert b"".join(p[60:] for _, p in out) == b"".join(s[60:] for s in big)


def test_non_tcp_and_special_tcp_pass_through() -> None:
    others = [
        icmp6_echo(),
        udp6(b"x" * 1000),
        udp6(b"y" * 1000),
        tcp_packet(6, b"", flags=ACK),
        tcp_packet(6, b"", flags=SYN),
        tcp_packet(6, b"z" * 100, flags=ACK | RST, seq=0),
        tcp_packet(6, b"z" * 100, flags=ACK | URG, seq=100),
        b"",
        b"\x60garbage",
    ]
    assert coalesce(others) == [(NONE_HDR, p) for p in others]
    single = tcp_packet(4, b"q" * 500)
    assert coalesce([single]) == [(NONE_HDR, single)]


def test_verify_false_skips_the_checksum_check() -> None:
    payload = os.urandom(1400 * 3)
    bad = segments_of(6, payload, 1400, csum="bad")
    ((vnet, pkt),) = coalesce(bad, verify=False)
    assert VnetHeader.decode(vnet).gso_type == GSO_TCPV6 and pkt[60:] == payload


def test_ipv4_options_are_copied_into_every_segment() -> None:
    plain = tcp_packet(4, os.urandom(3000), ip_id=0xFFFF, csum="partial")
    hdr = bytearray(plain[:20] + b"\x01\x01\x01\x00")  # IHL 6: three NOPs and an end-of-options
    hdr[0] = 0x46
    struct.pack_into("!HH", hdr, 2, len(plain) + 4, 0xFFFF)
    struct.pack_into("!H", hdr, 10, 0)
    struct.pack_into("!H", hdr, 10, rfc1071(bytes(hdr)))
    pkt = bytes(hdr) + plain[20:]
    vnet = VnetHeader(NEEDS_CSUM, GSO_TCPV4, 44, 1400, 24, 16).encode()
    segs = segment(vnet, pkt)
    assert [len(s) - 44 for s in segs] == [1400, 1400, 200]
    for i, seg in enumerate(segs):
        assert rfc1071(seg[:24]) == 0 and seg[20:24] == b"\x01\x01\x01\x00"
        assert struct.unpack_from("!H", seg, 4)[0] == (0xFFFF + i) & 0xFFFF  # the ID wraps
        assert tcp_checksum_ok(seg)
    assert [p for _, p in coalesce(segs)] == segs  # IP options: never merged
