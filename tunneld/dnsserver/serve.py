"""The trio listeners of the rendezvous DNS server (``tunneld serve-dns``).

One UDP socket and one TCP listener on the same address and port feed every request to
:meth:`DnsCore.handle` with the wall-clock time; a sweep task deletes expired leases. Everything runs in
the trio thread that opened the :class:`ZoneStore` (its SQLite connection must stay in that thread), and
the handler is synchronous, so requests are served one at a time, in arrival order. In front mode
(:mod:`tunneld.dnsserver.front`) a checked UPDATE waits for the primary instead (:class:`PrimaryLink`):
over TCP and TLS in its connection's order, over UDP in a task of its own while other requests go on;
the sweep deletes expired leases on the primary first. The primary's changes come back through the change
feed (:mod:`tunneld.dnsserver.feed`): its NOTIFY, recognised on the UDP port before anything else, and
the transfers it triggers.

UDP replies go through response rate limiting (:mod:`tunneld.dnsserver.rrl`), except signed replies no
larger than their request (the account's own UPDATEs: nothing to amplify). TCP (RFC 7766) is
:mod:`tunneld.dnsserver.tcp`'s: 2-byte length framing, idle timeouts, and connection caps per source and
in all that evict the longest-idle connection to admit a new one (:class:`TcpLimits`). The TLS listener
also carries DNS Push sessions (:mod:`tunneld.dnsserver.push`); zone changes reach the LLQ server and the
Push sessions from the same places: an UPDATE's changes, the sweep's expired leases, and the feed's.

STUN Binding requests (RFC 8489) share the UDP port, and any ``--stun`` port: a datagram whose first two
bits are zero, with the magic cookie at bytes 4-7 and a length field matching its size, is STUN
(:func:`tunneld.proto.stun_wire.is_stun`). A DNS message passes that test only with 0x2112 questions
and 0xA442 answers, which no query has, so the demux is done before the DNS guard. The answers
(:mod:`tunneld.dnsserver.stun`) have rate limits of their own.

The listen address ``::`` is dual-stack (IPv4-mapped addresses accepted); any other IPv6 address is
IPv6-only. :func:`serve` reports readiness through ``task_status.started()`` once both sockets are bound,
and raises OSError (port in use, no permission) before that.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import ssl
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.tsig
import trio

from tunneld.dnsserver.core import CheckedUpdate, DnsCore
from tunneld.dnsserver.feed import SOA_CHECK_INTERVAL, Feed, FeedTask
from tunneld.dnsserver.front import Forward, Front
from tunneld.dnsserver.llq import LLQServer
from tunneld.dnsserver.llq import Output as LLQOutput
from tunneld.dnsserver.owner import ClaimUnanswered, LeaseOwner, claim, claim_later, take_over, watching
from tunneld.dnsserver.primary import MAX_WAITING, PrimaryLink
from tunneld.dnsserver.push import PushServer
from tunneld.dnsserver.rrl import Kind, ResponseLimiter, RrlLimits, Verdict, kind_of, truncated
from tunneld.dnsserver.store import Change, RRsetRemoval
from tunneld.dnsserver.stun import respond as stun_respond
from tunneld.dnsserver.tcp import TcpLimits, TcpServer
from tunneld.dnsserver.walsync import WalSync
from tunneld.net.udp import set_buffers
from tunneld.proto.dnsguard import try_parse
from tunneld.proto.errors import ParseError
from tunneld.proto.llq_wire import LLQ_OP_REFRESH, LLQ_OP_SETUP, find_llq_option
from tunneld.proto.notify_wire import OPCODE_NOTIFY
from tunneld.proto.stun_wire import SUCCESS, is_stun, split_type

__all__ = ["MAX_WAITING", "PrimaryLink", "RrlLimits", "TcpLimits", "serve"]  # the link: moved, re-exported

log = logging.getLogger(__name__)

SWEEP_MAX_SLEEP: Final = 60.0
"""The sweeper re-reads the wall clock at least this often (the clock may jump)."""

_UDP_MAX: Final = 65535
UDP_BUFFER: Final = 4 << 20
"""Bytes of the DNS UDP socket's buffers: a burst of 1,000 LLQ acks (each ~1 KiB of kernel memory) fits."""
_OPCODE_UPDATE: Final = 5


def _lease_end(update: CheckedUpdate, now: float) -> float:
    """When the shortest lease an update grants ends (never: no lease)."""
    return math.inf if update.lease is None else now + min(update.lease.lease, update.lease.key_lease)


def llq_event_port(msg: dns.message.Message | ParseError, peer: object) -> tuple[str, int] | None:
    """Where the events of an LLQ set up or refreshed over TCP or TLS go: Apple's clients put the UDP port
    for them in the LLQ-ERROR field of such a SETUP or REFRESH (dnsextd and mDNSResponder; RFC 8764 leaves
    LLQ to UDP), and they go to the connection's own address, which the TCP handshake proved, so a client
    can direct them to no one else. None: not such a request (the message is answered as any other)."""
    if isinstance(msg, ParseError) or msg.flags & dns.flags.QR or not isinstance(peer, tuple) or not peer:
        return None
    option = find_llq_option(msg)
    if option is None or option.opcode not in (LLQ_OP_SETUP, LLQ_OP_REFRESH) or option.error == 0:
        return None
    return (str(peer[0]), option.error)


def _socket_family(host: str) -> int:
    return trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET


async def _bind(host: str, port: int, kind: int) -> trio.socket.SocketType:
    family = _socket_family(host)
    sock = trio.socket.socket(family, kind)
    try:
        if family == trio.socket.AF_INET6:
            sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        if kind == trio.socket.SOCK_STREAM:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        else:  # the acks of an event to 1,000 LLQs arrive in one burst: the default buffer holds ~200
            set_buffers(sock, UDP_BUFFER)  # type: ignore[arg-type]
        await sock.bind((host, port))
        if kind == trio.socket.SOCK_STREAM:
            sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


class _Server:
    def __init__(self, core: DnsCore, llq: LLQServer | None, tcp: TcpLimits | None = None,
                 rrl: RrlLimits | None = None) -> None:
        self.core = core
        self.store = core.store
        self.llq = llq
        self.udp: trio.socket.SocketType | None = None  # LLQ events go out from the UDP socket
        self.wake = trio.Event()  # set after an UPDATE: the next lease expiry may have moved earlier
        self.sweep_at = -math.inf  # when the lease sweeper looks next anyway (an earlier lease wakes it)
        self.llq_wake = trio.Event()  # set when the LLQ server's next deadline may have moved earlier
        self.tcp = TcpServer(self.tcp_respond, tcp)
        self.tls: TcpServer | None = None  # DNS over TLS, when serve() is given a TLS listener
        self.push: PushServer | None = None  # DNS Push sessions on the TLS listener
        self.rrl = ResponseLimiter(rrl)
        self.stun_rrl = ResponseLimiter(rrl)  # STUN answers do not eat a site's DNS budget, nor it theirs
        self.stun_counters: Counter[str] = Counter()
        self.answers: Counter[tuple[str, str]] = Counter()  # (opcode, rcode or "no reply"), for metrics
        self.front: Front | None = None  # front mode: updates go to the primary over this link
        self.link: PrimaryLink | None = None
        self.feed: FeedTask | None = None  # front mode: the primary's changes (NOTIFY, serial checks, IXFR)
        self.tasks: trio.Nursery | None = None  # for the LLQ events of a late answer from the primary
        self.owner: LeaseOwner | None = None  # front mode: our claim of the zone's leases (owner.py)
        self.walsync: WalSync | None = None  # front mode: the intents' syncs, in a worker thread

    def handle(self, wire: bytes, src: object,
               max_size: int | None) -> tuple[bytes | CheckedUpdate | None, LLQOutput]:
        """The reply to `wire` (None: silence) and the LLQ messages it causes (events to watchers); in
        front mode a checked update instead, for :meth:`forward`."""
        now = time.time()
        if self.llq is not None and max_size is None and (acked := self.llq.ack(wire, src, now)) is not None:
            return None, acked  # an event's ack (one per watcher and event), read without a parse
        msg = try_parse(wire, query=True)  # bounded first, and parsed once for both handlers
        if self.llq is not None and max_size is None:  # LLQ runs over UDP (RFC 8764 §5)
            out = self.llq.handle(wire, src, now, msg=msg)
            if out is not None:
                self.llq_wake.set()
                return None, out
        elif self.llq is not None and (events_to := llq_event_port(msg, src)) is not None:
            # An LLQ set up over TCP or TLS (Apple's extension): the reply goes back on the connection, the
            # events go over UDP to the connection's address, at the port the request named.
            out = self.llq.handle(wire, events_to, now, msg=msg)
            if out is not None:
                self.llq_wake.set()
                reply = next((w for d, w in out if d == events_to), None)
                return reply, [o for o in out if o[0] != events_to]
        self.core.last_changes = []
        prepared = self.core.prepare(wire, src, now, max_size=max_size, msg=msg)
        if isinstance(prepared, CheckedUpdate):
            if self.front is not None:
                return prepared, []
            lease_end = _lease_end(prepared, now)
            prepared = self.core.commit(prepared, dns.rcode.NOERROR, now)
            return prepared, self._after(wire, prepared, now, lease_end)
        return prepared, self._after(wire, prepared, now)

    async def forward(self, update: CheckedUpdate, wire: bytes) -> tuple[bytes | None, LLQOutput]:
        """Front mode: the checked update forwarded to the primary, and the device's reply."""
        assert self.front is not None and self.link is not None
        if self.owner is not None and not self.owner.serving:  # not (or no longer) ours: no fighting
            self.owner.refused()
            now = time.time()
            reply = self.core.commit(update, dns.rcode.SERVFAIL, now, remember=False)
            return reply, self._after(wire, reply, now)
        fwd = self.front.forward(update, time.time())
        if fwd is None:  # a copy of one still with the primary: silence, the client retransmits
            self._count(wire, None)
            return None, []
        answered = False
        try:
            # Shielded, and bounded by the link's timeout: once sent, the primary's answer is always
            # committed (our store, the replay memory), even if the device's connection goes meanwhile.
            with trio.CancelScope(shield=True):
                late = functools.partial(self._late, update, fwd)
                tickets: list[int] = []
                sent = functools.partial(self._sent, update, tickets)
                primary_reply = await self.link.exchange(fwd, late, sent)
                now = time.time()
                self.core.last_changes = []
                reply = self.front.answer(self.core, update, fwd, primary_reply, now)
                answered = True
                if tickets and self.walsync is not None:  # the lease on disk before the device hears
                    await self.walsync.wait(tickets[0])
        finally:
            if not answered:
                self.front.abandon(update)
        return reply, self._after(wire, reply, now, _lease_end(update, now))

    def _sent(self, update: CheckedUpdate, tickets: list[int]) -> None:
        """The forward is on its way: its intent written (:meth:`Front.sent`), synced by the WAL's task."""
        assert self.front is not None
        if self.front.sent(update, time.time(), sync=self.walsync is None) and self.walsync is not None:
            tickets.append(self.walsync.mark())

    def _late(self, update: CheckedUpdate, fwd: Forward, primary_reply: bytes) -> None:
        """The primary's answer to a forward that timed out (the device got SERVFAIL): a NOERROR is
        committed all the same, lease and all, and announced; the device's retry gets it from memory."""
        assert self.front is not None
        now = time.time()
        self.core.last_changes = []
        if self.front.late(self.core, update, fwd, primary_reply, now) is not None:
            events = self._announce(now)
            if events and self.tasks is not None:
                self.tasks.start_soon(self.send_llq, events)

    def _after(self, wire: bytes, reply: bytes | None, now: float,
               lease_end: float = -math.inf) -> LLQOutput:
        """Count the reply; an UPDATE's changes to the LLQ server and the Push sessions."""
        self._count(wire, reply)
        if len(wire) >= 4 and (wire[2] >> 3) & 0xF == _OPCODE_UPDATE:
            return self._announce(now, lease_end)
        return []

    def _announce(self, now: float, lease_end: float = -math.inf) -> LLQOutput:
        """The last update's changes (``core.last_changes``) to the Push sessions, queued before its reply
        is sent, and to the LLQ server (its events returned); the lease sweeper woken if the update's
        shortest lease (``lease_end``; unknown: at once) ends before it looks next anyway: waking it
        after each update cost the next update its queries of the store."""
        if lease_end < self.sweep_at:
            self.wake.set()
        events: LLQOutput = []
        if self.push is not None and self.core.last_changes:
            self.push.changes(self.core.last_changes, now)
        if self.llq is not None and self.core.last_changes:
            events = self.llq.changes(self.core.last_changes, now)
            self.llq_wake.set()
        return events

    def _count(self, wire: bytes, reply: bytes | None) -> None:
        if len(wire) < 4:
            return
        opcode = dns.opcode.to_text(dns.opcode.Opcode.make((wire[2] >> 3) & 0xF))
        rcode = dns.rcode.to_text(dns.rcode.Rcode.make(reply[3] & 0xF)) if reply and len(reply) >= 4 else None
        self.answers[opcode, rcode or "no reply"] += 1

    async def send_llq(self, out: LLQOutput) -> None:
        sock = self.udp
        for dest, wire in out:
            if sock is None:
                return
            if not isinstance(dest, tuple):  # LLQs are set up over UDP, so dest is a socket address
                log.debug("llq message for a non-UDP destination %r dropped", dest)
                continue
            try:
                await sock.sendto(wire, dest)
            except OSError as e:  # a watcher gone away: its LLQ expires with its lease
                log.debug("llq send to %r: %s", dest, e)

    async def llq_loop(self) -> None:
        """Resend unacknowledged events and expire LLQs when the LLQ server says it is time."""
        assert self.llq is not None
        while True:
            deadline = self.llq.deadline()  # wall-clock seconds, like everything the store keeps
            delay = SWEEP_MAX_SLEEP if deadline is None else min(max(deadline - time.time(), 0.0),
                                                                  SWEEP_MAX_SLEEP)
            with trio.move_on_after(delay):
                await self.llq_wake.wait()
            self.llq_wake = trio.Event()
            await self.send_llq(self.llq.poll(time.time()))

    async def udp_loop(self, sock: trio.socket.SocketType) -> None:
        with sock:
            async with trio.open_nursery() as forwards:  # front mode: updates answered as the primary does
                await self._udp_requests(sock, forwards)

    async def _udp_requests(self, sock: trio.socket.SocketType, forwards: trio.Nursery) -> None:
        while True:
            try:
                wire, src = await sock.recvfrom(_UDP_MAX)
            except OSError as e:  # e.g. ICMP port unreachable reported on the socket
                log.debug("udp receive: %s", e)
                continue
            if is_stun(wire):  # before the DNS guard: see the module docstring
                await self.answer_stun(sock, wire, src)
                continue
            if self.feed is not None and len(wire) >= 4 and (wire[2] >> 3) & 0xF == OPCODE_NOTIFY:
                self.feed.notify_later(wire, src)  # answered when idle, if signed by the primary
                continue
            reply, events = self.handle(wire, src, None)
            if isinstance(reply, CheckedUpdate):
                forwards.start_soon(self._udp_forward, sock, reply, wire, src)
                continue
            await self._udp_reply(sock, reply, events, len(wire), src, self.core.last_signed)

    async def _udp_forward(self, sock: trio.socket.SocketType, update: CheckedUpdate, wire: bytes,
                           src: tuple[str, int]) -> None:
        reply, events = await self.forward(update, wire)
        await self._udp_reply(sock, reply, events, len(wire), src, signed=True)  # with the account key

    async def _udp_reply(self, sock: trio.socket.SocketType, reply: bytes | None, events: LLQOutput,
                         query_size: int, src: tuple[str, int], signed: bool) -> None:
        if reply is not None:
            reply = self.limit(reply, query_size, src, signed)
        if reply is not None:
            try:
                await sock.sendto(reply, src)
            except OSError as e:
                log.debug("udp send to %r: %s", src, e)
        await self.send_llq(events)

    async def _send(self, sock: trio.socket.SocketType, reply: bytes | None, dest: tuple[str, int]) -> None:
        if reply is not None:
            try:
                await sock.sendto(reply, dest)
            except OSError as e:
                log.debug("udp send to %r: %s", dest, e)

    async def answer_stun(self, sock: trio.socket.SocketType, wire: bytes, src: tuple[str, int]) -> None:
        reply = stun_respond(wire, (src[0], src[1]), counters=self.stun_counters)
        if reply is None:
            return
        _, cls = split_type(int.from_bytes(reply[:2], "big"))
        kind = Kind.ANSWER if cls == SUCCESS else Kind.ERROR
        if self.stun_rrl.check(src, kind, trio.current_time()) is not Verdict.SEND:
            return  # no truncated form to slip: a real client retransmits
        try:
            await sock.sendto(reply, src)
        except OSError as e:
            log.debug("stun send to %r: %s", src, e)

    async def stun_loop(self, sock: trio.socket.SocketType) -> None:
        """An extra STUN-only port (``--stun``): anything but STUN is dropped."""
        with sock:
            while True:
                try:
                    wire, src = await sock.recvfrom(_UDP_MAX)
                except OSError as e:
                    log.debug("stun receive: %s", e)
                    continue
                if is_stun(wire):
                    await self.answer_stun(sock, wire, src)
                else:
                    self.stun_counters["stun port: not stun"] += 1

    def limit(self, reply: bytes, query_size: int, src: object, signed: bool) -> bytes | None:
        """What of a UDP ``reply`` may go to ``src``: the reply, its truncated form, or nothing. ``signed``
        is the caller's word, taken when the reply was made (``core.last_signed`` right after the handler;
        a forward's reply is signed): read later, another request may have changed it."""
        if signed and len(reply) <= query_size:
            self.rrl.counters["exempt: signed, not larger"] += 1
            return reply
        verdict = self.rrl.check(src, kind_of(reply, signed), trio.current_time())
        if verdict is Verdict.SEND:
            return reply
        return truncated(reply) if verdict is Verdict.SLIP else None

    async def tcp_respond(self, wire: bytes, peer: object) -> bytes | None:
        """The reply to one request over TCP (any LLQ events it causes go out over UDP)."""
        out, events = self.handle(wire, peer, 65535)
        if isinstance(out, CheckedUpdate):  # front mode: answered in order, once the primary has
            out, events = await self.forward(out, wire)
        with trio.CancelScope(shield=True):  # the connection may be evicted meanwhile; the events are not its
            await self.send_llq(events)
        return out

    async def front_loop(self) -> None:
        """Front mode's sweep: expired leases deleted on the primary, then here (:class:`Front`)."""
        assert self.front is not None and self.link is not None
        failed = False
        while True:
            lost = self.owner is not None and not self.owner.serving  # not our leases (yet): none deleted
            deadline = None if failed or lost else self.front.deadline()
            delay = SWEEP_MAX_SLEEP if deadline is None else min(max(deadline - time.time(), 0.0),
                                                                  SWEEP_MAX_SLEEP)
            self.wake, self.sweep_at = trio.Event(), time.time() + delay
            with trio.move_on_after(delay):
                await self.wake.wait()  # an update arrived: recompute the next expiry
            try:
                failed = False
                deletion = None if lost else self.front.due_deletion(time.time())
                if deletion is None:
                    continue
                reply = await self.link.exchange(deletion.forward)
                now = time.time()
                removed = self.front.deleted(deletion, reply, now)
            except Exception:  # keep serving; expired records stay invisible until a sweep succeeds
                log.exception("lease sweep failed; retrying in %.0f s", SWEEP_MAX_SLEEP)
                failed = True
                continue
            await self.zone_changed(removed, now)

    async def zone_changed(self, changes: Sequence[Change | RRsetRemoval], now: float) -> None:
        """Changes to the zone from the lease sweep or the change feed: to the Push sessions and the
        LLQ server (an UPDATE's go from :meth:`_after`, before its reply)."""
        if changes and self.push is not None:
            self.push.changes(changes, now)
        if changes and self.llq is not None:
            await self.send_llq(self.llq.changes(changes, now))
            self.llq_wake.set()

    async def sweep_loop(self) -> None:
        """Delete expired leases when the earliest one ends (records are already invisible before)."""
        while True:
            try:
                now = time.time()
                removed = self.store.expire(now)
                for r in removed:
                    rdtype = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(r.rdtype))
                    log.info("lease expired: %s %s (%d RR)", r.owner, rdtype, len(r.rrs))
                await self.zone_changed(removed, now)  # removal PUSHes and LLQ events
                nxt = self.store.next_expiry()
            except Exception:  # keep serving; expired records stay invisible until a sweep succeeds
                log.exception("lease sweep failed; retrying in %.0f s", SWEEP_MAX_SLEEP)
                nxt = None
            delay = SWEEP_MAX_SLEEP if nxt is None else min(max(nxt - time.time(), 0.0), SWEEP_MAX_SLEEP)
            self.wake, self.sweep_at = trio.Event(), time.time() + delay
            with trio.move_on_after(delay):
                await self.wake.wait()  # an update arrived: recompute the next expiry


async def serve(
    core: DnsCore,
    host: str,
    port: int,
    *,
    llq: LLQServer | None = None,
    tcp: TcpLimits | None = None,
    rrl: RrlLimits | None = None,
    stun_ports: Sequence[int] = (),
    after_bind: Callable[[], None] | None = None,
    metrics: tuple[str, int] | None = None,
    tls: tuple[str, int, ssl.SSLContext] | None = None,
    front: Front | None = None,
    primary_check: float | None = None,
    owner: LeaseOwner | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``core`` on UDP and TCP ``host:port`` until cancelled, with long-lived queries if ``llq``
    is given, the TCP limits ``tcp`` and the UDP response rate limits ``rrl`` (defaults:
    :class:`TcpLimits`, :class:`RrlLimits`), and STUN also on the UDP ``stun_ports`` of ``host``;
    Prometheus metrics over HTTP on ``metrics`` if given, and DNS over TLS (RFC 7858) on ``tls``'s host
    and port with its context if given (the same requests, limits and answers as TCP, and DNS Push
    sessions). OSError if a socket cannot be bound. With ``front``, signed UPDATEs go to its primary
    (front mode, :mod:`tunneld.dnsserver.front`) and expired leases are deleted there; the primary's
    changes come back by NOTIFY, a serial check every ``primary_check`` seconds (default
    :data:`~tunneld.dnsserver.feed.SOA_CHECK_INTERVAL`) and zone transfers
    (:mod:`tunneld.dnsserver.feed`). With ``owner`` the front first claims the zone's leases on the primary
    (:mod:`tunneld.dnsserver.owner`: OwnerConflict or ClaimFailed before readiness if it cannot; if the
    primary does not answer, it serves, refusing updates, and claims when the primary answers).
    ``after_bind`` runs once the DNS and STUN sockets are bound, before the first request is read
    (serve-dns drops its privileges there)."""
    socks: list[trio.socket.SocketType] = []
    try:
        for p, kind in ((port, trio.socket.SOCK_DGRAM), (port, trio.socket.SOCK_STREAM),
                        *((p, trio.socket.SOCK_DGRAM) for p in stun_ports)):
            try:
                socks.append(await _bind(host, p, kind))
            except OSError as e:
                if len(socks) >= 2:  # a --stun port: say which
                    e.filename = f"[{host}]:{p}" if ":" in host else f"{host}:{p}"
                raise
        if tls is not None:
            try:
                socks.append(await _bind(tls[0], tls[1], trio.socket.SOCK_STREAM))
            except OSError as e:
                e.filename = f"[{tls[0]}]:{tls[1]}" if ":" in tls[0] else f"{tls[0]}:{tls[1]}"
                raise
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if after_bind is not None:
        try:
            after_bind()
        except BaseException:
            for sock in socks:
                sock.close()
            raise
    tls_sock = socks.pop() if tls is not None else None
    udp, tcp_sock, stun_socks = socks[0], socks[1], socks[2:]
    server = _Server(core, llq, tcp, rrl)
    if tls is not None:
        server.push = PushServer(core)
        server.tls = TcpServer(server.tcp_respond, tcp, tls[2], push=server.push)
    server.udp = udp
    if front is not None:
        server.front, server.link = front, PrimaryLink(front.primary, front.timeout)
        front.start(time.time())  # as the user we now run as: the store's WAL files are ours
        server.walsync = WalSync.of(core.store)
        feed = Feed(core.store, front.key, interval=primary_check or SOA_CHECK_INTERVAL)
        server.feed = FeedTask(feed, server.link, server.zone_changed if owner is None
                               else watching(owner, server.zone_changed))
    if llq is not None:
        # LLQs established before a restart: they resume, and their clients get what changed meanwhile.
        await server.send_llq(llq.restore(time.time()))
    unclaimed = None
    try:
        if owner is not None and server.feed is not None and server.link is not None:
            server.owner, link, feed_task = owner, server.link, server.feed

            async def settle() -> None:  # the claim; after a take-over, the replica current, then adoption
                await claim(owner, link.exchange, time.time)
                if owner.take_over:
                    await server.zone_changed(await feed_task.check(), time.time())
                    await take_over(owner, link, core.policy.max_lease, time.time)
                    server.wake.set()  # the adopted leases' deletions
            try:
                await settle()
            except ClaimUnanswered as e:  # the primary is down: serve, refusing updates, and ask again
                log.warning("zone %s: the primary %s port %d did not answer this front's claim of the leases "
                            "(%s): updates are refused until it does", core.zone, *link.primary, e)
                unclaimed = settle
            except BaseException:
                for sock in (udp, tcp_sock, *stun_socks, *([tls_sock] if tls_sock else [])):
                    sock.close()
                raise
        async with trio.open_nursery() as nursery:
            server.tasks = nursery
            if server.link is not None:
                server.link.nursery = nursery  # late answers from the primary read at once
            nursery.start_soon(server.udp_loop, udp)
            nursery.start_soon(server.tcp.serve, tcp_sock)
            if tls_sock is not None and server.tls is not None:
                nursery.start_soon(server.tls.serve, tls_sock)
            nursery.start_soon(server.sweep_loop if front is None else server.front_loop)
            if server.feed is not None:
                nursery.start_soon(server.feed.run)
                nursery.start_soon(server.feed.answer_notifies, functools.partial(server._send, udp))
            if server.walsync is not None:
                nursery.start_soon(server.walsync.run)
            if unclaimed is not None:
                nursery.start_soon(claim_later, unclaimed, core.zone)
            for sock in stun_socks:
                nursery.start_soon(server.stun_loop, sock)
            if llq is not None:
                nursery.start_soon(server.llq_loop)
            if metrics is not None:  # imported only when on (prometheus-client's import cost)
                from tunneld.dnsserver.metrics import dns_server
                await nursery.start(dns_server(server, metrics).run)
            log.info("serving %s on %s port %d (UDP and TCP)%s%s%s", core.zone, host, port,
                     "".join(f", STUN on UDP port {p}" for p in stun_ports),
                     f", TLS on {tls[0]} port {tls[1]}" if tls is not None else "",
                     f", as the front of the primary {front.primary[0]} port {front.primary[1]}"
                     if front is not None else "")
            task_status.started()
    finally:
        if server.link is not None:
            server.link.close_now()
        if server.walsync is not None:
            server.walsync.close()
        tls_counters = server.tls.counters if server.tls is not None else Counter[str]()
        for what, counters in (("udp rate limiting", server.rrl.counters), ("tcp", server.tcp.counters),
                               ("tls", tls_counters),
                               ("dns push", server.push.counters if server.push is not None else Counter()),
                               ("stun", server.stun_counters + server.stun_rrl.counters),
                               ("front", (front.counters if front is not None else Counter())
                                + (server.link.counters if server.link is not None else Counter())
                                + (server.walsync.counters if server.walsync is not None else Counter())),
                               ("change feed", server.feed.feed.counters if server.feed else Counter()),
                               ("lease owner", owner.counters if owner is not None else Counter())):
            if counters:
                log.info("%s: %s", what, ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))


def bind_error_message(e: OSError, listen: str) -> str:
    """One line for a listener that could not be bound."""
    if e.errno == errno.EADDRINUSE:
        why = "the address is in use; is another DNS server running there? (choose another --listen)"
    elif e.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE (or use another port)"
    elif e.errno == errno.EADDRNOTAVAIL:
        why = "no interface has that address (give one of this host's addresses, or 0.0.0.0 / [::])"
    else:
        why = f"{e.strerror or e}"
    return f"cannot listen on {listen}: {why}"

