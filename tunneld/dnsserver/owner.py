"""The lease owner of a zone in front mode: one front per zone, claimed on the primary, refused otherwise.

Only one front may keep a zone's leases: a second one would delete, at expiry, records the first renewed.
At start the front claims the zone with a TXT record at ``_lease-owner._tunneld.<zone>`` holding a random
front ID (kept in its store's ``meta``) and its host name, written by an RFC 2136 UPDATE whose
prerequisite makes the claim atomic on the primary: "RRset does not exist" for a first claim,
"RRset exists (value dependent)" with our own TXT for each later start (§2.4.3, §2.4.2). Another front's
claim stops the start (:class:`OwnerConflict`, exit 2) unless ``--take-over`` replaces it; the front that
takes over adopts the records it finds without a lease (the longest lease a device may ask). A running
front whose feed shows another claim stops forwarding and deleting (:attr:`LeaseOwner.lost`). Devices
may not touch anything under ``_tunneld.<zone>`` (:func:`reserved`). docs/protocol.md, "One front per zone".
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.TXT
import dns.update
import trio

from tunneld.dnsserver.front import Forward, read_reply
from tunneld.dnsserver.store import Change, RRsetRemoval, ZoneStore, canonical
from tunneld.proto.dnsguard import from_checked
from tunneld.proto.errors import ParseError
from tunneld.proto.notify_wire import signed_answer, signed_question
from tunneld.proto.tsig import TsigError, TsigKey, sign
from tunneld.proto.xfr import Full, TransferReader, TransferResult, transfer_query

__all__ = ["OWNER_META", "RESERVED_LABEL", "ClaimFailed", "LeaseOwner", "OwnerConflict", "claim",
           "owner_name", "reserved", "take_over", "watching"]

log = logging.getLogger(__name__)

RESERVED_LABEL: Final = "_tunneld"
"""The label under the zone apex that is the front's own: no device update may touch a name under it."""
OWNER_LABEL: Final = "_lease-owner"
OWNER_META: Final = "lease-owner"
"""The store's ``meta`` row holding our claim: the TXT RDATA in presentation form."""
OWNER_TTL: Final = 60
CLAIM_RETRY_FIRST: Final = 2.0
CLAIM_RETRY_MAX: Final = 60.0
"""A claim the primary did not answer (it is down, or not reachable yet) is asked again after
CLAIM_RETRY_FIRST seconds, doubling up to CLAIM_RETRY_MAX; the front serves meanwhile, refusing updates."""
MAX_ANSWER: Final = 4096
"""Bytes of the primary's answer to our TXT query read: a claim is one TXT of some 60 bytes."""


class OwnerConflict(Exception):
    """Another front holds the zone's claim: the one-line message says whose, and the fix."""


class ClaimFailed(Exception):
    """The primary did not take or answer the claim."""


class ClaimUnanswered(ClaimFailed):
    """The primary did not answer the claim (down, or unreachable): worth asking again."""


def owner_name(zone: dns.name.Name) -> dns.name.Name:
    return dns.name.Name((OWNER_LABEL, RESERVED_LABEL)).concatenate(zone)


def reserved(name: dns.name.Name, zone: dns.name.Name) -> bool:
    """Is ``name`` at or under ``_tunneld.<zone>`` (the front's, never a device's)?"""
    return name.is_subdomain(dns.name.Name((RESERVED_LABEL,)).concatenate(zone))


def _txt(text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, text)


def new_claim(rand: Callable[[int], bytes], host: str) -> dns.rdata.Rdata:
    """A claim's TXT: ``"id=<16 hex digits>" "host=<host>"`` (the host only says where to look)."""
    safe = "".join(c for c in host if c.isascii() and (c.isalnum() or c in "-._"))[:63] or "unknown"
    return _txt(f'"id={rand(8).hex()}" "host={safe}"')


def describe(rdata: dns.rdata.Rdata) -> str:
    """A claim for a person: ``front id X on host Y`` (any TXT shown as it is)."""
    if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT):
        parts = dict(s.decode("ascii", "replace").partition("=")[::2] for s in rdata.strings)
        if "id" in parts:
            return f"front id {parts['id']} on host {parts.get('host', '?')}"
    return rdata.to_text()


def claim_update(zone: dns.name.Name, rdata: dns.rdata.Rdata, mode: str, msg_id: int, key: TsigKey,
                 now: float) -> Forward:
    """The claim UPDATE, signed with ``key``: ``first`` adds our TXT if the RRset does not exist; ``again``
    only asks that it exists holding exactly our TXT; ``take-over`` replaces whatever is there."""
    name = owner_name(zone)
    upd = dns.update.UpdateMessage(zone, id=msg_id)
    if mode == "first":
        upd.absent(name, dns.rdatatype.TXT)  # RFC 2136 §2.4.3: class NONE, TTL 0, no RDATA
        upd.add(name, OWNER_TTL, rdata)  # §2.5.1
    elif mode == "again":
        upd.present(name, rdata)  # §2.4.2: class IN, TTL 0, our RDATA
    elif mode == "take-over":
        upd.replace(name, OWNER_TTL, rdata)  # §2.5.2 (class ANY: the RRset deleted), then §2.5.1
    else:
        raise ValueError(f"claim mode {mode!r}")
    wire, mac = sign(upd.to_wire(), key, int(now))
    return Forward(msg_id, wire, mac)


def claim_query(zone: dns.name.Name, msg_id: int, key: TsigKey, now: float) -> Forward:
    """The question ``_lease-owner._tunneld.<zone>`` TXT IN for the primary, signed with ``key``."""
    wire, mac = signed_question(owner_name(zone), dns.rdatatype.TXT, key, msg_id, now)
    return Forward(msg_id, wire, mac)


def read_claims(wire: bytes, query: Forward, zone: dns.name.Name, key: TsigKey,
                now: float) -> list[dns.rdata.Rdata]:
    """The TXT records at the owner name in the primary's answer to ``query`` (empty: no claim). ParseError
    for anything but a signed NOERROR or NXDOMAIN answer to it."""
    _, flags = signed_answer(wire, query.msg_id, query.mac, key, now, MAX_ANSWER)
    msg = from_checked(wire)
    if msg.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or flags & dns.flags.TC:
        raise ParseError(f"rcode {dns.rcode.to_text(msg.rcode())}")
    name = owner_name(zone)
    return [rd for rrset in msg.answer if rrset.name == name and rrset.rdtype == dns.rdatatype.TXT
            for rd in rrset]


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``forward`` to the primary; its reply goes to :meth:`LeaseOwner.claim_reply` (``query``:
    :meth:`LeaseOwner.query_reply`)."""

    forward: Forward
    query: bool = False


class LeaseOwner:
    """The claim of one zone for this front, sans-I/O: :meth:`start`, then each reply to what it says to
    send, until one returns None (claimed) or raises (:class:`OwnerConflict`, :class:`ClaimFailed`)."""

    def __init__(self, store: ZoneStore, key: TsigKey, *, host: str, take_over: bool = False,
                 rand: Callable[[int], bytes] = os.urandom) -> None:
        self.store = store
        self.key = key
        self.take_over = take_over
        self._rand = rand
        saved = store.meta(OWNER_META)
        self.claim = _txt(saved) if saved is not None else new_claim(rand, host)
        self._mode = "take-over" if take_over else "again" if saved is not None else "first"
        self.claimed = False
        self.lost = False
        """Another front's claim showed up while we served: no more forwards nor deletions."""
        self.counters: Counter[str] = Counter()

    @property
    def serving(self) -> bool:
        """The zone's leases are ours: updates are forwarded and expired records deleted."""
        return self.claimed and not self.lost

    @property
    def name(self) -> dns.name.Name:
        return owner_name(self.store.zone)

    def _id(self) -> int:
        return int.from_bytes(self._rand(2), "big")

    def _save(self) -> None:
        text = self.claim.to_text()

        def put(db: sqlite3.Connection) -> bool:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (OWNER_META, text))
            return False

        self.store.replica_apply(put)

    def start(self, now: float) -> Send:
        """The first claim UPDATE (our claim saved first: if the primary takes it and we stop before
        reading the answer, the next start asks for it as our own)."""
        self._save()
        return Send(claim_update(self.store.zone, self.claim, self._mode, self._id(), self.key, now))

    def claim_reply(self, send: Send, reply: bytes | None, now: float) -> Send | None:
        """None: the zone is ours. A Send: ask the primary whose claim stopped ours."""
        if reply is None:
            raise ClaimUnanswered("no answer")
        try:
            rcode = read_reply(reply, send.forward, self.key, now)
        except (ParseError, TsigError) as e:
            raise ClaimFailed(f"a bad answer ({e})") from None
        if rcode == dns.rcode.NOERROR:
            self.claimed = True
            self.counters[f"claimed ({self._mode})"] += 1
            log.info("zone %s: this front owns its leases (%s)", self.store.zone, describe(self.claim))
            return None
        if rcode in (dns.rcode.YXRRSET, dns.rcode.NXRRSET) and self._mode != "take-over":
            return Send(claim_query(self.store.zone, self._id(), self.key, now), query=True)
        raise ClaimFailed(f"the answer {dns.rcode.to_text(dns.rcode.Rcode.make(rcode))}")

    def query_reply(self, send: Send, reply: bytes | None, now: float) -> Send | None:
        """The primary's TXT at the owner name: none (the primary lost it, e.g. a zone made anew) makes a
        first claim once more; exactly ours (a server that compares TXT prerequisites otherwise) is ours:
        None; another front's raises :class:`OwnerConflict`."""
        if reply is None:
            raise ClaimUnanswered("no answer to the owner query")
        try:
            claims = read_claims(reply, send.forward, self.store.zone, self.key, now)
        except ParseError as e:
            raise ClaimFailed(f"a bad answer to the owner query ({e})") from None
        if claims == [self.claim]:
            self.claimed = True
            self.counters["claimed (held already)"] += 1
            log.info("zone %s: this front owns its leases (%s)", self.store.zone, describe(self.claim))
            return None
        if not claims and self._mode == "again":
            self._mode = "first"
            return Send(claim_update(self.store.zone, self.claim, "first", self._id(), self.key, now))
        others = ", ".join(describe(c) for c in claims if c != self.claim) or "a claim being changed"
        zone = self.store.zone.to_text()
        raise OwnerConflict(
            f"zone {zone} has another front ({others}) that owns its leases; stop that front, or, if its "
            f"machine is gone for good, start this one with serve-dns --take-over")

    # ---- while serving ---------------------------------------------------------------------------------

    def check(self, now: float) -> bool:
        """After the feed applied a transfer: is the claim in the replica still ours? If not, once: log at
        error, and :attr:`lost` (the caller stops forwarding and deleting). True while it is ours."""
        if self.lost or not self.claimed:  # not yet claimed (the primary was down): nothing to lose
            return not self.lost
        held = [rr.rdata for rr in self.store.rrset(self.name, dns.rdatatype.TXT, now)]
        if held == [self.claim]:
            return True
        self.lost = True
        self.counters["claim lost"] += 1
        others = ", ".join(describe(c) for c in held) or "none"
        log.error("zone %s: another front took over its leases (the claim is now: %s); this front no longer "
                  "forwards updates nor deletes expired records: stop it", self.store.zone, others)
        return False

    def refused(self) -> None:
        self.counters["update refused: not the lease owner" if self.lost
                      else "update refused: the claim not answered yet"] += 1

    def adoption_query(self, now: float) -> TransferReader:
        """The AXFR whose records :meth:`adopt` takes (the whole zone as the primary holds it)."""
        return TransferReader(transfer_query(self.store.zone, self.key, self._id(), now, None), self.key)

    def adopt(self, result: TransferResult | None, now: float, lease: int) -> int:
        """After a take-over, once the replica is current: each record of the primary's zone (``result``,
        the answer to :meth:`adoption_query`) that a device could have added and that has no lease in our
        store gets ``lease`` seconds, so that a device that renews through this front keeps it and one that
        never does goes. Not adopted: the apex, NS records and their targets' addresses (the zone's own
        data), the server's records, anything under ``_tunneld``. The count."""
        if not isinstance(result, Full):
            self.counters["adoption: no zone transfer"] += 1
            log.error("zone %s: taken over, but the primary's zone could not be read: no record adopted; the "
                      "records the other front leased stay until deleted by hand", self.store.zone)
            return 0
        zone = self.store.zone
        static = {rec.rdata.target for rec in result.records if rec.rdtype == dns.rdatatype.NS
                  and isinstance(rec.rdata, dns.rdtypes.ANY.NS.NS)}
        static |= {rec.owner for rec in result.records if rec.rdtype == dns.rdatatype.NS}
        keys = {(canonical(rec.owner), rec.rdtype, rec.rdata.to_digestable(zone)) for rec in result.records
                if rec.owner != zone and rec.owner not in static and not reserved(rec.owner, zone)
                and not self.store.is_protected(rec.owner, rec.rdtype)}
        count = 0

        def give(db: sqlite3.Connection) -> bool:
            nonlocal count
            for key in keys:
                count += db.execute("UPDATE records SET expires=? WHERE owner=? AND rdtype=? AND rdata=? AND "
                                    "expires IS NULL", (now + lease, *key)).rowcount
            return False

        self.store.replica_apply(give)
        self.counters["records adopted"] += count
        log.warning("zone %s: taken over; %d record(s) without a lease adopted with a lease of %d s",
                    zone, count, lease)
        return count


class TransferLink(Protocol):
    async def transfer(self, reader: TransferReader, clock: Callable[[], float]) -> TransferResult | None: ...


class Exchange(Protocol):
    async def __call__(self, forward: Forward, /) -> bytes | None: ...


async def take_over(owner: LeaseOwner, link: TransferLink, lease: int, clock: Callable[[], float]) -> int:
    """After a take-over claim: the primary's zone read and its records without a lease adopted."""
    reader = owner.adoption_query(clock())
    return owner.adopt(await link.transfer(reader, clock), clock(), lease)


async def claim(owner: LeaseOwner, exchange: Exchange, clock: Callable[[], float]) -> None:
    """Claim the zone through ``exchange`` (the primary link's): returns once it is ours; raises
    :class:`OwnerConflict` or :class:`ClaimFailed` (with the reason) otherwise."""
    send: Send | None = owner.start(clock())
    for _ in range(4):  # first claim, owner query, first claim again: three at most
        if send is None:
            return
        reply = await exchange(send.forward)
        now = clock()
        send = owner.query_reply(send, reply, now) if send.query else owner.claim_reply(send, reply, now)
    if send is not None:
        raise ClaimFailed("the claim did not settle")


Deliver = Callable[[Sequence[Change | RRsetRemoval], float], Awaitable[None]]


def watching(owner: LeaseOwner, deliver: Deliver) -> Deliver:
    """``deliver`` for the change feed, checking the claim first (:meth:`LeaseOwner.check`)."""

    async def checked(changes: Sequence[Change | RRsetRemoval], now: float) -> None:
        owner.check(now)
        await deliver(changes, now)

    return checked


async def claim_later(settle: Callable[[], Awaitable[None]], zone: dns.name.Name) -> None:
    """``settle`` (the claim, and a take-over's adoption) asked again with a backoff until the primary
    answers; what it raises then (:class:`OwnerConflict`, another :class:`ClaimFailed`) ends the front."""
    delay = CLAIM_RETRY_FIRST
    while True:
        await trio.sleep(delay)
        try:
            await settle()
        except ClaimUnanswered as e:
            delay = min(delay * 2, CLAIM_RETRY_MAX)
            log.warning("zone %s: the primary still does not answer this front's claim (%s); again in %.0f s",
                        zone, e, delay)
            continue
        return
