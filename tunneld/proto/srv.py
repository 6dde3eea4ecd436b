"""Finding a service's server by SRV (RFC 2782): the query, and the choice among the answer's targets.

Sans-I/O: the query and the answer are bytes; the weighted choice draws from the injected ``rand``. With
the account key the query is signed (TSIG, at the ``now`` given) and only a reply signed over it counts:
the account's server answers its own clients' signed queries.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.rdtypes.IN.SRV

from tunneld.proto.dnsguard import parse
from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import TsigError, TsigKey, sign, verify

__all__ = ["LLQ_SRV_SERVICE", "LLQ_TLS_SRV_SERVICE", "PUSH_TLS_SRV_SERVICE", "QUERY_TLS_SRV_SERVICE",
           "TURN_SRV_SERVICE", "UPDATE_SRV_SERVICE", "UPDATE_TLS_SRV_SERVICE", "SrvQuery", "build_srv_query",
           "pick_srv_target"]

UPDATE_SRV_SERVICE: Final = "_dns-update._udp"  # RFC 2136 servers (DNS-SD, RFC 6763 §10)
LLQ_SRV_SERVICE: Final = "_dns-llq._udp"  # RFC 8764 §5.1
TURN_SRV_SERVICE: Final = "_turn._udp"  # RFC 5928 §3 (TURN over UDP)
# DNS over TLS (RFC 7858): the names mDNSResponder's dnsextd registered for UPDATE, queries and LLQ over TLS,
# and RFC 8765 §6.1's for DNS Push. Their targets are the server's TLS port (853 unless told otherwise).
UPDATE_TLS_SRV_SERVICE: Final = "_dns-update-tls._tcp"  # dnsextd (mDNSResponder uDNS.c)
QUERY_TLS_SRV_SERVICE: Final = "_dns-query-tls._tcp"  # dnsextd (mDNSResponder uDNS.c)
LLQ_TLS_SRV_SERVICE: Final = "_dns-llq-tls._tcp"  # dnsextd (mDNSResponder uDNS.c): LLQ set up over TLS
PUSH_TLS_SRV_SERVICE: Final = "_dns-push-tls._tcp"  # RFC 8765 §6.1


class SrvQuery(NamedTuple):
    """A query to send, and its message ID (which the answer must echo); if signed, the key and the
    query's MAC, over which the answer must be signed."""

    payload: bytes
    message_id: int
    key: TsigKey | None = None
    mac: bytes = b""


def build_srv_query(domain: str | dns.name.Name, rand: Callable[[int], bytes] = os.urandom,
                    service: str = UPDATE_SRV_SERVICE, *, key: TsigKey | None = None,
                    now: float = 0.0) -> SrvQuery:
    """A recursive SRV query for ``<service>.<domain>`` (``_dns-update._udp`` by default), signed with
    ``key`` at ``now`` (Unix seconds) if a key is given."""
    zone = domain if isinstance(domain, dns.name.Name) else dns.name.from_text(domain)
    qname = dns.name.from_text(service, zone)
    message_id = int.from_bytes(rand(2), "big")
    wire = dns.message.make_query(qname, dns.rdatatype.SRV, id=message_id).to_wire()
    if key is None:
        return SrvQuery(wire, message_id)
    signed, mac = sign(wire, key, int(now))
    return SrvQuery(signed, message_id, key, mac)


def pick_srv_target(wire: bytes, query: SrvQuery, rand: Callable[[int], bytes] = os.urandom,
                    now: float = 0.0) -> tuple[str, int] | None:
    """(target host, port) from the answer to ``query``, chosen as RFC 2782 says: the lowest priority,
    then at random by weight. None if the answer has no SRV for the name, or the target is "." (the
    service is decidedly not available). Raises ParseError for a malformed or non-matching answer, and
    for a signed query's answer whose TSIG does not verify at ``now``."""
    if query.key is not None:
        try:
            verify(wire, query.key, query.mac, now)
        except TsigError as e:
            raise ParseError(f"tsig: {e}") from None
    msg = parse(wire)
    sent = parse(query.payload)
    if not msg.flags & dns.flags.QR or msg.id != query.message_id:
        raise ParseError("not our answer")
    if [(q.name, q.rdtype) for q in msg.question] != [(q.name, q.rdtype) for q in sent.question]:
        raise ParseError("question mismatch")
    qname = sent.question[0].name
    records: list[dns.rdtypes.IN.SRV.SRV] = []
    for rrset in msg.answer:
        if rrset.name == qname and rrset.rdtype == dns.rdatatype.SRV:
            records.extend(rd for rd in rrset if isinstance(rd, dns.rdtypes.IN.SRV.SRV))
    if not records:
        return None
    best = min(r.priority for r in records)
    choice = _weighted_pick([r for r in records if r.priority == best], rand)
    if choice.target == dns.name.root:
        return None
    return choice.target.to_text(omit_final_dot=True), choice.port


def _weighted_pick(records: Sequence[dns.rdtypes.IN.SRV.SRV],
                   rand: Callable[[int], bytes]) -> dns.rdtypes.IN.SRV.SRV:
    """RFC 2782: a random order with the zero weights first, running sums, a random number in [0, total],
    the first record whose running sum reaches it."""
    shuffled = list(records)
    for i in range(len(shuffled) - 1, 0, -1):  # Fisher-Yates with the injected rand
        j = int.from_bytes(rand(4), "big") % (i + 1)
        shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
    ordered = sorted(shuffled, key=lambda r: r.weight != 0)
    total = sum(r.weight for r in ordered)
    pick = int.from_bytes(rand(4), "big") % (total + 1)
    running = 0
    for record in ordered:
        running += record.weight
        if running >= pick:
            return record
    return ordered[-1]  # pragma: no cover - running reaches total
