"""Response rate limiting of the rendezvous server's UDP replies, in the spirit of BIND's RRL.

UDP sources can be forged, so a server that answers every query reflects traffic at whoever is named as
the source. Replies are counted per source prefix (IPv4 /24, IPv6 /56: one site, as BIND's defaults) in
token buckets of replies per second, one per kind of reply: answers, errors (any other rcode, NXDOMAIN
included, as BIND's errors-per-second), and replies to requests signed with an account key (a much higher
rate: they are our own clients, but a captured signed query can be replayed from forged sources within
its TSIG window). Beyond the rate a reply is dropped, except every ``slip``-th, which is sent as an empty
truncated reply (TC=1, question only: no larger than the query) so that a real client behind a limited
prefix retries over TCP, which cannot be forged.

Sans-I/O: :meth:`ResponseLimiter.check` takes ``now`` (monotonic seconds). The table is bounded (least
recently used prefixes are forgotten first) and its counters are exposed.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Final

from tunneld.proto.dnsguard import name_end
from tunneld.proto.dnswire import HEADER_SIZE
from tunneld.proto.errors import ParseError

__all__ = ["Kind", "ResponseLimiter", "RrlLimits", "Verdict", "kind_of", "prefix_of", "truncated"]

IPV4_PREFIX: Final = 24
IPV6_PREFIX: Final = 56
_TC: Final = 0x0200  # RFC 1035 §4.1.1: TC in the flags word
_QUESTION_FIXED: Final = 4  # QTYPE, QCLASS (RFC 1035 §4.1.2)


class Kind(enum.Enum):
    ANSWER = "answer"
    ERROR = "error"
    SIGNED = "signed"


class Verdict(enum.Enum):
    SEND = "send"
    DROP = "drop"
    SLIP = "slip"  # send the truncated form instead (see :func:`truncated`)


@dataclass(frozen=True, slots=True)
class RrlLimits:
    """Rates are replies per second per prefix; each bucket holds ``burst`` seconds of its rate."""

    answers_per_second: float = 20.0
    errors_per_second: float = 10.0
    signed_per_second: float = 500.0
    burst: float = 2.0
    slip: int = 2
    """Every slip-th limited reply is sent truncated; 0 drops them all, 1 truncates them all."""
    max_prefixes: int = 100_000
    enabled: bool = True
    """False: every reply is sent (``tunneld serve-dns --rate-limit 0``)."""

    def __post_init__(self) -> None:
        rates = (self.answers_per_second, self.errors_per_second, self.signed_per_second)
        if min(rates) <= 0 or self.burst <= 0 or self.slip < 0 or self.max_prefixes < 1:
            raise ValueError("rates, burst and table size must be positive, slip at least 0")

    def rate(self, kind: Kind) -> float:
        if kind is Kind.ANSWER:
            return self.answers_per_second
        if kind is Kind.ERROR:
            return self.errors_per_second
        return self.signed_per_second


def prefix_of(source: object) -> str:
    """The prefix a UDP source counts against: IPv4 /24, IPv6 /56 (IPv4-mapped: IPv4)."""
    host = source[0] if isinstance(source, tuple) and source else source
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = IPV4_PREFIX if isinstance(ip, ipaddress.IPv4Address) else IPV6_PREFIX
    return str(ipaddress.ip_network((ip, bits), strict=False))


def kind_of(reply: bytes, signed: bool) -> Kind:
    """The bucket a reply (our own, so well-formed) is counted in: signed, an answer, or an error."""
    if signed:
        return Kind.SIGNED
    rcode = reply[3] & 0xF if len(reply) >= HEADER_SIZE else 0xF
    return Kind.ANSWER if rcode == 0 else Kind.ERROR


def truncated(reply: bytes) -> bytes:
    """The slip form of one of our replies: its header with TC set and its question, nothing else."""
    if len(reply) < HEADER_SIZE:
        return reply
    (qdcount,) = struct.unpack_from("!H", reply, 4)
    end = HEADER_SIZE
    if qdcount == 1:
        try:
            end = name_end(reply, HEADER_SIZE) + _QUESTION_FIXED
        except ParseError:
            qdcount, end = 0, HEADER_SIZE
    else:
        qdcount = 0
    msg_id, flags = struct.unpack_from("!HH", reply)
    return struct.pack("!HHHHHH", msg_id, flags | _TC, qdcount, 0, 0, 0) + reply[HEADER_SIZE:end]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    limited: int = 0


class ResponseLimiter:
    """Token buckets of replies per (prefix, kind); see the module docstring."""

    def __init__(self, limits: RrlLimits | None = None) -> None:
        self.limits = limits or RrlLimits()
        self._buckets: OrderedDict[tuple[str, Kind], _Bucket] = OrderedDict()
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, source: object, kind: Kind, now: float) -> Verdict:
        """May a reply of ``kind`` go to ``source`` at ``now``?"""
        limits = self.limits
        if not limits.enabled:
            return Verdict.SEND
        key = (prefix_of(source), kind)
        rate = limits.rate(kind)
        capacity = rate * limits.burst
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= limits.max_prefixes:
                self._buckets.popitem(last=False)
                self.counters["forgotten"] += 1
            bucket = self._buckets[key] = _Bucket(capacity, now)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(capacity, bucket.tokens + max(0.0, now - bucket.at) * rate)
            bucket.at = max(bucket.at, now)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            self.counters[f"sent: {kind.value}"] += 1
            return Verdict.SEND
        bucket.limited += 1
        if limits.slip and bucket.limited % limits.slip == 0:
            self.counters[f"slipped: {kind.value}"] += 1
            return Verdict.SLIP
        self.counters[f"dropped: {kind.value}"] += 1
        return Verdict.DROP
