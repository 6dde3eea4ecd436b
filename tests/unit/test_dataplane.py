"""The daemon's own packet loops (`tunneld.dataplane.Dataplane`) between two tunnel cores, over in-memory
TUN and UDP fakes (tests/unit/fake_io.py), in virtual time: pings both ways over a lossy network for
longer than a session lives (so rekeys must happen), and a TCP superpacket that crosses as runs.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections import Counter

import pytest
import trio
import trio.testing

from tests.helpers import drbg
from tests.unit.fake_io import FakeTun, FakeUDP, Wire
from tests.unit.test_offload import ACK, PSH, gso_header, tcp_packet
from tunneld.crypto.kdf import derive_psk
from tunneld.crypto.noise import generate_keypair
from tunneld.dataplane import Dataplane
from tunneld.proto.core import Address
from tunneld.proto.peer import Timers
from tunneld.proto.tunnel import PeerMoved, TunnelCore, TunnelEvent

EPOCH = 1_700_000_000.0
PSK = derive_psk(bytes(range(32)), "example.net")
A_ADDR: Address = ("::ffff:192.0.2.1", 4500)
B_ADDR: Address = ("::ffff:192.0.2.2", 4500)
A_ULA = ipaddress.IPv6Address("fd00:1::a")
B_ULA = ipaddress.IPv6Address("fd00:1::b")
T = Timers()
DURATION = 400.0  # past reject_after_time (180 s) twice: traffic only goes on if the sessions rekey
BULK_AT = 50.5  # between two pings: nothing else from a is in flight to overtake the burst
MSS = 1340


def ping(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, kind: bytes, seq: int) -> bytes:
    """A minimal IPv6 packet (next header 59) carrying `kind` (b"req" or b"rep") and `seq`."""
    payload = kind + seq.to_bytes(8, "big")
    return struct.pack("!IHBB", 6 << 28, len(payload), 59, 64) + src.packed + dst.packed + payload


class Host:
    """One side: its core, its loops, its fake devices, and the host behind the TUN that answers pings."""

    def __init__(self, name: str, addr: Address, ula: ipaddress.IPv6Address, wire: Wire, seed: int) -> None:
        self.name, self.addr, self.ula = name, addr, ula
        self.priv, self.pub = generate_keypair()
        self.core = TunnelCore(self.priv, PSK, timers=T, rand=drbg(seed))
        self.tun = FakeTun(self.core.layout, self._on_write)
        self.udp = FakeUDP(wire, addr)
        self.events: list[TunnelEvent] = []
        self.plane = Dataplane(self.core, self.tun, self.udp, wall=lambda: EPOCH + trio.current_time(),
                               on_event=self.events.append)
        self.requests: dict[int, float] = {}  # seq -> when our ping left
        self.replies: dict[int, float] = {}  # seq -> when its reply arrived
        self.tcp: list[bytes] = []  # TCP segments that arrived
        self.sources: set[bytes] = set()

    def _on_write(self, packet: bytes) -> None:
        self.sources.add(packet[8:24])
        if packet[6] == 6:
            self.tcp.append(packet)
            return
        kind, seq = packet[40:43], int.from_bytes(packet[43:51], "big")
        if kind == b"req":  # the host answers at once, as a kernel answers an echo request
            self.tun.inject(ping(self.ula, ipaddress.IPv6Address(packet[8:24]), b"rep", seq))
        else:
            assert seq not in self.replies, f"reply {seq} twice"
            self.replies[seq] = trio.current_time()

    async def pinger(self, peer: Host, first: int) -> None:
        seq = first
        while trio.current_time() < DURATION:
            self.requests[seq] = trio.current_time()
            self.tun.inject(ping(self.ula, peer.ula, b"req", seq))
            seq += 1
            await trio.sleep(1.0)


@pytest.mark.parametrize("seed", range(3))
def test_two_daemons_loops_ping_both_ways_across_rekeys_and_loss(seed: int) -> None:
    """10% loss each way, a ping each second from each side for 400 s of virtual time.

    Asserted: at least 70% of each side's pings are answered (a round trip survives with p = 0.81);
    pings are still answered in the last 100 s, long after the first session expired, so the loops
    carried the rekeys (several handshakes per side); nothing arrives twice and every packet on a TUN
    came from the other side's ULA. At t=50.5 (loss paused) a 12-segment TCP superpacket injected into
    a's TUN is segmented into a run, sealed as one GSO burst, received as one GRO run and written to
    b's TUN as a run: the 12 segments arrive whole and in order."""
    wire = Wire(seed, loss=0.1)
    a = Host("a", A_ADDR, A_ULA, wire, seed * 2)
    b = Host("b", B_ADDR, B_ULA, wire, seed * 2 + 1)
    a.core.add_peer("b", b.pub, B_ULA, B_ADDR)
    b.core.add_peer("a", a.pub, A_ULA, A_ADDR)
    payload = os.urandom(MSS * 12)
    sp = tcp_packet(6, payload, seq=1, flags=ACK | PSH, csum="partial")
    sp = sp[:8] + A_ULA.packed + B_ULA.packed + sp[40:]

    async def bulk() -> None:
        await trio.sleep(BULK_AT)
        wire.loss = 0.0
        a.tun.inject(sp, gso_header(sp, MSS))
        await trio.sleep(1.0)
        wire.loss = 0.1

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            wire.nursery = nursery
            await nursery.start(a.plane.run)
            await nursery.start(b.plane.run)
            nursery.start_soon(a.pinger, b, 0)
            nursery.start_soon(b.pinger, a, 1_000_000)
            nursery.start_soon(bulk)
            await trio.sleep(DURATION + 5.0)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    assert wire.dropped > 0
    for host, other in ((a, b), (b, a)):
        sent, answered = host.requests, host.replies
        assert set(answered) <= set(sent)
        assert len(answered) >= 0.7 * len(sent), (host.name, len(answered), len(sent))
        late = [s for s, t in sent.items() if t >= DURATION - 100 and s in answered]
        assert len(late) >= 50, (host.name, len(late))
        assert host.sources == {other.ula.packed}
        (peer,) = host.core.by_key.values()
        assert peer.handshakes >= 3, (host.name, peer.handshakes)
        assert host.plane.tun_write_drops == 0
        assert not [e for e in host.events if isinstance(e, PeerMoved)]  # nobody roamed
    # The superpacket: one run out of a, one GRO receive, one run into b's TUN, segments in order.
    assert a.core.counters.tx_runs == 1 and a.core.counters.tx_run_datagrams == 12
    assert b.core.counters.rx_runs == 1 and b.tun.runs_written == 1
    assert len(b.tcp) == 12 and b"".join(p[60:] for p in b.tcp) == payload
    assert Counter(int.from_bytes(p[44:48], "big") for p in b.tcp) == Counter(1 + i * MSS for i in range(12))
