"""The offload fast path (issue 6): runs of packets handled as one object.

Every vectorised form is checked against the per-packet form it replaces, which stays the reference:
`seal_run` against `seal_many`, `open_run` against `open_many`, `commit_run` against `commit`,
`segment_run` against `segment`, `coalesce_run` against `coalesce`, and `TunnelCore.inbound_gro`
against `TunnelCore.inbound`. A fast path that does not apply must change nothing and say so (None),
so that the per-packet path, which counts every drop, runs instead.
"""

from __future__ import annotations

import ipaddress
import os

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_offload import ACK, CWR, FIN, PSH, SYN, gso_header, tcp_checksum_ok, tcp_packet
from tests.unit.test_tunnel_core import Net, run
from tunneld.crypto.aead import SUITES
from tunneld.crypto.esp import LAYOUT, NH_NONE, OVERHEAD_MAX, SecurityAssociation, lay_out, trailer
from tunneld.crypto.replay import ReplayWindow
from tunneld.fastpath.coalesce import coalesce, coalesce_run
from tunneld.fastpath.headers import GSO_NONE, VNET_HDR_LEN, VnetHeader
from tunneld.fastpath.runs import Burst, RxRun, TxRun
from tunneld.fastpath.segment import NATIVE_TCP6, segment, segment_run
from tunneld.net.tun import MAX_TCP_HEADERS, Tun, gso_max_size_for
from tunneld.net.udp import MAX_GSO_BYTES, MAX_GSO_SEGMENTS, UDPTransport

KEY = bytes(range(32))
SALT = bytes.fromhex("a0a1a2a3")
MSS = 1340
WALL = 1_700_000_002.0


def sa(esn: bool = True, top: int = 0, seq: int = 0, suite: str = "aes-256-gcm",
       native: bool = True) -> SecurityAssociation:
    s = SecurityAssociation(0x1000, KEY[: SUITES[suite].key_len], SALT, aead=suite, esn=esn, native=native)
    s.seq = seq
    s.replay.top = top
    return s


def superpacket(nseg: int, extra: int, *, seq: int = 1000, flags: int = ACK | PSH,
                options: bytes = b"") -> bytes:
    payload = os.urandom(MSS * nseg + extra)
    return tcp_packet(6, payload, seq=seq, flags=flags, options=options, csum="partial")


def wires_of(packets: list[bytes], start: int = 0, esn: bool = True) -> list[bytes]:
    return sa(esn, seq=start).seal_many(packets)


# -- ESP ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("esn", "start"), [(True, 0), (True, 2**32 - 3), (False, 0), (False, 2**32 - 20)])
@pytest.mark.parametrize("lengths", [[1400] * 7 + [1397], [1401] * 3, [40, 40], [1400, 7]])
def test_seal_run_is_seal_many_back_to_back(esn: bool, start: int, lengths: list[int]) -> None:
    packets = [os.urandom(n) for n in lengths]
    a, b = sa(esn, seq=start), sa(esn, seq=start)
    _seal_run_is_seal_many(a, b, packets, start)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_runs_in_every_suite(suite: str) -> None:
    packets = [os.urandom(1400) for _ in range(9)] + [os.urandom(99)]
    a, b = sa(seq=7, suite=suite), sa(seq=7, suite=suite)
    _seal_run_is_seal_many(a, b, packets, 7)
    wires = sa(seq=7, suite=suite).seal_many(packets)
    opened = sa(top=7, suite=suite).open_run(b"".join(wires), len(wires[0]))
    assert opened is not None and RxRun(*opened).packets() == packets


def _seal_run_is_seal_many(a: SecurityAssociation, b: SecurityAssociation, packets: list[bytes],
                           start: int) -> None:
    """Sealed in place, by the batch AES-GCM (where built) and by the reference: `seal_many`'s bytes."""
    ref = SecurityAssociation(a.spi, KEY[: a.suite.key_len], SALT, aead=a.suite.name, esn=a.esn, native=False)
    ref.seq = a.seq
    wires = b.seal_many(packets)
    for s in (a, ref):
        buf, size = s.seal_run(*lay_out([p + trailer(len(p)) for p in packets]))
        assert size == len(wires[0]) and bytes(buf) == b"".join(wires)
        assert Burst(buf, size).datagrams() == wires
        assert s.seq == b.seq == start + len(packets)


@pytest.mark.parametrize("native", [True, False])
def test_seal_run_checks_the_limit_and_the_layout_before_sealing(native: bool) -> None:
    s = sa(esn=False, seq=2**32 - 2, native=native)
    with pytest.raises(Exception, match="exhausted"):
        s.seal_run(*lay_out([b"x" * 40 + trailer(40)] * 3))
    for lengths in ([40, 44, 40], [40, 44], []):
        with pytest.raises(ValueError):
            lay_out([bytes(n) + trailer(n) for n in lengths])
    s = sa(native=native)
    buf, stride, count, last = lay_out([bytes(40) + trailer(40)] * 3)
    untouched = bytes(buf)
    for args in ((buf + b"x", stride, count, last), (buf, stride, count + 1, last), (buf, stride, 0, last),
                 (buf, stride, count, last + 4), (buf, 20, count, last), (buf[:-1], stride, count, last)):
        with pytest.raises(ValueError):
            s.seal_run(*args)
    assert s.seq == 0 and bytes(buf) == untouched


@pytest.mark.parametrize(("esn", "start"), [(True, 0), (True, 5000), (True, 2**32 - 10), (False, 0),
                                             (False, 2**32 - 30)])
@pytest.mark.parametrize("tail", [1400, 1397, 100, 40])
def test_open_run_is_open_many(esn: bool, start: int, tail: int) -> None:
    """In-order runs, across the 2**32 boundary of the ESN counter, with every kind of last datagram."""
    packets = [os.urandom(1400) for _ in range(20)] + [os.urandom(tail)]
    wires = wires_of(packets, start, esn)
    fast, ref = sa(esn, top=start), sa(esn, top=start)
    opened = fast.open_run(b"".join(wires), len(wires[0]))
    assert opened is not None
    assert RxRun(*opened).packets() == ref.open_many(wires) == packets
    assert fast.replay.snapshot() == ref.replay.snapshot()
    assert fast.rx_dropped == 0


def _refused(rx: SecurityAssociation, data: bytes, size: int) -> None:
    before = (rx.replay.snapshot(), rx.rx_auth_fail, rx.rx_malformed, rx.rx_replay, rx.rx_dummy)
    assert rx.open_run(data, size) is None
    assert (rx.replay.snapshot(), rx.rx_auth_fail, rx.rx_malformed, rx.rx_replay, rx.rx_dummy) == before


def test_open_run_refuses_and_changes_nothing_unless_everything_is_in_order() -> None:
    packets = [os.urandom(1400) for _ in range(10)]
    wires = wires_of(packets, 100)
    size = len(wires[0])
    rx = sa(top=100)
    # Any flipped bit anywhere: header (SPI, sequence, IV), ciphertext, ICV.
    data = b"".join(wires)
    for pos in (0, 5, 12, 16, 700, size - 1, 5 * size + 3, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        _refused(rx, bytes(bad), size)
    _refused(rx, b"".join(wires[:3] + wires[4:]), size)  # a gap
    _refused(rx, b"".join(wires[:3] + wires[2:]), size)  # a duplicate
    _refused(rx, b"".join(wires[1:] + wires[:1]), size)  # out of order
    _refused(rx, b"".join(wires[:1]), size)  # one datagram is not a run
    other = SecurityAssociation(0x2000, KEY, SALT)
    other.seq = 100
    _refused(rx, b"".join(wires[:5] + other.seal_many(packets[5:])), size)  # another SPI inside
    _refused(rx, b"".join(wires[:5] + wires[5:6]) + b"\0" * 3, size)  # a tail not 4-byte aligned
    assert rx.open_run(data, size) is not None
    _refused(rx, data, size)  # replayed as a whole
    # The per-packet path then sorts out what is wrong and counts it.
    ref = sa(top=100)
    assert ref.open_many(wires[:3] + wires[2:]) == packets
    assert ref.rx_replay == 1


def test_open_run_refuses_padding_it_does_not_expect() -> None:
    tx = sa()
    packets = [os.urandom(1400) for _ in range(4)]
    wires = [*tx.seal_many(packets[:2]), tx.seal(packets[2], next_header=NH_NONE), *tx.seal_many(packets[3:])]
    _refused(sa(), b"".join(wires), len(wires[0]))  # a dummy packet inside: per-packet path
    # Different inner lengths in the full slots (one pad length per run is the fast case).
    mixed = [os.urandom(1400), os.urandom(1399), os.urandom(1400)]
    w = sa().seal_many(mixed)
    assert len({len(x) for x in w}) == 1
    _refused(sa(), b"".join(w), len(w[0]))
    assert sa().open_many(w) == mixed


@settings(max_examples=200, deadline=None)
@given(top=st.integers(0, 2**40), gap=st.integers(1, 20_000), count=st.integers(1, 64))
def test_commit_run_is_commit_one_by_one(top: int, gap: int, count: int) -> None:
    a, b = ReplayWindow(), ReplayWindow()
    for w in (a, b):
        if top:
            assert w.commit(top)
            w.commit(max(1, top - 70))
    first = top + gap
    a.commit_run(first, count)
    for s in range(first, first + count):
        assert b.commit(s)
    assert a.snapshot() == b.snapshot()


def test_commit_run_refuses_what_is_not_a_fresh_run() -> None:
    w = ReplayWindow()
    w.commit(100)
    for first, count in ((100, 2), (50, 2), (101, 0), (101, 9000)):
        with pytest.raises(ValueError):
            w.commit_run(first, count)
    assert w.top == 100


# -- segmentation and coalescing ---------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(nseg=st.integers(2, 48), extra=st.integers(0, MSS), seq=st.integers(0, 2**32 - 1),
       flags=st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | PSH | FIN, ACK | CWR, ACK | CWR | PSH]),
       options=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(range(8))]))
def test_segment_run_is_segment(nseg: int, extra: int, seq: int, flags: int, options: bytes) -> None:
    """The C form (where built) and the NumPy form, each against the per-packet reference."""
    if nseg * MSS + extra + 60 + len(options) > 65535:
        nseg -= 2
    sp = superpacket(nseg, extra, seq=seq, flags=flags, options=options)
    vnet = gso_header(sp, MSS)
    ref = segment(vnet, sp)
    for native in (True, False):
        run = segment_run(vnet, sp, LAYOUT, native=native)
        assert run is not None
        assert run.packets() == ref
        assert all(bytes(s).endswith(trailer(len(p))) and len(s) == len(p) + len(trailer(len(p)))
                   for s, p in zip(run.plaintexts(), ref, strict=True))
        assert all(tcp_checksum_ok(p) for p in run.packets())
        assert run.dst == sp[24:40] and run.nbytes == sum(map(len, ref))
        assert len(run.buf) == (run.count - 1) * run.stride + run.head + run.last + run.tail


@pytest.mark.parametrize("native", [True, False])
def test_segment_run_declines_what_segment_handles_alone(native: bool) -> None:
    sp = superpacket(10, 5)
    assert segment_run(VnetHeader().encode(), sp, LAYOUT, native) is None  # not GSO
    assert segment_run(gso_header(sp, 20000), sp, LAYOUT, native) is None  # one full segment
    v4 = tcp_packet(4, os.urandom(5000), csum="partial")
    assert segment_run(gso_header(v4, 1000), v4, LAYOUT, native) is None
    assert segment_run(gso_header(sp, MSS), sp[:-1], LAYOUT, native) is None  # the length field disagrees
    # An odd segment size: the NumPy form leaves it to `segment`, the C form does it as `segment` would.
    odd = segment_run(gso_header(sp, 1339), sp, LAYOUT, native)
    if native and NATIVE_TCP6:
        assert odd is not None and odd.packets() == segment(gso_header(sp, 1339), sp)
    else:
        assert odd is None


def _run_of(packets: list[bytes]) -> RxRun:
    stride = max(map(len, packets)) + 4
    arena = bytearray(stride * len(packets))
    for i, p in enumerate(packets):
        arena[i * stride : i * stride + len(p)] = p
    return RxRun(arena, stride, [len(p) for p in packets])


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("extra", [0, 1, 700])
@pytest.mark.parametrize("flags", [ACK, ACK | PSH | FIN, ACK | CWR])
def test_coalesce_run_is_coalesce(extra: int, flags: int, native: bool) -> None:
    sp = superpacket(30, extra, flags=flags, options=b"\x01\x01\x08\x0a" + bytes(8))
    segs = segment(gso_header(sp, MSS), sp)
    iov = coalesce_run(_run_of(segs), native)
    assert iov is not None
    ((hdr, merged),) = coalesce(segs, verify=False)
    assert bytes(iov[0]) == hdr and b"".join(bytes(x) for x in iov[1:]) == merged
    # and what the TUN gets back is the superpacket the sender's kernel handed up (payload, headers)
    assert merged[60 + 12 :] == sp[60 + 12 :]


@pytest.mark.parametrize("native", [True, False])
def test_coalesce_run_declines_anything_but_one_in_order_flow(native: bool) -> None:
    segs = segment(gso_header(superpacket(6, 100), MSS), superpacket(6, 100))
    cases = {
        "reordered": segs[:2] + segs[3:4] + segs[2:3] + segs[4:],
        "two flows": [*segs[:3], tcp_packet(6, bytes(MSS), seq=1000 + 3 * MSS, sport=1), *segs[4:]],
        "psh in the middle": [*segs[:2], segs[2][:53] + bytes([ACK | PSH]) + segs[2][54:], *segs[3:]],
        "syn": [segs[0][:53] + bytes([ACK | SYN]) + segs[0][54:], *segs[1:]],
        "window changes": [*segs[:2], segs[2][:54] + b"\x7f\xff" + segs[2][56:], *segs[3:]],
        "one packet": segs[:1],
        "not tcp": [b"\x60" + bytes(5) + b"\x3b\x40" + bytes(32) + bytes(MSS)] * 3,
    }
    for name, pkts in cases.items():
        run = _run_of(pkts)
        before = bytes(run.arena)
        assert coalesce_run(run, native) is None, name
        assert bytes(run.arena) == before, name  # declined: the arena is as it was
    # The caller's fallback (coalesce) follows the same rules (a window change ends a merge, as the
    # kernel's tcp_gro_receive compares the whole flag word), and still merges what they allow.
    merged = coalesce(cases["window changes"], verify=False)
    assert [VnetHeader.decode(h).gso_type for h, _ in merged] == [4, GSO_NONE, 4]  # 0-1 | 2 | 3-6
    assert [h[1] for h in coalesce(cases["reordered"], verify=False)] != [GSO_NONE] * 6


# -- the tunnel core ---------------------------------------------------------------------------------------


A_ULA = ipaddress.IPv6Address("fd00:1::a")
B_ULA = ipaddress.IPv6Address("fd00:1::b")


def a_to_b(packet: bytes) -> bytes:
    """The packet with the simulation's a as source and b as destination (the TCP checksum is not
    recomputed: nothing here checks it)."""
    return packet[:8] + A_ULA.packed + B_ULA.packed + packet[40:]


def _established() -> Net:
    """Two cores with a confirmed session, from the in-memory simulation."""
    net = Net(1, gro=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net.start(nursery)
            net.send(net.a, 0)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()

    run(main)
    assert net.confirmed_pair()
    return net


def test_inbound_gro_opens_a_run_whole_and_checks_every_inner_source() -> None:
    net = _established()
    a, b = net.a, net.b
    now = 2.0
    good = [a_to_b(tcp_packet(6, os.urandom(1000), seq=i)) for i in range(8)]
    (flight,) = a.core.outbound(good, [], now, WALL).sends
    dest, datagrams = flight.destination, flight.datagrams
    gro = [(b"".join(datagrams), dest, len(datagrams[0]))]
    rx_before = b.peer.rx_packets
    out = b.core.inbound_gro(gro, now, WALL)
    (item,) = out.tun_runs
    assert out.tun_packets == [] and item.packets() == good
    assert b.peer.rx_packets == rx_before + 8
    # A spoofed inner source inside a run: that packet alone is dropped and counted.
    spoofed = [*good[:3], good[3][:8] + ipaddress.IPv6Address("fd00:1::c").packed + good[3][24:], *good[4:]]
    (flight,) = a.core.outbound(spoofed, [], now, WALL).sends
    dest, datagrams = flight.destination, flight.datagrams
    out = b.core.inbound_gro([(b"".join(datagrams), dest, len(datagrams[0]))], now, WALL)
    assert out.tun_runs == [] and out.tun_packets == good[:3] + good[4:]
    assert b.peer.dropped_spoofed == 1


def test_inbound_gro_keeps_arrival_order_between_single_datagrams_and_runs() -> None:
    net = _established()
    a, b = net.a, net.b
    now = 2.0
    pkts = [a_to_b(tcp_packet(6, os.urandom(500), seq=i)) for i in range(9)]
    (flight,) = a.core.outbound(pkts, [], now, WALL).sends
    dest, w = flight.destination, flight.datagrams
    batch = [(w[0], dest, 0), (b"".join(w[1:5]), dest, len(w[1])), (w[5], dest, 0),
             (b"".join(w[7:9]), dest, len(w[7])), (w[6], dest, 0)]  # 6 arrives after 7 and 8
    out = b.core.inbound_gro(batch, now, WALL)
    assert out.tun_in_order() == pkts[:6] + pkts[7:9] + pkts[6:7]
    assert len(out.tun_runs) == 2 and [r.at for r in out.tun_runs] == [1, 2]
    assert out.tun_packets == [pkts[0], pkts[5], pkts[6]]


def test_outbound_seals_a_txrun_as_a_burst_in_order_with_loose_packets() -> None:
    net = _established()
    a, b = net.a, net.b
    now = 2.0
    sp = superpacket(5, 77)
    sp = a_to_b(sp)
    run = segment_run(gso_header(sp, MSS), sp, LAYOUT)
    assert isinstance(run, TxRun)
    loose = [a_to_b(tcp_packet(6, b"ack", seq=7))]
    run.at = 1  # after the first loose packet
    inner = run.packets()  # sealing is in place: the run holds datagrams afterwards
    (flight,) = a.core.outbound([loose[0], loose[0]], [run], now, WALL).sends
    assert len(flight.datagrams) == 2 and [b.at for b in flight.bursts] == [1]
    assert isinstance(flight.bursts[0], Burst)
    datagrams = flight.all_datagrams()
    out = b.core.inbound([(d, flight.destination) for d in datagrams], now, WALL)
    assert out.tun_packets == loose + inner + loose
    # sealed in sending order: the sequence numbers follow the datagrams
    seqs = [int.from_bytes(d[4:8], "big") for d in datagrams]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_outbound_counts_each_runs_place_again_within_its_destination() -> None:
    """Runs and loose packets to several destinations: each destination's flight keeps their order,
    with a run's `at` counted among that destination's loose packets only."""
    net = _established()
    a, b = net.a, net.b
    now = 2.0
    nowhere = ipaddress.IPv6Address("fd00:1::99").packed

    def to(dst: bytes, packet: bytes) -> bytes:
        return packet[:24] + dst + packet[40:]

    ack = a_to_b(tcp_packet(6, b"ack", seq=7))
    lost = to(nowhere, ack)
    run_b = segment_run(gso_header(a_to_b(superpacket(3, 5)), MSS), a_to_b(superpacket(3, 5)), LAYOUT)
    sp = to(nowhere, superpacket(4, 0))
    run_x = segment_run(gso_header(sp, MSS), sp, LAYOUT)
    assert run_b is not None and run_x is not None
    run_x.at, run_b.at = 1, 2  # ack | lost, run_x | run_b, ack
    before = a.core.counters.tx_no_route
    inner_b = run_b.packets()  # sealing is in place
    (flight,) = a.core.outbound([ack, lost, ack], [run_x, run_b], now, WALL).sends
    assert a.core.counters.tx_no_route == before + 1 + run_x.count
    assert [burst.at for burst in flight.bursts] == [1]  # after b's first loose packet, not after two
    out = b.core.inbound([(d, flight.destination) for d in flight.all_datagrams()], now, WALL)
    assert out.tun_packets == [ack, *inner_b, ack]


# -- UDP ------------------------------------------------------------------------------------------------


def test_send_burst_arrives_as_the_datagrams_and_recv_runs_keeps_gro_whole() -> None:
    """Over loopback: a Burst goes out as GSO sends of whole datagrams (split every 64 KB), and a GRO
    receive is handed up as one buffer with its segment size."""
    bodies = [os.urandom(1416) for _ in range(70)] + [os.urandom(333)]
    buf = memoryview(b"".join(bodies))
    got: list[tuple[bytes, tuple[str, int], int]] = []
    flags: dict[str, bool] = {}

    async def main() -> None:
        rx = UDPTransport(0, "::1")
        tx = UDPTransport(0, "::1")
        try:
            await tx.send_burst(buf, 1416, ("::1", rx.local_port))
            with trio.fail_after(5):
                while sum(-(-len(d) // s) if s else 1 for d, _, s in got) < len(bodies):
                    await rx.wait_readable()
                    rx.recv_runs(got)
            flags.update(gro=rx.gro, gso=tx.gso)
        finally:
            rx.close()
            tx.close()

    trio.run(main)
    datagrams = []
    for data, _src, size in got:
        datagrams += [data[o : o + size] for o in range(0, len(data), size)] if size else [data]
    assert datagrams == bodies
    if flags["gro"] and flags["gso"]:
        assert any(size for _, _, size in got)  # loopback merged at least one burst


@pytest.mark.parametrize("mtu", [1280, 1400, 1420, 1500, 9000])
def test_a_superpacket_of_the_chosen_size_fits_one_gso_send(mtu: int) -> None:
    """With the TUN's gso_max_size from gso_max_size_for, every superpacket (any TCP header length)
    splits into segments that, sealed, fit one UDP GSO send: one sendmsg, one run at the peer."""
    g = gso_max_size_for(mtu, LAYOUT.overhead)
    for hl in range(60, MAX_TCP_HEADERS + 1, 4):
        segments = -(-(g - hl) // (mtu - hl))
        assert segments * (mtu + OVERHEAD_MAX) <= MAX_GSO_BYTES, (hl, segments)
        assert segments <= MAX_GSO_SEGMENTS
    assert -(-(g - 72) // (mtu - 72)) >= MAX_GSO_BYTES // (mtu + OVERHEAD_MAX) - 1  # and not much smaller


def test_tun_writes_runs_and_packets_in_order_and_falls_back_for_a_broken_run() -> None:
    """Tun.write_batch with offload: loose packets, a mergeable run (one writev of the merged
    superpacket) and a run that is not one flow (merged by coalesce instead), in arrival order. The
    device is a pipe here, so the test reads back exactly the byte stream the writes produced."""
    segs = segment(gso_header(superpacket(4, 9), MSS), superpacket(4, 9))
    other = segment(gso_header(superpacket(3, 0, seq=9), MSS), superpacket(3, 0, seq=9))
    changed = [other[0], other[1], other[2][:54] + b"\x7f\xff" + other[2][56:]]  # the window changes
    # a run of `changed`: coalesce_run declines; coalesce merges the first two
    loose = tcp_packet(6, b"loose")
    r, w = os.pipe()
    try:
        tun = Tun.__new__(Tun)
        tun.offload, tun.fd, tun.superpackets_written = True, w, 0
        run, broken_run = _run_of(segs), _run_of(changed)
        run.at = broken_run.at = 1  # both after the first loose packet
        assert tun.write_batch([loose, loose], [run, broken_run]) == 0
        assert tun.superpackets_written == 2  # the run, and the broken run merged by coalesce
        os.close(w)
        w = -1
        got = b""
        while chunk := os.read(r, 1 << 20):
            got += chunk
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    none = bytes(VNET_HDR_LEN)
    want = none + loose
    want += b"".join(bytes(x) for x in coalesce_run(_run_of(segs)) or [])
    want += b"".join(h + p for h, p in coalesce(changed, verify=False))
    want += none + loose
    assert got == want


def test_plain_tun_writes_runs_packet_by_packet_in_their_place() -> None:
    """Tun.write_batch without offload: a run goes out as its packets, one write each, after the first
    `run.at` loose packets (read back through a pipe standing in for the device)."""
    segs = segment(gso_header(superpacket(3, 9), MSS), superpacket(3, 9))
    first, last = tcp_packet(6, b"first"), tcp_packet(6, b"last")
    r, w = os.pipe()
    try:
        tun = Tun.__new__(Tun)
        tun.offload, tun.fd = False, w
        run = _run_of(segs)
        run.at = 1
        assert tun.write_batch([first, last], [run]) == 0
        os.close(w)
        w = -1
        got = b""
        while chunk := os.read(r, 1 << 20):
            got += chunk
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert got == first + b"".join(segs) + last


def test_the_daemon_can_keep_freed_memory_on_glibc() -> None:
    """The per-run buffers must not make glibc trim the heap and fault pages back in per superpacket
    (tunneld.daemon.keep_freed_memory); CI's Debian has glibc, where mallopt accepts the setting."""
    import platform

    from tunneld.daemon import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
