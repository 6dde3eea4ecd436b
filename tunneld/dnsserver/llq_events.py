"""The contents of LLQ events (RFC 8764 §7): answer sets, their diff, and its packing into datagrams.

Pure functions of the LLQ server (:mod:`tunneld.dnsserver.llq`). An answer set is held as records with
their TTLs; a diff lists one record per RRset (a removal with TTL 0xFFFFFFFF); a diff too large for one
datagram is split, because an event is UDP and must fit the client's EDNS size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tunneld.proto.llq_wire import LLQ_REMOVE_TTL

__all__ = ["Records", "diff", "records", "split"]

Key = tuple[dns.name.Name, int]
Records = dict[Key, dict[dns.rdata.Rdata, int]]


def records(answers: Iterable[dns.rrset.RRset]) -> Records:
    """The answer set of ``answers``: per name and type, each record and its TTL."""
    out: Records = {}
    for rrset in answers:
        held = out.setdefault((rrset.name, rrset.rdtype), {})
        for rdata in rrset:
            held[rdata] = rrset.ttl
    return {k: v for k, v in out.items() if v}


def _one(key: Key, rdata: dns.rdata.Rdata, ttl: int) -> dns.rrset.RRset:
    name, rdtype = key
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.RdataType.make(rdtype))
    rrset.add(rdata)
    rrset.ttl = ttl  # set after add: add() would lower it to the minimum of the TTLs given
    return rrset


def diff(old: Records, new: Records) -> list[dns.rrset.RRset]:
    """What turns ``old`` into ``new``: removals first (TTL 0xFFFFFFFF), then additions and TTL changes
    (their TTL); one record per RRset. Each record appears at most once, so parts may be reordered."""
    changed: list[dns.rrset.RRset] = []
    for key, held in old.items():
        changed.extend(_one(key, rd, LLQ_REMOVE_TTL) for rd in held if rd not in new.get(key, {}))
    for key, fresh in new.items():
        held = old.get(key, {})
        changed.extend(_one(key, rd, ttl) for rd, ttl in fresh.items() if held.get(rd) != ttl)
    return changed


def split(changed: list[dns.rrset.RRset], size_of: Callable[[list[dns.rrset.RRset]], int],
          room: int) -> list[list[dns.rrset.RRset]]:
    """``changed`` in parts whose messages fit ``room`` bytes; ``size_of(answers)`` renders a message.
    A record is measured next to the question alone, an upper bound (in a message it may compress
    more). A record that fits no message alone still goes, alone."""
    base = size_of([])
    parts: list[list[dns.rrset.RRset]] = [[]]
    size = base
    for rrset in changed:
        extra = size_of([rrset]) - base
        if parts[-1] and size + extra > room:
            parts.append([])
            size = base
        parts[-1].append(rrset)
        size += extra
    return parts
