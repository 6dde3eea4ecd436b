"""The account watcher: a client for every device's records (LLQ, or DNS Push), turned into peers.

A sans-I/O core on the face of :mod:`tunneld.proto.core`, driven with ``now`` in Unix seconds (its queries
are signed); it talks to one server and drops datagrams from anywhere else. Randomness goes through the
injected ``rand(n) -> bytes`` to its clients. It follows the browse PTR, then each other device's AAAA,
SRV and TXT, then the target addresses its key names (:mod:`tunneld.proto.records`), and with
``host_keys`` its SSHFP and host-key TXT (:mod:`tunneld.proto.hostkeys`), one client per question
(shared between hosts that need the same one). With ``push`` (the server's DNS-over-TLS address) the
clients are DNS Push subscriptions on one session (:mod:`tunneld.proto.push_client`) and LLQ over UDP is
the fallback, question by question. What each change makes of a host (:class:`PeerLearned`,
:class:`PeerGone`, :class:`PeerRejected`), and the known limits, are in docs/protocol.md ("Watcher
behaviour").
"""

from __future__ import annotations

import base64
import binascii
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

from tunneld.proto import hostkeys, records
from tunneld.proto.core import Address, Outbox, Transmit
from tunneld.proto.dnswire import from_server
from tunneld.proto.errors import ParseError
from tunneld.proto.llq import (
    LLQ_DEFAULT_LEASE,
    Added,
    Established,
    Event,
    Failed,
    Fallback,
    LLQClient,
    LLQState,
    Removed,
    TcpQuery,
)
from tunneld.proto.llq_wire import parse_message
from tunneld.proto.push_client import PushClient, PushSession, PushUnavailable, PushUp, Refused
from tunneld.proto.tsig import TsigKey, TsigSession
from tunneld.proto.watcher_types import (
    ClientFactory,
    DropConnection,
    PeerGone,
    PeerLearned,
    PeerRejected,
    QueryStatus,
    TransportStatus,
    WatchClient,
    WatcherEvent,
)

__all__ = [
    "ClientFactory",
    "DropConnection",
    "PeerGone",
    "PeerLearned",
    "PeerRejected",
    "QueryStatus",
    "TcpQuery",
    "TransportStatus",
    "WatchClient",
    "Watcher",
    "WatcherEvent",
]

Question = tuple[dns.name.Name, dns.rdatatype.RdataType]
_RecordKey = tuple[dns.name.Name, int, int]  # owner, rdclass, rdtype
_AWAITING_FIRST_ANSWER: Final = frozenset({LLQState.IDLE, LLQState.SETUP_SENT, LLQState.CHALLENGE_SENT})
_HANDSHAKING: Final = frozenset({LLQState.SETUP_SENT, LLQState.CHALLENGE_SENT})
MAX_HANDSHAKES: Final = 32
"""LLQ handshakes in flight at once; the other clients wait their turn. An account of 100 devices starts
some 300 at once: the burst overflowed the server's socket buffer, and the retransmissions doubled it."""


# -- state -------------------------------------------------------------------------------------------------


@dataclass
class _Watch:
    """One question: its client, the records its events gave, the hosts that use it."""

    client: WatchClient
    cache: dict[_RecordKey, set[dns.rdata.Rdata]] = field(default_factory=dict)
    hosts: set[str] = field(default_factory=set)  # lower-case host names; empty for the browse question


@dataclass
class _Host:
    name: str
    questions: set[Question] = field(default_factory=set)
    target_key: bytes | None = None  # the key whose target A/AAAA are watched
    good: records.HostRecords | None = None
    reason: str | None = None  # why it does not parse now (None: it does)
    reported: set[str] = field(default_factory=set)  # rejection reasons already reported
    keys: tuple[hostkeys.HostKey, ...] = ()  # the verified SSH host keys last reported
    keys_refused: list[str] = field(default_factory=list)  # host-key refusals last reported


def _txt_key(domain: str, name: str, rrsets: Iterable[dns.rrset.RRset]) -> bytes | None:
    """The public key in the host's TXT, leniently (it only picks names to watch; parse() decides)."""
    service = records.service_name(domain, name)
    found: list[dns.rdata.Rdata] = []
    for rrset in rrsets:
        if rrset.rdtype == dns.rdatatype.TXT and rrset.rdclass == dns.rdataclass.IN and rrset.name == service:
            found.extend(rrset)
    if len(found) != 1 or not isinstance(found[0], dns.rdtypes.ANY.TXT.TXT):
        return None
    for string in found[0].strings:
        key, sep, value = string.partition(b"=")
        if sep and key.lower() == b"pk":
            try:
                public_key = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return None
            return public_key if len(public_key) == records.PUBLIC_KEY_LEN else None
    return None


# -- the watcher -------------------------------------------------------------------------------------------


class Watcher(Outbox[WatcherEvent]):
    """Follows the account ``domain``'s devices (except ``own_name``) by LLQ. See the module docstring.

    ``rand``, ``lease`` and one TSIG session with ``key`` (``now`` is then Unix time) go to every
    client. ``client_factory(qname, rdtype, rand=, lease=, tsig=)`` makes the LLQ client for one question;
    with ``push`` (the server's DNS-over-TLS address: messages from it go to the Push session) questions
    are followed by DNS Push while the server offers it.
    """

    def __init__(self, domain: str, own_name: str, *, server: Address,
                 rand: Callable[[int], bytes] = os.urandom,
                 lease: int = LLQ_DEFAULT_LEASE,
                 key: TsigKey | None = None,
                 client_factory: ClientFactory = LLQClient,
                 host_keys: bool = False,
                 push: Address | None = None) -> None:
        super().__init__()
        self.host_keys = host_keys  # also follow each host's SSHFP and host-key TXT
        self.server = server
        self.domain = domain
        self.own_name = own_name
        self.lease = lease
        self._rand = rand
        self._tsig = None if key is None else TsigSession(key)  # one per socket: shared by the clients
        self._factory = client_factory
        self._browse: Question = records.names_to_browse(domain)[0]
        self._watches: dict[Question, _Watch] = {}
        self._hosts: dict[str, _Host] = {}  # by lower-case name
        self._waiting: deque[Question] = deque()  # clients made, not started yet (MAX_HANDSHAKES)
        self._renewing: set[Question] = set()  # waiting to set up again after a network change
        self._starting: set[Question] = set()  # started from the queue, maybe still in their handshake
        self.counters: Counter[str] = Counter()
        self.running = False
        self.push: PushSession | None = None  # its own TSIG session: another connection
        if push is not None:
            self.push = PushSession(push, rand=rand, tsig=None if key is None else TsigSession(key))
        self._push_refused: set[Question] = set()  # by LLQ until the session is next set up

    # -- public API ----------------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin: an LLQ on the browse PTR question (hosts follow as the PTR set names them)."""
        if self.running:
            return
        self.running = True
        if self.push is not None:
            self.push.start(now)
        self._start_client(self._browse, None, now)
        self._drain_push(now)

    def renew(self, now: float) -> None:
        """The network moved: the server's LLQs point at our old address, so every client sets its LLQ up
        again (from the new one; MAX_HANDSHAKES at a time), and the answers tell what changed meanwhile.
        The Push session (on its new connection) subscribes again to everything it carries."""
        queued = set(self._waiting)
        llq = [q for q, w in self._watches.items() if not isinstance(w.client, PushClient)]
        self._renewing.update(llq)
        self._waiting.extend(q for q in llq if q not in queued)
        if self.push is not None:
            self.push.reconnect(now)
        self._start_waiting(now)
        self._drain_push(now)
        self.counters["renewals"] += 1

    def push_lost(self, now: float, reason: str) -> None:
        """The Push session's connection was lost, or could not be made (the service's port tells)."""
        if self.push is not None and self.running:
            self.push.connection_lost(now, reason)
            self._drain_push(now)

    def close(self, now: float) -> None:
        """Stop every client (established LLQs are cancelled with lease 0) and forget all hosts."""
        if self.push is not None:
            self.push.close(now)  # the connection's end ends its subscriptions
        for watch in self._watches.values():
            watch.client.close(now)
            self._transmits.extend(watch.client.transmits())
        self._watches.clear()
        self._hosts.clear()
        self._waiting.clear()
        self._renewing.clear()
        self._starting.clear()
        self.running = False

    def transmits(self) -> list[Transmit]:
        if self.push is not None:  # the Push session's messages (its clients send through it)
            self._transmits.extend(self.push.transmits())
        return super().transmits()

    def finished(self) -> bool:
        return not self.running  # the cancellations are sent once and not answered

    def receive(self, data: bytes, source: Address, now: float) -> None:
        """Route one datagram from the server to its question's client. Never raises for network input."""
        if not self.running:
            self.counters["not running"] += 1
            return
        if self.push is not None and from_server(source, self.push.server):
            self.push.receive(data, source, now)
            self._drain_push(now)
            self._start_waiting(now)
            return
        if not from_server(source, self.server):
            self.counters["not from the server"] += 1
            return
        try:
            msg = parse_message(data)
        except ParseError as e:
            self.counters[f"parse error: {e}"] += 1
            return
        if len(msg.question) != 1:
            self.counters["not one question"] += 1
            return
        q = msg.question[0]
        question: Question = (q.name, dns.rdatatype.RdataType.make(q.rdtype))
        watch = self._watches.get(question)
        if watch is None or q.rdclass != dns.rdataclass.IN or isinstance(watch.client, PushClient):
            self.counters["unknown question"] += 1
            return
        watch.client.receive(data, source, now)
        self._handle(question, watch, now)
        self._start_waiting(now)

    def poll(self, now: float) -> None:
        """Run every client's timers due at ``now``."""
        if self.push is not None:
            deadline = self.push.deadline()
            if deadline is not None and deadline <= now:
                self.push.poll(now)
                self._drain_push(now)
        for question, watch in list(self._watches.items()):
            if self._watches.get(question) is not watch:
                continue  # stopped while handling an earlier client's output
            deadline = watch.client.deadline()
            if deadline is not None and deadline <= now:
                watch.client.poll(now)
                self._handle(question, watch, now)
        self._start_waiting(now)

    def deadline(self) -> float | None:
        """When :meth:`poll` must next be called (None: nothing scheduled)."""
        times = [t for t in (w.client.deadline() for w in self._watches.values()) if t is not None]
        push = None if self.push is None else self.push.deadline()
        if push is not None:
            times.append(push)
        return min(times) if times else None

    def peers(self) -> list[records.HostRecords]:
        """The hosts currently learned (complete and consistent), by name."""
        learned = [h.good for h in self._hosts.values() if h.good is not None]
        return sorted(learned, key=lambda r: r.name.lower())

    @property
    def state(self) -> dict[str, Any]:
        """Status for humans: the browse LLQ, every host and its clients, counters."""
        def client_state(question: Question) -> str:
            watch = self._watches.get(question)
            return watch.client.state.value if watch is not None else "stopped"

        def label(question: Question) -> str:
            return f"{question[0]} {dns.rdatatype.to_text(question[1])}"

        hosts: dict[str, Any] = {}
        for host in sorted(self._hosts.values(), key=lambda h: h.name.lower()):
            hosts[host.name] = {
                "known": True,
                "complete": host.good is not None,
                "rejected": host.reason if host.reason and not host.reason.startswith("missing ") else None,
                "incomplete": host.reason if host.reason and host.reason.startswith("missing ") else None,
                "public_key": base64.b64encode(host.good.public_key).decode("ascii") if host.good else None,
                "endpoints": PeerLearned(host.good).endpoints if host.good else [],
                "clients": {label(q): client_state(q) for q in sorted(host.questions, key=label)},
            }
        counters: Counter[str] = Counter(self.counters)
        for watch in self._watches.values():
            counters.update(watch.client.counters)
        transport = {"transport": "llq"}
        if self.push is not None:
            counters.update({f"push: {k}": v for k, v in self.push.counters.items()})
            transport = {"transport": "push" if self.push.usable else "llq", "push": self.push.state.value}
        return {
            "running": self.running,
            **transport,
            "browse": {label(self._browse): client_state(self._browse)},
            "hosts": hosts,
            "counters": dict(counters),
        }

    # -- clients -------------------------------------------------------------------------------------------

    def _start_client(self, question: Question, host: str | None, now: float) -> None:
        """Start (or share) the client for ``question``."""
        watch = self._watches.get(question)
        if watch is not None:
            if host is not None:
                watch.hosts.add(host)
            return
        watch = _Watch(self._new_client(question))
        if host is not None:
            watch.hosts.add(host)
        self._watches[question] = watch
        self.counters["clients started"] += 1
        self._waiting.append(question)
        self._start_waiting(now)

    def _new_client(self, question: Question) -> WatchClient:
        """A Push subscription while the server offers Push, else an LLQ client."""
        if self.push is not None and self.push.usable and question not in self._push_refused:
            return self.push.client(*question)
        return self._factory(question[0], question[1], server=self.server, rand=self._rand,
                             lease=self.lease, tsig=self._tsig)

    def _swap(self, question: Question, watch: _Watch, now: float) -> None:
        """Follow ``question`` by the other kind of client (Push to LLQ, or back). The records held stay:
        the new client's first answer replaces them as a whole, so a host still there is not lost."""
        old = watch.client
        old.close(now)
        self._transmits.extend(old.transmits())
        watch.client = self._new_client(question)
        self.counters["clients switched"] += 1
        self._waiting.append(question)

    def _drain_push(self, now: float) -> None:
        """Pass on what the Push session sent and reported, and its clients' events."""
        session = self.push
        if session is None:
            return
        self._transmits.extend(session.transmits())
        for event in session.events():
            if isinstance(event, PushUp):
                self._push_refused.clear()
                self._emit(TransportStatus("push"))
                for question, watch in list(self._watches.items()):
                    if not isinstance(watch.client, PushClient):
                        self._swap(question, watch, now)
            elif isinstance(event, PushUnavailable):
                self.counters["push unavailable"] += 1
                self._emit(TransportStatus("llq", event.reason))
            else:
                self._emit(event)
        touched, session.touched = session.touched, set()
        for question in sorted(touched, key=str):
            held = self._watches.get(question)
            if held is not None and isinstance(held.client, PushClient):
                self._handle(question, held, now)
        self._start_waiting(now)

    def _start_waiting(self, now: float) -> None:
        """Start waiting clients while fewer than MAX_HANDSHAKES handshakes are in flight."""
        if not self._waiting:
            return
        for question in list(self._starting):
            watch = self._watches.get(question)
            if watch is None or watch.client.state not in _HANDSHAKING:
                self._starting.discard(question)
        while self._waiting and len(self._starting) < MAX_HANDSHAKES:
            question = self._waiting.popleft()
            watch = self._watches.get(question)
            renewing = question in self._renewing
            self._renewing.discard(question)
            if watch is None or (watch.client.state != LLQState.IDLE and not renewing):
                continue  # released meanwhile
            watch.client.start(now)
            self._transmits.extend(watch.client.transmits())
            self._starting.add(question)

    def _release(self, question: Question, host: str, now: float) -> None:
        watch = self._watches.get(question)
        if watch is None:
            return
        watch.hosts.discard(host)
        if not watch.hosts:
            del self._watches[question]
            self.counters["clients stopped"] += 1
            watch.client.close(now)
            self._transmits.extend(watch.client.transmits())

    def _watch_host(self, host: _Host, questions: Iterable[Question], now: float) -> None:
        for question in questions:
            if question in host.questions:
                continue
            host.questions.add(question)
            self._start_client(question, host.name.lower(), now)

    # -- events --------------------------------------------------------------------------------------------

    def _handle(self, question: Question, watch: _Watch, now: float) -> None:
        """Pass on what the client sent, and apply what it reported."""
        client = watch.client
        self._transmits.extend(client.transmits())
        changed = False
        for event in client.events():
            if isinstance(event, Refused):  # the server will not serve it by Push: LLQ it is
                self.counters["push refused"] += 1
                if self.push is not None and self.push.usable:
                    self._push_refused.add(question)
                self._emit(QueryStatus(question[0], question[1], "fallback", event.reason))
                if self._watches.get(question) is watch and watch.client is client:
                    self._swap(question, watch, now)
                continue
            changed |= self._apply(question, watch, event)
        if not changed:
            return
        if question == self._browse:
            self._update_hosts(watch, now)
        else:
            for key in sorted(watch.hosts):
                host = self._hosts.get(key)
                if host is not None:
                    self._update_host(host, now)
        # A host refused for publishing a learned host's key may be acceptable now that the other is gone.
        for key in sorted(self._hosts):
            host = self._hosts[key]
            if host.reason is not None and host.reason.startswith("duplicate key:"):
                self._evaluate(host)

    def _apply(self, question: Question, watch: _Watch, event: Event) -> bool:
        """Apply one client event to the question's cache; True if the cache may have changed."""
        if isinstance(event, Added):
            held = watch.cache.setdefault(_key(event.rrset), set())
            held.update(event.rrset)
            return True
        if isinstance(event, Removed):
            key = _key(event.rrset)
            held = watch.cache.get(key, set())
            held.difference_update(event.rrset)
            if not held:
                watch.cache.pop(key, None)
            return True
        if isinstance(event, Established):
            watch.cache = {}
            for rrset in event.answers:
                watch.cache.setdefault(_key(rrset), set()).update(rrset)
            self._emit(QueryStatus(question[0], question[1], "established"))
            return True
        if isinstance(event, TcpQuery):
            self._emit(event)
        elif isinstance(event, Failed):
            self.counters["LLQ failed"] += 1
            self._emit(QueryStatus(question[0], question[1], "failed", event.reason))
        elif isinstance(event, Fallback):
            self.counters["LLQ fallback"] += 1
            self._emit(QueryStatus(question[0], question[1], "fallback", event.reason))
        return False

    def _unanswered(self, question: Question) -> bool:
        watch = self._watches.get(question)
        return watch is not None and watch.client.state in _AWAITING_FIRST_ANSWER

    def _rrsets(self, questions: Iterable[Question]) -> list[dns.rrset.RRset]:
        result = []
        for question in questions:
            watch = self._watches.get(question)
            if watch is None:
                continue
            for (name, rdclass, rdtype), rdatas in watch.cache.items():
                rrset = dns.rrset.RRset(name, dns.rdataclass.RdataClass.make(rdclass),
                                        dns.rdatatype.RdataType.make(rdtype))
                for rdata in rdatas:
                    rrset.add(rdata)
                result.append(rrset)
        return result

    def _update_hosts(self, browse: _Watch, now: float) -> None:
        names = records.list_hosts(self.domain, self._rrsets([self._browse]))
        wanted = {name.lower(): name for name in names if name.lower() != self.own_name.lower()}
        for key in sorted(set(self._hosts) - set(wanted)):
            host = self._hosts.pop(key)
            self.counters["hosts gone"] += 1
            for question in sorted(host.questions, key=str):
                self._release(question, key, now)
            if host.good is not None:
                self._emit(PeerGone(host.name, host.good.public_key))
        for key, name in sorted(wanted.items()):
            if key in self._hosts:
                continue
            host = _Host(name)
            self._hosts[key] = host
            self.counters["hosts found"] += 1
            self._watch_host(host, records.names_to_watch(self.domain, name), now)
            if self.host_keys:
                self._watch_host(host, hostkeys.names_to_watch(self.domain, name), now)

    def _update_host(self, host: _Host, now: float) -> None:
        key = _txt_key(self.domain, host.name, self._rrsets(host.questions))
        if key != host.target_key:
            if host.target_key is not None:
                old = set(records.names_to_watch(self.domain, host.name, host.target_key))
                old -= set(records.names_to_watch(self.domain, host.name))
                for question in old:
                    host.questions.discard(question)
                    self._release(question, host.name.lower(), now)
            host.target_key = key
            if key is not None:
                self._watch_host(host, records.names_to_watch(self.domain, host.name, key), now)
        self._evaluate(host)

    def _evaluate(self, host: _Host) -> None:
        if any(self._unanswered(q) for q in host.questions):
            return  # wait for every question's first answer: no half-learned host (identity, then endpoint)
        try:
            parsed = records.parse(self.domain, host.name, self._rrsets(host.questions))
            for other in self._hosts.values():
                held = other.good.public_key if other is not host and other.good is not None else None
                if held == parsed.public_key:
                    raise ParseError(f"duplicate key: {host.name} publishes the key of {other.name}")
        except ParseError as e:
            reason = str(e)
            host.reason = reason
            if host.good is not None:
                self._emit(PeerGone(host.name, host.good.public_key))
                host.good = None
            if not reason.startswith("missing ") and reason not in host.reported:
                host.reported.add(reason)
                self.counters["hosts rejected"] += 1
                self._emit(PeerRejected(host.name, reason))
            return
        host.reason = None
        host.reported.clear()
        keys = self._host_keys(host)
        if parsed == host.good and keys == host.keys:
            return
        if host.good is not None and host.good.public_key != parsed.public_key:
            self._emit(PeerGone(host.name, host.good.public_key))
        host.good, host.keys = parsed, keys
        self._emit(PeerLearned(parsed, keys))

    def _host_keys(self, host: _Host) -> tuple[hostkeys.HostKey, ...]:
        """The host's verified SSH host keys; refusals (as PeerRejected) are reported once per change."""
        if not self.host_keys:
            return ()
        keys, refused = hostkeys.parse(self.domain, host.name,
                                       self._rrsets(hostkeys.names_to_watch(self.domain, host.name)))
        if refused != host.keys_refused:
            host.keys_refused = refused
            for reason in refused:
                self.counters["host keys refused"] += 1
                self._emit(PeerRejected(host.name, reason))
        return keys


def _key(rrset: dns.rrset.RRset) -> _RecordKey:
    return (rrset.name, int(rrset.rdclass), int(rrset.rdtype))
