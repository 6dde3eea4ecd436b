"""The watching service: the :class:`Watcher` core over one UDP socket (and a TLS port), run by the driver.

It runs the watcher's long-lived queries against the account's DNS server: the account's browse PTR, then
each device's records. Each complete, consistent record set becomes a peer in the tunnel's table (through
the ``on_event`` callback the daemon gives); a device that goes away is forgotten. The queries carry TSIG
(for privacy), so the core runs on the wall clock. On shutdown the driver lets the LLQ cancellations leave.
An answer that came truncated is fetched over TCP (the core's :class:`TcpQuery`): one exchange per
request, its reply handed to the core like a datagram. With ``push`` (a TLS account) the core also holds a
DNS Push session over a TLS port presenting the device's certificate: a :class:`DualPort` sends each
message by its destination, the port tells the core when its connection is lost, and the core may ask
for it to be dropped. LLQ over the UDP socket is the fallback.
"""

from __future__ import annotations

import logging
import os
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.name
import trio

from tunneld.proto.llq import LLQ_TCP_TIMEOUT
from tunneld.proto.tsig import TsigKey
from tunneld.proto.watcher import DropConnection, TcpQuery, TransportStatus, Watcher, WatcherEvent
from tunneld.services.driver import DatagramPort, Driver, ServerLink, ServerPort, connect_udp
from tunneld.services.tlsport import TlsPort

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


@dataclass(frozen=True)
class PushTransport:
    """Where the watcher finds DNS Push: the server's DNS-over-TLS address, the client context (the account
    CA, the device's certificate: tlsport.client_context) and the name the server's certificate carries."""

    server: tuple[str, int]
    context: Callable[[], ssl.SSLContext]
    """Called at each connection: the device's certificate is renewed while the daemon runs."""
    hostname: str


class DualPort:
    """The watcher's two ways to its server as one port: ``sendto`` goes to the TLS port when addressed
    to its server, else to the UDP socket; ``recvfrom`` gives what either received."""

    def __init__(self, udp: ServerPort, tls: TlsPort, nursery: trio.Nursery) -> None:
        self.udp, self.tls = udp, tls
        self._in, self._out = trio.open_memory_channel[tuple[bytes, Any]](64)
        for port in (udp, tls):
            nursery.start_soon(self._pump, port)

    async def _pump(self, port: DatagramPort) -> None:
        while True:
            try:
                item = await port.recvfrom(65535)
            except trio.ClosedResourceError:
                return
            except OSError as e:  # an ICMP error for an earlier UDP send: the core retransmits
                log.debug("watch: receive: %s", e)
                continue
            try:
                await self._in.send(item)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return

    async def sendto(self, data: bytes, address: Any, /) -> int:
        port: DatagramPort = self.tls if tuple(address) == self.tls.server else self.udp
        return await port.sendto(data, address)

    async def recvfrom(self, bufsize: int, /) -> tuple[bytes, Any]:
        try:
            return await self._out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("closed") from None

    def close(self) -> None:
        self.udp.close()
        self.tls.close()
        self._in.close()


class WatcherService(ServerLink[WatcherEvent]):
    def __init__(self, server: tuple[str, int], zone: str, own_name: str, key_secret: bytes,
                 on_event: Callable[[WatcherEvent], None], *, host_keys: bool = False,
                 push: PushTransport | None = None) -> None:
        key = TsigKey(dns.name.from_text(zone), key_secret)
        self.watcher = Watcher(zone, own_name, server=server, rand=os.urandom, key=key,
                               host_keys=host_keys, push=None if push is None else push.server)
        super().__init__(self.watcher, server, grace=STOP_GRACE, name="watch",
                         connect=connect_udp if push is None else self._connect_both)
        self.push = push
        self._deliver = on_event
        self._nursery: trio.Nursery | None = None
        self._tls: TlsPort | None = None

    async def _connect_both(self, server: tuple[str, int]) -> ServerPort:
        """The UDP socket to ``server`` and a TLS port to the Push server, as one port."""
        assert self.push is not None and self._nursery is not None
        udp = await connect_udp(server)
        tls = TlsPort(self.push.server, self.push.context, self.push.hostname)
        tls.on_lost = self._push_lost
        self._tls = tls
        return DualPort(udp, tls, self._nursery)

    def _push_lost(self, reason: str) -> None:
        log.debug("watch: %s", reason)
        driver = self.driver
        if driver is not None:
            self.watcher.push_lost(driver.now(), reason)
            driver.wake()

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
        if isinstance(event, DropConnection):
            log.debug("watch: DNS Push connection dropped: %s", event.reason)
            if self._tls is not None:
                self._tls.drop()
            return
        if isinstance(event, TransportStatus):
            log.info("watch: following the account by %s%s", "DNS Push over TLS" if event.transport == "push"
                     else "LLQ over UDP", f" ({event.detail})" if event.detail else "")
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
        push = {} if self.push is None else {"push_server": f"{self.push.server[0]}:{self.push.server[1]}"}
        return {"state": "watching", "server": f"{self.server[0]}:{self.server[1]}", **push,
                **self.watcher.state}
