"""The STUN Binding client (RFC 8489) as a sans-I/O core: the endpoint a NAT gives our socket, and its kind.

A round sends one Binding request to every server at once, retransmits each per §6.2.1 and starts again
every ``interval`` seconds, which also keeps the NAT binding of the socket it runs on alive. Answers are
accepted only from the server asked and for an outstanding transaction ID. When a round is over, the
answers say how the NAT maps: the same address from two servers (distinct address and port) is an
endpoint-independent mapping, different ones a per-destination mapping. docs/nat.md, "STUN".
"""

from __future__ import annotations

import ipaddress
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tunneld.proto import stun_wire as wire
from tunneld.proto.core import Address, Outbox
from tunneld.proto.errors import ParseError

__all__ = [
    "ENDPOINT_INDEPENDENT",
    "PER_DESTINATION",
    "UNKNOWN",
    "NatKind",
    "Observed",
    "ServerFailed",
    "StunClient",
    "StunEvent",
    "normal_address",
]

ENDPOINT_INDEPENDENT = "endpoint-independent"  # RFC 4787 §4.1: one mapping for every destination
PER_DESTINATION = "per-destination"  # address (and port) dependent mapping: a mapping per destination
UNKNOWN = "unknown"  # fewer than two servers answered: nothing to compare

RM = 16  # RFC 8489 §6.2.1: after the last request, wait Rm times the RTO before giving up
_MAX_REASON = 80  # characters of an error response's reason phrase kept in an event


@dataclass(frozen=True)
class Observed:
    """``server`` saw us as ``mapped``, ``rtt`` seconds after our (last) request."""

    server: Address
    mapped: Address
    rtt: float


@dataclass(frozen=True)
class ServerFailed:
    """``server`` did not answer this round's request (``reason``: timeout, or its error response)."""

    server: Address
    reason: str


@dataclass(frozen=True)
class NatKind:
    """How the NAT maps (``kind``), and the mapped address peers can use: the common one for an
    endpoint-independent mapping, the one answer with a single server, None per destination.
    Emitted when the kind or the mapped address changes."""

    kind: str
    mapped: Address | None


StunEvent = Observed | ServerFailed | NatKind


@dataclass
class _Transaction:
    tid: bytes
    request: bytes
    sent: float  # when the last (re)transmission left
    sends: int  # transmissions so far
    due: float  # next retransmission, or the give-up time after the last one


def normal_address(address: Address) -> Address:
    """The address in one spelling: IPv4-mapped IPv6 (a dual-stack socket's view) as IPv4, IPv6 compressed,
    no zone. ValueError if the host is not an IP address."""
    ip = ipaddress.ip_address(address[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), address[1]


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:_MAX_REASON])


class StunClient(Outbox[StunEvent]):
    """Binding rounds to ``servers`` (IP literals; duplicates are asked once) every ``interval`` seconds.

    ``rto`` is the first retransmission timeout (doubled each time), ``attempts`` the number of
    transmissions of one request. ``now`` is monotonic seconds. Bad input is counted in :attr:`counters`
    and dropped; nothing from the network raises.
    """

    def __init__(self, servers: Sequence[Address], rand: Callable[[int], bytes] = os.urandom, *,
                 interval: float = 25.0, rto: float = 0.5, attempts: int = 4) -> None:
        super().__init__()
        if interval <= 0 or rto <= 0 or attempts < 1:
            raise ValueError("interval and rto must be positive, attempts at least 1")
        self.servers: tuple[Address, ...] = tuple(dict.fromkeys(normal_address(s) for s in servers))
        self.rand = rand
        self.interval = interval
        self.rto = rto
        self.attempts = attempts
        self.counters: Counter[str] = Counter()
        self.rounds = 0
        self._pending: dict[Address, _Transaction] = {}
        self._answers: dict[Address, Address] = {}  # this round's
        self._observed: dict[Address, Address] = {}
        self._kind = UNKNOWN
        self._mapped: Address | None = None
        self._next_round: float | None = None  # None: at the first poll
        self._closed = False

    # -- what it knows ---------------------------------------------------------------------------------

    @property
    def observed(self) -> dict[Address, Address]:
        """Server -> the mapped address it last answered (a copy)."""
        return dict(self._observed)

    @property
    def kind(self) -> str:
        """The last finished round's verdict: ENDPOINT_INDEPENDENT, PER_DESTINATION or UNKNOWN."""
        return self._kind

    @property
    def mapped(self) -> Address | None:
        """The mapped address that goes with :attr:`kind` (see :class:`NatKind`)."""
        return self._mapped

    # -- the core face ---------------------------------------------------------------------------------

    def check(self, now: float) -> None:
        """Start a new round at once (the network changed, or on demand); outstanding requests are
        abandoned, so a late answer through the old path cannot count."""
        if not self._closed:
            self._start_round(now)

    def end_round(self, now: float) -> None:
        """Give up on the outstanding requests at once (for a caller with a time bound of its own, such as
        a diagnostic): they fail, and the answers so far give the verdict. Rounds go on as scheduled."""
        for server in list(self._pending):
            del self._pending[server]
            self._fail(server, "no answer yet")
        self._maybe_end_round()

    def poll(self, now: float) -> None:
        if self._closed:
            return
        if self._next_round is None or now >= self._next_round:
            for server in list(self._pending):  # an interval shorter than the give-up time
                del self._pending[server]
                self._fail(server, "no answer before the next round")
            self._maybe_end_round()
            self._start_round(now)
            return
        for server, t in list(self._pending.items()):
            if now < t.due:
                continue
            if t.sends >= self.attempts:
                del self._pending[server]
                self._fail(server, f"no answer after {t.sends} requests")
                continue
            self._send(server, t.request)
            t.sends += 1
            t.sent = now
            t.due = now + self._timeout(t.sends)
        self._maybe_end_round()

    def deadline(self) -> float | None:
        if self._closed:
            return None
        if self._next_round is None:
            return 0.0  # the first round: at once
        return min([self._next_round, *(t.due for t in self._pending.values())])

    def receive(self, data: bytes, source: Address, now: float) -> None:
        if self._closed:
            self.counters["closed"] += 1
            return
        try:
            msg = wire.decode(data)
        except ParseError as e:
            self.counters[f"parse error: {e}"] += 1
            return
        try:
            server = normal_address(source)
        except ValueError:
            self.counters["bad source"] += 1
            return
        if msg.method != wire.BINDING or msg.cls not in (wire.SUCCESS, wire.ERROR):
            self.counters["not a binding response"] += 1
            return
        t = self._pending.get(server)
        if t is None or t.tid != msg.transaction_id:
            tids = {p.tid for p in self._pending.values()}
            self.counters["wrong source" if msg.transaction_id in tids else "unknown transaction"] += 1
            return
        if msg.get(wire.FINGERPRINT) is not None and not wire.check_fingerprint(msg):
            self.counters["bad fingerprint"] += 1
            return
        if msg.cls == wire.ERROR:
            code = msg.error_code()
            del self._pending[server]
            self.counters["error response"] += 1
            self._fail(server, "error response" if code is None
                       else f"error {code[0]} {_printable(code[1])}".rstrip())
            self._maybe_end_round()
            return
        mapped = msg.xor_mapped_address() or msg.mapped_address()  # MAPPED-ADDRESS: legacy servers
        if mapped is None:
            self.counters["no mapped address"] += 1
            return
        del self._pending[server]
        rtt = max(0.0, now - t.sent)
        self._answers[server] = self._observed[server] = mapped
        self._emit(Observed(server, mapped, rtt))
        self._maybe_end_round()

    def close(self, now: float) -> None:
        """Nothing to take back: Binding leaves no state at the server."""
        self._closed = True
        self._pending.clear()

    def finished(self) -> bool:
        return self._closed

    # -- rounds ----------------------------------------------------------------------------------------

    def _timeout(self, sends: int) -> float:
        """After transmission number ``sends``: the doubled RTO, or Rm x RTO after the last (§6.2.1)."""
        return self.rto * (RM if sends >= self.attempts else 2 ** (sends - 1))

    def _start_round(self, now: float) -> None:
        self.rounds += 1
        self._next_round = now + self.interval
        self._pending.clear()
        self._answers = {}
        for server in self.servers:
            tid = self.rand(wire.TRANSACTION_ID_LEN)
            if len(tid) != wire.TRANSACTION_ID_LEN:
                raise ValueError("rand returned the wrong number of bytes")
            request = wire.encode(wire.BINDING, wire.REQUEST, tid, fingerprint=True)
            self._pending[server] = _Transaction(tid, request, now, 1, now + self._timeout(1))
            self._send(server, request)

    def _fail(self, server: Address, reason: str) -> None:
        self._observed.pop(server, None)  # a server that did not answer has no current observation
        self._emit(ServerFailed(server, reason))

    def _maybe_end_round(self) -> None:
        """With nothing outstanding, the round's answers give the kind; no answer at all changes nothing."""
        if self._pending or not self._answers:
            return
        answers, self._answers = self._answers, {}
        distinct = set(answers.values())
        if len(answers) >= 2:
            kind = ENDPOINT_INDEPENDENT if len(distinct) == 1 else PER_DESTINATION
            mapped = next(iter(distinct)) if len(distinct) == 1 else None
        else:  # one answer: it can confirm an endpoint-independent verdict, not make one
            mapped = next(iter(distinct))
            kind = ENDPOINT_INDEPENDENT if (self._kind, self._mapped) == (ENDPOINT_INDEPENDENT, mapped) \
                else UNKNOWN
        if (kind, mapped) != (self._kind, self._mapped):
            self._kind, self._mapped = kind, mapped
            self._emit(NatKind(kind, mapped))
