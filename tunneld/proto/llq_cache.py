"""The answer set an LLQ client holds, and the diff events it reports (:class:`Added`, :class:`Removed`).

Applying the events in order to an empty set gives :meth:`AnswerCache.records` at all times. A full
answer set (an ACK, a poll, an answer fetched over TCP) replaces the cache; an LLQ event (RFC 8764 §7)
changes it record by record, TTL 0xFFFFFFFF meaning removal. TTLs come from the wire (dnspython turns
those above 0x7FFFFFFF into 0).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tunneld.proto.llq_wire import LLQ_REMOVE_TTL

__all__ = ["Added", "AnswerCache", "Removed"]

_RecordKey = tuple[dns.name.Name, int, int]  # name, rdclass, rdtype
_Held = dict[_RecordKey, dict[dns.rdata.Rdata, int]]


@dataclass(frozen=True)
class Added:
    """Records that entered the answer set (one RRset per name and type)."""

    rrset: dns.rrset.RRset


@dataclass(frozen=True)
class Removed:
    """Records that left the answer set."""

    rrset: dns.rrset.RRset


class AnswerCache:
    """One question's answer set; ``counters`` counts what a full answer set should not hold."""

    def __init__(self, counters: Counter[str]) -> None:
        self.counters = counters
        self._cache: _Held = {}

    def records(self) -> list[dns.rrset.RRset]:
        """The current answer set, one RRset per name and type (TTLs as received)."""
        return [_rrset(key, rdatas.items()) for key, rdatas in sorted(
            self._cache.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])) if rdatas]

    def replace(self, answers: Sequence[dns.rrset.RRset], ttls: Sequence[int]) -> list[Added | Removed]:
        """A full answer set (removal TTLs skipped) replaces the cache; what changed."""
        new: _Held = {}
        for rrset, ttl in zip(answers, ttls, strict=True):
            if ttl == LLQ_REMOVE_TTL:
                self.counters["removal TTL in a full answer set"] += 1
                continue
            held = new.setdefault((rrset.name, rrset.rdclass, rrset.rdtype), {})
            for rdata in rrset:
                held[rdata] = ttl
        events: list[Added | Removed] = []
        for key, held in self._cache.items():
            gone = [(rd, ttl) for rd, ttl in held.items() if rd not in new.get(key, {})]
            if gone:
                events.append(Removed(_rrset(key, gone)))
        for key, fresh in new.items():
            held = self._cache.get(key, {})
            came = [(rd, ttl) for rd, ttl in fresh.items() if rd not in held]
            if came:
                events.append(Added(_rrset(key, came)))
        self._cache = {key: dict(held) for key, held in new.items() if held}
        return events

    def apply(self, answers: Sequence[dns.rrset.RRset], ttls: Sequence[int]) -> list[Added | Removed]:
        """An LLQ event's records, one by one: removals (TTL 0xFFFFFFFF) and additions; what changed
        (nothing for a duplicate)."""
        added: dict[_RecordKey, list[tuple[dns.rdata.Rdata, int]]] = {}
        removed: dict[_RecordKey, list[tuple[dns.rdata.Rdata, int]]] = {}
        for rrset, ttl in zip(answers, ttls, strict=True):
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
        events: list[Added | Removed] = [Removed(_rrset(k, gone)) for k, gone in removed.items()]
        events += [Added(_rrset(k, came)) for k, came in added.items()]
        return events


def _rrset(key: _RecordKey, rdatas: Iterable[tuple[dns.rdata.Rdata, int]]) -> dns.rrset.RRset:
    name, rdclass, rdtype = key
    rrset = dns.rrset.RRset(name, dns.rdataclass.RdataClass.make(rdclass),
                            dns.rdatatype.RdataType.make(rdtype))
    items = list(rdatas)
    for rdata, _ttl in items:
        rrset.add(rdata)
    rrset.ttl = min((ttl for _rd, ttl in items), default=0)
    return rrset
