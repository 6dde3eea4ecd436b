"""The tunnel port's defences against handshake floods, sans I/O: when cookies engage, who may cost us
X25519 work, and how much of it one receive batch may take.

Three parts, each WireGuard's idea (wireguard-go device/receive.go, ratelimiter/ratelimiter.go), measured
over time with the `now` the caller passes:

- :class:`LoadMeter` -- "under load" once more than ``UNDER_LOAD_RATE`` handshake messages with a valid
  mac1 arrived within one second, and for ``UNDER_LOAD_AFTER_TIME`` after that; under load, a message
  without a valid mac2 gets a cookie reply instead of the Diffie-Hellman work.
- :class:`SourceLimiter` -- under load, after mac2 proved the source address: a token bucket per source
  (an IPv4 address, an IPv6 /64), ``SOURCE_RATE`` per second with a burst of ``SOURCE_BURST``, in a
  bounded table.
- the same token bucket for cookie replies, per source: a flood that spreads over many ports of a few
  addresses gets a few cookie replies a second instead of one per message (a genuine initiator needs
  one per retry), which bounds both our cost and what a spoofed flood makes us send to a victim.
- a per-batch budget of X25519 work (``WORK_PER_BATCH``) and of cookie replies (``COOKIES_PER_BATCH``),
  so that a receive batch full of handshake messages cannot hold up the data in the batches behind it;
  the excess is dropped, never queued.

docs/hardening.md ("The tunnel port under load") gives the reasoning behind the numbers.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Final

from tunneld.proto.handshake_wire import packed_address

UNDER_LOAD_RATE: Final = 128
"""Handshake messages (valid mac1) per second beyond which we are under load: at about 0.2-0.6 ms of
X25519 work each, 128 a second is a few percent of one core, and more than a whole account's devices
sending at once after a network change."""
LOAD_WINDOW: Final = 1.0  # seconds over which UNDER_LOAD_RATE is counted
UNDER_LOAD_AFTER_TIME: Final = 1.0
"""Seconds we stay under load after the rate last exceeded the threshold (wireguard-go
``UnderLoadAfterTime``), so that a flood in bursts does not flap in and out of cookie mode."""

SOURCE_RATE: Final = 20.0  # handshake messages per second per source (wireguard-go packetsPerSecond)
SOURCE_BURST: Final = 5  # of which this many at once (wireguard-go packetsBurstable)
SOURCE_TABLE_SIZE: Final = 4096
"""Sources tracked at most; the least recently seen is forgotten first (it then starts a full bucket,
which costs at most SOURCE_BURST messages of work: each source needs a cookie from a real address)."""
IPV6_PREFIX_BYTES: Final = 8  # IPv6 sources are counted by /64, as WireGuard: one host owns the /64

WORK_PER_BATCH: Final = 16
"""Handshake messages per receive batch that get X25519 work: 16 x ~0.5 ms keeps the data behind a batch
waiting a few milliseconds at most; a larger burst of genuine handshakes retries after rekey_timeout."""
COOKIES_PER_BATCH: Final = 64
"""Cookie replies per receive batch: 64 x ~30 us (an XChaCha20-Poly1305 and a MAC each) is about what
reading and checking a full batch of 256 datagrams costs, so cookie replies can at most double the cost
of a flood of replayed initiations, however fast it comes."""


class LoadMeter:
    """Handshake load over time: the arrival times of the last ``rate + 1`` messages (bounded memory)."""

    def __init__(self, rate: int = UNDER_LOAD_RATE, window: float = LOAD_WINDOW,
                 after: float = UNDER_LOAD_AFTER_TIME) -> None:
        self.window = window
        self.after = after
        self._arrivals: deque[float] = deque(maxlen=rate + 1)
        self._until = -1.0
        self.episodes = 0  # how many times we went under load

    def arrived(self, now: float) -> bool:
        """Count one message at ``now``; whether we are under load for it."""
        arrivals = self._arrivals
        arrivals.append(now)
        if len(arrivals) == arrivals.maxlen and now - arrivals[0] < self.window:
            if now >= self._until:
                self.episodes += 1
            self._until = now + self.after
        return now < self._until

    def under_load(self, now: float) -> bool:
        return now < self._until

    def recent(self, now: float) -> int:
        """Messages within the last window (capped at rate + 1)."""
        return sum(1 for t in self._arrivals if now - t < self.window)


def source_key(host: str) -> bytes | None:
    """What a source is counted by: its IPv4 address (also when IPv4-mapped), or its IPv6 /64; None if
    ``host`` is not an address."""
    packed = packed_address(host)
    return packed if packed is None or len(packed) == 4 else packed[:IPV6_PREFIX_BYTES]


class SourceLimiter:
    """WireGuard's ratelimiter: a token bucket per source key, in a bounded least-recently-used table."""

    def __init__(self, rate: float = SOURCE_RATE, burst: int = SOURCE_BURST,
                 size: int = SOURCE_TABLE_SIZE) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.size = size
        self._table: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._table)

    def allow(self, host: str, now: float) -> bool:
        """Take one message from ``host``'s bucket; False when it is empty (or ``host`` is no address)."""
        key = source_key(host)
        if key is None:
            return False
        table = self._table
        entry = table.get(key)
        if entry is None:
            if len(table) >= self.size:
                table.popitem(last=False)
                self.evictions += 1
            table[key] = (self.burst - 1.0, now)
            return True
        tokens, at = entry
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        table.move_to_end(key)
        allowed = tokens >= 1.0
        table[key] = (tokens - 1.0 if allowed else tokens, now)
        return allowed


class HandshakeLoad:
    """The three defences of one Handshaker, and their counters (:meth:`status`)."""

    def __init__(self, meter: LoadMeter | None = None, limiter: SourceLimiter | None = None,
                 work_per_batch: int = WORK_PER_BATCH, cookies_per_batch: int = COOKIES_PER_BATCH,
                 cookie_limiter: SourceLimiter | None = None) -> None:
        self.meter = LoadMeter() if meter is None else meter
        # `is None`, not `or`: a SourceLimiter with an empty table is falsy (it has a length).
        self.limiter = SourceLimiter() if limiter is None else limiter
        self.cookie_limiter = SourceLimiter() if cookie_limiter is None else cookie_limiter
        self.work_per_batch = work_per_batch
        self.cookies_per_batch = cookies_per_batch
        # What is left of this batch's budgets; None: no batch begun, no budget (a Handshaker on its own).
        self._work_left: int | None = None
        self._cookies_left: int | None = None
        self.cookie_replies = 0
        self.worked = 0  # messages that got the X25519 work

    def begin_batch(self) -> None:
        """A new receive batch: its handshake messages share ``work_per_batch`` X25519 work and
        ``cookies_per_batch`` cookie replies."""
        self._work_left = self.work_per_batch
        self._cookies_left = self.cookies_per_batch

    def end_batch(self) -> None:
        self._work_left = self._cookies_left = None

    def take_work(self) -> bool:
        """Whether one more message of this batch may have the X25519 work (and count it if so)."""
        if self._work_left is not None:
            if self._work_left <= 0:
                return False
            self._work_left -= 1
        self.worked += 1
        return True

    def take_cookie(self, host: str, now: float) -> bool:
        """Whether one more message of this batch, from ``host``, may have a cookie reply: within the
        batch's budget and ``host``'s bucket."""
        if not self.cookie_limiter.allow(host, now):
            return False
        if self._cookies_left is not None:
            if self._cookies_left <= 0:
                return False
            self._cookies_left -= 1
        return True

    def status(self, now: float) -> dict[str, Any]:
        """For `tunneld status`: whether we are under load and what the defences did."""
        return {
            "under_load": self.meter.under_load(now),
            "recent": self.meter.recent(now),
            "under_load_episodes": self.meter.episodes,
            "worked": self.worked,
            "cookie_replies": self.cookie_replies,
            "sources_tracked": len(self.limiter),
            "source_evictions": self.limiter.evictions,
            "cookie_sources_tracked": len(self.cookie_limiter),
        }
