"""A sans-I/O client for one DNS Long-Lived Query (RFC 8764), on the core face of :mod:`tunneld.proto.core`.

:class:`LLQClient` is driven with ``now`` (Unix seconds: its TSIG needs them); randomness (message IDs,
refresh jitter) comes from the injected ``rand(n) -> bytes``. It sends to one server and ignores datagrams
from anywhere else. The handshake, retransmission, refresh, event and fallback rules it follows, and why,
are in docs/protocol.md ("LLQ client"); the wire is :mod:`tunneld.proto.llq_wire`.

Events: :class:`Added` / :class:`Removed` are a diff stream -- applying them in order to an empty set
gives :meth:`LLQClient.records` at all times. :class:`Established`, :class:`Refreshed`, :class:`Failed`
and :class:`Fallback` report status; :class:`Established` also carries the full answer set.
:class:`TcpQuery` asks the service for one exchange over TCP: an answer that came truncated (TC) is
fetched whole that way, and the service gives the reply to :meth:`LLQClient.receive`.
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
from tunneld.proto.dnswire import from_server
from tunneld.proto.llq_cache import Added, AnswerCache, Removed
from tunneld.proto.llq_wire import (
    LLQ_ERR_NO_ERROR,
    LLQ_MAX_TRIES,
    LLQ_OP_EVENT,
    LLQ_OP_REFRESH,
    LLQ_OP_SETUP,
    LLQ_VERSION,
    UDP_PAYLOAD,
    LLQOption,
    error_name,
    find_llq_option,
    read_answer,
)
from tunneld.proto.tsig import TsigSession

__all__ = [
    "LLQ_DEFAULT_LEASE",
    "LLQ_POLL_INTERVAL",
    "LLQ_SETUP_RETRY_INTERVAL",
    "LLQ_TCP_TIMEOUT",
    "Added",
    "Established",
    "Event",
    "Failed",
    "Fallback",
    "LLQClient",
    "LLQState",
    "Refreshed",
    "Removed",
    "TcpQuery",
]

# -- timing (RFC 8764 §5.1 and §6; Apple's mDNSResponder where the RFC leaves a choice) --------------------

LLQ_DEFAULT_LEASE: Final = 7200  # Apple kLLQ_DefLease
LLQ_RETRY_WAITS: Final = (2.0, 4.0, 8.0)  # §5.1: >=2 s, >=4 s before the retransmissions, 8 s after the 3rd
LLQ_POLL_INTERVAL: Final = 15 * 60.0  # Apple LLQ_POLL_INTERVAL
LLQ_SETUP_RETRY_INTERVAL: Final = 3600.0  # §5.1: re-try setup no more than once per hour
LLQ_REFRESH_MIN_FRACTION: Final = 0.5  # Apple: lease/2 + random(lease/10)
LLQ_REFRESH_MAX_FRACTION: Final = 0.6
LLQ_TCP_TIMEOUT: Final = 10.0  # one TCP exchange for a truncated answer (RFC 7766); 3 tries, as over UDP


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Established:
    """The LLQ is up: ``answers`` is the full answer set from the ACK; ``lease`` the remaining lease."""

    answers: tuple[dns.rrset.RRset, ...]
    llq_id: int
    lease: int


@dataclass(frozen=True)
class Refreshed:
    """A refresh was acknowledged with ``lease`` seconds."""

    lease: int


@dataclass(frozen=True)
class Failed:
    """An established LLQ was lost (``reason``); a new handshake has been started."""

    reason: str


@dataclass(frozen=True)
class Fallback:
    """The server does not (or cannot now) do LLQ: polling every ``poll_interval`` seconds; setup is
    re-tried after ``retry_setup_in`` seconds."""

    poll_interval: float
    reason: str
    retry_setup_in: float = LLQ_SETUP_RETRY_INTERVAL


@dataclass(frozen=True)
class TcpQuery:
    """Send ``payload`` (a signed query, no LLQ option) to the server over TCP and hand the reply to
    ``receive``: an answer came truncated. The client retries after ``LLQ_TCP_TIMEOUT`` seconds."""

    payload: bytes


Event = Added | Removed | Established | Refreshed | Failed | Fallback | TcpQuery


class LLQState(enum.Enum):
    IDLE = "idle"
    SETUP_SENT = "setup sent"  # waiting for the challenge
    CHALLENGE_SENT = "challenge response sent"  # waiting for the ACK + answers
    ESTABLISHED = "established"
    POLLING = "polling"  # fallback
    STOPPED = "stopped"


# -- the client --------------------------------------------------------------------------------------------


class LLQClient(Outbox["Event"]):
    """An LLQ client for one question (``qname``, ``rdtype``, class IN). See the module docstring.

    ``server`` is where requests go (datagrams from elsewhere are dropped). ``rand(n)`` returns n random
    bytes. ``lease`` is the lease requested in the SETUP request; ``tsig`` the optional TSIG session
    (every message signed, every datagram verified); ``poll_interval`` the fallback polling interval.
    """

    def __init__(self, qname: dns.name.Name | str, rdtype: dns.rdatatype.RdataType | str | int, *,
                 server: Address, rand: Callable[[int], bytes] = os.urandom, lease: int = LLQ_DEFAULT_LEASE,
                 tsig: TsigSession | None = None, poll_interval: float = LLQ_POLL_INTERVAL) -> None:
        super().__init__()
        self.server = server
        if not 0 < lease < 1 << 32:
            raise ValueError("lease must be a positive 32-bit number of seconds")
        self.qname = dns.name.from_text(qname) if isinstance(qname, str) else qname
        self.rdtype = dns.rdatatype.RdataType.make(rdtype)
        self.rdclass = dns.rdataclass.IN
        self.lease = lease
        self.poll_interval = poll_interval
        self.tsig = tsig
        self._rand = rand
        self.counters: Counter[str] = Counter()
        self.state = LLQState.IDLE
        self.llq_id = 0
        self.granted_lease = 0
        self._refresh_lease = 0  # the lease the challenge granted: what refreshes ask for
        self._msg_id = 0  # message ID of the outstanding request (setup, challenge response, refresh, poll)
        self._setup_msg_id: int | None = None  # the SETUP request's ID, to recognise re-sent challenges
        self._pending: bytes | None = None  # the outstanding request's wire, for retransmission
        self._pending_opcode = 0  # LLQ opcode of the pending request, 0 for a plain poll
        self._tries = 0
        self._retry_at: float | None = None  # next retransmission, or give-up time after the last try
        self._refresh_at: float | None = None
        self._expires_at: float | None = None
        self._poll_at: float | None = None
        self._setup_retry_at: float | None = None
        self._cache = AnswerCache(self.counters)
        self._fetch_id: int | None = None  # the query fetching a truncated answer over TCP
        self._fetch_wire = b""
        self._fetch_tries = 0
        self._fetch_at: float | None = None
        self._announce = False  # Established is reported once the fetched answer is in
        self._held: list[tuple[list[dns.rrset.RRset], list[int]]] = []  # events while fetching

    # -- public API --------------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin (or restart) the handshake: the SETUP request."""
        self._send_setup(now)

    def close(self, now: float) -> None:
        """Cancel: an established LLQ gets a REFRESH with lease 0 (sent once, unanswered); then nothing
        more."""
        if self.state == LLQState.ESTABLISHED:
            self._msg_id = self._new_id()
            cancel = LLQOption(LLQ_VERSION, LLQ_OP_REFRESH, 0, self.llq_id, 0)
            self._tx(self._render(self._query(cancel), now))
        self.state = LLQState.STOPPED
        self._clear_timers()
        self._stop_fetch()

    def finished(self) -> bool:
        return self.state in (LLQState.IDLE, LLQState.STOPPED)

    def records(self) -> list[dns.rrset.RRset]:
        """The current answer set, one RRset per name and type (TTLs as received)."""
        return self._cache.records()

    def deadline(self) -> float | None:
        """When :meth:`poll` must next be called (None: nothing scheduled)."""
        times = [t for t in (self._retry_at, self._refresh_at, self._expires_at, self._poll_at,
                             self._setup_retry_at, self._fetch_at) if t is not None]
        return min(times) if times else None

    def poll(self, now: float) -> None:
        """Run the timers due at ``now``: retransmissions, give-up, refresh, lease expiry, polling."""
        if self.state in (LLQState.IDLE, LLQState.STOPPED):
            return
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_due(now)
        if self._fetch_at is not None and now >= self._fetch_at:
            self._fetch_due(now)
        if self.state == LLQState.ESTABLISHED:
            if self._expires_at is not None and now >= self._expires_at:
                self._lost(now, "lease expired without a refresh reply")
            elif self._refresh_at is not None and now >= self._refresh_at:
                self._refresh_at = None
                option = LLQOption(LLQ_VERSION, LLQ_OP_REFRESH, 0, self.llq_id, self._refresh_lease)
                self._begin_request(now, self._query(option), LLQ_OP_REFRESH)
        if self.state == LLQState.POLLING:
            if self._setup_retry_at is not None and now >= self._setup_retry_at:
                self.counters["setup retry"] += 1
                self._send_setup(now)
            elif self._poll_at is not None and now >= self._poll_at:
                self._poll_at = now + self.poll_interval
                self._begin_request(now, self._query(None), 0, retransmit=False)

    def receive(self, data: bytes, source: Address, now: float) -> None:
        """Handle one datagram. Never raises for network input."""
        if not from_server(source, self.server):
            self.counters["not from the server"] += 1
            return
        if self.state in (LLQState.IDLE, LLQState.STOPPED):
            self.counters["not running"] += 1
            return
        read = read_answer(data, self.tsig, now)
        if isinstance(read, str):
            self.counters[read] += 1
            return
        msg, ttls = read
        if not msg.flags & dns.flags.QR or msg.opcode() != dns.opcode.QUERY:
            self.counters["not a query response"] += 1
            return
        if not self._our_question(msg):
            self.counters["other question"] += 1
            return
        option = find_llq_option(msg)
        if option is not None and option.opcode == LLQ_OP_EVENT:
            self._on_event(msg, option, ttls, now)
            return
        if self._fetch_id is not None and msg.id == self._fetch_id and option is None:
            self._on_fetched(msg, ttls, now)
            return
        if (msg.id != self._msg_id and msg.id != self._setup_msg_id) or self._pending is None:
            self.counters["unexpected message ID"] += 1
            return
        if self.state == LLQState.SETUP_SENT:
            self._on_setup_reply(msg, option, ttls, now)
        elif self.state == LLQState.CHALLENGE_SENT:
            self._on_ack(msg, option, ttls, now)
        elif self.state == LLQState.ESTABLISHED:
            self._on_refresh_reply(msg, option, now)
        elif self.state == LLQState.POLLING:
            self._on_poll_reply(msg, ttls, now)

    # -- receive paths -----------------------------------------------------------------------------------

    def _our_question(self, msg: dns.message.Message) -> bool:
        if len(msg.question) != 1:
            return False
        q = msg.question[0]
        return bool(q.name == self.qname and q.rdtype == self.rdtype and q.rdclass == self.rdclass)

    def _rcode_ok(self, msg: dns.message.Message) -> bool:
        return msg.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)

    def _on_setup_reply(self, msg: dns.message.Message, option: LLQOption | None, ttls: list[int],
                        now: float) -> None:
        if msg.id != self._msg_id:
            self.counters["unexpected message ID"] += 1
            return
        if not self._rcode_ok(msg):
            self._fallback(now, f"rcode {dns.rcode.to_text(msg.rcode())} to the LLQ setup request")
            return
        if option is None or option.version != LLQ_VERSION:
            # Not an LLQ server: the answer is an ordinary answer, use it as the first poll result.
            truncated = bool(msg.flags & dns.flags.TC)
            if not truncated:
                self._replace_cache(msg, ttls)
            what = "no LLQ option" if option is None else f"LLQ version {option.version}"
            self._fallback(now, f"the server answered the setup request with {what}", poll_now=False)
            if truncated:
                self._fetch(now, announce=False)
            return
        if option.opcode != LLQ_OP_SETUP:
            self.counters["unexpected LLQ opcode"] += 1
            return
        if option.error != LLQ_ERR_NO_ERROR:
            self._fallback(now, f"setup challenge carried {error_name(option.error)}")
            return
        if msg.answer:
            self.counters["answers in challenge ignored"] += 1
        if option.llq_id == 0 or option.lease == 0:
            self._fallback(now, "setup challenge with LLQ-ID 0 or lease 0")
            return
        self.llq_id = option.llq_id
        self.granted_lease = self._refresh_lease = option.lease
        self.state = LLQState.CHALLENGE_SENT
        response = LLQOption(LLQ_VERSION, LLQ_OP_SETUP, 0, option.llq_id, option.lease)
        self._begin_request(now, self._query(response), LLQ_OP_SETUP)

    def _on_ack(self, msg: dns.message.Message, option: LLQOption | None, ttls: list[int],
                now: float) -> None:
        if msg.id != self._msg_id:
            # The server re-sent the challenge (it answers every retransmitted SETUP request).
            self.counters["duplicate challenge"] += 1
            return
        if not self._rcode_ok(msg):
            self._fallback(now, f"rcode {dns.rcode.to_text(msg.rcode())} to the challenge response")
            return
        if option is None or option.version != LLQ_VERSION or option.opcode != LLQ_OP_SETUP:
            self.counters["ACK without LLQ SETUP option"] += 1
            return
        if option.llq_id != self.llq_id:
            self.counters["ACK for another LLQ-ID"] += 1
            return
        if option.error != LLQ_ERR_NO_ERROR:
            self._fallback(now, f"setup ACK carried {error_name(option.error)}")
            return
        if msg.flags & dns.flags.TC:  # the answer set did not fit: the LLQ is up, its answer comes by TCP
            self._established(now, option.lease or self.granted_lease)
            self._fetch(now, announce=True)
            return
        # The ACK's answer set is authoritative: it replaces the cache (Apple: "protocol anomaly").
        self._replace_cache(msg, ttls)
        self._established(now, option.lease or self.granted_lease)
        self._emit(Established(tuple(self.records()), self.llq_id, self.granted_lease))

    def _on_refresh_reply(self, msg: dns.message.Message, option: LLQOption | None, now: float) -> None:
        if self._pending_opcode != LLQ_OP_REFRESH or msg.id != self._msg_id:
            self.counters["unexpected message ID"] += 1
            return
        if option is None or option.opcode != LLQ_OP_REFRESH or option.llq_id != self.llq_id:
            self.counters["bad refresh reply"] += 1
            return
        if option.error != LLQ_ERR_NO_ERROR or not self._rcode_ok(msg):
            reason = (f"refresh answered with {error_name(option.error)}" if option.error
                      else f"refresh answered with rcode {dns.rcode.to_text(msg.rcode())}")
            self._lost(now, reason)
            return
        if msg.answer:
            self.counters["answers in refresh reply ignored"] += 1
        if option.lease == 0:
            self._lost(now, "refresh granted lease 0")
            return
        self._established(now, option.lease)
        self._emit(Refreshed(option.lease))

    def _on_poll_reply(self, msg: dns.message.Message, ttls: list[int], now: float) -> None:
        if msg.id != self._msg_id:
            self.counters["unexpected message ID"] += 1
            return
        self._pending = None
        self._retry_at = None
        if not self._rcode_ok(msg):
            self.counters[f"poll rcode {dns.rcode.to_text(msg.rcode())}"] += 1
            return
        if msg.flags & dns.flags.TC:
            self._fetch(now, announce=False)
            return
        self._replace_cache(msg, ttls)

    def _on_event(self, msg: dns.message.Message, option: LLQOption, ttls: list[int], now: float) -> None:
        if self.llq_id == 0 or option.llq_id != self.llq_id or self.state not in (
                LLQState.CHALLENGE_SENT, LLQState.ESTABLISHED):
            self.counters["event for another LLQ-ID"] += 1
            return
        # Ack every event for our LLQ, duplicates too: same message ID, our question, the option echoed.
        ack = dns.message.Message(id=msg.id)
        ack.flags = dns.flags.QR
        ack.find_rrset(ack.question, self.qname, self.rdclass, self.rdtype, create=True, force_unique=True)
        ack.use_edns(0, payload=UDP_PAYLOAD, options=[
            LLQOption(option.version, LLQ_OP_EVENT, option.error, option.llq_id, option.lease)])
        self._tx(self._render(ack, now))
        self.counters["event acked"] += 1
        if self.state != LLQState.ESTABLISHED:
            # Before the ACK reached us: its full answer set will include this change.
            self.counters["event before ACK"] += 1
            return
        if self._fetch_id is not None:  # applied once the whole answer is in (it may predate them)
            self._held.append((list(msg.answer), ttls))
        else:
            changes = self._cache.apply(msg.answer, ttls)
            if not changes:
                self.counters["duplicate or no-op event"] += 1
            for change in changes:
                self._emit(change)
        if msg.flags & dns.flags.TC:
            self._fetch(now, announce=False)

    def _on_fetched(self, msg: dns.message.Message, ttls: list[int], now: float) -> None:
        """The whole answer, over TCP: it replaces the cache, then the events held meanwhile apply
        (each is a diff from an earlier state, so in order they end at the server's)."""
        if msg.flags & dns.flags.TC or not self._rcode_ok(msg):
            self.counters["unusable answer over TCP"] += 1
            return  # the fetch timer tries again
        held, announce = self._held, self._announce
        self._stop_fetch()
        self._replace_cache(msg, ttls)
        for answers, event_ttls in held:
            for change in self._cache.apply(answers, event_ttls):
                self._emit(change)
        if announce and self.state == LLQState.ESTABLISHED:
            self._emit(Established(tuple(self.records()), self.llq_id, self.granted_lease))

    def _fetch(self, now: float, announce: bool) -> None:
        """Fetch the whole answer over TCP (once at a time)."""
        self._announce |= announce
        if self._fetch_id is not None:
            return
        msg = self._query(None)
        self._fetch_id = msg.id
        self._fetch_wire = self._render(msg, now)
        self._fetch_tries = 1
        self._fetch_at = now + LLQ_TCP_TIMEOUT
        self.counters["truncated answer fetched over TCP"] += 1
        self._emit(TcpQuery(self._fetch_wire))

    def _fetch_due(self, now: float) -> None:
        if self._fetch_tries < LLQ_MAX_TRIES:
            self._fetch_tries += 1
            self._fetch_at = now + LLQ_TCP_TIMEOUT
            self.counters["TCP retry"] += 1
            self._emit(TcpQuery(self._fetch_wire))
            return
        self._stop_fetch()
        self.counters["no answer over TCP"] += 1
        if self.state == LLQState.ESTABLISHED:  # polling tries TCP again at each poll
            self._fallback(now, f"the answer is truncated and {LLQ_MAX_TRIES} tries over TCP failed",
                           poll_now=False)

    def _stop_fetch(self) -> None:
        self._fetch_id = self._fetch_at = None
        self._fetch_tries = 0
        self._announce = False
        self._held = []

    # -- state changes -----------------------------------------------------------------------------------

    def _send_setup(self, now: float) -> None:
        self._clear_timers()
        self._stop_fetch()
        self.state = LLQState.SETUP_SENT
        self.llq_id = 0
        self.granted_lease = 0
        request = LLQOption(LLQ_VERSION, LLQ_OP_SETUP, 0, 0, self.lease)
        self._begin_request(now, self._query(request), LLQ_OP_SETUP)
        self._setup_msg_id = self._msg_id

    def _established(self, now: float, lease: int) -> None:
        self._clear_timers()
        self.state = LLQState.ESTABLISHED
        self.granted_lease = lease
        self._setup_msg_id = None
        self._refresh_at = now + lease * self._uniform(LLQ_REFRESH_MIN_FRACTION, LLQ_REFRESH_MAX_FRACTION)
        self._expires_at = now + lease

    def _lost(self, now: float, reason: str) -> None:
        """The established LLQ is gone: report it and start a new handshake at once."""
        self.counters["LLQ lost"] += 1
        self._emit(Failed(reason))
        self._send_setup(now)

    def _fallback(self, now: float, reason: str, poll_now: bool = True) -> None:
        self.counters["fallback"] += 1
        self._clear_timers()
        self._stop_fetch()
        self.state = LLQState.POLLING
        self.llq_id = 0
        self.granted_lease = 0
        self._setup_msg_id = None
        self._setup_retry_at = now + LLQ_SETUP_RETRY_INTERVAL
        self._emit(Fallback(self.poll_interval, reason))
        if poll_now:
            self._poll_at = now + self.poll_interval
            self._begin_request(now, self._query(None), 0, retransmit=False)
        else:
            self._poll_at = now + self.poll_interval

    def _retry_due(self, now: float) -> None:
        self._retry_at = None
        if self._pending is None:
            return
        if self._tries < LLQ_MAX_TRIES:
            self._tries += 1
            self._retry_at = now + LLQ_RETRY_WAITS[self._tries - 1]
            self.counters["retransmission"] += 1
            self._tx(self._pending)
            return
        self._pending = None
        if self.state == LLQState.ESTABLISHED:
            self._lost(now, f"{LLQ_MAX_TRIES} refresh requests unanswered")
        elif self.state in (LLQState.SETUP_SENT, LLQState.CHALLENGE_SENT):
            step = "setup request" if self.state == LLQState.SETUP_SENT else "challenge response"
            self._fallback(now, f"no answer to {LLQ_MAX_TRIES} LLQ {step}s")

    def _clear_timers(self) -> None:
        self._pending = None
        self._pending_opcode = 0
        self._tries = 0
        self._retry_at = self._refresh_at = self._expires_at = self._poll_at = self._setup_retry_at = None

    # -- building messages ---------------------------------------------------------------------------

    def _begin_request(self, now: float, msg: dns.message.Message, opcode: int,
                       retransmit: bool = True) -> None:
        wire = self._render(msg, now)
        self._msg_id = msg.id
        self._pending = wire
        self._pending_opcode = opcode
        self._tries = 1
        self._retry_at = now + LLQ_RETRY_WAITS[0] if retransmit else None
        self._tx(wire)

    def _query(self, option: LLQOption | None) -> dns.message.Message:
        msg = dns.message.make_query(self.qname, self.rdtype, self.rdclass, id=self._new_id(), flags=0)
        msg.use_edns(0, payload=UDP_PAYLOAD, options=[] if option is None else [option])  # a real size
        return msg

    def _tx(self, wire: bytes) -> None:
        self._send(self.server, wire)

    def _render(self, msg: dns.message.Message, now: float) -> bytes:
        wire = msg.to_wire()  # rendered once: what is signed is what is sent
        return wire if self.tsig is None else self.tsig.sign(wire, now)

    def _new_id(self) -> int:
        return int.from_bytes(self._rand(2), "big")

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * int.from_bytes(self._rand(4), "big") / 2**32

    def _replace_cache(self, msg: dns.message.Message, ttls: list[int]) -> None:
        for change in self._cache.replace(msg.answer, ttls):
            self._emit(change)
