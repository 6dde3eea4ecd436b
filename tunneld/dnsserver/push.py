"""DNS Push Notifications (RFC 8765 on DSO, RFC 8490): the server's sessions and subscriptions, sans-I/O.

:class:`PushServer` is the registry for one zone: its sessions, and their subscriptions indexed by owner
name, so a zone change (``DnsCore.last_changes`` after an UPDATE, ``ZoneStore.expire`` in the sweep) reaches
exactly the sessions subscribed at the names it touched. :class:`PushSession` is one DSO session on one TLS
connection: DSO messages (unframed) and ``now`` (wall-clock seconds, as the store's leases) in, messages out
through ONE FIFO, in the order they were generated; ordinary DNS answers take a slot in the same FIFO
(:meth:`PushSession.reserve`), so a query's answer never overtakes a PUSH generated before it. Timers are
``deadline()``/``poll(now)``. Input is decoded by :mod:`tunneld.proto.dso_wire` (ParseError only) and never
raises out of :meth:`PushSession.receive`: a bad message aborts the session, counted. The rules, timers
and limits: docs/dnspush.md ("The server").
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from tunneld.dnsserver.core import DnsCore
from tunneld.dnsserver.llq_events import Records, diff, records
from tunneld.dnsserver.store import Change, RRsetRemoval
from tunneld.proto.dso_wire import (
    DELETE_ONE_TTL,
    MAX_PUSH_RECORDS,
    RCODE_DSOTYPENI,
    DsoMessage,
    Keepalive,
    Push,
    PushRecord,
    Reconfirm,
    Subscribe,
    UnknownTlv,
    Unsubscribe,
    decode,
    encode,
)
from tunneld.proto.errors import ParseError

__all__ = ["INACTIVITY_TIMEOUT", "KEEPALIVE_INTERVAL", "PushLimits", "PushServer", "PushSession", "is_dso"]

log = logging.getLogger(__name__)

INACTIVITY_TIMEOUT: Final = 15.0
"""Seconds (RFC 8490 §6.2, §7.1): a session without subscriptions is inactive; at twice this without an
operation the client is delinquent and the session is aborted (§6.4.1)."""
KEEPALIVE_INTERVAL: Final = 60.0
"""Seconds (RFC 8490 §6.5, §7.1): the client sends something at least this often; after twice this of
silence the session is aborted."""
_OPCODE_DSO: Final = 6  # RFC 8490 §5.4
_PUSH_ROOM: Final = 16 * 1024
"""Bytes of change notifications per PUSH we send (far below the 65535 a message may hold: a large change
becomes several PUSHes, each of which fits the output cap on its own)."""


def is_dso(wire: bytes) -> bool:
    """Is ``wire`` a DSO message, by its OPCODE (RFC 8490 §5.4)? A connection's first one opens a session."""
    return len(wire) >= 3 and (wire[2] >> 3) & 0xF == _OPCODE_DSO


@dataclass(frozen=True, slots=True)
class PushLimits:
    """Per-session limits (docs/hardening.md, "Push limits")."""

    max_subscriptions: int = 256
    """Subscriptions one session may hold; a SUBSCRIBE beyond gets REFUSED."""
    max_queued: int = 64 * 1024
    """Bytes of output queued for a session's writer; beyond, the client is not reading: abort."""
    inactivity_timeout: float = INACTIVITY_TIMEOUT
    keepalive_interval: float = KEEPALIVE_INTERVAL


@dataclass(slots=True, eq=False)  # identity: kept in sets per owner name
class _Subscription:
    session: PushSession
    msg_id: int
    qname: dns.name.Name
    qtype: int
    snapshot: Records = field(default_factory=dict)


class _Slot:
    """A place in a session's FIFO: a message, or an ordinary answer still being computed."""

    __slots__ = ("ready", "wire")

    def __init__(self, wire: bytes | None, ready: bool) -> None:
        self.wire = wire
        self.ready = ready


class PushServer:
    """The DNS Push sessions and subscriptions of ``core``'s zone. See the module docstring."""

    def __init__(self, core: DnsCore, limits: PushLimits | None = None) -> None:
        self.core = core
        self.limits = limits or PushLimits()
        self.sessions: set[PushSession] = set()
        self._by_owner: dict[dns.name.Name, set[_Subscription]] = {}
        self.counters: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<PushServer zone={self.core.zone} sessions={len(self.sessions)}>"

    @property
    def subscriptions(self) -> int:
        return sum(len(subs) for subs in self._by_owner.values())

    def open(self, member: bool, now: float) -> PushSession:
        """A new session (its connection sent its first DSO message); ``member``: its peer presented a
        client certificate under the account CA (the private view), else the public view only."""
        session = PushSession(self, member, now)
        self.sessions.add(session)
        self.counters["session opened: member" if member else "session opened: public"] += 1
        return session

    def close(self, session: PushSession) -> None:
        """Forget ``session`` and its subscriptions (its connection has ended)."""
        for sub in list(session.subscriptions.values()):
            self._forget(sub)
        session.subscriptions.clear()
        self.sessions.discard(session)

    def changes(self, rrset_changes: Iterable[Change | RRsetRemoval], now: float) -> None:
        """Queue PUSH messages for every subscription whose answer changed at the names in
        ``rrset_changes`` (``DnsCore.last_changes`` or ``ZoneStore.expire`` results)."""
        owners = {ch.owner for ch in rrset_changes}
        for owner in owners:
            for sub in list(self._by_owner.get(owner, ())):
                if not sub.session.closed:
                    self._update(sub, now)

    # ---- subscriptions ----------------------------------------------------------------------------------

    def _update(self, sub: _Subscription, now: float) -> None:
        """Diff ``sub``'s answer against what its session was last sent; push the difference."""
        new = self._answer(sub.qname, sub.qtype, now, sub.session.member)
        changed = diff(sub.snapshot, new)
        sub.snapshot = new
        if changed:
            sub.session._push([_push_record(rrset.name, rrset.ttl, rdata)
                               for rrset in changed for rdata in rrset])

    def _answer(self, qname: dns.name.Name, qtype: int, now: float, member: bool) -> Records:
        answers, _rcode = self.core.answer(qname, qtype, now, private=member)
        return records(answers)

    def _subscribe(self, session: PushSession, msg_id: int, tlv: Subscribe, now: float) -> int:
        """Admit a SUBSCRIBE: its RCODE (NOERROR: the session then pushes the current answer)."""
        if tlv.rclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
            self.counters["subscribe refused: class"] += 1
            return dns.rcode.FORMERR
        qname = tlv.name
        if not self.core.store.in_zone(qname):
            self.counters["subscribe refused: outside the zone"] += 1
            return dns.rcode.REFUSED
        if not session.member and (self.core.answer(qname, tlv.rtype, now, private=False)[1]
                                   != dns.rcode.NOERROR):
            self.counters["subscribe refused: not public"] += 1  # a name only members may see
            return dns.rcode.REFUSED
        if len(session.subscriptions) >= self.limits.max_subscriptions:
            self.counters["subscribe refused: session limit"] += 1
            return dns.rcode.REFUSED
        if any(s.qname == qname and s.qtype == tlv.rtype for s in self._by_owner.get(qname, ())
               if s.session is session):
            self.counters["subscribe refused: duplicate"] += 1
            return dns.rcode.REFUSED
        sub = _Subscription(session, msg_id, qname, tlv.rtype)
        session.subscriptions[msg_id] = sub
        self._by_owner.setdefault(qname, set()).add(sub)
        self.counters["subscribed"] += 1
        return dns.rcode.NOERROR

    def _forget(self, sub: _Subscription) -> None:
        subs = self._by_owner.get(sub.qname)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_owner[sub.qname]


def _push_record(name: dns.name.Name, ttl: int, rdata: dns.rdata.Rdata) -> PushRecord:
    """One change notification from a diff record (LLQ's removal TTL is RFC 8765's DELETE_ONE_TTL)."""
    return PushRecord.delete(name, rdata) if ttl == DELETE_ONE_TTL else PushRecord.add(name, ttl, rdata)


class PushSession:
    """One DSO session. ``receive`` a DSO message; ``reserve``/``fill`` an ordinary answer's place;
    ``take`` what is ready to write, in order; ``deadline``/``poll`` the timers; ``closed`` once aborted
    (``reason`` says why; the connection is then closed). ``waker`` (set by the I/O side) is called when
    output is queued or the session is aborted."""

    def __init__(self, server: PushServer, member: bool, now: float) -> None:
        self.server = server
        self.member = member
        self.subscriptions: dict[int, _Subscription] = {}
        self.reason: str | None = None
        self.waker: Callable[[], None] | None = None
        self._fifo: deque[_Slot] = deque()
        self._queued = 0
        self._heard = now  # the client's last message (keepalive, §6.5)
        self._active = now  # the last operation's end (inactivity, §6.2)

    @property
    def closed(self) -> bool:
        return self.reason is not None

    @property
    def queued(self) -> int:
        """Bytes in the FIFO not yet taken."""
        return self._queued

    # ---- input ------------------------------------------------------------------------------------------

    def receive(self, wire: bytes, now: float) -> None:
        """One DSO message from the client. Never raises: a message we cannot accept aborts the session."""
        if self.closed:
            return
        self._heard = now
        try:
            message = decode(wire)
        except ParseError as e:
            self._abort(f"malformed: {e}")
            return
        try:
            self._handle(message, now)
        except Exception:  # last line of defence: never raise into the connection
            log.exception("internal error in a DNS Push session")
            self._abort("internal error")

    def answered(self, now: float) -> None:
        """An ordinary DNS request on the session was answered: a message heard, an operation ended."""
        self._heard = self._active = now

    def _handle(self, message: DsoMessage, now: float) -> None:
        counters = self.server.counters
        if message.response:
            self._abort("unexpected response")  # we send no requests (§5.4: a protocol error)
            return
        primary = message.primary
        assert primary is not None  # decode guarantees a request or unidirectional message has one
        if isinstance(primary, Keepalive):
            if message.unidirectional:
                self._abort("unidirectional keepalive")  # only a server may send one (§7.1.3)
                return
            counters["keepalive"] += 1
            self._respond(message.msg_id, (self._keepalive(),))
        elif isinstance(primary, Subscribe):
            self._active = now
            if message.msg_id in self.subscriptions:
                self._abort("subscribe ID in use")  # §5.4: an ID is in use while its operation lasts
                return
            rcode = self.server._subscribe(self, message.msg_id, primary, now)
            self._respond(message.msg_id, (), rcode)
            sub = self.subscriptions.get(message.msg_id)
            if rcode == dns.rcode.NOERROR and sub is not None:
                self.server._update(sub, now)  # everything that answers it now, after the response
        elif isinstance(primary, Unsubscribe):
            sub = self.subscriptions.pop(primary.subscribe_id, None)
            if sub is None:
                counters["unsubscribe: unknown ID"] += 1
                return
            self.server._forget(sub)
            counters["unsubscribed"] += 1
            if not self.subscriptions:
                self._active = now  # the last operation ended: inactivity counts from now
        elif isinstance(primary, Reconfirm):
            self._reconfirm(primary, now)
        elif isinstance(primary, UnknownTlv) and not message.unidirectional:
            counters["dsotypeni"] += 1
            self._respond(message.msg_id, (), RCODE_DSOTYPENI)  # §5.4
        else:  # an unknown unidirectional message, or one only a server sends (PUSH, RETRY DELAY)
            self._abort("unexpected unidirectional message")

    def _reconfirm(self, tlv: Reconfirm, now: float) -> None:
        """RFC 8765 §6.5: we are authoritative, so check; a record that is not there is removed now."""
        counters = self.server.counters
        rdtype = tlv.rdata.rdtype
        if not self.server.core.store.in_zone(tlv.name):
            counters["reconfirm: outside the zone"] += 1
            return
        held = self.server._answer(tlv.name, rdtype, now, self.member).get((tlv.name, rdtype), {})
        if tlv.rdata in held:
            counters["reconfirm: present"] += 1
            return
        counters["reconfirm: removed"] += 1
        for sub in self.subscriptions.values():  # what we pushed of it is gone from those answers too
            sub.snapshot.get((tlv.name, rdtype), {}).pop(tlv.rdata, None)
        self._push([PushRecord.delete(tlv.name, tlv.rdata)])

    def _keepalive(self) -> Keepalive:
        limits = self.server.limits
        return Keepalive(round(limits.inactivity_timeout * 1000), round(limits.keepalive_interval * 1000))

    # ---- output -----------------------------------------------------------------------------------------

    def reserve(self) -> _Slot:
        """A place in the FIFO for the answer to an ordinary DNS request being handled now (what is queued
        later goes after it); :meth:`fill` it with the answer."""
        slot = _Slot(None, False)
        self._fifo.append(slot)
        return slot

    def fill(self, slot: _Slot, wire: bytes | None) -> None:
        """The answer for a reserved place (None: no answer)."""
        slot.wire, slot.ready = wire, True
        if wire is not None:
            self._count(len(wire))
        self._wake()

    def take(self) -> list[bytes]:
        """The messages ready to write, in order (unframed); an unfilled place holds back what follows."""
        out: list[bytes] = []
        while self._fifo and self._fifo[0].ready:
            wire = self._fifo.popleft().wire
            if wire is not None:
                self._queued -= len(wire)
                out.append(wire)
        return out

    def _respond(self, msg_id: int, tlvs: tuple[Keepalive, ...], rcode: int = 0) -> None:
        self._queue(encode(DsoMessage(msg_id, tlvs, response=True, rcode=rcode)))

    def _push(self, changes: list[PushRecord]) -> None:
        """PUSH ``changes`` (removals first, as the diff gives them), split into messages that fit."""
        part: list[PushRecord] = []
        size = 0
        for change in changes:
            extra = len(change.wire())
            if part and (size + extra > _PUSH_ROOM or len(part) >= MAX_PUSH_RECORDS):
                self._push_part(part)
                part, size = [], 0
            part.append(change)
            size += extra
        if part:
            self._push_part(part)

    def _push_part(self, part: list[PushRecord]) -> None:
        try:
            wire = encode(DsoMessage(0, (Push(tuple(part)),)))
        except ValueError:  # over the DNS guard's budget for one message: halve it
            if len(part) == 1:
                self.server.counters["push record not sendable"] += 1
                return
            half = len(part) // 2
            self._push_part(part[:half])
            self._push_part(part[half:])
            return
        self.server.counters["push sent"] += 1
        self._queue(wire)

    def _queue(self, wire: bytes) -> None:
        if self.closed:
            return
        self._fifo.append(_Slot(wire, True))
        self._count(len(wire))
        self._wake()

    def _count(self, size: int) -> None:
        self._queued += size
        if self._queued > self.server.limits.max_queued:
            self._abort("output not read")

    def _wake(self) -> None:
        if self.waker is not None:
            self.waker()

    # ---- timers -----------------------------------------------------------------------------------------

    def deadline(self) -> float:
        """When :meth:`poll` next has work: the keepalive limit, or (without subscriptions) the
        inactivity limit."""
        limits = self.server.limits
        at = self._heard + 2 * limits.keepalive_interval  # §6.5
        if not self.subscriptions:
            at = min(at, self._active + 2 * limits.inactivity_timeout)  # §6.4.1: the client is delinquent
        return at

    def poll(self, now: float) -> None:
        if self.closed or now < self.deadline():
            return
        limits = self.server.limits
        if now >= self._heard + 2 * limits.keepalive_interval:
            self._abort("keepalive timeout")
        else:
            self._abort("inactivity timeout")

    def _abort(self, reason: str) -> None:
        if self.closed:
            return
        self.reason = reason
        self.server.counters[f"session aborted: {reason.split(':')[0]}"] += 1
        self.server.close(self)
        self._fifo.clear()
        self._queued = 0
        self._wake()
