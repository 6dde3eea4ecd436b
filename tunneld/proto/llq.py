"""DNS Long-Lived Queries (RFC 8764): the EDNS(0) LLQ option and a sans-I/O client for one question.

Sans-I/O like :mod:`tunneld.proto.natpmp`: :class:`LLQClient` takes datagrams and ``now`` (monotonic
seconds) and returns datagrams to send and :data:`Event` values; it never reads a clock, never touches a
socket and draws randomness (message IDs, refresh jitter) only through the injected ``rand(n) -> bytes``.
The adapter owns one UDP socket towards the LLQ server (SRV ``_dns-llq._udp.<zone>``), feeds every datagram
from it to :meth:`LLQClient.receive`, calls :meth:`LLQClient.poll` at :meth:`LLQClient.deadline` and sends
every :class:`Transmit` to the server. Facts and sources: PROTOCOLS.md section 3.

Importing this module registers :class:`LLQOption` with dnspython for option code 1 (process-wide, the way
dnspython registers ``CookieOption``), so messages carrying the option parse and render.

The option (RFC 8764 §3.1/§3.2), 18 bytes of data: VERSION u16 (1) | OPCODE u16 | ERROR u16 | LLQ-ID u64 |
LEASE u32. (Some docs show a 16-byte layout without ERROR: wrong.)

Behaviour of :class:`LLQClient`:

- **Handshake** (§5.2). SETUP request (ID 0, requested lease) -> challenge (a SETUP response echoing our
  message ID, no answers, nonzero LLQ-ID, granted lease) -> challenge response (SETUP, that ID, the granted
  lease, a fresh message ID) -> ACK + answers (SETUP, the ID). Challenge and ACK both carry opcode SETUP;
  they are told apart by our state and by which request's message ID they echo. A re-sent challenge (the
  answer to a retransmitted SETUP request) is counted and ignored. The ACK's answer set is authoritative:
  it replaces the cache.
- **Retransmission** (§5.1). Each request step is sent up to 3 times: at 0 s, +2 s, +4 s after that (so
  at 0, 2 and 6 s), with the same message ID; we listen 8 s after the third (until 14 s). Then the server
  is treated as down: :class:`Fallback` and polling.
- **Fallback.** A server that answers the SETUP request without an LLQ option (or with an LLQ version we
  do not speak), a challenge or ACK with LLQ-ERROR != 0, an unusable rcode (only NOERROR and NXDOMAIN are
  accepted, as Apple does) or silence -> :class:`Fallback` (``poll_interval``, 15 min as Apple's
  ``LLQ_POLL_INTERVAL``). The client then sends a plain query (no LLQ option) every poll interval and
  applies each answer as a full snapshot; a plain answer to the SETUP request is used as the first
  snapshot. LLQ setup is retried no more than once per hour (§5.1).
- **Refresh** (§6). At ``lease * uniform(0.5, 0.6)`` after the ACK or the last refresh reply (Apple:
  ``lease/2 + random(lease/10)``) a REFRESH with the LLQ-ID and the lease the challenge granted is sent,
  retransmitted like the setup (3 tries). A reply with error 0 -> :class:`Refreshed`. NO-SUCH-LLQ (or any
  error), 3 unanswered tries or lease expiry -> :class:`Failed` and an immediate new handshake.
- **Events** (§7). An event is a response with the LLQ opcode EVENT; it is matched to our LLQ on the
  LLQ-ID only, never on the message ID (the server chooses it). Every answer RR with TTL 0xFFFFFFFF is a
  removal, any other an addition. (dnspython rewrites TTLs above 0x7FFFFFFF to 0, so the TTLs are read
  from the wire.) Each event for our LLQ-ID is acknowledged -- duplicates included, as the server resends
  until acknowledged -- with a response (QR=1) carrying the event's message ID, our question and the
  event's LLQ option echoed (opcode EVENT, same LLQ-ID; Apple's ``uDNS_recvLLQResponse``). Changes are
  applied to the cache, so a duplicate produces no second :class:`Added`. Events for another LLQ-ID are
  ignored (counted) and not acknowledged.
- **Robustness.** Garbage, truncated messages, malformed options, mismatched IDs, unexpected opcodes and
  TSIG failures are counted in :attr:`LLQClient.counters` and dropped; nothing from the network raises.

Events: :class:`Added` / :class:`Removed` are a diff stream -- applying them in order to an empty set
gives :meth:`LLQClient.records` at all times (after an ACK or a poll answer they carry the difference to
the previous cache, so the first ACK yields an :class:`Added` per RRset). :class:`Established`,
:class:`Refreshed`, :class:`Failed` and :class:`Fallback` report status; :class:`Established` also carries
the full answer set as a snapshot.

TSIG (BTMM draft §7.2: LLQs carry TSIG): with a :class:`~tunneld.proto.tsig.TsigSession` every message
is signed at ``now`` (which must then be Unix time) and every datagram verified before it is parsed.
Without one, messages go unsigned and an incoming TSIG is not checked.
"""

from __future__ import annotations

import enum
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.wire

from tunneld.proto.dnswire import ANSWER, MAX_MESSAGE, walk
from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import TsigError, TsigSession

__all__ = [
    "LLQ_DEFAULT_LEASE",
    "LLQ_ERR_BAD_VERS",
    "LLQ_ERR_FORMAT",
    "LLQ_ERR_NO_ERROR",
    "LLQ_ERR_NO_SUCH_LLQ",
    "LLQ_ERR_SERV_FULL",
    "LLQ_ERR_STATIC",
    "LLQ_ERR_UNKNOWN",
    "LLQ_OPTION_CODE",
    "LLQ_OPTION_LEN",
    "LLQ_OP_EVENT",
    "LLQ_OP_REFRESH",
    "LLQ_OP_SETUP",
    "LLQ_POLL_INTERVAL",
    "LLQ_REMOVE_TTL",
    "LLQ_SETUP_RETRY_INTERVAL",
    "LLQ_VERSION",
    "Added",
    "Established",
    "Event",
    "Failed",
    "Fallback",
    "LLQClient",
    "LLQOption",
    "LLQState",
    "Output",
    "Refreshed",
    "Removed",
    "Transmit",
    "find_llq_option",
    "parse_llq_option",
    "parse_message",
]

# -- constants (PROTOCOLS.md §3) -----------------------------------------------------------------------------

LLQ_OPTION_CODE: Final = 1  # RFC 8764 §3.1
LLQ_OPTION_LEN: Final = 18  # §3.2: version, opcode, error (u16 each), ID (u64), lease (u32)
LLQ_VERSION: Final = 1
LLQ_OP_SETUP: Final = 1
LLQ_OP_REFRESH: Final = 2
LLQ_OP_EVENT: Final = 3
LLQ_ERR_NO_ERROR: Final = 0
LLQ_ERR_SERV_FULL: Final = 1
LLQ_ERR_STATIC: Final = 2
LLQ_ERR_FORMAT: Final = 3
LLQ_ERR_NO_SUCH_LLQ: Final = 4
LLQ_ERR_BAD_VERS: Final = 5
LLQ_ERR_UNKNOWN: Final = 6
LLQ_REMOVE_TTL: Final = 0xFFFFFFFF  # an event RR with this TTL is a removal (§7)
LLQ_DEFAULT_LEASE: Final = 7200  # Apple kLLQ_DefLease
LLQ_UDP_PAYLOAD: Final = 1440  # Apple's OPT class
LLQ_MAX_TRIES: Final = 3  # §5.1, Apple kLLQ_MAX_TRIES
LLQ_RETRY_WAITS: Final = (2.0, 4.0, 8.0)  # §5.1: >=2 s, >=4 s before the retransmissions, 8 s after the 3rd
LLQ_POLL_INTERVAL: Final = 15 * 60.0  # Apple LLQ_POLL_INTERVAL
LLQ_SETUP_RETRY_INTERVAL: Final = 3600.0  # §5.1: re-try setup no more than once per hour
LLQ_REFRESH_MIN_FRACTION: Final = 0.5  # Apple: lease/2 + random(lease/10)
LLQ_REFRESH_MAX_FRACTION: Final = 0.6

_ERROR_NAMES: Final = {
    LLQ_ERR_NO_ERROR: "NO-ERROR",
    LLQ_ERR_SERV_FULL: "SERV-FULL",
    LLQ_ERR_STATIC: "STATIC",
    LLQ_ERR_FORMAT: "FORMAT-ERR",
    LLQ_ERR_NO_SUCH_LLQ: "NO-SUCH-LLQ",
    LLQ_ERR_BAD_VERS: "BAD-VERS",
    LLQ_ERR_UNKNOWN: "UNKNOWN-ERR",
}
_OPCODE_NAMES: Final = {LLQ_OP_SETUP: "SETUP", LLQ_OP_REFRESH: "REFRESH", LLQ_OP_EVENT: "EVENT"}

_LLQ_STRUCT: Final = struct.Struct("!HHHQI")


def _error_name(code: int) -> str:
    return f"LLQ-ERROR {code} ({_ERROR_NAMES.get(code, 'unknown')})"


# -- the option --------------------------------------------------------------------------------------------


class LLQOption(dns.edns.Option):
    """The LLQ EDNS(0) option (code 1): 18 bytes of data, all fields unsigned big-endian."""

    def __init__(self, version: int = LLQ_VERSION, opcode: int = LLQ_OP_SETUP, error: int = 0,
                 llq_id: int = 0, lease: int = 0) -> None:
        super().__init__(dns.edns.OptionType.make(LLQ_OPTION_CODE))
        for name, value, bits in (("version", version, 16), ("opcode", opcode, 16), ("error", error, 16),
                                  ("llq_id", llq_id, 64), ("lease", lease, 32)):
            if not 0 <= value < 1 << bits:
                raise ValueError(f"LLQ {name} out of range")
        self.version = version
        self.opcode = opcode
        self.error = error
        self.llq_id = llq_id
        self.lease = lease

    def to_wire(self, file: Any | None = None) -> bytes | None:
        data = _LLQ_STRUCT.pack(self.version, self.opcode, self.error, self.llq_id, self.lease)
        if file:
            file.write(data)
            return None
        return data

    def to_bytes(self) -> bytes:
        """The 18 option data bytes (without option code and length)."""
        return _LLQ_STRUCT.pack(self.version, self.opcode, self.error, self.llq_id, self.lease)

    def to_text(self) -> str:
        op = _OPCODE_NAMES.get(self.opcode, str(self.opcode))
        return (f"LLQ v{self.version} {op} error {self.error} id {self.llq_id:#018x} lease {self.lease}")

    def __repr__(self) -> str:
        return (f"LLQOption(version={self.version}, opcode={self.opcode}, error={self.error}, "
                f"llq_id={self.llq_id:#x}, lease={self.lease})")

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    @classmethod
    def from_wire_parser(cls, otype: dns.edns.OptionType | str, parser: dns.wire.Parser) -> dns.edns.Option:
        """dnspython's hook; a wrong length raises dnspython's own FormError (wrapped by
        :func:`parse_message`)."""
        data = parser.get_remaining()
        if len(data) != LLQ_OPTION_LEN:
            # dnspython's exception classes are untyped.
            raise dns.exception.FormError("LLQ option must be 18 bytes")  # type: ignore[no-untyped-call]
        return cls(*_LLQ_STRUCT.unpack(data))


def parse_llq_option(data: bytes) -> LLQOption:
    """Parse the 18 option data bytes; ParseError("LLQ option length") for any other length."""
    if len(data) != LLQ_OPTION_LEN:
        raise ParseError("LLQ option length")
    return LLQOption(*_LLQ_STRUCT.unpack(data))


dns.edns.register_type(LLQOption, dns.edns.OptionType.make(LLQ_OPTION_CODE))


# -- messages ----------------------------------------------------------------------------------------------


def _answer_ttls(wire: bytes) -> list[int]:
    """The raw TTLs of the answer section, in order (dnspython turns TTLs above 0x7FFFFFFF into 0)."""
    return [r.ttl for r in walk(wire) if r.section == ANSWER]


def parse_message(wire: bytes) -> dns.message.Message:
    """Parse a DNS message with one RR per RRset (so per-RR TTLs survive) and TSIG validation off.

    Raises ParseError and nothing else: "truncated" for a short header or a message that ends early,
    "malformed DNS message" for anything else dnspython rejects (a malformed LLQ option included)."""
    if len(wire) > MAX_MESSAGE:
        raise ParseError("oversized")
    try:
        return dns.message.from_wire(wire, keyring=False, one_rr_per_rrset=True)
    except (dns.message.ShortHeader, dns.message.Truncated) as e:
        raise ParseError("truncated") from e
    except Exception as e:  # dnspython raises many types (FormError, ValueError, struct.error, ...)
        raise ParseError("malformed DNS message") from e


def find_llq_option(message: dns.message.Message) -> LLQOption | None:
    """The first LLQ option in the message's OPT RR (option i belongs to question i; we ask one)."""
    for option in message.options:
        if isinstance(option, LLQOption):
            return option
    return None


# -- events and outputs ------------------------------------------------------------------------------------


class Transmit(NamedTuple):
    """A DNS message to send to the LLQ server."""

    wire: bytes


@dataclass(frozen=True)
class Added:
    """Records that entered the answer set (one RRset per name and type)."""

    rrset: dns.rrset.RRset


@dataclass(frozen=True)
class Removed:
    """Records that left the answer set."""

    rrset: dns.rrset.RRset


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


Event = Added | Removed | Established | Refreshed | Failed | Fallback


class Output(NamedTuple):
    """What :meth:`LLQClient.receive` and :meth:`LLQClient.poll` return."""

    transmits: list[Transmit]
    events: list[Event]


class LLQState(enum.Enum):
    IDLE = "idle"
    SETUP_SENT = "setup sent"  # waiting for the challenge
    CHALLENGE_SENT = "challenge response sent"  # waiting for the ACK + answers
    ESTABLISHED = "established"
    POLLING = "polling"  # fallback
    STOPPED = "stopped"


_RecordKey = tuple[dns.name.Name, int, int]  # name, rdclass, rdtype


# -- the client --------------------------------------------------------------------------------------------


class LLQClient:
    """An LLQ client for one question (``qname``, ``rdtype``, class IN). See the module docstring.

    ``rand(n)`` returns n random bytes (``os.urandom`` by default). ``lease`` is the lease requested in
    the SETUP request; ``tsig`` the optional TSIG session; ``poll_interval`` the fallback polling
    interval.
    """

    def __init__(self, qname: dns.name.Name | str, rdtype: dns.rdatatype.RdataType | str | int,
                 rand: Callable[[int], bytes] = os.urandom, lease: int = LLQ_DEFAULT_LEASE,
                 tsig: TsigSession | None = None, poll_interval: float = LLQ_POLL_INTERVAL) -> None:
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
        self._cache: dict[_RecordKey, dict[dns.rdata.Rdata, int]] = {}

    # -- public API --------------------------------------------------------------------------------------

    def start(self, now: float) -> Transmit:
        """Begin (or restart) the handshake: the SETUP request."""
        return self._send_setup(now)

    def stop(self, now: float) -> list[Transmit]:
        """Cancel: an established LLQ gets a REFRESH with lease 0 (sent once); then nothing more."""
        out = []
        if self.state == LLQState.ESTABLISHED:
            self._msg_id = self._new_id()
            out.append(Transmit(self._render(self._query(LLQOption(LLQ_VERSION, LLQ_OP_REFRESH, 0,
                                                                     self.llq_id, 0)), now)))
        self.state = LLQState.STOPPED
        self._clear_timers()
        return out

    def records(self) -> list[dns.rrset.RRset]:
        """The current answer set, one RRset per name and type (TTLs as received)."""
        return [self._rrset(key, rdatas.items()) for key, rdatas in sorted(
            self._cache.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])) if rdatas]

    def deadline(self) -> float | None:
        """When :meth:`poll` must next be called (None: nothing scheduled)."""
        times = [t for t in (self._retry_at, self._refresh_at, self._expires_at, self._poll_at,
                             self._setup_retry_at) if t is not None]
        return min(times) if times else None

    def poll(self, now: float) -> Output:
        """Run the timers due at ``now``: retransmissions, give-up, refresh, lease expiry, polling."""
        out = Output([], [])
        if self.state in (LLQState.IDLE, LLQState.STOPPED):
            return out
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_due(now, out)
        if self.state == LLQState.ESTABLISHED:
            if self._expires_at is not None and now >= self._expires_at:
                self._lost(now, out, "lease expired without a refresh reply")
            elif self._refresh_at is not None and now >= self._refresh_at:
                self._refresh_at = None
                option = LLQOption(LLQ_VERSION, LLQ_OP_REFRESH, 0, self.llq_id, self._refresh_lease)
                out.transmits.append(self._begin_request(now, self._query(option), LLQ_OP_REFRESH))
        if self.state == LLQState.POLLING:
            if self._setup_retry_at is not None and now >= self._setup_retry_at:
                self.counters["setup retry"] += 1
                out.transmits.append(self._send_setup(now))
            elif self._poll_at is not None and now >= self._poll_at:
                self._poll_at = now + self.poll_interval
                out.transmits.append(self._begin_request(now, self._query(None), 0, retransmit=False))
        return out

    def receive(self, wire: bytes, now: float) -> Output:
        """Handle one datagram from the server. Never raises for network input."""
        out = Output([], [])
        if self.state in (LLQState.IDLE, LLQState.STOPPED):
            self.counters["not running"] += 1
            return out
        if self.tsig is not None:
            try:
                self.tsig.verify(wire, now)
            except (TsigError, ParseError):
                self.counters["tsig rejected"] += 1
                return out
        try:
            msg = parse_message(wire)
            ttls = _answer_ttls(wire)
        except ParseError as e:
            self.counters[f"parse error: {e}"] += 1
            return out
        if len(ttls) != len(msg.answer):  # one RR per RRset, so they must line up
            self.counters["parse error: answer count"] += 1
            return out
        if not msg.flags & dns.flags.QR or msg.opcode() != dns.opcode.QUERY:
            self.counters["not a query response"] += 1
            return out
        if not self._our_question(msg):
            self.counters["other question"] += 1
            return out
        option = find_llq_option(msg)
        if option is not None and option.opcode == LLQ_OP_EVENT:
            self._on_event(msg, option, ttls, now, out)
            return out
        if (msg.id != self._msg_id and msg.id != self._setup_msg_id) or self._pending is None:
            self.counters["unexpected message ID"] += 1
            return out
        if self.state == LLQState.SETUP_SENT:
            self._on_setup_reply(msg, option, ttls, now, out)
        elif self.state == LLQState.CHALLENGE_SENT:
            self._on_ack(msg, option, ttls, now, out)
        elif self.state == LLQState.ESTABLISHED:
            self._on_refresh_reply(msg, option, now, out)
        elif self.state == LLQState.POLLING:
            self._on_poll_reply(msg, ttls, out)
        return out

    # -- receive paths -----------------------------------------------------------------------------------

    def _our_question(self, msg: dns.message.Message) -> bool:
        if len(msg.question) != 1:
            return False
        q = msg.question[0]
        return bool(q.name == self.qname and q.rdtype == self.rdtype and q.rdclass == self.rdclass)

    def _rcode_ok(self, msg: dns.message.Message) -> bool:
        return msg.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)

    def _on_setup_reply(self, msg: dns.message.Message, option: LLQOption | None, ttls: list[int],
                        now: float, out: Output) -> None:
        if msg.id != self._msg_id:
            self.counters["unexpected message ID"] += 1
            return
        if not self._rcode_ok(msg):
            self._fallback(now, out, f"rcode {dns.rcode.to_text(msg.rcode())} to the LLQ setup request")
            return
        if option is None or option.version != LLQ_VERSION:
            # Not an LLQ server: the answer is an ordinary answer, use it as the first poll result.
            self._replace_cache(self._answer_records(msg, ttls), out)
            what = "no LLQ option" if option is None else f"LLQ version {option.version}"
            self._fallback(now, out, f"the server answered the setup request with {what}", poll_now=False)
            return
        if option.opcode != LLQ_OP_SETUP:
            self.counters["unexpected LLQ opcode"] += 1
            return
        if option.error != LLQ_ERR_NO_ERROR:
            self._fallback(now, out, f"setup challenge carried {_error_name(option.error)}")
            return
        if msg.answer:
            self.counters["answers in challenge ignored"] += 1
        if option.llq_id == 0 or option.lease == 0:
            self._fallback(now, out, "setup challenge with LLQ-ID 0 or lease 0")
            return
        self.llq_id = option.llq_id
        self.granted_lease = self._refresh_lease = option.lease
        self.state = LLQState.CHALLENGE_SENT
        response = LLQOption(LLQ_VERSION, LLQ_OP_SETUP, 0, option.llq_id, option.lease)
        out.transmits.append(self._begin_request(now, self._query(response), LLQ_OP_SETUP))

    def _on_ack(self, msg: dns.message.Message, option: LLQOption | None, ttls: list[int], now: float,
                out: Output) -> None:
        if msg.id != self._msg_id:
            # The server re-sent the challenge (it answers every retransmitted SETUP request).
            self.counters["duplicate challenge"] += 1
            return
        if not self._rcode_ok(msg):
            self._fallback(now, out, f"rcode {dns.rcode.to_text(msg.rcode())} to the challenge response")
            return
        if option is None or option.version != LLQ_VERSION or option.opcode != LLQ_OP_SETUP:
            self.counters["ACK without LLQ SETUP option"] += 1
            return
        if option.llq_id != self.llq_id:
            self.counters["ACK for another LLQ-ID"] += 1
            return
        if option.error != LLQ_ERR_NO_ERROR:
            self._fallback(now, out, f"setup ACK carried {_error_name(option.error)}")
            return
        # The ACK's answer set is authoritative: it replaces the cache (Apple: "protocol anomaly").
        self._replace_cache(self._answer_records(msg, ttls), out)
        self._established(now, option.lease or self.granted_lease)
        out.events.append(Established(tuple(self.records()), self.llq_id, self.granted_lease))

    def _on_refresh_reply(self, msg: dns.message.Message, option: LLQOption | None, now: float,
                          out: Output) -> None:
        if self._pending_opcode != LLQ_OP_REFRESH or msg.id != self._msg_id:
            self.counters["unexpected message ID"] += 1
            return
        if option is None or option.opcode != LLQ_OP_REFRESH or option.llq_id != self.llq_id:
            self.counters["bad refresh reply"] += 1
            return
        if option.error != LLQ_ERR_NO_ERROR or not self._rcode_ok(msg):
            reason = (f"refresh answered with {_error_name(option.error)}" if option.error
                      else f"refresh answered with rcode {dns.rcode.to_text(msg.rcode())}")
            self._lost(now, out, reason)
            return
        if msg.answer:
            self.counters["answers in refresh reply ignored"] += 1
        if option.lease == 0:
            self._lost(now, out, "refresh granted lease 0")
            return
        self._established(now, option.lease)
        out.events.append(Refreshed(option.lease))

    def _on_poll_reply(self, msg: dns.message.Message, ttls: list[int], out: Output) -> None:
        if msg.id != self._msg_id:
            self.counters["unexpected message ID"] += 1
            return
        self._pending = None
        self._retry_at = None
        if not self._rcode_ok(msg):
            self.counters[f"poll rcode {dns.rcode.to_text(msg.rcode())}"] += 1
            return
        self._replace_cache(self._answer_records(msg, ttls), out)

    def _on_event(self, msg: dns.message.Message, option: LLQOption, ttls: list[int], now: float,
                  out: Output) -> None:
        if self.llq_id == 0 or option.llq_id != self.llq_id or self.state not in (
                LLQState.CHALLENGE_SENT, LLQState.ESTABLISHED):
            self.counters["event for another LLQ-ID"] += 1
            return
        # Ack every event for our LLQ, duplicates too: same message ID, our question, the option echoed.
        ack = dns.message.Message(id=msg.id)
        ack.flags = dns.flags.QR
        ack.find_rrset(ack.question, self.qname, self.rdclass, self.rdtype, create=True, force_unique=True)
        ack.use_edns(0, payload=LLQ_UDP_PAYLOAD, options=[
            LLQOption(option.version, LLQ_OP_EVENT, option.error, option.llq_id, option.lease)])
        out.transmits.append(Transmit(self._render(ack, now)))
        self.counters["event acked"] += 1
        if self.state != LLQState.ESTABLISHED:
            # Before the ACK reached us: its full answer set will include this change.
            self.counters["event before ACK"] += 1
            return
        added: dict[_RecordKey, list[tuple[dns.rdata.Rdata, int]]] = {}
        removed: dict[_RecordKey, list[tuple[dns.rdata.Rdata, int]]] = {}
        for rrset, ttl in zip(msg.answer, ttls, strict=True):
            key = (rrset.name, rrset.rdclass, rrset.rdtype)
            for rdata in rrset:
                held = self._cache.setdefault(key, {})
                if ttl == LLQ_REMOVE_TTL:
                    if rdata in held:
                        removed.setdefault(key, []).append((rdata, held.pop(rdata)))
                elif rdata not in held:
                    held[rdata] = ttl
                    added.setdefault(key, []).append((rdata, ttl))
                else:
                    held[rdata] = ttl
                if not held:
                    del self._cache[key]
        if not added and not removed:
            self.counters["duplicate or no-op event"] += 1
        out.events.extend(Removed(self._rrset(k, v)) for k, v in removed.items())
        out.events.extend(Added(self._rrset(k, v)) for k, v in added.items())

    # -- state changes -----------------------------------------------------------------------------------

    def _send_setup(self, now: float) -> Transmit:
        self._clear_timers()
        self.state = LLQState.SETUP_SENT
        self.llq_id = 0
        self.granted_lease = 0
        request = LLQOption(LLQ_VERSION, LLQ_OP_SETUP, 0, 0, self.lease)
        transmit = self._begin_request(now, self._query(request), LLQ_OP_SETUP)
        self._setup_msg_id = self._msg_id
        return transmit

    def _established(self, now: float, lease: int) -> None:
        self._clear_timers()
        self.state = LLQState.ESTABLISHED
        self.granted_lease = lease
        self._setup_msg_id = None
        self._refresh_at = now + lease * self._uniform(LLQ_REFRESH_MIN_FRACTION, LLQ_REFRESH_MAX_FRACTION)
        self._expires_at = now + lease

    def _lost(self, now: float, out: Output, reason: str) -> None:
        """The established LLQ is gone: report it and start a new handshake at once."""
        self.counters["LLQ lost"] += 1
        out.events.append(Failed(reason))
        out.transmits.append(self._send_setup(now))

    def _fallback(self, now: float, out: Output, reason: str, poll_now: bool = True) -> None:
        self.counters["fallback"] += 1
        self._clear_timers()
        self.state = LLQState.POLLING
        self.llq_id = 0
        self.granted_lease = 0
        self._setup_msg_id = None
        self._setup_retry_at = now + LLQ_SETUP_RETRY_INTERVAL
        out.events.append(Fallback(self.poll_interval, reason))
        if poll_now:
            self._poll_at = now + self.poll_interval
            out.transmits.append(self._begin_request(now, self._query(None), 0, retransmit=False))
        else:
            self._poll_at = now + self.poll_interval

    def _retry_due(self, now: float, out: Output) -> None:
        self._retry_at = None
        if self._pending is None:
            return
        if self._tries < LLQ_MAX_TRIES:
            self._tries += 1
            self._retry_at = now + LLQ_RETRY_WAITS[self._tries - 1]
            self.counters["retransmission"] += 1
            out.transmits.append(Transmit(self._pending))
            return
        self._pending = None
        if self.state == LLQState.ESTABLISHED:
            self._lost(now, out, f"{LLQ_MAX_TRIES} refresh requests unanswered")
        elif self.state in (LLQState.SETUP_SENT, LLQState.CHALLENGE_SENT):
            step = "setup request" if self.state == LLQState.SETUP_SENT else "challenge response"
            self._fallback(now, out, f"no answer to {LLQ_MAX_TRIES} LLQ {step}s")

    def _clear_timers(self) -> None:
        self._pending = None
        self._pending_opcode = 0
        self._tries = 0
        self._retry_at = self._refresh_at = self._expires_at = self._poll_at = self._setup_retry_at = None

    # -- building messages ---------------------------------------------------------------------------

    def _begin_request(self, now: float, msg: dns.message.Message, opcode: int,
                       retransmit: bool = True) -> Transmit:
        wire = self._render(msg, now)
        self._msg_id = msg.id
        self._pending = wire
        self._pending_opcode = opcode
        self._tries = 1
        self._retry_at = now + LLQ_RETRY_WAITS[0] if retransmit else None
        return Transmit(wire)

    def _query(self, option: LLQOption | None) -> dns.message.Message:
        msg = dns.message.make_query(self.qname, self.rdtype, self.rdclass, id=self._new_id(), flags=0)
        if option is not None:
            msg.use_edns(0, payload=LLQ_UDP_PAYLOAD, options=[option])
        return msg

    def _render(self, msg: dns.message.Message, now: float) -> bytes:
        wire = msg.to_wire()  # rendered once: what is signed is what is sent
        return wire if self.tsig is None else self.tsig.sign(wire, now)

    def _new_id(self) -> int:
        return int.from_bytes(self._rand(2), "big")

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * int.from_bytes(self._rand(4), "big") / 2**32

    # -- the cache -----------------------------------------------------------------------------------------

    def _answer_records(self, msg: dns.message.Message,
                        ttls: list[int]) -> dict[_RecordKey, dict[dns.rdata.Rdata, int]]:
        records: dict[_RecordKey, dict[dns.rdata.Rdata, int]] = {}
        for rrset, ttl in zip(msg.answer, ttls, strict=True):
            if ttl == LLQ_REMOVE_TTL:
                self.counters["removal TTL in a full answer set"] += 1
                continue
            held = records.setdefault((rrset.name, rrset.rdclass, rrset.rdtype), {})
            for rdata in rrset:
                held[rdata] = ttl
        return records

    def _replace_cache(self, new: dict[_RecordKey, dict[dns.rdata.Rdata, int]], out: Output) -> None:
        for key, held in self._cache.items():
            gone = [(rd, ttl) for rd, ttl in held.items() if rd not in new.get(key, {})]
            if gone:
                out.events.append(Removed(self._rrset(key, gone)))
        for key, fresh in new.items():
            held = self._cache.get(key, {})
            came = [(rd, ttl) for rd, ttl in fresh.items() if rd not in held]
            if came:
                out.events.append(Added(self._rrset(key, came)))
        self._cache = {key: dict(held) for key, held in new.items() if held}

    @staticmethod
    def _rrset(key: _RecordKey, rdatas: Iterable[tuple[dns.rdata.Rdata, int]]) -> dns.rrset.RRset:
        name, rdclass, rdtype = key
        rrset = dns.rrset.RRset(name, dns.rdataclass.RdataClass.make(rdclass),
                                dns.rdatatype.RdataType.make(rdtype))
        items = list(rdatas)
        for rdata, _ttl in items:
            rrset.add(rdata)
        rrset.ttl = min((ttl for _rd, ttl in items), default=0)
        return rrset
