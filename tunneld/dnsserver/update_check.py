"""The check of a signed UPDATE (RFC 2136 §3) before it is applied or forwarded: the zone section, the
prerequisites against the store, the permission rules (the zone's own records are the server's; added
records need a lease) and the Update Lease option (RFC 9664) clamped to the policy.

Split out of :mod:`tunneld.dnsserver.core` so that the same check serves both the local server, which
applies the changes to its store, and the front (:mod:`tunneld.dnsserver.front`), which forwards them to
a primary server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, cast

import dns.edns
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.update

from tunneld.dnsserver.owner import reserved
from tunneld.dnsserver.store import AddRR, Change, DeleteName, DeleteRR, DeleteRRset, Lease, ZoneStore
from tunneld.proto.dnswire import UPDATE_LEASE_OPTION_CODE, decode_update_lease, encode_update_lease, walk
from tunneld.proto.errors import ParseError

if TYPE_CHECKING:
    from tunneld.dnsserver.core import Policy

__all__ = ["LEASE_OTYPE", "Reject", "check_update", "grant_lease"]

LEASE_OTYPE: Final = cast(dns.edns.OptionType, UPDATE_LEASE_OPTION_CODE)  # dnspython has no name for code 2


class Reject(Exception):
    """The update is refused with ``rcode``."""

    def __init__(self, rcode: dns.rcode.Rcode) -> None:
        super().__init__(rcode)
        self.rcode = rcode


def grant_lease(policy: Policy, req: dns.message.Message) -> tuple[Lease | None, bytes | None]:
    """The granted lease and the reply option's data, in the request's 4/8-byte form (RFC 9664 §4.3)."""
    opts = [o for o in req.options if o.otype == UPDATE_LEASE_OPTION_CODE]
    lo, hi = policy.min_lease, policy.max_lease
    if not opts:
        default = policy.default_lease
        if default is None:
            return None, None
        granted = min(max(default, lo), hi)
        return Lease(granted, granted), None  # no option asked, none in the reply
    if len(opts) > 1:
        raise Reject(dns.rcode.FORMERR)
    try:
        asked, key_asked = decode_update_lease(opts[0].to_wire() or b"")
    except ParseError:
        raise Reject(dns.rcode.FORMERR) from None
    lease = Lease(min(max(asked, lo), hi), min(max(asked if key_asked is None else key_asked, lo), hi))
    return lease, encode_update_lease(lease.lease, None if key_asked is None else lease.key_lease)

def check_update(
    store: ZoneStore, policy: Policy, req: dns.update.UpdateMessage, wire: bytes, now: float
) -> tuple[list[Change], bytes | None, Lease | None]:
    """RFC 2136 §3 in order: zone, prerequisites, permission, prescan. Raises Reject with the rcode."""
    # §3.1 zone section
    if len(req.zone) != 1:
        raise Reject(dns.rcode.FORMERR)
    z = req.zone[0]
    if z.rdclass != dns.rdataclass.IN or z.name != store.zone:
        raise Reject(dns.rcode.NOTAUTH)
    ttls = [r.ttl for r in walk(wire)]
    pre_ttls = ttls[: len(req.prerequisite)]
    upd_ttls = ttls[len(req.prerequisite) : len(req.prerequisite) + len(req.update)]
    # §3.2 prerequisites (dnspython gives one RRset per RR for updates, in wire order)
    wanted: dict[tuple[dns.name.Name, int], set[bytes]] = {}
    for rrset, ttl in zip(req.prerequisite, pre_ttls, strict=True):
        if ttl != 0:
            raise Reject(dns.rcode.FORMERR)
        if not store.in_zone(rrset.name):
            raise Reject(dns.rcode.NOTZONE)
        if rrset.deleting == dns.rdataclass.ANY:
            if rrset.rdtype == dns.rdatatype.ANY:
                if not store.name_in_use(rrset.name, now):
                    raise Reject(dns.rcode.NXDOMAIN)
            elif not store.rrset(rrset.name, rrset.rdtype, now):
                raise Reject(dns.rcode.NXRRSET)
        elif rrset.deleting == dns.rdataclass.NONE:
            if rrset.rdtype == dns.rdatatype.ANY:
                if store.name_in_use(rrset.name, now):
                    raise Reject(dns.rcode.YXDOMAIN)
            elif store.rrset(rrset.name, rrset.rdtype, now):
                raise Reject(dns.rcode.YXRRSET)
        elif rrset.rdclass == dns.rdataclass.IN and not dns.rdatatype.is_metatype(rrset.rdtype):
            wanted.setdefault((rrset.name, rrset.rdtype), set()).update(
                rd.to_digestable() for rd in rrset
            )
        else:
            raise Reject(dns.rcode.FORMERR)
    for (name, rdtype), rdatas in wanted.items():
        if {rr.wire for rr in store.rrset(name, rdtype, now)} != rdatas:
            raise Reject(dns.rcode.NXRRSET)
    # §3.3 permission: the key was checked already; protect the zone's own records; insist on leases
    lease, lease_reply = grant_lease(policy, req)
    changes: list[Change] = []
    for rrset, ttl in zip(req.update, upd_ttls, strict=True):
        if not store.in_zone(rrset.name):
            raise Reject(dns.rcode.NOTZONE)
        rdtype = rrset.rdtype
        if rrset.deleting is None:
            if rrset.rdclass != dns.rdataclass.IN or dns.rdatatype.is_metatype(rdtype):
                raise Reject(dns.rcode.FORMERR)
            changes.extend(AddRR(rrset.name, rrset.ttl, rd) for rd in rrset)
        elif ttl != 0:
            raise Reject(dns.rcode.FORMERR)
        elif rrset.deleting == dns.rdataclass.ANY:
            if rdtype == dns.rdatatype.ANY:
                changes.append(DeleteName(rrset.name))
            elif dns.rdatatype.is_metatype(rdtype):
                raise Reject(dns.rcode.FORMERR)
            else:
                changes.append(DeleteRRset(rrset.name, rdtype))
        else:  # NONE: delete one RR
            if dns.rdatatype.is_metatype(rdtype):
                raise Reject(dns.rcode.FORMERR)
            changes.extend(DeleteRR(rrset.name, rd) for rd in rrset)
    for ch in changes:
        if isinstance(ch, DeleteName):
            protected = ch.owner != store.zone and store.is_protected(ch.owner, dns.rdatatype.ANY)
        elif isinstance(ch, DeleteRRset):
            protected = store.is_protected(ch.owner, ch.rdtype)
        else:
            protected = store.is_protected(ch.owner, ch.rdata.rdtype)
        if protected or reserved(ch.owner, store.zone):  # the front's lease-owner claim: all of _tunneld
            raise Reject(dns.rcode.REFUSED)
    if policy.require_lease and lease is None and any(isinstance(c, AddRR) for c in changes):
        raise Reject(dns.rcode.REFUSED)
    return changes, lease_reply, lease
