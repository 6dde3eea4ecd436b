"""In-memory stand-ins for the TUN device and the UDP transport, for running `tunneld.dataplane`'s loops
in virtual time (as wireguard-go's tun/tuntest and conn/bindtest).

`Wire` carries datagrams between `FakeUDP` ends with seeded loss and delay; a burst whose datagrams all
survive arrives as one UDP GRO receive, as on Linux. `FakeTun` is the host's side of the TUN: the test
injects packets (loose, or GSO superpackets that it segments as the real device does with offload)
and sees what the tunnel writes, through `on_write`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import trio

from tunneld.crypto.layout import SealLayout
from tunneld.fastpath.runs import RxRun, TxRun, interleave
from tunneld.fastpath.segment import segment, segment_run
from tunneld.proto.core import Address


class Readable:
    """A queue a loop can wait on, as on a file descriptor."""

    def __init__(self) -> None:
        self._ready = trio.Event()

    def wake(self) -> None:
        self._ready.set()

    async def wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            self._ready = trio.Event()
            await self._ready.wait()
        await trio.lowlevel.checkpoint()


class Wire:
    """A lossy, delaying network between FakeUDP ends (no reordering within one send)."""

    def __init__(self, seed: int, loss: float = 0.0, max_delay: float = 0.02) -> None:
        self.r = random.Random(seed)
        self.loss = loss
        self.max_delay = max_delay
        self.ends: dict[Address, FakeUDP] = {}
        self.nursery: trio.Nursery | None = None
        self.sent = 0
        self.dropped = 0
        self.gro_receives = 0

    def carry(self, src: Address, dest: Address, datagrams: Sequence[bytes], burst_size: int = 0) -> None:
        kept = []
        for d in datagrams:
            self.sent += 1
            if self.r.random() < self.loss:
                self.dropped += 1
            else:
                kept.append(d)
        end = self.ends.get(dest)
        if end is None or not kept:
            return
        if burst_size and len(kept) == len(datagrams) > 1:
            items = [(b"".join(kept), src, burst_size)]  # UDP GRO: one receive
            self.gro_receives += 1
        else:
            items = [(d, src, 0) for d in kept]
        assert self.nursery is not None
        self.nursery.start_soon(self._deliver, self.r.uniform(0, self.max_delay), end, items)

    @staticmethod
    async def _deliver(delay: float, end: FakeUDP, items: list[tuple[bytes, Address, int]]) -> None:
        await trio.sleep(delay)
        end.inbox += items
        end.wake()


class FakeUDP(Readable):
    """One end of the wire, with the face of `tunneld.net.udp.UDPTransport` the loops use."""

    def __init__(self, wire: Wire, addr: Address) -> None:
        super().__init__()
        self.wire = wire
        self.addr = addr
        self.inbox: list[tuple[bytes, Address, int]] = []
        wire.ends[addr] = self

    async def wait_readable(self) -> None:
        await self.wait(lambda: bool(self.inbox))

    def recv_runs(self, out: list[tuple[bytes, Address, int]], max_datagrams: int = 256) -> int:
        n = 0
        while self.inbox and n < max_datagrams:
            data, src, size = self.inbox.pop(0)
            out.append((data, src, size))
            n += -(-len(data) // size) if size else 1
        return n

    async def send_batch(self, datagrams: Sequence[bytes], dest: Address) -> None:
        await trio.lowlevel.checkpoint()
        self.wire.carry(self.addr, dest, list(datagrams))

    async def send_burst(self, buf: memoryview, size: int, dest: Address) -> None:
        await trio.lowlevel.checkpoint()
        self.wire.carry(self.addr, dest, [bytes(buf[o : o + size]) for o in range(0, len(buf), size)], size)


class FakeTun(Readable):
    """The TUN, with the face of `tunneld.net.tun.Tun` the loops use. `layout` is for segmenting
    injected superpackets into runs (as a TUN with offload); `on_write` sees every packet written."""

    def __init__(self, layout: SealLayout, on_write: Callable[[bytes], None] = lambda p: None) -> None:
        super().__init__()
        self.layout = layout
        self.on_write = on_write
        self.queue: list[tuple[bytes | None, bytes]] = []  # (virtio-net header or None, packet)
        self.written: list[tuple[float, bytes]] = []
        self.runs_written = 0

    def inject(self, packet: bytes, vnet: bytes | None = None) -> None:
        """The host sends `packet` into the tunnel (a superpacket if `vnet` is its GSO header)."""
        self.queue.append((vnet, packet))
        self.wake()

    async def wait_readable(self) -> None:
        await self.wait(lambda: bool(self.queue))

    def read_batch(self, packets: list[bytes], runs: list[TxRun], max_packets: int = 128) -> int:
        n = 0
        while self.queue and n < max_packets:
            vnet, packet = self.queue.pop(0)
            if vnet is None:
                packets.append(packet)
                n += 1
                continue
            run = segment_run(vnet, packet, self.layout)
            if run is None:
                segments = segment(vnet, packet)
                packets += segments
                n += len(segments)
                continue
            run.at = len(packets)
            runs.append(run)
            n += run.count
        return n

    def write_batch(self, packets: list[bytes], runs: list[RxRun]) -> int:
        now = trio.current_time()
        self.runs_written += len(runs)
        for p in interleave(packets, runs):
            self.written.append((now, p))
            self.on_write(p)
        return 0
