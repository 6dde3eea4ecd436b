"""The watcher's DNS Push client (RFC 8765) on one DSO session (RFC 8490) over DNS over TLS, sans-I/O.

:class:`PushSession` is the session with the server: KEEPALIVE first, keepalive traffic within the interval
the server gave, a response deadline on every request, reconnection with backoff after the connection is
lost, RETRY DELAY honoured, and the verdict that the server does not do Push (the watcher then falls back to
LLQ over UDP and the session tries again later). :class:`PushClient` is one subscription, on the watcher's
client face (:class:`~tunneld.proto.watcher_types.WatchClient`), giving the events an LLQ client gives
(:mod:`tunneld.proto.llq`), so the watcher's logic is the same over either. Each SUBSCRIBE is followed by
an ordinary TSIG-signed QUERY for the same question on the same connection: PUSHes before its answer are
ignored, the answer is the whole set (``Established``), PUSHes after it are ``Added``/``Removed``.
``now`` is whatever clock the driver gives (Unix seconds: the queries are signed); randomness is injected.
The rules and why: docs/protocol.md ("Watcher behaviour").
"""

from __future__ import annotations

import enum
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tunneld.proto.core import Address, Outbox
from tunneld.proto.dso_wire import (
    CLASS_ANY,
    INFINITE,
    MIN_KEEPALIVE_INTERVAL,
    OPCODE_DSO,
    RCODE_DSOTYPENI,
    TYPE_ANY,
    DsoMessage,
    Keepalive,
    Push,
    PushRecord,
    RetryDelay,
    Subscribe,
    UnknownTlv,
    Unsubscribe,
    decode,
    encode,
)
from tunneld.proto.errors import ParseError
from tunneld.proto.llq import Established, Event, Failed, LLQState
from tunneld.proto.llq_cache import AnswerCache
from tunneld.proto.llq_wire import LLQ_REMOVE_TTL, read_answer
from tunneld.proto.tsig import TsigSession

__all__ = [
    "DEFAULT_KEEPALIVE_INTERVAL",
    "KEEPALIVE_WISH",
    "PUSH_RETRY_INTERVAL",
    "RECONNECT_MAX",
    "RECONNECT_MIN",
    "RECONNECT_TRIES",
    "RESPONSE_TIMEOUT",
    "DropConnection",
    "PushClient",
    "PushSession",
    "PushUnavailable",
    "PushUp",
    "Refused",
    "SessionEvent",
    "SessionState",
    "is_dso",
]

Question = tuple[dns.name.Name, dns.rdatatype.RdataType]

# -- timing (RFC 8490 §6.2, §6.5, §7.1; the values of our server where the RFC leaves a choice) -----------

KEEPALIVE_WISH: Final = Keepalive(inactivity_timeout=15_000, keepalive_interval=60_000)
"""What our first KEEPALIVE asks for (ms): the values our server applies anyway."""
DEFAULT_KEEPALIVE_INTERVAL: Final = 60.0  # s: a server that gives none (it may start the session silently)
KEEPALIVE_FRACTION: Final = 0.75  # a message leaves within this part of the interval (§6.5)
RESPONSE_TIMEOUT: Final = 10.0  # s: a request (KEEPALIVE, SUBSCRIBE, the resync QUERY) unanswered: dead link
RECONNECT_MIN: Final = 2.0  # s: the first wait after a lost connection, doubling ...
RECONNECT_MAX: Final = 60.0  # ... up to this, plus up to a quarter more of jitter
RECONNECT_TRIES: Final = 3  # reconnections in a row that fail before Push counts as unavailable
PUSH_RETRY_INTERVAL: Final = 300.0  # s: while on LLQ, Push is tried again this often
_NOTIMP: Final = 4  # RFC 1035 §4.1.1: a server without DSO may answer NOTIMP (RFC 8490 §5.1.1)


# -- events ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushUp:
    """The session is established (the server answered the KEEPALIVE): Push is usable."""

    keepalive_interval: float | None


@dataclass(frozen=True)
class PushUnavailable:
    """Push is not usable now (``reason``): the watcher uses LLQ; the session tries again after
    ``retry_in`` seconds."""

    reason: str
    retry_in: float


@dataclass(frozen=True)
class DropConnection:
    """The session gave up on the connection (a dead link, a RETRY DELAY, a protocol error): close it, so
    the next message opens a fresh one."""

    reason: str


@dataclass(frozen=True)
class Refused:
    """A subscription the server will not serve (``reason``): the watcher follows the question by LLQ."""

    reason: str


SessionEvent = PushUp | PushUnavailable | DropConnection
ClientEvent = Event | Refused


class SessionState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"  # the first KEEPALIVE sent, its response awaited
    UP = "up"
    WAITING = "reconnecting"  # the connection was lost: waiting out the backoff or a RETRY DELAY
    UNAVAILABLE = "unavailable"  # the watcher uses LLQ; Push is tried again later
    STOPPED = "stopped"


class _Phase(enum.Enum):
    PENDING = "pending"  # waiting for the session
    SUBSCRIBING = "subscribing"  # SUBSCRIBE sent
    QUERYING = "querying"  # subscribed; the resync QUERY sent
    LIVE = "live"  # the QUERY answered: PUSHes apply


def is_dso(data: bytes) -> bool:
    """Whether ``data`` is a DSO message (OPCODE 6), by its header alone."""
    return len(data) >= 3 and (data[2] >> 3) & 0xF == OPCODE_DSO


# -- one subscription --------------------------------------------------------------------------------------


class PushClient(Outbox[ClientEvent]):
    """One question (class IN) followed by DNS Push through ``session``. Its messages leave through the
    session (:meth:`transmits` stays empty); its events are the LLQ client's, and :class:`Refused`."""

    def __init__(self, session: PushSession, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> None:
        super().__init__()
        self.session = session
        self.qname = qname
        self.rdtype = dns.rdatatype.RdataType.make(rdtype)
        self.state = LLQState.IDLE
        self.counters: Counter[str] = Counter()
        self.phase = _Phase.PENDING
        self.subscribe_id = 0  # the accepted SUBSCRIBE's message ID (0: none)
        self.cache = AnswerCache(self.counters)

    @property
    def question(self) -> Question:
        return (self.qname, self.rdtype)

    def start(self, now: float) -> None:
        self.state = LLQState.SETUP_SENT
        self.session.subscribe(self, now)

    def close(self, now: float) -> None:
        self.session.unsubscribe(self, now)
        self.state = LLQState.STOPPED

    def receive(self, data: bytes, source: Address, now: float) -> None:
        self.session.receive(data, source, now)

    def poll(self, now: float) -> None:
        """The session runs every timer."""

    def deadline(self) -> float | None:
        return None

    def finished(self) -> bool:
        return self.state in (LLQState.IDLE, LLQState.STOPPED)

    def records(self) -> list[dns.rrset.RRset]:
        return self.cache.records()

    def _matches(self, record: PushRecord) -> bool:
        if record.name != self.qname or record.rclass not in (dns.rdataclass.IN, CLASS_ANY):
            return False
        return self.rdtype == TYPE_ANY or record.rtype in (self.rdtype, TYPE_ANY)

    def _changes(self, record: PushRecord) -> list[tuple[dns.rrset.RRset, int]]:
        """``record`` as (RRset, TTL) pairs for the cache: a collective deletion names every held RRset
        it covers, each record removed with the removal TTL."""
        if record.rdata is not None:
            rdtype = dns.rdatatype.RdataType.make(record.rtype)
            rrset = dns.rrset.RRset(record.name, dns.rdataclass.IN, rdtype)
            rrset.add(record.rdata)
            return [(rrset, LLQ_REMOVE_TTL if record.ttl == LLQ_REMOVE_TTL else record.ttl)]
        return [(rrset, LLQ_REMOVE_TTL) for rrset in self.cache.records()
                if rrset.name == record.name and record.rtype in (TYPE_ANY, rrset.rdtype)]


# -- the session -------------------------------------------------------------------------------------------


class PushSession(Outbox[SessionEvent]):
    """The DSO session with ``server`` (its TLS port), carrying every :class:`PushClient`. See the module
    docstring. ``tsig`` signs the resync queries and verifies their answers (DSO messages carry none:
    the TLS client certificate is the membership, RFC 8490 §5.4)."""

    def __init__(self, server: Address, *, rand: Callable[[int], bytes] = os.urandom,
                 tsig: TsigSession | None = None) -> None:
        super().__init__()
        self.server = server
        self.tsig = tsig
        self._rand = rand
        self.counters: Counter[str] = Counter()
        self.state = SessionState.IDLE
        self.keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL
        self.clients: dict[Question, PushClient] = {}
        self._outstanding: dict[int, tuple[PushClient | None, str, float]] = {}  # ID: client, kind, due
        self._last_sent = 0.0
        self._reconnect_at: float | None = None
        self._retry_at: float | None = None
        self._backoff = RECONNECT_MIN
        self._failures = 0  # connection attempts in a row that failed
        self._was_up = False  # established since the last start or retry: losses reconnect, not fall back
        self.touched: set[Question] = set()  # clients with new events since the owner last looked

    # -- the owner's API -----------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Open the session: the KEEPALIVE request (the port connects at the first send)."""
        if self.state in (SessionState.IDLE, SessionState.UNAVAILABLE, SessionState.WAITING):
            self._connect(now)

    def client(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> PushClient:
        return PushClient(self, qname, rdtype)

    @property
    def usable(self) -> bool:
        """Whether new questions should use Push (not while it is unavailable or stopped)."""
        return self.state not in (SessionState.UNAVAILABLE, SessionState.STOPPED)

    def connection_lost(self, now: float, reason: str) -> None:
        """The port lost the connection or could not make one (the service calls this)."""
        self._lost(now, reason, drop=False)

    def reconnect(self, now: float) -> None:
        """The network moved (a new port): set the session up again at once, and every subscription."""
        if self.state in (SessionState.UP, SessionState.CONNECTING, SessionState.WAITING):
            self.counters["reconnected after a network change"] += 1
            self._reset_clients("network changed")
            self._backoff = RECONNECT_MIN
            self._connect(now)

    def close(self, now: float) -> None:
        """Stop: nothing more is sent (closing the connection ends every subscription, RFC 8765 §6.4)."""
        self.state = SessionState.STOPPED
        self._outstanding.clear()
        self._reconnect_at = self._retry_at = None

    def deadline(self) -> float | None:
        times = [due for _c, _k, due in self._outstanding.values()]
        times += [t for t in (self._reconnect_at, self._retry_at, self._keepalive_due()) if t is not None]
        return min(times) if times else None

    def poll(self, now: float) -> None:
        late = [kind for _c, kind, due in self._outstanding.values() if due <= now]
        if late:
            self._lost(now, f"no response to {late[0]} within {RESPONSE_TIMEOUT:g} s")
        waiting, unavailable = SessionState.WAITING, SessionState.UNAVAILABLE
        if self.state == waiting and self._reconnect_at is not None and now >= self._reconnect_at:
            self._connect(now)
        elif self.state == unavailable and self._retry_at is not None and now >= self._retry_at:
            self.counters["push retried"] += 1
            self._connect(now)
        due = self._keepalive_due()
        if due is not None and now >= due:
            self._request(now, KEEPALIVE_WISH, None, "KEEPALIVE")
            self.counters["keepalive sent"] += 1

    def receive(self, data: bytes, source: Address, now: float) -> None:
        """One message from the server's connection. Never raises for network input."""
        if self.state in (SessionState.IDLE, SessionState.STOPPED):
            self.counters["not running"] += 1
            return
        if is_dso(data):
            try:
                message = decode(data)
            except ParseError as e:
                self.counters[f"DSO parse error: {e}"] += 1
                self._lost(now, f"undecodable DSO message ({e})")
                return
            self._on_dso(message, now)
        else:
            self._on_answer(data, now)

    # -- clients -------------------------------------------------------------------------------------------

    def subscribe(self, client: PushClient, now: float) -> None:
        self.clients[client.question] = client
        client.phase = _Phase.PENDING
        if self.state == SessionState.UP:
            self._send_subscribe(client, now)
        elif self.state == SessionState.IDLE:
            self._connect(now)
        elif self.state in (SessionState.UNAVAILABLE, SessionState.STOPPED):
            self._refuse(client, "DNS Push unavailable")

    def unsubscribe(self, client: PushClient, now: float) -> None:
        if self.clients.get(client.question) is client:
            del self.clients[client.question]
        for msg_id, (owner, _kind, _due) in list(self._outstanding.items()):
            if owner is client:
                del self._outstanding[msg_id]
        if self.state == SessionState.UP and client.subscribe_id:
            self._tx(now, DsoMessage(0, (Unsubscribe(client.subscribe_id),)))
        client.subscribe_id = 0

    # -- receive paths -------------------------------------------------------------------------------------

    def _on_dso(self, message: DsoMessage, now: float) -> None:
        if message.response:
            entry = self._outstanding.pop(message.msg_id, None)
            if entry is None:
                self.counters["response to nothing"] += 1
                return
            client, kind, _due = entry
            if kind == "KEEPALIVE":
                self._on_keepalive_response(message, now)
            elif kind == "SUBSCRIBE" and client is not None:
                self._on_subscribe_response(client, message, now)
            else:
                self.counters["DSO response to a query"] += 1
            return
        primary = message.primary
        if not message.unidirectional:  # a request from the server: none is defined for a client
            rcode = RCODE_DSOTYPENI if isinstance(primary, UnknownTlv) else dns.rcode.FORMERR
            self.counters["request from the server"] += 1
            self._tx(now, DsoMessage(message.msg_id, (), response=True, rcode=rcode))
            return
        if isinstance(primary, Push):
            self._on_push(primary, now)
        elif isinstance(primary, RetryDelay):
            self.counters["retry delay"] += 1
            self._lost(now, f"RETRY DELAY {primary.delay} ms (rcode {message.rcode})",
                       wait=primary.delay / 1000)
        elif isinstance(primary, Keepalive):
            self._set_keepalive(primary)
        else:  # RFC 8490 §5.4.5: an unknown or misplaced unidirectional message aborts the session
            self.counters["unexpected unidirectional message"] += 1
            self._lost(now, "unexpected unidirectional message")

    def _on_keepalive_response(self, message: DsoMessage, now: float) -> None:
        if message.rcode in (RCODE_DSOTYPENI, _NOTIMP):
            self._unavailable(now, f"the server answered KEEPALIVE with {_rcode(message.rcode)}")
            return
        if message.rcode:  # overloaded, say: a RETRY DELAY in the response says how long to stay away
            delay = next((t.delay / 1000 for t in message.tlvs if isinstance(t, RetryDelay)), None)
            self._lost(now, f"KEEPALIVE answered with {_rcode(message.rcode)}", wait=delay)
            return
        for tlv in message.tlvs:
            if isinstance(tlv, Keepalive):
                self._set_keepalive(tlv)
        if self.state != SessionState.CONNECTING:
            return
        self.state = SessionState.UP
        self._failures = 0
        self._was_up = True
        self._backoff = RECONNECT_MIN
        self.counters["sessions"] += 1
        self._emit(PushUp(self.keepalive_interval))
        for client in list(self.clients.values()):
            if client.phase == _Phase.PENDING and client.state != LLQState.IDLE:
                self._send_subscribe(client, now)

    def _on_subscribe_response(self, client: PushClient, message: DsoMessage, now: float) -> None:
        if message.rcode in (RCODE_DSOTYPENI, _NOTIMP):
            self._unavailable(now, f"the server answered SUBSCRIBE with {_rcode(message.rcode)}")
            return
        if message.rcode:
            self.counters["subscription refused"] += 1
            self.clients.pop(client.question, None)
            self._refuse(client, f"SUBSCRIBE answered with {_rcode(message.rcode)}")
            return
        client.subscribe_id = message.msg_id
        client.phase = _Phase.QUERYING
        query = dns.message.make_query(client.qname, client.rdtype, dns.rdataclass.IN, id=self._new_id(),
                                       flags=0)
        wire = query.to_wire()
        if self.tsig is not None:
            wire = self.tsig.sign(wire, now)
        self._outstanding[query.id] = (client, "QUERY", now + RESPONSE_TIMEOUT)
        self._send(self.server, wire)
        self._last_sent = now

    def _on_answer(self, data: bytes, now: float) -> None:
        """An ordinary DNS message: the answer to a resync QUERY (anything else is counted, dropped)."""
        read = read_answer(data, self.tsig, now)
        if isinstance(read, str):
            self.counters[read] += 1
            return
        msg, ttls = read
        entry = self._outstanding.get(msg.id)
        if (entry is None or entry[1] != "QUERY" or entry[0] is None or not msg.flags & dns.flags.QR
                or msg.opcode() != dns.opcode.QUERY):
            self.counters["unexpected answer"] += 1
            return
        client = entry[0]
        q = msg.question[0] if len(msg.question) == 1 else None
        if q is None or (q.name, q.rdtype, q.rdclass) != (client.qname, client.rdtype, dns.rdataclass.IN):
            self.counters["answer for another question"] += 1
            return
        del self._outstanding[msg.id]
        if msg.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or msg.flags & dns.flags.TC:
            self.counters["unusable resync answer"] += 1
            self.clients.pop(client.question, None)
            self._refuse(client, f"the resync query was answered with {dns.rcode.to_text(msg.rcode())}")
            return
        for change in client.cache.replace(msg.answer, ttls):
            client._emit(change)
        client.phase = _Phase.LIVE
        client.state = LLQState.ESTABLISHED
        client._emit(Established(tuple(client.records()), 0, 0))
        self.touched.add(client.question)

    def _on_push(self, push: Push, now: float) -> None:
        changes: dict[Question, list[tuple[dns.rrset.RRset, int]]] = {}
        for record in push.records:
            if record.rtype == TYPE_ANY:  # a whole name removed: every type's subscription to it
                matched = [c for c in self.clients.values() if c._matches(record)]
            else:
                found = (self.clients.get((record.name, dns.rdatatype.RdataType.make(t)))
                         for t in (record.rtype, TYPE_ANY))
                matched = [c for c in found if c is not None and c._matches(record)]
            if not matched:
                self.counters["push for no subscription"] += 1
            for client in matched:
                if client.phase != _Phase.LIVE:
                    self.counters["push before the resync answer"] += 1  # that answer will include it
                    continue
                changes.setdefault(client.question, []).extend(client._changes(record))
        for question, pairs in changes.items():
            client = self.clients[question]
            events = client.cache.apply([rrset for rrset, _ttl in pairs], [ttl for _rrset, ttl in pairs])
            if not events:
                self.counters["duplicate or no-op push"] += 1
            for event in events:
                client._emit(event)
            self.touched.add(question)

    # -- state changes -------------------------------------------------------------------------------------

    def _connect(self, now: float) -> None:
        self.state = SessionState.CONNECTING
        self._reconnect_at = self._retry_at = None
        self.keepalive_interval = DEFAULT_KEEPALIVE_INTERVAL
        self._request(now, KEEPALIVE_WISH, None, "KEEPALIVE")

    def _lost(self, now: float, reason: str, *, wait: float | None = None, drop: bool = True) -> None:
        """The connection is gone (or we give up on it): every subscription waits to be made again."""
        if self.state == SessionState.WAITING and wait is not None and self._reconnect_at is not None:
            self._reconnect_at = max(self._reconnect_at, now + wait)  # a RETRY DELAY while waiting
            return
        if self.state not in (SessionState.UP, SessionState.CONNECTING):
            return
        self.counters["connection lost"] += 1
        failed_attempt = self.state == SessionState.CONNECTING
        if drop:
            self._emit(DropConnection(reason))
        self._reset_clients(reason)
        if failed_attempt:
            self._failures += 1
            if not self._was_up or self._failures >= RECONNECT_TRIES:
                self._unavailable(now, reason, wait or 0.0, drop=False)
                return
        jitter = self._backoff * 0.25 * int.from_bytes(self._rand(2), "big") / 0x10000
        self.state = SessionState.WAITING
        self._reconnect_at = now + max(self._backoff + jitter, wait or 0.0)
        self._backoff = min(self._backoff * 2, RECONNECT_MAX)

    def _reset_clients(self, reason: str) -> None:
        """Every subscription waits to be made again; a live one reports the loss (its records are kept:
        the next resync answer replaces them as a whole)."""
        self._outstanding.clear()
        for client in self.clients.values():
            if client.phase == _Phase.LIVE:
                client.state = LLQState.SETUP_SENT
                client._emit(Failed(f"DNS Push: {reason}"))
                self.touched.add(client.question)
            client.phase, client.subscribe_id = _Phase.PENDING, 0

    def _unavailable(self, now: float, reason: str, wait: float = 0.0, drop: bool = True) -> None:
        self.counters["push unavailable"] += 1
        if drop and self.state in (SessionState.UP, SessionState.CONNECTING):
            self._emit(DropConnection(reason))
        self.state = SessionState.UNAVAILABLE
        self._outstanding.clear()
        self._was_up = False
        self._failures = 0
        self._backoff = RECONNECT_MIN
        self._reconnect_at = None
        retry_in = max(PUSH_RETRY_INTERVAL, wait)
        self._retry_at = now + retry_in
        self._emit(PushUnavailable(reason, retry_in))
        for client in list(self.clients.values()):
            self._refuse(client, f"DNS Push unavailable: {reason}")
        self.clients.clear()

    def _refuse(self, client: PushClient, reason: str) -> None:
        client.phase, client.subscribe_id = _Phase.PENDING, 0
        client.state = LLQState.STOPPED
        client._emit(Refused(reason))
        self.touched.add(client.question)

    def _set_keepalive(self, tlv: Keepalive) -> None:
        interval = tlv.keepalive_interval
        if interval == INFINITE:
            self.keepalive_interval = None
            return
        if interval < MIN_KEEPALIVE_INTERVAL:
            self.counters["keepalive interval below the minimum"] += 1
            interval = MIN_KEEPALIVE_INTERVAL
        self.keepalive_interval = interval / 1000

    # -- sending -------------------------------------------------------------------------------------------

    def _keepalive_due(self) -> float | None:
        if self.state != SessionState.UP or self.keepalive_interval is None:
            return None
        if any(kind == "KEEPALIVE" for _c, kind, _d in self._outstanding.values()):
            return None
        return self._last_sent + self.keepalive_interval * KEEPALIVE_FRACTION

    def _send_subscribe(self, client: PushClient, now: float) -> None:
        client.phase = _Phase.SUBSCRIBING
        self._request(now, Subscribe(client.qname, client.rdtype), client, "SUBSCRIBE")

    def _request(self, now: float, tlv: Keepalive | Subscribe, client: PushClient | None, kind: str) -> None:
        msg_id = self._new_id()
        self._outstanding[msg_id] = (client, kind, now + RESPONSE_TIMEOUT)
        self._tx(now, DsoMessage(msg_id, (tlv,)))

    def _tx(self, now: float, message: DsoMessage) -> None:
        self._send(self.server, encode(message))
        self._last_sent = now

    def _new_id(self) -> int:
        """A message ID, not 0 (a DSO request's, §5.4) and not one awaiting its response."""
        for _ in range(8):
            msg_id = int.from_bytes(self._rand(2), "big")
            if msg_id and msg_id not in self._outstanding:
                return msg_id
        return next(i for i in range(1, 0x10000) if i not in self._outstanding)  # a poor rand(): any free one


def _rcode(rcode: int) -> str:
    return "DSOTYPENI" if rcode == RCODE_DSOTYPENI else dns.rcode.to_text(dns.rcode.Rcode.make(rcode))
