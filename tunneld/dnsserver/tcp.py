"""DNS over TCP for the rendezvous server (RFC 7766): connection limits that evict idle clients first.

A connection is idle from its last completed message (or its opening) until its next message is complete;
it is closed when idle longer than the idle timeout (§6.2.3), so a slow or silent client (slow-loris) holds
its slot for seconds, not minutes. Connections are capped per source and in total. When the server nears
its total cap it shortens the idle timeout, and a new connection over either cap is admitted by evicting
the longest-idle connection (of that source, or of all): a flood of idle connections can delay a client
by one connection set-up, never lock it out.

:class:`ConnTable` is the sans-I/O bookkeeping (time passed in); :class:`TcpServer` runs it with trio:
2-byte length framing, one message at a time per connection, replies from an async ``respond`` callback;
with an SSL context, each connection is DNS over TLS (RFC 7858) under the same limits. Given a
:class:`~tunneld.dnsserver.push.PushServer`, a TLS connection whose message is a DSO message (RFC 8490)
becomes a DNS Push session: from then on DSO's own timers end it (not the idle timeout, the message count
or the lifetime), a reader task feeds the session and a writer task writes its one FIFO, which ordinary
DNS answers on the session also go through, in order. A member's session (a client certificate under the
account CA) then leaves the eviction order for caps of its own: a flood of connections, or a crowd of
strangers' sessions, can evict no subscriber; a member session beyond those caps is refused with a RETRY
DELAY instead.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import ssl
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from tunneld.dnsserver.push import PushServer, PushSession, is_dso
from tunneld.dnsserver.tls import is_member
from tunneld.proto import dso_wire
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.errors import ParseError

__all__ = ["ConnTable", "TcpLimits", "TcpServer", "source_key"]

log = logging.getLogger(__name__)

_LENGTH: Final = struct.Struct("!H")  # RFC 1035 §4.2.2: each message is prefixed by its 2-byte length
_REFUSED: Final = 5  # RFC 1035 §4.1.1
SESSIONS_FULL_RETRY_MS: Final = 60_000
"""The RETRY DELAY a member session refused at the sessions' caps is given (RFC 8490 §7.2)."""


@dataclass(frozen=True, slots=True)
class TcpLimits:
    """The TCP limits of the server (RFC 7766 §6.2.3 leaves the values to the server)."""

    max_connections: int = 256
    """Connections open at once; a new one beyond evicts the longest-idle."""
    per_source: int = 16
    """Connections from one source (an IPv4 address, an IPv6 /64) at once; beyond, its longest-idle goes."""
    idle_timeout: float = 10.0
    """Seconds a connection may stay idle (and a message take to arrive in full)."""
    busy_idle_timeout: float = 1.0
    """The idle timeout while at least ``busy_fraction`` of ``max_connections`` are open."""
    busy_fraction: float = 0.75
    max_lifetime: float = 120.0
    """Seconds a connection may stay open in all."""
    max_messages: int = 100
    """Requests served on one connection before it is closed."""
    max_sessions: int = 4096
    """Member DNS Push sessions (a client certificate under the account CA) open at once. They leave the
    connection table, so that no flood of connections can evict a subscriber; one beyond is refused."""
    sessions_per_source: int = 256
    """Member sessions from one source: a household of devices behind one NAT address."""

    def __post_init__(self) -> None:
        if min(self.max_connections, self.per_source, self.max_sessions, self.sessions_per_source) < 1:
            raise ValueError("connection limits must be at least 1")
        if not 0 < self.busy_idle_timeout <= self.idle_timeout or self.max_lifetime <= 0:
            raise ValueError("timeouts must be positive, the busy one no longer than the idle one")


def source_key(address: object) -> str:
    """The source a connection counts against: its IPv4 address, or its IPv6 /64 (one host's usual
    allocation; an IPv4-mapped address counts as the IPv4 address). Anything else counts as itself."""
    host = address[0] if isinstance(address, tuple) and address else address
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


@dataclass(slots=True)
class _Entry:
    source: str
    idle_since: float


class ConnTable:
    """The open connections, by ID: which to evict to admit a new one, and when each times out."""

    def __init__(self, limits: TcpLimits) -> None:
        self.limits = limits
        self._conns: dict[int, _Entry] = {}  # least recently active first
        self._per_source: Counter[str] = Counter()
        self._next_id = 0
        self._sessions: dict[int, str] = {}  # member sessions, out of the eviction order: their sources
        self._session_sources: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._conns)

    def __contains__(self, conn_id: object) -> bool:
        return conn_id in self._conns or conn_id in self._sessions

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def promote(self, conn_id: int) -> bool:
        """``conn_id`` became a member's DNS Push session: it leaves the connection table (no new
        connection can evict it, no idle timeout applies) for the sessions' own caps. False, and it stays
        an ordinary connection, if those caps are reached."""
        entry = self._conns.get(conn_id)
        if entry is None:
            return conn_id in self._sessions
        limits = self.limits
        if len(self._sessions) >= limits.max_sessions or \
                self._session_sources[entry.source] >= limits.sessions_per_source:
            self.counters["member session refused: at its cap"] += 1
            return False
        self._remove(conn_id)
        self._sessions[conn_id] = entry.source
        self._session_sources[entry.source] += 1
        self.counters["member sessions"] += 1
        return True

    @property
    def busy(self) -> bool:
        """Near the total cap: idle connections get the short timeout."""
        return len(self._conns) >= self.limits.busy_fraction * self.limits.max_connections

    def idle_timeout(self) -> float:
        return self.limits.busy_idle_timeout if self.busy else self.limits.idle_timeout

    def admit(self, source: str, now: float) -> tuple[int, list[int]]:
        """A new connection from ``source``: its ID, and the IDs of the connections evicted (already
        removed from the table) to make room for it."""
        evicted: list[int] = []
        if self._per_source[source] >= self.limits.per_source:
            victim = next(i for i, e in self._conns.items() if e.source == source)
            self._remove(victim)
            evicted.append(victim)
            self.counters["evicted: per source"] += 1
        while len(self._conns) >= self.limits.max_connections:
            victim = next(iter(self._conns))
            self._remove(victim)
            evicted.append(victim)
            self.counters["evicted: total"] += 1
        self._next_id += 1
        self._conns[self._next_id] = _Entry(source, now)
        self._per_source[source] += 1
        self.counters["admitted"] += 1
        return self._next_id, evicted

    def active(self, conn_id: int, now: float) -> None:
        """A message completed on ``conn_id``: it is idle from ``now`` (and the most recently active)."""
        entry = self._conns.pop(conn_id, None)
        if entry is not None:
            entry.idle_since = now
            self._conns[conn_id] = entry

    def deadline(self, conn_id: int) -> float:
        """When ``conn_id`` times out unless a message completes first (-inf once it is gone)."""
        entry = self._conns.get(conn_id)
        return float("-inf") if entry is None else entry.idle_since + self.idle_timeout()

    def remove(self, conn_id: int) -> None:
        if conn_id in self._conns:
            self._remove(conn_id)
        source = self._sessions.pop(conn_id, None)
        if source is not None:
            self._session_sources[source] -= 1
            if not self._session_sources[source]:
                del self._session_sources[source]

    def _remove(self, conn_id: int) -> None:
        entry = self._conns.pop(conn_id)
        self._per_source[entry.source] -= 1
        if not self._per_source[entry.source]:
            del self._per_source[entry.source]


class TcpServer:
    """Serves DNS over TCP on a listening socket with :class:`TcpLimits`. ``respond(wire, peer)`` gives
    the reply to one request (None: no reply); it must compute the reply before its first checkpoint (a
    session's FIFO keeps the answer's place from the call). ``push``: DNS Push sessions on TLS connections.
    """

    def __init__(self, respond: Callable[[bytes, object], Awaitable[bytes | None]],
                 limits: TcpLimits | None = None, ssl_context: ssl.SSLContext | None = None,
                 push: PushServer | None = None) -> None:
        self.respond = respond
        self.push = push if ssl_context is not None else None  # RFC 8765 §1.2: DNS Push is over TLS only
        self.table = ConnTable(limits or TcpLimits())
        self.ssl_context = ssl_context  # DNS over TLS (RFC 7858): each connection's handshake comes first
        self._scopes: dict[int, trio.CancelScope] = {}  # each connection's, for eviction
        self._reads: dict[int, trio.CancelScope] = {}  # the idle wait of each connection reading

    @property
    def counters(self) -> Counter[str]:
        return self.table.counters

    async def serve(self, sock: trio.socket.SocketType) -> None:
        """Accept and serve connections until cancelled (the socket is closed then)."""
        async with trio.open_nursery() as nursery, trio.SocketListener(sock) as listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:  # EMFILE and friends: back off a little
                    log.warning("tcp accept: %s", e)
                    await trio.sleep(0.1)
                    continue
                try:
                    peer = stream.socket.getpeername()
                except OSError:  # already reset by the client
                    await trio.aclose_forcefully(stream)
                    continue
                busy = self.table.busy
                conn_id, evicted = self.table.admit(source_key(peer), trio.current_time())
                for victim in evicted:
                    scope = self._scopes.pop(victim, None)
                    if scope is not None:
                        scope.cancel()
                if self.table.busy and not busy:
                    self._shorten()
                scope = trio.CancelScope(deadline=trio.current_time() + self.table.limits.max_lifetime)
                self._scopes[conn_id] = scope
                nursery.start_soon(self._connection, stream, peer, conn_id, scope)

    def _shorten(self) -> None:
        """The idle timeout just became the short one: connections waiting now get it too."""
        for conn_id, read in self._reads.items():
            read.deadline = min(read.deadline, self.table.deadline(conn_id))

    async def _connection(self, sock_stream: trio.SocketStream, peer: object, conn_id: int,
                          scope: trio.CancelScope) -> None:
        table = self.table
        stream: trio.abc.Stream = sock_stream
        try:
            with scope:
                if self.ssl_context is not None:
                    # The handshake counts as the first message: it must end within the idle timeout.
                    tls = trio.SSLStream(sock_stream, self.ssl_context, server_side=True)
                    stream = tls
                    with trio.move_on_after(table.idle_timeout()) as handshake:
                        try:
                            await tls.do_handshake()
                        except trio.BrokenResourceError:
                            table.counters["closed: tls handshake failed"] += 1
                            return
                    if handshake.cancelled_caught:
                        table.counters["closed: tls handshake timeout"] += 1
                        return
                    table.active(conn_id, trio.current_time())
                for _ in range(table.limits.max_messages):
                    wire = await self._read_message(stream, conn_id)
                    if wire is None:
                        break
                    table.active(conn_id, trio.current_time())
                    if self.push is not None and is_dso(wire) and isinstance(stream, trio.SSLStream):
                        scope.deadline = math.inf  # DSO's timers end the session from now on
                        await self._session(stream, peer, conn_id, wire, self.push)
                        break
                    reply = await self.respond(wire, peer)
                    if reply is None:
                        continue
                    with trio.move_on_after(table.idle_timeout()):
                        await stream.send_all(_LENGTH.pack(len(reply)) + reply)
                        table.active(conn_id, trio.current_time())
                        continue
                    table.counters["closed: reply not read"] += 1
                    break
            if scope.cancelled_caught:
                table.counters["closed: evicted or lifetime"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("tcp %r: %s", peer, e)
        finally:
            self._scopes.pop(conn_id, None)
            self._reads.pop(conn_id, None)
            table.remove(conn_id)
            await trio.aclose_forcefully(stream)

    async def _session(self, stream: trio.SSLStream[trio.SocketStream], peer: object, conn_id: int,
                       first: bytes, push: PushServer) -> None:
        """Run the DNS Push session that ``first`` (a DSO message) opened, until either side ends it."""
        member = is_member(stream.getpeercert(), push.core.zone.to_text())
        if member and not self.table.promote(conn_id):
            # RFC 8490 §7.2: the server asks the client to go away and come back later.
            goodbye = dso_wire.DsoMessage(0, (dso_wire.RetryDelay(SESSIONS_FULL_RETRY_MS),), rcode=_REFUSED)
            with trio.move_on_after(1.0):
                await stream.send_all(frame(dso_wire.encode(goodbye)))
            return
        session = push.open(member, time.time())
        lot = trio.lowlevel.ParkingLot()
        try:
            async with trio.open_nursery() as nursery:
                def wake() -> None:
                    if session.closed:
                        nursery.cancel_scope.cancel()  # aborted: the writer may be blocked in a send
                    lot.unpark_all()

                session.waker = wake
                nursery.start_soon(self._write_session, stream, session, lot, nursery.cancel_scope)
                await self._read_session(stream, peer, conn_id, first, session)
                nursery.cancel_scope.cancel()
        finally:
            if session.reason is not None:
                log.debug("push session %r aborted: %s", peer, session.reason)
            push.close(session)

    async def _read_session(self, stream: trio.abc.Stream, peer: object, conn_id: int, first: bytes,
                            session: PushSession) -> None:
        """The session's reader: messages in, one at a time, until the end of the stream, an error, or the
        session's end (its timers are polled here)."""
        frames = FrameBuffer()
        try:
            await self._session_message(first, peer, session)
            while not session.closed:
                wait = session.deadline() - time.time()
                with trio.move_on_after(max(wait, 0.0)) as timer:
                    data = await stream.receive_some(65536)
                if timer.cancelled_caught:
                    session.poll(time.time())
                    continue
                if not data:
                    self.counters["push: closed by the client"] += 1
                    return
                frames.feed(bytes(data))
                while (wire := frames.next()) is not None and not session.closed:
                    self.table.active(conn_id, trio.current_time())
                    await self._session_message(wire, peer, session)
        except ParseError as e:
            self.counters[f"push: bad framing: {e}"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self.counters["push: connection lost"] += 1  # e.g. closed without close_notify, or reset
            log.debug("push session %r: %s", peer, e)

    async def _write_session(self, stream: trio.abc.Stream, session: PushSession,
                             lot: trio.lowlevel.ParkingLot, scope: trio.CancelScope) -> None:
        """The session's writer: its FIFO, in order, framed, until cancelled or the connection fails."""
        try:
            while True:
                out = session.take()
                if out:
                    await stream.send_all(b"".join(frame(m) for m in out))
                else:
                    await lot.park()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self.counters["push: connection lost"] += 1
            log.debug("push session writer: %s", e)
            scope.cancel()

    async def _session_message(self, wire: bytes, peer: object, session: PushSession) -> None:
        if is_dso(wire):
            session.receive(wire, time.time())
            return
        slot = session.reserve()  # before the answer is computed: later PUSHes go after it
        reply = await self.respond(wire, peer)
        session.fill(slot, reply)
        session.answered(time.time())

    async def _read_message(self, stream: trio.abc.Stream, conn_id: int) -> bytes | None:
        """The next framed message, or None at end of stream or when the idle timeout passes."""
        with trio.CancelScope(deadline=self.table.deadline(conn_id)) as read:
            self._reads[conn_id] = read
            try:
                head = await _receive_exactly(stream, _LENGTH.size)
                if head is not None:
                    return await _receive_exactly(stream, _LENGTH.unpack(head)[0])
                return None
            finally:
                del self._reads[conn_id]
        self.table.counters["closed: idle"] += 1
        return None


async def _receive_exactly(stream: trio.abc.Stream, n: int) -> bytes | None:
    """``n`` bytes from the stream, or None at end of stream (also mid-message)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
