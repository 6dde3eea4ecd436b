"""The data plane: the daemon's three loops around a TunnelCore, over any TUN and UDP transport.

    TUN --read until EAGAIN--> core.outbound --> UDP (loose datagrams and GSO bursts per destination)
    UDP --recv until EAGAIN (GRO whole)--> core.inbound_gro --> TUN, and replies --> UDP
    timer --> core.poll --> UDP
    STUN that came in on UDP --> on_stun (the NAT service's STUN and TURN clients)

All decisions are the core's; these loops only move bytes and read the clocks. The TUN and the
transport are reached through two small protocols, so that tests run these very loops over in-memory
fakes in virtual time (as wireguard-go's tun/tuntest and conn/bindtest).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

from tunneld.fastpath.runs import RxRun, TxRun
from tunneld.proto.core import Address
from tunneld.proto.tunnel import Output, TunnelCore, TunnelEvent

log = logging.getLogger("tunneld")

TIMER_TICK = 0.25  # seconds: the timer loop's longest sleep, so newly armed timers are seen soon


class TunDevice(Protocol):
    """What the loops need of the TUN (`tunneld.net.tun.Tun`)."""

    async def wait_readable(self) -> None: ...

    def read_batch(self, packets: list[bytes], runs: list[TxRun], max_packets: int = 128) -> int:
        """Drain what is ready: loose packets, and runs each after the first `run.at` packets."""
        ...

    def write_batch(self, packets: list[bytes], runs: list[RxRun]) -> int:
        """Write in order; returns how many writes were dropped."""
        ...


class Transport(Protocol):
    """What the loops need of the outer UDP socket (`tunneld.net.udp.UDPTransport`)."""

    async def wait_readable(self) -> None: ...

    def recv_runs(self, out: list[tuple[bytes, Address, int]], max_datagrams: int = 256) -> int:
        """Drain what is ready: (buffer, source, GRO segment size or 0) per receive."""
        ...

    async def send_batch(self, datagrams: Sequence[bytes], dest: Address) -> None: ...

    async def send_burst(self, buf: memoryview, size: int, dest: Address) -> None: ...


def _log_event(event: TunnelEvent) -> None:
    log.info("%s", event)


class Dataplane:
    """The loops of one tunnel. `wall` is the Unix clock the handshake's timestamps need; `now` is
    trio's clock (virtual under a MockClock)."""

    def __init__(self, core: TunnelCore, tun: TunDevice, udp: Transport,
                 wall: Callable[[], float] = time.time,
                 on_event: Callable[[TunnelEvent], None] = _log_event) -> None:
        self.core = core
        self.tun = tun
        self.udp = udp
        self.wall = wall
        self.on_event = on_event
        # STUN messages that came in on the tunnel socket go here (the NAT service); None: dropped.
        self.on_stun: Callable[[bytes, Address], None] | None = None
        self.tun_write_drops = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._udp_loop)
            await nursery.start(self._tun_loop)
            await nursery.start(self._timer_loop)
            task_status.started()

    async def send(self, out: Output) -> None:
        """Carry out a core's output: TUN writes, then sends in order, then its events."""
        if out.tun_packets or out.tun_runs:
            self.tun_write_drops += self.tun.write_batch(out.tun_packets, out.tun_runs)
        udp = self.udp
        for flight in out.sends:
            dest, datagrams = flight.destination, flight.datagrams
            prev = 0
            for burst in flight.bursts:
                if burst.at > prev:
                    await udp.send_batch(datagrams[prev : burst.at], dest)
                    prev = burst.at
                await udp.send_burst(burst.buf, burst.size, dest)
            if prev < len(datagrams):
                await udp.send_batch(datagrams[prev:] if prev else datagrams, dest)
        for event in out.events:
            self.on_event(event)
        if out.stun and self.on_stun is not None:
            for data, source in out.stun:
                self.on_stun(data, source)

    async def _tun_loop(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        tun, core = self.tun, self.core
        task_status.started()
        while True:
            await tun.wait_readable()
            packets: list[bytes] = []
            runs: list[TxRun] = []
            tun.read_batch(packets, runs)
            await self.send(core.outbound(packets, runs, trio.current_time(), self.wall()))

    async def _udp_loop(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        core = self.core
        task_status.started()
        while True:
            udp = self.udp
            try:
                await udp.wait_readable()
            except (OSError, trio.ClosedResourceError):
                await trio.sleep(0)  # the socket was replaced (rebind); wait on the new one
                continue
            batch: list[tuple[bytes, Address, int]] = []
            udp.recv_runs(batch)
            await self.send(core.inbound_gro(batch, trio.current_time(), self.wall()))

    async def _timer_loop(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        polled_at = -math.inf
        while True:
            now = trio.current_time()
            deadline = self.core.deadline()
            if deadline is None or deadline <= polled_at:
                # Nothing armed, or a deadline the last poll should have cleared: never spin on it.
                wake = now + TIMER_TICK
            else:
                wake = min(deadline, now + TIMER_TICK)
            await trio.sleep_until(max(wake, now))
            polled_at = trio.current_time()
            await self.send(self.core.poll(polled_at, self.wall()))
