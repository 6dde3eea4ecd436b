"""The one trio driver: runs any sans-I/O core (:mod:`tunneld.proto.core`) over its sockets.

Datagrams go to ``core.receive``, timers to ``core.poll`` at ``core.deadline()``; whatever the core then
has to send leaves by ``sendto`` on the first socket, and its events go to the service's ``on_event``. On
cancellation the core is closed and its last messages (deletes, withdrawals) get a bounded, shielded grace
to leave and be answered. A service is then: which sockets, which core, what to do with its events.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import trio

from tunneld.proto.core import Core

__all__ = ["MAX_NAP", "DatagramPort", "Driver", "ServerLink", "ServerPort", "connect_udp"]

log = logging.getLogger("tunneld.driver")

E = TypeVar("E")

MAX_NAP = 30.0
"""Longest sleep between looks at the deadline: a core on the wall clock notices a clock step (or a
resume from suspend) within this time."""


class DatagramPort(Protocol):
    """What the driver needs of a socket: a trio UDP socket, or a port onto a socket someone else owns
    (the NAT service's clients share the tunnel's socket through one)."""

    def recvfrom(self, bufsize: int, /) -> Awaitable[tuple[bytes, Any]]: ...

    def sendto(self, data: bytes, address: Any, /) -> Awaitable[int]: ...


class Driver(Generic[E]):
    """Drive ``core`` over ``sockets`` (already bound or connected; the first one sends).

    ``clock`` is the core's clock (``trio.current_time`` or a wall clock); ``grace`` bounds the goodbye.
    Outside calls into the core (``core.publish(..., driver.now())``) are followed by :meth:`wake`, which
    sends what they produced and lets the timer loop look at the new deadline.
    """

    def __init__(self, core: Core[E], sockets: Sequence[DatagramPort], *,
                 on_event: Callable[[E], None] = lambda event: None,
                 clock: Callable[[], float] = trio.current_time, grace: float = 1.0,
                 max_datagram: int = 65535, name: str = "core") -> None:
        if not sockets:
            raise ValueError("the driver needs at least one socket")
        self.core = core
        self.sockets = list(sockets)
        self.on_event = on_event
        self.clock = clock
        self.grace = grace
        self.max_datagram = max_datagram
        self.name = name
        self.send_errors = 0
        self.receive_errors = 0
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._receivers: trio.CancelScope | None = None

    def now(self) -> float:
        return self.clock()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, then say goodbye within ``grace``. Reports ready once the core's
        first messages have been sent."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._start_receivers()
                self.core.poll(self.clock())
                await self._flush()
                task_status.started()
                await self._timers()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(self.grace):
                await self._goodbye()

    def reopen(self, sockets: Sequence[DatagramPort]) -> None:
        """Carry on over new sockets (the network moved and the old ones are bound to a vanished
        address); the core and its state stay. The caller closes the old sockets afterwards."""
        if not sockets:
            raise ValueError("the driver needs at least one socket")
        self.sockets = list(sockets)
        if self._receivers is not None:
            self._receivers.cancel()
        if self._nursery is not None:
            self._start_receivers()
        self.wake()

    def _start_receivers(self) -> None:
        assert self._nursery is not None
        scope = self._receivers = trio.CancelScope()
        sockets = list(self.sockets)

        async def receivers() -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    for sock in sockets:
                        nursery.start_soon(self._receive, sock)

        self._nursery.start_soon(receivers)

    async def _timers(self, until_finished: bool = False) -> None:
        while not (until_finished and self.core.finished()):
            deadline = self.core.deadline()
            nap = MAX_NAP if deadline is None else min(MAX_NAP, max(0.0, deadline - self.clock()))
            with trio.move_on_after(nap):
                await self._wake.wait()
            self._wake = trio.Event()
            self.core.poll(self.clock())
            await self._flush()

    async def _goodbye(self) -> None:
        self.core.close(self.clock())
        await self._flush()
        if self.core.finished():
            return
        async with trio.open_nursery() as nursery:
            for sock in self.sockets:
                nursery.start_soon(self._receive, sock)
            await self._timers(until_finished=True)
            nursery.cancel_scope.cancel()

    async def _receive(self, sock: DatagramPort) -> None:
        while True:
            try:
                data, source = await sock.recvfrom(self.max_datagram)
            except trio.ClosedResourceError:  # closed under us (reopen): the new receivers carry on
                return
            except OSError as e:  # an ICMP error for an earlier send: the core retransmits
                self.receive_errors += 1
                log.debug("%s: receive: %s", self.name, e)
                continue
            self.core.receive(data, (source[0], source[1]), self.clock())
            await self._flush()
            self._wake.set()  # the deadline may have moved

    async def _flush(self) -> None:
        sock = self.sockets[0]
        for t in self.core.transmits():
            try:
                await sock.sendto(t.payload, t.destination)
            except OSError as e:  # no route right now: the core's timers retry
                self.send_errors += 1
                log.debug("%s: send to %s: %s", self.name, t.destination, e)
        for event in self.core.events():
            self.on_event(event)


async def connect_udp(server: tuple[str, int]) -> trio.socket.SocketType:
    """A UDP socket connected to ``server``: the kernel drops datagrams from anyone else, and the source
    address is chosen by the routes of the moment (so after a network change, a new one is needed)."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        await sock.connect(server)
    except BaseException:
        sock.close()
        raise
    return sock


class ServerPort(DatagramPort, Protocol):
    """A port to one server that its owner closes: a connected UDP socket, or a DNS-over-TLS connection
    (tunneld.services.tlsport)."""

    def close(self) -> None: ...


class ServerLink(Generic[E]):
    """A core that talks to one server (the publisher, the watcher), on the wall clock, over a port that
    ``connect`` opens: a connected UDP socket by default, DNS over TLS with the account's transport set so.
    :meth:`reopen` moves it to a fresh port when the network changed under it."""

    def __init__(self, core: Core[E], server: tuple[str, int], *, grace: float, name: str,
                 connect: Callable[[tuple[str, int]], Awaitable[ServerPort]] = connect_udp) -> None:
        self.core = core
        self.server = server
        self.grace = grace
        self.name = name
        self.connect = connect
        self.reopened = 0
        self._sock: ServerPort | None = None
        self.driver: Driver[E] | None = None

    def on_event(self, event: E) -> None:
        """What to do with the core's events (a subclass's business)."""

    def ready(self, driver: Driver[E]) -> None:
        """Called once the socket is up, before the driver runs: hand the core its first work."""

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._sock = await self.connect(self.server)
        try:
            self.driver = Driver(self.core, [self._sock], on_event=self.on_event, clock=time.time,
                                 grace=self.grace, name=self.name)
            self.ready(self.driver)
            await self.driver.run(task_status=task_status)
        finally:
            self.driver = None
            self._sock.close()

    async def reopen(self) -> bool:
        """A new socket (the old one's source address may be gone); False if not running."""
        if self.driver is None or self._sock is None:
            return False
        new = await self.connect(self.server)
        old, self._sock = self._sock, new
        self.driver.reopen([new])
        old.close()
        self.reopened += 1
        return True
