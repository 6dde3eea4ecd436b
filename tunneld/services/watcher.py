"""The watching service: the :class:`Watcher` core over one UDP socket, run by the :class:`Driver`.

It runs the watcher's long-lived queries against the account's DNS server: the account's browse PTR, then
each device's records. Each complete, consistent record set becomes a peer in the tunnel's table (through
the ``on_event`` callback the daemon gives); a device that goes away is forgotten. The queries carry TSIG
(for privacy), so the core runs on the wall clock. On shutdown the driver lets the LLQ cancellations leave.
An answer that came truncated is fetched over TCP (the core's :class:`TcpQuery`): one exchange per
request, its reply handed to the core like a datagram.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from typing import Any

import dns.name
import trio

from tunneld.proto.llq import LLQ_TCP_TIMEOUT
from tunneld.proto.tsig import TsigKey
from tunneld.proto.watcher import TcpQuery, Watcher, WatcherEvent
from tunneld.services.driver import Driver, ServerLink

log = logging.getLogger("tunneld.watch")

STOP_GRACE = 1.0  # seconds to let the LLQ cancellations leave on shutdown


async def _exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError("the server closed the connection")
        buf += chunk
    return bytes(buf)


async def tcp_exchange(server: tuple[str, int], wire: bytes) -> bytes:
    """One DNS message over TCP (RFC 7766: 2-byte length framing, so the reply is at most 65535 bytes)."""
    stream = await trio.open_tcp_stream(*server)
    async with stream:
        await stream.send_all(struct.pack("!H", len(wire)) + wire)
        (size,) = struct.unpack("!H", await _exactly(stream, 2))
        return await _exactly(stream, size)


class WatcherService(ServerLink[WatcherEvent]):
    def __init__(self, server: tuple[str, int], zone: str, own_name: str, key_secret: bytes,
                 on_event: Callable[[WatcherEvent], None], *, host_keys: bool = False) -> None:
        key = TsigKey(dns.name.from_text(zone), key_secret)
        self.watcher = Watcher(zone, own_name, server=server, rand=os.urandom, key=key,
                               host_keys=host_keys)
        super().__init__(self.watcher, server, grace=STOP_GRACE, name="watch")
        self._deliver = on_event
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:  # the TCP exchanges
            self._nursery = nursery
            try:
                await super().run(task_status=task_status)
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    def on_event(self, event: WatcherEvent) -> None:
        if isinstance(event, TcpQuery):
            if self._nursery is not None:
                self._nursery.start_soon(self._exchange, event.payload)
            return
        self._deliver(event)

    async def _exchange(self, wire: bytes) -> None:
        """Send one query over TCP and give the reply to the core (a failure: the core asks again)."""
        with trio.move_on_after(LLQ_TCP_TIMEOUT):
            try:
                reply = await tcp_exchange(self.server, wire)
            except (OSError, EOFError, trio.BrokenResourceError) as e:
                log.debug("watch: TCP query to %s:%d: %s", self.server[0], self.server[1], e)
                return
            driver = self.driver
            if driver is not None:
                self.watcher.receive(reply, self.server, driver.now())
                driver.wake()

    def ready(self, driver: Driver[WatcherEvent]) -> None:
        self.watcher.start(driver.now())

    async def renew(self) -> bool:
        """The network moved: a new socket, and every LLQ set up again from it."""
        if not await self.reopen():
            return False
        assert self.driver is not None
        self.watcher.renew(self.driver.now())
        self.driver.wake()
        return True

    def status(self) -> dict[str, Any]:
        return {"state": "watching", "server": f"{self.server[0]}:{self.server[1]}", **self.watcher.state}
