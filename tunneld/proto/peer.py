"""One peer's sessions and timers, without I/O: `now` in, actions out.

A session is one handshake's result: an outbound and an inbound ESP security association. A peer
holds up to three (as WireGuard's keypairs do):

- `current`: used for sending;
- `previous`: the one `current` replaced, still accepted on receive so that packets in flight
  during a rekey are not lost;
- `next`: a session we derived as responder, not yet confirmed. A responder must not send on it
  until the initiator has shown it holds the keys, by the first packet that arrives on it
  (key confirmation); that packet promotes it to `current`.

The timers are WireGuard's (timers.go), called through hooks with the same names, so the two can be
read side by side. `poll(now)` fires what is due and returns actions for the adapter to carry out;
`deadline()` says when to call it next.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tunneld.crypto.esp import SecurityAssociation
from tunneld.proto import constants as C
from tunneld.proto.paths import PathState


@dataclass(frozen=True)
class Timers:
    """Timer settings; the defaults are the protocol's, tests shorten them through the config."""

    rekey_after_time: float = C.REKEY_AFTER_TIME
    reject_after_time: float = C.REJECT_AFTER_TIME
    rekey_attempt_time: float = C.REKEY_ATTEMPT_TIME
    rekey_timeout: float = C.REKEY_TIMEOUT
    keepalive_timeout: float = C.KEEPALIVE_TIMEOUT
    rekey_after_messages: int = C.REKEY_AFTER_MESSAGES


class Action(enum.Enum):
    INITIATE = "initiate"  # start a new handshake
    RETRY = "retry"  # the last initiation was not answered within rekey_timeout: send another
    KEEPALIVE = "keepalive"  # send an empty authenticated packet on the current session
    PERSISTENT = "persistent"  # keep the path (a NAT's binding) open: keepalive, or handshake if needed
    GAVE_UP = "gave-up"  # the handshake did not complete within rekey_attempt_time


@dataclass(eq=False)
class Session:
    outbound: SecurityAssociation
    inbound: SecurityAssociation
    created: float
    initiator: bool
    confirmed: bool

    @property
    def local_index(self) -> int:
        return self.inbound.spi


@dataclass(eq=False)
class Peer:
    name: str
    public_key: bytes
    ula: bytes  # the 16 packed bytes of the peer's ULA: inner sources must equal it
    endpoint: tuple[str, int] | None = None
    timers: Timers = field(default_factory=Timers)
    endpoint_source: str | None = None  # "config", "dns" or "packet": where `endpoint` came from
    endpoint_at: float | None = None  # `now` when it was set
    rand: Callable[[int], bytes] = field(kw_only=True)  # seeds the timers' jitter (the core's randomness)

    current: Session | None = None
    previous: Session | None = None
    next: Session | None = None

    # timer state (monotonic seconds); None = not armed
    handshake_started: float | None = None  # first initiation of the current attempt
    retry_at: float | None = None
    keepalive_at: float | None = None  # data arrived: say something back by then
    new_handshake_at: float | None = None  # data sent: expect something back by then
    persistent_keepalive: float | None = None  # seconds: keep the path open (we sit behind a NAT)
    traffic_at: float | None = None  # last authenticated packet either way (persistent keepalive's clock)
    received_at: float | None = None  # last authenticated packet from the peer
    staged: deque[bytes] = field(default_factory=lambda: deque(maxlen=C.MAX_STAGED_PACKETS))
    path: PathState = field(default_factory=PathState)  # direct or relayed, and the plans to change it

    # counters, for status
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    last_handshake_wall: float | None = None
    handshakes: int = 0
    last_sent_handshake: float | None = None  # `now` of our last initiation or response
    dropped_spoofed: int = 0
    rx_dropped_retired: int = 0  # drop counts of sessions already discarded
    rx_replay_retired: int = 0
    _jitter_rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Seeded once from `rand`: jitter is drawn on the data path (data_sent), where a system call
        # per draw (os.urandom) would cost, and it needs no cryptographic strength.
        self._jitter_rng = random.Random(self.rand(16))

    # -- sessions ---------------------------------------------------------------------------------

    def sendable(self, now: float) -> Session | None:
        """The session to send on, or None if a handshake is needed first."""
        s = self.current
        if s is None or not s.confirmed or self.expired(s, now):
            return None
        if s.outbound.seq >= s.outbound.limit:
            return None
        return s

    def wants_rekey(self, now: float) -> bool:
        """On sending: no usable session, or ours is old enough that its initiator renews it."""
        s = self.sendable(now)
        if s is None:
            return True
        return (s.initiator and now - s.created >= self.timers.rekey_after_time) or \
            s.outbound.seq >= self.timers.rekey_after_messages

    def wants_rekey_on_receive(self, now: float) -> bool:
        """On receiving: the initiator renews a session about to be rejected even if it only
        listens (receive-only flows would otherwise stall at reject_after_time)."""
        s = self.current
        t = self.timers
        return s is not None and s.initiator and \
            now - s.created >= t.reject_after_time - t.keepalive_timeout - t.rekey_timeout

    def add_session(self, session: Session, now: float) -> list[Session]:
        """Install a fresh session; returns the sessions dropped (their inbound SPIs must go).

        As wireguard-go's BeginSymmetricSession: an initiator's session is confirmed (we hold the
        response) and becomes current; if a responder session was waiting in `next`, the peer may
        already be sending on it (crossing handshakes), so it is kept as `previous` for receiving.
        A responder's session waits in `next`, and `previous` is dropped.
        """
        dropped: list[Session] = []
        if session.initiator:
            if self.next is not None:
                for s in (self.current, self.previous):
                    if s is not None:
                        dropped.append(s)
                self.previous = self.next
                self.next = None
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = session
        else:
            for s in (self.next, self.previous):
                if s is not None:
                    dropped.append(s)
            self.next = session
            self.previous = None
        return dropped

    def received_on(self, session: Session, now: float, wall: float) -> list[Session]:
        """An authenticated packet arrived on `session`; promote `next` on its first packet.

        For the responder that first packet is the key confirmation, so only now does the handshake
        count as complete (a peer with a wrong PSK gets a response but never gets here).
        """
        dropped: list[Session] = []
        if session is self.next:
            session.confirmed = True
            self.handshake_complete(now, wall)  # as wireguard-go: stops our own retries too
            if self.previous is not None:
                dropped.append(self.previous)
            self.previous = self.current
            self.current = session
            self.next = None
        self.any_authenticated_packet_received(now)
        return dropped

    def expired(self, session: Session, now: float) -> bool:
        """Past reject_after_time: neither used nor accepted. The same sum as `deadline` uses, so
        that polling at the announced deadline always expires the session (floating point)."""
        return now >= session.created + self.timers.reject_after_time

    def expire(self, now: float) -> list[Session]:
        """Drop sessions past reject_after_time; returns them."""
        dropped = []
        for attr in ("previous", "current", "next"):
            s = getattr(self, attr)
            if s is not None and self.expired(s, now):
                dropped.append(s)
                setattr(self, attr, None)
        return dropped

    def sessions(self) -> list[Session]:
        return [s for s in (self.current, self.previous, self.next) if s is not None]

    def _jitter(self) -> float:
        """Uniform in [0, REKEY_TIMEOUT_JITTER_MAX] (wireguard-go draws it with its fast PRNG too)."""
        return self._jitter_rng.uniform(0, C.REKEY_TIMEOUT_JITTER_MAX)

    # -- timer hooks (wireguard-go device/timers.go) ----------------------------------------------

    def handshake_initiated(self, now: float) -> None:
        """timersHandshakeInitiated: retry after rekey_timeout plus jitter unless answered."""
        if self.handshake_started is None:
            self.handshake_started = now
        self.retry_at = now + self.timers.rekey_timeout + self._jitter()

    def handshake_complete(self, now: float, wall: float) -> None:
        """timersHandshakeComplete: stop retrying, record the time for status."""
        self.retry_at = None
        self.handshake_started = None
        self.last_handshake_wall = wall
        self.handshakes += 1

    def data_sent(self, now: float) -> None:
        """timersDataSent: expect an answer within keepalive + rekey_timeout (plus jitter, so two
        peers that both time out do not initiate at the same instant), else rehandshake."""
        if self.new_handshake_at is None:
            self.new_handshake_at = now + self.timers.keepalive_timeout + self.timers.rekey_timeout \
                + self._jitter()

    def data_received(self, now: float) -> None:
        """timersDataReceived: answer within keepalive_timeout, with a keepalive if nothing else."""
        if self.keepalive_at is None:
            self.keepalive_at = now + self.timers.keepalive_timeout

    def any_authenticated_packet_sent(self, now: float) -> None:
        """timersAnyAuthenticatedPacketSent: what we sent answers the peer; no keepalive needed."""
        self.keepalive_at = None
        self.traffic_at = now

    def any_authenticated_packet_received(self, now: float) -> None:
        """timersAnyAuthenticatedPacketReceived: the peer is alive; no new handshake needed."""
        self.new_handshake_at = None
        self.traffic_at = self.received_at = now

    def heard(self, now: float) -> None:
        """An authenticated handshake message came from the peer (its endpoint is confirmed fresh)."""
        self.traffic_at = self.received_at = now

    def set_endpoint(self, endpoint: tuple[str, int] | None, source: str, now: float | None) -> None:
        self.endpoint, self.endpoint_source, self.endpoint_at = endpoint, source, now

    def heard_from_within(self, now: float, seconds: float) -> bool:
        """Whether an authenticated packet from the peer arrived in the last ``seconds``."""
        return self.received_at is not None and now - self.received_at <= seconds

    def _persistent_due(self) -> float | None:
        if self.persistent_keepalive is None or self.endpoint is None:
            return None
        return 0.0 if self.traffic_at is None else self.traffic_at + self.persistent_keepalive

    # -- the timer wheel --------------------------------------------------------------------------

    def deadline(self) -> float | None:
        times = [t for t in (self.retry_at, self.keepalive_at, self.new_handshake_at, self._persistent_due())
                 if t is not None]
        times += [s.created + self.timers.reject_after_time for s in self.sessions()]
        if (p := self.path.deadline()) is not None:
            times.append(p)
        return min(times) if times else None

    def poll(self, now: float) -> tuple[list[Action], list[Session]]:
        """Fire the timers that are due; returns (actions, sessions dropped by expiry)."""
        actions: list[Action] = []
        dropped = self.expire(now)
        if self.retry_at is not None and now >= self.retry_at:
            assert self.handshake_started is not None
            if now - self.handshake_started >= self.timers.rekey_attempt_time:
                self.retry_at = None
                self.handshake_started = None
                self.staged.clear()
                self.new_handshake_at = None
                actions.append(Action.GAVE_UP)
            else:
                actions.append(Action.RETRY)
        if self.new_handshake_at is not None and now >= self.new_handshake_at:
            self.new_handshake_at = None
            if self.retry_at is None:
                actions.append(Action.INITIATE)
        if self.keepalive_at is not None and now >= self.keepalive_at:
            self.keepalive_at = None
            if self.sendable(now) is not None:
                actions.append(Action.KEEPALIVE)
        due = self._persistent_due()
        if due is not None and now >= due:
            self.traffic_at = now  # once per interval, answered or not
            actions.append(Action.PERSISTENT)
        return actions, dropped

    def handshake_in_progress(self) -> bool:
        return self.retry_at is not None
