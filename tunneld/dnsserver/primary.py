"""The front's TCP connection to its zone's primary (RFC 7766 framing), shared by everything the front asks.

Front mode (:mod:`tunneld.dnsserver.front`) sends the primary the devices' UPDATEs, the deletions of
expired leases, the serial checks and the zone transfers of the change feed (:mod:`tunneld.dnsserver.feed`).
They take turns, one at a time in the order asked (trio's lock is fair), each bounded by a timeout. A
transfer never interleaves with a forwarded UPDATE: an UPDATE's answer is committed to the store before
anything else runs, so a transfer that began before it cannot undo it (docs/protocol.md, "Front mode").
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Final, Protocol

import trio

from tunneld.dnsserver.front import FORWARD_TIMEOUT
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.dnsguard import MAX_MESSAGE
from tunneld.proto.errors import ParseError
from tunneld.proto.xfr import TransferReader, TransferResult

__all__ = ["MAX_WAITING", "TRANSFER_TIMEOUT", "PrimaryLink", "Request"]

log = logging.getLogger(__name__)

_RECEIVE: Final = 65535
MAX_WAITING: Final = 32
"""Exchanges waiting for the connection to the primary (one is on it at a time); beyond: refused."""
TRANSFER_TIMEOUT: Final = 60.0
"""Seconds one zone transfer may take, the wait for its turn included: the largest transfer
(:data:`tunneld.proto.xfr.MAX_XFR_BYTES`, 16 MiB) at a few Mbit/s. An IXFR takes milliseconds."""


class Request(Protocol):
    """A signed request to the primary: an UPDATE (:class:`~tunneld.dnsserver.front.Forward`) or the serial
    check's SOA query (:class:`~tunneld.proto.notify_wire.SoaQuery`)."""

    @property
    def msg_id(self) -> int: ...

    @property
    def wire(self) -> bytes: ...


class PrimaryLink:
    """The front's TCP connection to its primary (RFC 7766 framing), reused from one exchange to the
    next: one exchange at a time, in the order they were asked for (trio's lock is fair), each within
    ``timeout`` seconds of being asked (the wait for the connection included), at most
    :data:`MAX_WAITING` waiting."""

    def __init__(self, primary: tuple[str, int], timeout: float = FORWARD_TIMEOUT) -> None:
        self.primary = primary
        self.timeout = timeout
        self.counters: Counter[str] = Counter()
        self._lock = trio.Lock()
        self._waiting = 0
        self._stream: trio.SocketStream | None = None
        self._frames = FrameBuffer()

    async def exchange(self, forward: Request) -> bytes | None:
        """The primary's reply to ``forward``; None if none came in time (or too many are waiting)."""
        if self._waiting >= MAX_WAITING:
            self.counters["busy: refused"] += 1
            return None
        self._waiting += 1
        try:
            with trio.move_on_after(self.timeout):
                async with self._lock:
                    done = False
                    try:
                        reply = await self._exchange(forward)
                        done = True
                        return reply
                    finally:
                        if not done:  # cancelled mid-exchange: the stream's state is unknown
                            await self.close()
            self.counters["timeout"] += 1
            return None
        finally:
            self._waiting -= 1

    async def _exchange(self, forward: Request) -> bytes | None:
        if len(forward.wire) > MAX_MESSAGE:  # our TSIG made a 64 KiB update larger than TCP can carry
            self.counters["too large"] += 1
            return None
        for _ in range(2):  # a reused connection the primary closed meanwhile: once more on a new one
            reused = self._stream is not None
            try:
                if self._stream is None:
                    self._stream = await trio.open_tcp_stream(*self.primary)
                    self._frames = FrameBuffer()
                    self.counters["connections"] += 1
                await self._stream.send_all(frame(forward.wire))
                reply = await self._read(self._stream, forward.msg_id)
            except (OSError, trio.BrokenResourceError, ParseError) as e:
                log.debug("primary %s: %s", self.primary, e)
                reply = None
            if reply is not None:
                return reply
            await self.close()
            if not reused:
                break
        self.counters["connection failed"] += 1
        return None

    async def _read(self, stream: trio.SocketStream, msg_id: int) -> bytes | None:
        while True:
            while (message := self._frames.next()) is not None:
                if message[:2] == msg_id.to_bytes(2, "big"):
                    return message
                self.counters["stray reply"] += 1
            data = await stream.receive_some(_RECEIVE)
            if not data:
                return None
            self._frames.feed(data)

    async def transfer(self, reader: TransferReader, clock: Callable[[], float],
                       timeout: float = TRANSFER_TIMEOUT) -> TransferResult | None:
        """The answer to ``reader``'s transfer query, read by it on a connection of its own, in the turn of
        the exchanges; None on any failure (counted), or if ``timeout`` passed first. ``clock`` gives the
        wall-clock time each message's TSIG is checked at."""
        if self._waiting >= MAX_WAITING:
            self.counters["busy: refused"] += 1
            return None
        self._waiting += 1
        try:
            with trio.move_on_after(timeout):
                async with self._lock:
                    return await self._transfer(reader, clock)
            self.counters["transfer: timeout"] += 1
            return None
        finally:
            self._waiting -= 1

    async def _transfer(self, reader: TransferReader, clock: Callable[[], float]) -> TransferResult | None:
        frames = FrameBuffer()
        try:
            stream = await trio.open_tcp_stream(*self.primary)
        except OSError as e:
            log.debug("primary %s: %s", self.primary, e)
            self.counters["transfer: connection failed"] += 1
            return None
        async with stream:
            try:
                await stream.send_all(frame(reader.query.wire))
                while True:
                    while (message := frames.next()) is not None:
                        result = reader.feed(message, clock())
                        if result is not None:
                            return result
                    data = await stream.receive_some(_RECEIVE)
                    if not data:
                        self.counters["transfer: closed early"] += 1
                        return None
                    frames.feed(data)
            except ParseError as e:
                log.info("transfer from the primary %s refused: %s", self.primary, e)
                self.counters["transfer: refused"] += 1
            except (OSError, trio.BrokenResourceError) as e:
                log.debug("primary %s: %s", self.primary, e)
                self.counters["transfer: connection failed"] += 1
        return None

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await trio.aclose_forcefully(stream)

    def close_now(self) -> None:
        """Close the connection without waiting (at shutdown, outside any trio task)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.socket.close()
