"""Sans-I/O LLQ server (RFC 8764) on top of :class:`tunneld.dnsserver.core.DnsCore`.

Bytes and ``now_wall`` in, ``(dest, bytes)`` out; no clock, no socket, randomness only through the injected
``rand(n) -> bytes``. The wire is :mod:`tunneld.proto.llq_wire` (shared with our client); TSIG checks and
signed rendering are the core's. The adapter feeds every UDP datagram to :meth:`LLQServer.handle` first
(``None``: not an LLQ message, give it to :meth:`DnsCore.handle`), passes zone changes to
:meth:`LLQServer.changes` and calls :meth:`LLQServer.poll` at :meth:`LLQServer.deadline`. The handshake,
refresh, event, event-ID and TSIG rules, and why, are in docs/protocol.md ("LLQ server behaviour"); what
it admits (replays, half-open LLQs, caps per address and key) in docs/hardening.md ("LLQ limits").
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tunneld.dnsserver.core import DnsCore, Signer
from tunneld.dnsserver.llq_events import Records, records
from tunneld.dnsserver.llq_limits import CHALLENGE_TIMEOUT, MAX_LLQS, Caps, Replays
from tunneld.dnsserver.llq_render import Batch, llq_error, llq_reply, read_ack
from tunneld.dnsserver.llq_saver import Saver
from tunneld.dnsserver.store import Change, RRsetRemoval
from tunneld.proto.dnsguard import try_parse
from tunneld.proto.errors import ParseError
from tunneld.proto.llq_wire import (
    LLQ_ERR_BAD_VERS,
    LLQ_ERR_FORMAT,
    LLQ_ERR_NO_ERROR,
    LLQ_ERR_NO_SUCH_LLQ,
    LLQ_ERR_SERV_FULL,
    LLQ_MAX_TRIES,
    LLQ_OP_EVENT,
    LLQ_OP_REFRESH,
    LLQ_OP_SETUP,
    LLQ_VERSION,
    UDP_PAYLOAD,
    LLQOption,
    find_llq_option,
)
from tunneld.proto.tsig import MAX_FUDGE, TsigError, TsigKey, verify

__all__ = ["EVENT_RETRY_WAITS", "IDLE_SOURCES_KEPT", "LLQ_LEASE_SLACK", "LLQ_MAX_LEASE", "LLQ_MIN_LEASE",
           "REQUEST_IDS_KEPT", "LLQServer"]

log = logging.getLogger(__name__)

LLQ_MIN_LEASE: Final = 15 * 60  # Apple dnsextd's clamp
LLQ_MAX_LEASE: Final = 2 * 60 * 60
LLQ_LEASE_SLACK: Final = 60  # challenge response lease must be within +-60 s of the grant (dnsextd [V])
EVENT_RETRY_WAITS: Final = (2.0, 4.0, 8.0)  # resend after 2 s, then 4 s; give up 8 s after the 3rd try
EVENT_MAX_TRIES: Final = LLQ_MAX_TRIES  # 3 sends in total
REQUEST_IDS_KEPT: Final = 1024  # per source: its latest request IDs, which event IDs avoid
IDLE_SOURCES_KEPT: Final = 1024  # sources without LLQs whose ID state is kept (for a re-setup)

Dest = object
Output = list[tuple[Dest, bytes]]
_IDS_SAVED: Final = 64  # request IDs of the source saved with each LLQ (they outlive a restart)


@dataclass(slots=True)
class _PendingEvent:
    wire: bytes
    tries: int
    next_at: float


@dataclass(slots=True)
class _Source:
    """Message IDs towards one client address, shared by all its LLQs (see "Event message IDs")."""

    next_id: int  # the next event's message ID (mod 2**16)
    requests: dict[int, None] = field(default_factory=dict)  # its latest request IDs, oldest first
    llqs: int = 0  # LLQs of this source in the table (a source with LLQs is never forgotten)


@dataclass(slots=True)
class _LLQ:
    llq_id: int
    src: Dest
    qname: dns.name.Name
    qtype: int
    setup_msg_id: int
    granted: int
    expires: float
    key: TsigKey | None
    challenge: bytes
    established: bool = False
    half_open_until: float = math.inf  # a half-open LLQ goes at CHALLENGE_TIMEOUT, not at its lease
    payload: int = UDP_PAYLOAD  # the largest event datagram: the client's EDNS size, at most 1232
    dirty: bool = False  # changed while an event was in flight: send the next diff when it is acked
    snapshot: Records = field(default_factory=dict)
    events: dict[int, _PendingEvent] = field(default_factory=dict)


def _clamp(lease: int) -> int:
    return min(max(lease, LLQ_MIN_LEASE), LLQ_MAX_LEASE)


class LLQServer:
    """The LLQ server for ``core``'s zone. See the module docstring.

    ``rand(n)`` gives n random bytes (LLQ-IDs, event message IDs); ``max_llqs`` bounds the table (half-open
    LLQs included: a full table answers SETUP with LLQ-ERROR SERV-FULL), ``per_address`` and ``per_key``
    what one source IP and one TSIG key may hold of it (default a quarter and three quarters);
    ``require_tsig`` refuses unsigned LLQ requests.
    """

    def __init__(self, core: DnsCore, rand: Callable[[int], bytes] = os.urandom, max_llqs: int = MAX_LLQS,
                 require_tsig: bool = True, per_address: int | None = None,
                 per_key: int | None = None) -> None:
        self.core = core
        self.max_llqs = max_llqs
        self.require_tsig = require_tsig
        self.caps = Caps(max(1, max_llqs // 4) if per_address is None else per_address,
                         max_llqs - max_llqs // 4 if per_key is None else per_key)
        self.replays = Replays()
        self.saver = Saver(core.store)
        self._rand = rand
        self._llqs: dict[int, _LLQ] = {}
        self._by_question: dict[tuple[Dest, dns.name.Name, int], _LLQ] = {}  # one per source and question
        self._by_name: dict[dns.name.Name, dict[int, _LLQ]] = {}  # a change visits only its names' LLQs
        self._sources: dict[Dest, _Source] = {}  # least recently used first
        self._due = -math.inf  # poll has no work before this (a lower bound; -inf: not known)
        self.counters: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<LLQServer zone={self.core.zone} llqs={len(self._llqs)}>"

    def __len__(self) -> int:
        return len(self._llqs)

    # ---- entry points ---------------------------------------------------------------------------------

    def handle(self, wire_or_parsed: bytes | dns.message.Message, src: Dest,
               now_wall: float, *, msg: dns.message.Message | ParseError | None = None) -> Output | None:
        """Handle one datagram from ``src``. None: not an LLQ message (give it to ``DnsCore.handle``).
        A list (possibly empty) of ``(dest, wire)`` replies otherwise. Never raises. ``msg``: the
        listener's ``dnsguard.try_parse`` of the wire bytes (a message is parsed once); None: parsed here."""
        try:
            if isinstance(w := wire_or_parsed, bytes) and (acked := self.ack(w, src, now_wall)) is not None:
                return acked
            self._note_request(wire_or_parsed, src)
            return self._handle(wire_or_parsed, src, now_wall, msg)
        except Exception:  # last line of defence: never raise into the listener
            log.exception("internal error handling an LLQ message from %r", src)
            self.counters["internal error"] += 1
            return []

    def ack(self, wire: bytes, src: Dest, now_wall: float) -> Output | None:
        """The common ack (for a pending event of an LLQ of ``src``, unsigned or signed with its key), read
        from its frames; None for any other message, which :meth:`handle` parses (and decides alike)."""
        ack = read_ack(wire)
        llq = None if ack is None or ack.opcode != LLQ_OP_EVENT else self._llqs.get(ack.llq_id)
        if ack is None or llq is None or llq.src != src or ack.msg_id not in llq.events:
            return None
        if ack.tsig is not None:
            if llq.key is None or ack.tsig.error or ack.tsig.fudge > MAX_FUDGE:
                return None
            try:
                verify(wire, llq.key, b"", now_wall, ack.tsig)
            except (TsigError, ParseError):
                return None
        return self._acked(llq, ack.msg_id, ack.tsig is not None, now_wall)

    def changes(self, rrset_changes: Iterable[Change | RRsetRemoval], now: float) -> Output:
        """EVENT messages for every established LLQ whose answer changed at the names in
        ``rrset_changes`` (``DnsCore.last_changes`` or ``ZoneStore.expire`` results). Kept for resending
        until acknowledged."""
        owners = {ch.owner for ch in rrset_changes}
        out: Output = []
        batch = Batch(self.core, now)
        for llq in [llq for owner in owners for llq in self._by_name.get(owner, {}).values()]:
            if not llq.established:
                continue
            if now >= llq.expires:
                self._drop(llq, "lease expired", now)
                continue
            if llq.events:
                # One diff in flight per LLQ, so a resent older event can never overtake a newer one
                # (add X, then remove X, arriving in the other order, would leave X at the client). The
                # change is sent, diffed against what the client was last sent, once that diff is acked.
                llq.dirty = True
                self.counters["event deferred"] += 1
                continue
            out.extend((llq.src, wire) for wire in self._next_event(llq, now, batch))
        return out

    def poll(self, now: float) -> Output:
        """Resend unacknowledged events, drop LLQs whose events went unacknowledged 3 times, and expire
        LLQs (half-open ones included) whose lease has run out."""
        out: Output = []
        for llq in list(self._llqs.values()) if now >= self._due else ():  # the table only when due
            if now >= llq.expires:
                self._drop(llq, "lease expired" if llq.established else "half-open lease expired", now)
                continue
            if now >= llq.half_open_until:
                self._drop(llq, "challenge not answered", now)
                continue
            for msg_id, pending in list(llq.events.items()):
                if now < pending.next_at:
                    continue
                if pending.tries >= EVENT_MAX_TRIES:
                    self._drop(llq, "event not acknowledged", now)
                    break
                pending.tries += 1
                pending.next_at = now + EVENT_RETRY_WAITS[pending.tries - 1]
                self.counters["event resent"] += 1
                out.append((llq.src, llq.events[msg_id].wire))
        if now >= self._due:
            self._due = self._earliest()
        self.saver.poll(now)
        return out

    def deadline(self) -> float | None:
        """When :meth:`poll` must next be called (None: no LLQs). Every message's handling may move it
        earlier, so it is kept, not found over the whole table each time."""
        if self._due == -math.inf:
            self._due = self._earliest()
        times = [t for t in (self._due, self.saver.due()) if t is not None and t < math.inf]
        return min(times) if times else None

    def _earliest(self) -> float:
        times = [min(llq.expires, llq.half_open_until) for llq in self._llqs.values()]
        times.extend(p.next_at for llq in self._llqs.values() for p in llq.events.values())
        return min(times, default=math.inf)

    def llq_ids(self) -> list[int]:
        """The LLQ-IDs in the table (half-open included); for status and tests."""
        return list(self._llqs)

    def pending_events(self, llq_id: int) -> int:
        """How many events of ``llq_id`` await an ack (0 for unknown IDs)."""
        llq = self._llqs.get(llq_id)
        return 0 if llq is None else len(llq.events)

    # ---- requests -------------------------------------------------------------------------------------

    def _handle(self, wire_or_parsed: bytes | dns.message.Message, src: Dest, now: float,
                parsed: dns.message.Message | ParseError | None) -> Output | None:
        if isinstance(wire_or_parsed, dns.message.Message):
            msg = wire_or_parsed
            if msg.had_tsig:  # the signature cannot be checked without the original wire
                option = find_llq_option(msg)
                if option is None or msg.flags & dns.flags.QR:
                    return None if option is None else []
                bare = dns.message.Message(id=msg.id)  # unsigned: we could not check its MAC
                bare.flags = dns.flags.QR | (msg.flags & dns.flags.RD)
                bare.question = list(msg.question)
                bare.set_rcode(dns.rcode.REFUSED)
                return [(src, bare.to_wire())]
            wire, parsed = msg.to_wire(), None
        else:
            wire = wire_or_parsed
        if parsed is None:
            parsed = try_parse(wire, one_rr_per_rrset=True)
        if isinstance(parsed, ParseError):
            return None
        msg = parsed
        option = find_llq_option(msg)
        if option is None or msg.opcode() != dns.opcode.QUERY or msg.edns > 0:
            return None
        signer: Signer | None = None
        if msg.flags & dns.flags.QR:
            if msg.had_tsig:
                checked = self.core.check_tsig(msg, wire, int(now))
                if isinstance(checked, bytes):
                    self.counters["ack tsig rejected"] += 1
                    return []
                signer = checked
            return self._on_ack(msg, option, src, signer, now)
        repeated = False
        if msg.had_tsig:
            checked = self.core.check_tsig(msg, wire, int(now))
            if isinstance(checked, bytes):
                self.counters["tsig rejected"] += 1
                return [(src, checked)]
            signer = checked
            first, repeated = self.replays.first(signer.request_mac, src, signer.request_time,
                                                 signer.request_fudge, now)
            if first != src:  # a copy of another source's signed request: a replay, answered by nothing
                self.counters["replayed request"] += 1
                return []
        if len(msg.question) != 1:
            return [(src, llq_error(self.core, msg, option, LLQ_ERR_FORMAT, signer, now, dns.rcode.FORMERR))]
        q = msg.question[0]
        if q.rdclass != dns.rdataclass.IN or not self.core.store.in_zone(q.name):
            return [(src, llq_reply(self.core, msg, None, signer, now, rcode=dns.rcode.REFUSED))]
        if q.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR) or (
                dns.rdatatype.is_metatype(q.rdtype) and q.rdtype != dns.rdatatype.ANY):
            return [(src, llq_error(self.core, msg, option, LLQ_ERR_FORMAT, signer, now, dns.rcode.FORMERR))]
        if self.require_tsig and signer is None:
            self.counters["unsigned LLQ refused"] += 1
            return [(src, llq_reply(self.core, msg, None, None, now, rcode=dns.rcode.REFUSED))]
        if option.version != LLQ_VERSION:
            return [(src, llq_error(self.core, msg, option, LLQ_ERR_BAD_VERS, signer, now))]
        if option.opcode == LLQ_OP_SETUP and option.llq_id == 0:
            reply = self._setup(msg, option, src, signer, now, repeated)
            return [] if reply is None else [(src, reply)]
        if option.opcode == LLQ_OP_SETUP:
            return [(src, self._challenge_response(msg, option, src, signer, now))]
        if option.opcode == LLQ_OP_REFRESH:
            return [(src, self._refresh(msg, option, src, signer, now))]
        return [(src, llq_error(self.core, msg, option, LLQ_ERR_FORMAT, signer, now))]

    def _setup(self, msg: dns.message.Message, option: LLQOption, src: Dest, signer: Signer | None,
               now: float, repeated: bool) -> bytes | None:
        q = msg.question[0]
        llq = self._by_question.get((src, q.name, q.rdtype))
        if llq is not None:
            if (not llq.established and llq.setup_msg_id == msg.id and self._key_ok(llq, signer)
                    and now < llq.half_open_until):
                self.counters["duplicate setup request"] += 1
                return llq.challenge  # §5.1: re-send our reply to a duplicate, unchanged
            if not repeated:
                self._drop(llq, "restarted by a new setup request", now)
        if repeated:  # its LLQ went on (or went away): a late copy must not restart it
            self.counters["replayed request"] += 1
            return None
        key = None if signer is None else signer.key
        refused = self.caps.refuse(src, None if key is None else key.name)
        if refused is None and len(self._llqs) >= self.max_llqs:
            refused = "table full"
        if refused is not None:
            self.counters[refused] += 1
            return llq_error(self.core, msg, option, LLQ_ERR_SERV_FULL, signer, now)
        granted = _clamp(option.lease)
        llq_id = self._new_llq_id()
        reply = llq_reply(self.core, msg, LLQOption(LLQ_VERSION, LLQ_OP_SETUP, LLQ_ERR_NO_ERROR, llq_id,
                                                    granted), signer, now)
        payload = max(512, msg.payload) if msg.edns >= 0 else 512
        self._llqs[llq_id] = _LLQ(llq_id, src, q.name, q.rdtype, msg.id, granted, now + granted, key, reply,
                                  half_open_until=now + CHALLENGE_TIMEOUT, payload=min(payload, UDP_PAYLOAD))
        self._admit(self._llqs[llq_id])
        self._note_id(src, msg.id)  # the source is known from now on (its first request included)
        self.counters["challenge sent"] += 1
        return reply

    def _challenge_response(self, msg: dns.message.Message, option: LLQOption, src: Dest,
                            signer: Signer | None, now: float) -> bytes:
        llq = self._find(msg, option, src, signer, now)
        if llq is None:
            return llq_error(self.core, msg, option, LLQ_ERR_NO_SUCH_LLQ, signer, now)
        if abs(option.lease - llq.granted) > LLQ_LEASE_SLACK:
            self.counters["challenge response lease mismatch"] += 1
            return llq_error(self.core, msg, option, LLQ_ERR_FORMAT, signer, now)
        if llq.established:
            # The client retransmits only before it has our ACK, and ignores events until then: the
            # fresh ACK below carries the full answer set, so in-flight events are superseded.
            self.counters["duplicate challenge response"] += 1
            llq.events.clear()
            llq.dirty = False
        answers, rcode = self.core.answer(llq.qname, llq.qtype, now)
        llq.snapshot = records(answers)
        llq.established = True
        llq.half_open_until = math.inf
        self._persist(llq, now)
        reply = LLQOption(LLQ_VERSION, LLQ_OP_SETUP, LLQ_ERR_NO_ERROR, llq.llq_id, self._remaining(llq, now))
        self.counters["ack sent"] += 1
        return llq_reply(self.core, msg, reply, signer, now, answers=answers, rcode=rcode)

    def _refresh(self, msg: dns.message.Message, option: LLQOption, src: Dest, signer: Signer | None,
                 now: float) -> bytes:
        llq = self._find(msg, option, src, signer, now)
        if llq is None or not llq.established:
            return llq_error(self.core, msg, option, LLQ_ERR_NO_SUCH_LLQ, signer, now)
        if option.lease == 0:
            self._drop(llq, "cancelled", now)
            return llq_reply(self.core, msg, LLQOption(LLQ_VERSION, LLQ_OP_REFRESH, LLQ_ERR_NO_ERROR,
                                                       llq.llq_id, 0), signer, now)
        llq.granted = _clamp(option.lease)
        llq.expires = now + llq.granted
        self._due = min(self._due, llq.expires)
        if not llq.events:
            self._persist(llq, now)
        self.counters["refreshed"] += 1
        return llq_reply(self.core, msg, LLQOption(LLQ_VERSION, LLQ_OP_REFRESH, LLQ_ERR_NO_ERROR, llq.llq_id,
                                                   llq.granted), signer, now)

    def _on_ack(self, msg: dns.message.Message, option: LLQOption, src: Dest, signer: Signer | None,
                now: float) -> Output:
        llq = self._llqs.get(option.llq_id)
        # Apple's client acks events without TSIG: an unsigned ack from the LLQ's own address and port
        # is accepted, as it only stops resends (it reads nothing); a signed one must carry the LLQ's key.
        if (option.opcode != LLQ_OP_EVENT or llq is None or llq.src != src
                or (signer is not None and not self._key_ok(llq, signer))):
            self.counters["unmatched ack"] += 1
            return []
        if msg.id not in llq.events:
            self.counters["ack for no pending event"] += 1
            return []
        return self._acked(llq, msg.id, signer is not None, now)

    def _acked(self, llq: _LLQ, msg_id: int, signed: bool, now: float) -> Output:
        del llq.events[msg_id]
        self.counters["unsigned ack accepted" if not signed and llq.key is not None else "event acked"] += 1
        if llq.events:
            return []
        self._persist(llq, now)  # what the client now holds: the next diff's base, even after a restart
        more = self._next_event(llq, now) if llq.dirty and now < llq.expires else []
        return [(llq.src, wire) for wire in more]

    # ---- helpers --------------------------------------------------------------------------------------

    def _find(self, msg: dns.message.Message, option: LLQOption, src: Dest, signer: Signer | None,
              now: float) -> _LLQ | None:
        """The LLQ ``option`` names, if it belongs to this source, question and key and is still alive."""
        llq = self._llqs.get(option.llq_id)
        q = msg.question[0]
        if (llq is None or llq.src != src or llq.qname != q.name or llq.qtype != q.rdtype
                or not self._key_ok(llq, signer)):
            self.counters["no such LLQ"] += 1
            return None
        if now >= min(llq.expires, llq.half_open_until):
            self._drop(llq, "lease expired" if now >= llq.expires else "challenge not answered", now)
            return None
        return llq

    @staticmethod
    def _key_ok(llq: _LLQ, signer: Signer | None) -> bool:
        if llq.key is None:
            return True
        return signer is not None and signer.key.name == llq.key.name

    def _admit(self, llq: _LLQ) -> None:
        self._by_question[(llq.src, llq.qname, llq.qtype)] = llq
        self._by_name.setdefault(llq.qname, {})[llq.llq_id] = llq
        self._due = min(self._due, llq.expires, llq.half_open_until)
        self._source(llq.src).llqs += 1
        self.caps.add(llq.src, None if llq.key is None else llq.key.name)

    def _drop(self, llq: _LLQ, reason: str, now: float) -> None:
        self.counters[f"dropped: {reason}"] += 1
        if self._llqs.pop(llq.llq_id, None) is not None:
            if self._by_question.get((llq.src, llq.qname, llq.qtype)) is llq:
                del self._by_question[(llq.src, llq.qname, llq.qtype)]
            named = self._by_name.get(llq.qname, {})
            if named.pop(llq.llq_id, None) is not None and not named:
                del self._by_name[llq.qname]
            self.caps.remove(llq.src, None if llq.key is None else llq.key.name)
            source = self._sources.get(llq.src)
            if source is not None:
                source.llqs -= 1
        if llq.established:
            self.saver.put(llq.llq_id, None, now)

    # ---- durability -----------------------------------------------------------------------------------

    def _persist(self, llq: _LLQ, now: float) -> None:
        """Keep an established LLQ in the store with the answer its client has acknowledged, and its
        source's message-ID state (on restore, the latest saved for a source wins)."""
        src = llq.src if isinstance(llq.src, tuple) else None
        source = self._source(llq.src)
        state = {
            "src": list(src) if src is not None else None,
            "qname": llq.qname.to_text(), "qtype": int(llq.qtype), "granted": llq.granted,
            "expires": llq.expires, "key": llq.key.name.to_text() if llq.key is not None else None,
            "payload": llq.payload,
            "records": self.saver.records(llq.snapshot),
            "ids": {"saved": now, "next": source.next_id, "requests": list(source.requests)[-_IDS_SAVED:]},
        }
        self.saver.put(llq.llq_id, json.dumps(state), now)

    def restore(self, now: float) -> Output:
        """After a restart: reload the established LLQs from the store and send each client what changed
        since the answer it acknowledged (nothing, usually: the events resume where they stopped)."""
        out: Output = []
        restored: list[_LLQ] = []
        saved: dict[Dest, tuple[float, int]] = {}  # source -> (when saved, next event ID)
        for llq_id, text in self.core.store.llq_all():
            try:
                st = json.loads(text)
                key = None
                if st["key"] is not None:
                    key = self.core.key(dns.name.from_text(st["key"]))
                    if key is None:
                        raise ValueError("its key is no longer configured")
                snapshot = self.saver.snapshot(st["records"])
                llq = _LLQ(llq_id, tuple(st["src"]), dns.name.from_text(st["qname"]), int(st["qtype"]),
                           0, int(st["granted"]), float(st["expires"]), key, b"", established=True,
                           snapshot=snapshot, payload=min(max(512, int(st.get("payload", 512))), UDP_PAYLOAD))
            except (ValueError, KeyError, TypeError, dns.exception.DNSException) as e:
                self.counters["llq not restored"] += 1
                log.info("LLQ %x not restored: %s", llq_id, e)
                self.core.store.llq_delete(llq_id)
                continue
            if now >= llq.expires:
                self.core.store.llq_delete(llq_id)
                continue
            self._llqs[llq_id] = llq
            self._admit(llq)
            self.counters["restored"] += 1
            restored.append(llq)
            ids = st.get("ids")
            if isinstance(ids, dict):  # absent in LLQs saved before event IDs were sequential
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    when, nxt = float(ids["saved"]), int(ids["next"]) & 0xFFFF
                    if when >= saved.get(llq.src, (-math.inf, 0))[0]:
                        saved[llq.src] = (when, nxt)
                    for msg_id in ids.get("requests", ()):
                        self._note_id(llq.src, int(msg_id) & 0xFFFF)
        for src, (_when, nxt) in saved.items():
            self._source(src).next_id = nxt
        batch = Batch(self.core, now)
        for llq in restored:  # after every source's ID state is back
            out.extend((llq.src, wire) for wire in self._next_event(llq, now, batch))
        return out

    @staticmethod
    def _remaining(llq: _LLQ, now: float) -> int:
        return max(1, min(math.ceil(llq.expires - now), 0xFFFFFFFF))

    def _new_llq_id(self) -> int:
        while True:
            llq_id = int.from_bytes(self._rand(8), "big")
            if llq_id and llq_id not in self._llqs:
                return llq_id

    def _next_event(self, llq: _LLQ, now: float, batch: Batch | None = None) -> list[bytes]:
        """The EVENT messages with what changed since the client was last sent the answer (none if
        nothing): as few as fit its UDP size, rendered once per ``batch`` for all LLQs alike
        (:mod:`tunneld.dnsserver.llq_render`). The next diff waits until every part is acked."""
        llq.dirty = False
        batch = Batch(self.core, now) if batch is None else batch
        new = batch.answer(llq.qname, llq.qtype)
        old, llq.snapshot = llq.snapshot, new
        templates = batch.templates(llq.qname, llq.qtype, old, new, llq.payload, llq.key)
        if len(templates) > 1:
            self.counters["event split"] += 1
        lease = self._remaining(llq, now)
        out = []
        for template in templates:
            msg_id = self._event_id(llq.src)
            wire = batch.event(template, msg_id, llq.llq_id, lease, llq.key)
            llq.events[msg_id] = _PendingEvent(wire, 1, now + EVENT_RETRY_WAITS[0])
            self._due = min(self._due, now + EVENT_RETRY_WAITS[0])
            self.counters["event sent"] += 1
            out.append(wire)
        return out

    # ---- message IDs towards a source (see "Event message IDs" in the module docstring) ----------------

    def _source(self, src: Dest) -> _Source:
        """The ID state of ``src`` (created with a random start), marked as the most recently used."""
        source = self._sources.pop(src, None)
        if source is None:
            source = _Source(int.from_bytes(self._rand(2), "big"))
            if len(self._sources) >= self.max_llqs + IDLE_SOURCES_KEPT:
                for other, st in self._sources.items():  # forget the least recently used without LLQs
                    if st.llqs <= 0:
                        del self._sources[other]
                        break
        self._sources[src] = source
        return source

    def _note_request(self, wire_or_parsed: bytes | dns.message.Message, src: Dest) -> None:
        """Remember the message ID of a request (QR clear, LLQ or not) from a source we send events to:
        its client may keep that request's MAC under the ID."""
        if src not in self._sources:
            return
        if isinstance(wire_or_parsed, dns.message.Message):
            if not wire_or_parsed.flags & dns.flags.QR:
                self._note_id(src, wire_or_parsed.id)
        elif len(wire_or_parsed) >= 3 and not wire_or_parsed[2] & 0x80:
            self._note_id(src, int.from_bytes(wire_or_parsed[:2], "big"))

    def _note_id(self, src: Dest, msg_id: int) -> None:
        requests = self._source(src).requests
        requests.pop(msg_id, None)
        requests[msg_id] = None
        if len(requests) > REQUEST_IDS_KEPT:
            del requests[next(iter(requests))]

    def _event_id(self, src: Dest) -> int:
        """The next event message ID towards ``src``: sequential, skipping its latest request IDs."""
        source = self._source(src)
        while True:  # ends: at most REQUEST_IDS_KEPT of the 65536 IDs are skipped
            msg_id = source.next_id
            source.next_id = (msg_id + 1) & 0xFFFF
            if msg_id not in source.requests:
                return msg_id
            self.counters["event id skipped: a request id of the source"] += 1
