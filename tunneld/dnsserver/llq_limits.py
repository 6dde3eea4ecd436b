"""What the LLQ server admits: request MACs seen (replays), half-open lifetime, caps per address and per key.

A signed LLQ request is unique by its TSIG MAC: the same MAC again within its time window is a copy --
the client's retransmission if it comes from the same source, a replay if from another one. The table is
shared by every client, so no address and no key may take all of it. The reasons and numbers are in
docs/hardening.md ("LLQ limits").
"""

from __future__ import annotations

from collections import Counter
from typing import Final

__all__ = ["CHALLENGE_TIMEOUT", "MACS_KEPT", "MAX_LLQS", "Caps", "Replays", "address_of"]

MAX_LLQS: Final = 10_000
"""The LLQ table's default size (serve-dns --llq-max); a key may hold three quarters, an address a quarter."""

CHALLENGE_TIMEOUT: Final = 30.0
"""Seconds a half-open LLQ (challenge sent, no challenge response yet) is kept: RFC 8764 §5.1's client
sends the setup at 0, 2 and 6 s and the challenge response at most 6 s and 8 s of listening after that
(20 s in all); 30 s leaves room for round trips. Not the lease: an unanswered challenge proves nothing."""
MACS_KEPT: Final = 65536
"""Request MACs remembered at most (a flood of valid signed requests forgets the oldest first)."""

Dest = object


def address_of(src: Dest) -> object:
    """The address part of a source (a socket address's IP; anything else is its own address)."""
    return src[0] if isinstance(src, tuple) and src else src


class Replays:
    """Request MACs of signed LLQ requests and who sent each first, until its TSIG time window closes."""

    def __init__(self, max_kept: int = MACS_KEPT) -> None:
        self.max_kept = max_kept
        self._seen: dict[bytes, tuple[float, Dest]] = {}  # MAC -> (end of its window, first source)

    def __len__(self) -> int:
        return len(self._seen)

    def first(self, mac: bytes, src: Dest, time_signed: int, fudge: int, now: float) -> tuple[Dest, bool]:
        """Who sent ``mac`` first (``src`` if nobody), and whether it was seen before. The MAC is kept for
        the request's own window, its time signed plus its fudge: the TSIG check refuses it after that."""
        self._forget(now)
        seen = self._seen.get(mac)
        if seen is not None:
            return seen[1], True
        while len(self._seen) >= self.max_kept:
            del self._seen[next(iter(self._seen))]
        self._seen[mac] = (time_signed + fudge, src)
        return src, False

    def _forget(self, now: float) -> None:
        seen = self._seen
        while seen:  # oldest first: windows end in about the order the requests came
            mac, (until, _src) = next(iter(seen.items()))
            if until >= now:
                return
            del seen[mac]


class Caps:
    """LLQs held per address (a source's IP, any port) and per TSIG key name (None: unsigned)."""

    def __init__(self, per_address: int, per_key: int) -> None:
        self.per_address = per_address
        self.per_key = per_key
        self._by_address: Counter[object] = Counter()
        self._by_key: Counter[object] = Counter()

    def refuse(self, src: Dest, key: object) -> str | None:
        """Why one more LLQ for ``src`` with ``key`` is refused (None: admitted)."""
        if self._by_address[address_of(src)] >= self.per_address:
            return "address cap"
        if self._by_key[key] >= self.per_key:
            return "key cap"
        return None

    def add(self, src: Dest, key: object) -> None:
        self._by_address[address_of(src)] += 1
        self._by_key[key] += 1

    def remove(self, src: Dest, key: object) -> None:
        for counts, k in ((self._by_address, address_of(src)), (self._by_key, key)):
            counts[k] -= 1
            if counts[k] <= 0:
                del counts[k]
