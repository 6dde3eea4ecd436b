"""The front's TCP connection to its zone's primary (RFC 7766 framing), shared by everything the front asks.

Front mode (:mod:`tunneld.dnsserver.front`) sends the primary the devices' UPDATEs, the deletions of
expired leases and the serial checks of the change feed (:mod:`tunneld.dnsserver.feed`) pipelined on one
connection: up to :data:`MAX_IN_FLIGHT` at once, answers matched by message ID in whatever order they come
(RFC 7766 §6.2.1.1), each bounded by a timeout. Zone transfers use a connection of their own, in turns with
the exchanges: one starts once every exchange in flight has been answered (its answer committed before the
transfer's task runs again), and none starts until it is done, nor is a late answer read meanwhile, so a
transfer never undoes a change whose answer came while it was read (docs/protocol.md, "Front mode").
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import trio

from tunneld.dnsserver.front import FORWARD_TIMEOUT
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.dnsguard import MAX_MESSAGE
from tunneld.proto.errors import ParseError
from tunneld.proto.xfr import TransferReader, TransferResult

__all__ = ["MAX_IN_FLIGHT", "MAX_LATE", "MAX_WAITING", "TRANSFER_TIMEOUT", "PrimaryLink", "Request"]

log = logging.getLogger(__name__)

_RECEIVE: Final = 65535
MAX_IN_FLIGHT: Final = 16
"""Exchanges sent and not yet answered on the connection at once (BIND applies UPDATEs one at a time
anyway: this only hides the round trips)."""
MAX_WAITING: Final = 64
"""Exchanges waiting behind those in flight (for a place, or for a transfer's turn to end); beyond:
refused at once."""
MAX_LATE: Final = 64
"""Exchanges that timed out whose answer is still awaited on the connection (:meth:`PrimaryLink.exchange`'s
``late``), the oldest forgotten first."""
LATE_WAIT: Final = 60.0
"""Seconds late answers are read for when no exchange is reading (with :attr:`PrimaryLink.nursery`)."""
TRANSFER_TIMEOUT: Final = 60.0
"""Seconds one zone transfer may take, the wait for its turn included: the largest transfer
(:data:`tunneld.proto.xfr.MAX_XFR_BYTES`, 16 MiB) at a few Mbit/s. An IXFR takes milliseconds."""

Late = Callable[[bytes], None]
"""Called with the answer to an exchange that timed out, if it comes later on the same connection."""


async def _acquire(lock: trio.Lock | trio.Semaphore) -> None:
    """``lock`` acquired, without a trip through the scheduler when it is free: an exchange's way to the
    socket crossed three of them (a slot, the connection, the send), each a scheduler pass, before its
    bytes left (docs/perf-dns.md). The send itself is the checkpoint."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class Request(Protocol):
    """A signed request to the primary: an UPDATE (:class:`~tunneld.dnsserver.front.Forward`) or the serial
    check's SOA query (:class:`~tunneld.proto.notify_wire.SoaQuery`)."""

    @property
    def msg_id(self) -> int: ...

    @property
    def wire(self) -> bytes: ...


@dataclass(eq=False)
class _Pending:
    """One exchange sent on connection number ``conn`` (-1: not yet): its answer once read (None: the
    connection failed), and ``wake``, set when it is done or may take over reading."""

    conn: int
    reply: bytes | None = None
    done: bool = False
    wake: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)  # its message ID is free again


class PrimaryLink:
    """The front's TCP connection to its primary (RFC 7766 framing), reused from one exchange to the
    next: at most :data:`MAX_IN_FLIGHT` exchanges on it at once and :data:`MAX_WAITING` waiting, each
    within ``timeout`` seconds of being asked (the wait included). No background task: whichever waiting
    exchange finds no one reading reads, and hands the role on when its own answer has come."""

    def __init__(self, primary: tuple[str, int], timeout: float = FORWARD_TIMEOUT) -> None:
        self.primary = primary
        self.timeout = timeout
        self.counters: Counter[str] = Counter()
        self._queued = 0  # exchanges and transfers asked and not done
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._pending: dict[int, _Pending] = {}  # in flight, by message ID
        self._late: OrderedDict[int, Late] = OrderedDict()  # timed out, answer still awaited
        self._reading = False
        self._send_lock = trio.Lock()
        self._connect_lock = trio.Lock()
        self._stream: trio.SocketStream | None = None
        self._conn = 0  # number of the current connection
        self._frames = FrameBuffer()
        self._in_use = 0  # exchanges past the gate (a transfer waits for none)
        self._idle = trio.Event()
        self._idle.set()
        self._transfers = 0  # transfers waiting or running (new exchanges wait for none)
        self._gate_open = trio.Event()
        self._gate_open.set()
        self._transfer_lock = trio.Lock()
        self._late_reader: _Pending | None = None  # reading for late answers only
        self._late_scope: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None
        """Where late answers are read when no exchange is reading; without it, they are read with the
        next exchange."""

    # ---- exchanges ----------------------------------------------------------------------------------

    async def exchange(self, forward: Request, late: Late | None = None,
                       sent: Callable[[], None] | None = None) -> bytes | None:
        """The primary's reply to ``forward``; None if none came in time (or too many are waiting, or the
        connection failed). If it timed out once sent, ``late`` is called with the reply should it come
        afterwards on the same connection. ``sent`` is called once it is first sent whole, while the
        primary works (the front writes the update's leases then: :mod:`tunneld.dnsserver.intents`)."""
        if self._queued >= MAX_IN_FLIGHT + MAX_WAITING:
            self.counters["busy: refused"] += 1
            return None
        if len(forward.wire) > MAX_MESSAGE:  # our TSIG made a 64 KiB update larger than TCP can carry
            self.counters["too large"] += 1
            return None
        self._queued += 1
        sent_on: list[int] = []  # the connection it was last sent on
        try:
            with trio.move_on_after(self.timeout):
                while self._transfers:  # a transfer's turn: it waits for the exchanges in flight
                    await self._gate_open.wait()
                self._enter()
                try:
                    await _acquire(self._slots)
                    try:
                        return await self._exchange(forward, sent_on, sent)
                    finally:
                        self._slots.release()
                finally:
                    self._leave()
            self.counters["timeout"] += 1
            if late is not None and sent_on and sent_on[0] == self._conn and self._stream is not None:
                self._late[forward.msg_id] = late
                while len(self._late) > MAX_LATE:
                    self._late.popitem(last=False)
                if self.nursery is not None and self._late_reader is None and not self._transfers:
                    self._late_reader = _Pending(self._conn)
                    self._enter()  # a transfer waits for it as for an exchange (and ends it)
                    self.nursery.start_soon(self._read_late, self._late_reader, self._stream)
            return None
        except trio.Cancelled:  # from outside (shutting down): the last one out closes the connection
            if not self._pending:
                self._fail(self._conn)
            raise
        finally:
            self._queued -= 1

    def _enter(self) -> None:
        if not self._in_use:
            self._idle = trio.Event()
        self._in_use += 1

    def _leave(self) -> None:
        self._in_use -= 1
        if not self._in_use:
            self._idle.set()

    async def _exchange(self, forward: Request, sent_on: list[int],
                        on_sent: Callable[[], None] | None) -> bytes | None:
        msg_id = forward.msg_id
        while (other := self._pending.get(msg_id)) is not None:  # IDs unique among those in flight
            self.counters["waited for a message ID in flight"] += 1
            await other.finished.wait()
        if self._late.pop(msg_id, None) is not None:
            self.counters["late: forgotten, its message ID reused"] += 1
        slot = self._pending[msg_id] = _Pending(-1)  # reserved before anything is awaited
        try:
            # The connection lost with the exchange on it (the primary closed a reused one, say): once
            # more on a new one. RFC 2136 additions and deletions are idempotent, as when a device retries.
            for attempt in range(2):
                try:
                    stream = await self._connect()
                except OSError as e:
                    log.debug("primary %s: %s", self.primary, e)
                    break
                slot.conn, slot.done, slot.reply = self._conn, False, None
                sent_on[:] = [slot.conn]
                if await self._send(stream, slot, frame(forward.wire)) and on_sent is not None:
                    on_sent()
                    on_sent = None
                reply = await self._await(slot, stream)
                if reply is not None:
                    return reply
                if attempt == 0:
                    self.counters["connection lost: sent again"] += 1
        finally:
            del self._pending[msg_id]
            slot.finished.set()
            self._hand_over()
        self.counters["connection failed"] += 1
        return None

    async def _connect(self) -> trio.SocketStream:
        if self._stream is not None:  # connected: no wait (the lock is only for the connecting)
            return self._stream
        async with self._connect_lock:
            if self._stream is None:
                self._stream = await trio.open_tcp_stream(*self.primary)
                self._frames = FrameBuffer()
                self._conn += 1
                self._late.clear()
                self.counters["connections"] += 1
            return self._stream

    async def _send(self, stream: trio.SocketStream, slot: _Pending, data: bytes) -> bool:
        """Send ``data`` for ``slot``; False if it was not sent whole (the connection failed)."""
        await _acquire(self._send_lock)
        try:
            if slot.done:  # the connection failed while this one waited to send
                return False
            done = False
            try:
                await stream.send_all(data)
                done = True
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                log.debug("primary %s: %s", self.primary, e)
            finally:
                if not done:  # cancelled or broken mid-frame: the stream is unusable
                    self._fail(slot.conn)
            return done
        finally:
            self._send_lock.release()

    async def _await(self, slot: _Pending, stream: trio.SocketStream) -> bytes | None:
        """``slot``'s reply, reading the connection if no one else is."""
        while not slot.done:
            if self._reading:
                await slot.wake.wait()
                slot.wake = trio.Event()
                continue
            self._reading = True
            try:
                await self._read(slot, stream)
            finally:
                self._reading = False
        return slot.reply

    def _hand_over(self) -> None:
        """Wake one exchange still waiting (else the late reader), to read if no one is."""
        if not self._reading:
            for other in (*self._pending.values(), self._late_reader):
                if other is not None and not other.done:
                    other.wake.set()
                    return

    async def _read_late(self, slot: _Pending, stream: trio.SocketStream) -> None:
        """Read (when no exchange is) until no late answer is awaited on ``slot``'s connection, or a
        transfer takes its turn (the answers are then read with the next exchange)."""
        try:
            with trio.move_on_after(LATE_WAIT) as self._late_scope:
                if not self._transfers:
                    await self._await(slot, stream)
        finally:
            self._late_scope = None
            slot.done = True
            if self._late_reader is slot:
                self._late_reader = None
            self._leave()
            self._hand_over()

    async def _read(self, slot: _Pending, stream: trio.SocketStream) -> None:
        try:
            while not slot.done:
                while (message := self._frames.next()) is not None:
                    self._dispatch(message)
                if slot.done:
                    return
                data = await stream.receive_some(_RECEIVE)  # cancel-safe: nothing is lost
                if not data:
                    self._fail(slot.conn)
                    return
                if slot.conn == self._conn:  # not a buffer of the next connection's
                    self._frames.feed(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ParseError) as e:
            log.debug("primary %s: %s", self.primary, e)
            self._fail(slot.conn)

    def _dispatch(self, message: bytes) -> None:
        msg_id = int.from_bytes(message[:2], "big")
        slot = self._pending.get(msg_id)
        if slot is not None and not slot.done and slot.conn == self._conn:
            slot.reply, slot.done = message, True
            slot.wake.set()
            return
        late = self._late.pop(msg_id, None)
        if late is None:
            self.counters["stray reply"] += 1
            return
        self.counters["late reply"] += 1
        if not self._late and self._late_reader is not None:
            self._late_reader.done = True
            self._late_reader.wake.set()
        try:
            late(message)
        except Exception:  # the caller's; the link goes on
            log.exception("handling a late reply from the primary %s", self.primary)

    def _fail(self, conn: int) -> None:
        """Connection ``conn`` is lost: closed, and every exchange in flight on it fails."""
        if conn == self._conn and self._stream is not None:
            stream, self._stream = self._stream, None
            stream.socket.close()
            self._late.clear()
        for slot in (*self._pending.values(), self._late_reader):
            if slot is not None and slot.conn == conn and not slot.done:
                slot.done = True
                slot.wake.set()

    # ---- transfers ----------------------------------------------------------------------------------

    async def transfer(self, reader: TransferReader, clock: Callable[[], float],
                       timeout: float = TRANSFER_TIMEOUT) -> TransferResult | None:
        """The answer to ``reader``'s transfer query, read by it on a connection of its own once the
        exchanges in flight are answered, none starting until it is done; None on any failure (counted),
        or if ``timeout`` passed first. ``clock`` gives the wall-clock time each message's TSIG is checked
        at."""
        if self._queued >= MAX_IN_FLIGHT + MAX_WAITING:
            self.counters["busy: refused"] += 1
            return None
        self._queued += 1
        if not self._transfers:
            self._gate_open = trio.Event()
        self._transfers += 1
        if self._late_scope is not None:  # no answer is read while a transfer is
            self._late_scope.cancel()
        try:
            with trio.move_on_after(timeout):
                async with self._transfer_lock:
                    while self._in_use:
                        await self._idle.wait()
                    return await self._transfer(reader, clock)
            self.counters["transfer: timeout"] += 1
            return None
        finally:
            self._queued -= 1
            self._transfers -= 1
            if not self._transfers:
                self._gate_open.set()

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
        self._fail(self._conn)

    def close_now(self) -> None:
        """Close the connection without waiting (at shutdown, outside any trio task)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.socket.close()
