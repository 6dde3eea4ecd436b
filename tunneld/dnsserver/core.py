"""Sans-I/O message handler of the rendezvous DNS server: QUERY and UPDATE (RFC 2136) with TSIG (RFC 8945)
and the Update Lease option (RFC 9664).

:meth:`DnsCore.handle` takes one request's wire bytes, the sender and the wall-clock time, and returns the
reply's wire bytes or None (no reply). It never reads a clock, never touches a socket and never raises.
dnspython parses and renders; TSIG is :mod:`tunneld.proto.tsig`'s, with our ``now``: a signed reply is
rendered once and its TSIG computed over exactly those bytes (dnspython shuffles an RRset's records at
each rendering). The LLQ server (:mod:`tunneld.dnsserver.llq`) shares :meth:`DnsCore.check_tsig`,
:meth:`DnsCore.render` and :meth:`DnsCore.answer`. An UPDATE is checked
(:mod:`tunneld.dnsserver.update_check`), then committed: :meth:`DnsCore.prepare` gives the checked update,
:meth:`DnsCore.commit` answers it with an outcome (NOERROR applies it), so that front mode
(:mod:`tunneld.dnsserver.front`) can take the outcome from a primary server instead.

Device records are answered only to queries signed with an account key; others see the server's own
records alone, and unsigned UDP replies are held to a few times their request's size (why and how:
docs/hardening.md, "Privacy and answer limits").
"""

from __future__ import annotations

import contextlib
import functools
import logging
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.update

from tunneld.crypto.kdf import derive_tsig_key
from tunneld.dnsserver.replay import ReplayCache
from tunneld.dnsserver.store import SOA_MINIMUM, ZONE_TTL, Change, DiskFull, Lease, StoredRR, ZoneStore
from tunneld.dnsserver.update_check import LEASE_OTYPE, Reject, check_update
from tunneld.proto.dnsguard import try_parse
from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import (
    BADKEY,
    BADSIG,
    BADTIME,
    TsigError,
    TsigKey,
    check,
    signed_size,
    unsigned_error,
)
from tunneld.proto.tsig import sign as tsig_sign

__all__ = ["PUBLIC_SERIAL", "UNSIGNED_UDP_MAX", "UNSIGNED_UDP_RATIO", "CheckedUpdate", "DnsCore", "Policy",
           "Signer", "account_key", "unsigned_udp_limit"]

log = logging.getLogger(__name__)


_HDR: Final = struct.Struct("!HHHHHH")
_OPT: Final = struct.Struct("!BHHIH")  # root, TYPE OPT, CLASS payload, TTL (rcode, version, flags), RDLEN
_OPTION: Final = struct.Struct("!HH")  # EDNS option code, length (RFC 6891 §6.1.2)
_EDNS_PAYLOAD: Final = 8192  # what dnspython's make_response offers
_LEASE_PAYLOAD: Final = 1232  # with the Update Lease option (DNS Flag Day 2020)


def account_key(secret: bytes, domain: str) -> TsigKey:
    """The account's TSIG key: hmac-sha256, key name = the domain, secret from crypto.kdf. Its repr never
    shows the secret; :meth:`~tunneld.proto.tsig.TsigKey.dnspython` gives the key to tools that sign with
    dnspython."""
    return TsigKey(dns.name.from_text(domain).canonicalize(), derive_tsig_key(secret, domain))


@dataclass(frozen=True, slots=True)
class Policy:
    """Server limits. Leases are clamped to [min_lease, max_lease] (by default 30 min to 2 h)."""

    min_lease: int = 1800
    max_lease: int = 7200
    require_lease: bool = True
    """Refuse updates that add records without an Update Lease option (as Apple's dnsextd does)."""
    default_lease: int | None = None
    """If set, updates without the option get this lease (clamped) instead: plain RFC 2136 clients such as
    nsupdate cannot send RFC 9664's option, and their records should still expire."""
    fudge: int = 300


@dataclass(slots=True)
class Signer:
    """How to sign a reply: the validated request's key, MAC and TSIG fields."""

    key: TsigKey
    request_mac: bytes
    request_time: int
    fudge: int
    """The fudge of the reply (the server's)."""
    request_fudge: int = 0
    """The request's own fudge: its TSIG window, hence its replay window, is request_time ± this."""


@dataclass(slots=True)
class CheckedUpdate:
    """A signed UPDATE that passed the check (:func:`~tunneld.dnsserver.update_check.check_update`) and
    is not a replay: what :meth:`DnsCore.commit` needs to answer it once its outcome is known."""

    req: dns.update.UpdateMessage
    wire: bytes
    signer: Signer
    changes: list[Change]
    lease: Lease | None
    lease_reply: bytes | None
    max_size: int | None


UNSIGNED_UDP_MAX: Final = 1232
"""Largest unsigned UDP reply: the EDNS buffer size of DNS Flag Day 2020, which avoids IP fragmentation."""
UNSIGNED_UDP_RATIO: Final = 3
"""An unsigned UDP reply is at most this many times its request (truncated with TC beyond): a spoofed
query must not draw a large reply at a third party. Signed replies keep the size their client asked."""
PUBLIC_SERIAL: Final = 1
"""The SOA serial unsigned queries see (the real one counts the zone's updates)."""
_UNKNOWN_QUERY_LIMIT: Final = 512  # RFC 1035 §4.2.1, for a caller that does not give the request's size


def unsigned_udp_limit(query_size: int | None) -> int:
    """The size limit of an unsigned UDP reply to a request of ``query_size`` bytes."""
    if query_size is None:
        return _UNKNOWN_QUERY_LIMIT
    return min(UNSIGNED_UDP_MAX, UNSIGNED_UDP_RATIO * query_size)


class DnsCore:
    """The handler for one zone. ``keys`` maps key names to dnspython TSIG keys (usually one: the account)."""

    def __init__(self, store: ZoneStore, keys: Sequence[TsigKey | dns.tsig.Key],
                 policy: Policy | None = None) -> None:
        """``keys``: ours, or dnspython's (as tests and tools hold them), held as ours."""
        self.store = store
        self.zone = store.zone
        ours = [TsigKey.of(k) for k in keys]
        self._keys: dict[dns.name.Name, TsigKey] = {k.name.canonicalize(): k for k in ours}
        self.policy = policy or Policy()
        self.parse_errors: Counter[str] = Counter()  # requests answered FORMERR, by the guard's reason
        self.last_changes: list[Change] = []
        """The change list of the last update that changed the zone (for the future LLQ server)."""
        # Signed UPDATEs answered within their TSIG time window, by request MAC, kept with the zone: a
        # copy of one (a replay, or the client's own retransmission) gets the reply that was sent.
        self._answered = ReplayCache(store)
        self.replays = 0
        self.last_signed = False
        """Whether the last reply :meth:`handle` returned was signed for a request that verified (for the
        listener's response rate limiting: the account's own clients get a higher rate)."""

    def __repr__(self) -> str:  # never show the keys
        return f"<DnsCore zone={self.zone} keys={len(self._keys)}>"

    # ---- entry point ----------------------------------------------------------------------------------

    def handle(
        self, wire: bytes, src: object, now_wall: float, *, max_size: int | None = None,
        msg: dns.message.Message | ParseError | None = None,
    ) -> bytes | None:
        """Answer one request. ``max_size`` None means UDP rules (512, or the EDNS payload size); a TCP
        listener passes 65535. ``msg``: the listener's ``dnsguard.try_parse(wire, query=True)`` (a message
        is parsed once); None: parsed here. Returns None for silence (no parseable header, or a response)."""
        out = self.prepare(wire, src, now_wall, max_size=max_size, msg=msg)
        if isinstance(out, CheckedUpdate):
            return self.commit(out, dns.rcode.NOERROR, now_wall)
        return out

    def prepare(
        self, wire: bytes, src: object, now_wall: float, *, max_size: int | None = None,
        msg: dns.message.Message | ParseError | None = None,
    ) -> bytes | CheckedUpdate | None:
        """As :meth:`handle`, but a signed UPDATE that passed its check and is not a replay is returned
        unapplied, for the caller to apply or forward and then :meth:`commit` with the outcome (the front:
        :mod:`tunneld.dnsserver.front`)."""
        self.last_signed = False
        try:
            return self._handle(wire, now_wall, max_size, msg)
        except Exception:  # last line of defence: never raise into the listener
            log.exception("internal error handling a request from %r", src)
            return self._header_reply(wire, dns.rcode.SERVFAIL)

    # ---- parsing and TSIG -----------------------------------------------------------------------------

    def _header_reply(self, wire: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
        """A bare reply built from the header alone (for messages dnspython cannot parse)."""
        if len(wire) < _HDR.size:
            return None
        msg_id, flags = struct.unpack_from("!HH", wire)
        if flags & dns.flags.QR:
            return None
        out_flags = dns.flags.QR | (flags & (dns.flags.RD | 0x7800))  # keep the opcode bits and RD
        return _HDR.pack(msg_id, out_flags | (int(rcode) & 0xF), 0, 0, 0, 0)

    def _handle(self, wire: bytes, now: float, max_size: int | None,
                msg: dns.message.Message | ParseError | None) -> bytes | CheckedUpdate | None:
        if len(wire) < _HDR.size or struct.unpack_from("!H", wire, 2)[0] & dns.flags.QR:
            return None
        if msg is None:
            msg = try_parse(wire, query=True)
        if isinstance(msg, ParseError):  # any parse failure of untrusted input is FORMERR
            self.parse_errors[str(msg)] += 1
            return self._header_reply(wire, dns.rcode.FORMERR)
        req = msg
        if req.edns > 0:
            resp = dns.message.make_response(req, copy_mode=dns.message.CopyMode.NOTHING)
            resp.use_edns(0)
            resp.set_rcode(dns.rcode.BADVERS)
            return resp.to_wire()

        signer: Signer | None = None
        if req.had_tsig:
            signer_or_reply = self.check_tsig(req, wire, int(now))
            if isinstance(signer_or_reply, bytes):
                return signer_or_reply
            signer = signer_or_reply

        opcode = req.opcode()
        if opcode == dns.opcode.QUERY:
            resp = self._query(req, now, signed=signer is not None)
        elif opcode == dns.opcode.UPDATE:
            assert isinstance(req, dns.update.UpdateMessage)
            # Unsigned updates are refused: only the account's devices may write (RFC 2136 §3.3).
            if signer is None:
                resp = self._error(req, dns.rcode.REFUSED)
            else:
                return self._update_once(req, wire, signer, now, max_size)
        else:
            resp = self._error(req, dns.rcode.NOTIMP)
        return self.render(req, resp, signer, now, max_size, query_size=len(wire))

    def _update_once(self, req: dns.update.UpdateMessage, wire: bytes, signer: Signer, now: float,
                     max_size: int | None) -> bytes | CheckedUpdate:
        """Check a signed UPDATE, to be applied once. TSIG's time check (RFC 8945 §5.2.3) only bounds a
        replay to the request's time window, and the account key is shared by all its devices, so a per-
        key "no earlier time" rule would refuse one device's update after another's. Instead the request
        MAC, unique per signed message, is remembered (:mod:`tunneld.dnsserver.replay`) until the
        request's own window closes: a copy within it (say, an old endpoint replayed after the device
        moved, or after a server restart) changes nothing and gets the reply that was sent, under the
        copy's message ID (the MAC covers the original ID only), which is also what a client
        retransmitting after a lost reply needs."""
        done = self._answered.find(signer.request_mac, now)
        if done is not None:
            self.replays += 1
            return wire[:2] + done[2:]
        return self._update(req, wire, now, signer, max_size)

    def key(self, name: dns.name.Name) -> TsigKey | None:
        """The TSIG key of that name, if it is one of ours (for the LLQ server's restored LLQs)."""
        return self._keys.get(name.canonicalize())

    def check_tsig(self, req: dns.message.Message, wire: bytes, now: int) -> Signer | bytes:
        """Validate a signed request (RFC 8945 §5.2: key, MAC, time): how to sign the reply, or the wire
        of the error reply (BADKEY, BADSIG unsigned; BADTIME signed) to send instead: empty for a
        response (an LLQ ack), which is never answered. Shared with the LLQ server."""
        try:
            key, tsig = check(wire, self._keys, now)
        except (ParseError, TsigError) as e:
            if req.flags & dns.flags.QR:
                return b""
            return self._tsig_refusal(req, e, now)
        return Signer(key, tsig.mac, tsig.time_signed, self.policy.fudge, tsig.fudge)

    def _tsig_refusal(self, req: dns.message.Message, e: ParseError | TsigError, now: int) -> bytes:
        if isinstance(e, ParseError) or e.tsig is None or e.error not in (BADKEY, BADSIG, BADTIME):
            return self._error(req, dns.rcode.FORMERR).to_wire()  # also a request carrying a TSIG error
        if e.error == BADTIME:
            key = self._keys[e.tsig.name.canonicalize()]
            signer = Signer(key, e.tsig.mac, e.tsig.time_signed, e.tsig.fudge)
            return self.sign(self._error(req, dns.rcode.NOTAUTH), signer, now, BADTIME,
                             e.tsig.time_signed, struct.pack("!Q", now)[2:])
        return unsigned_error(self._error(req, dns.rcode.NOTAUTH).to_wire(), e.tsig, e.error)

    def sign(
        self,
        resp: dns.message.Message,
        signer: Signer,
        now: int,
        error: int = 0,
        time_signed: int | None = None,
        other: bytes = b"",
        max_size: int = 65535,
    ) -> bytes:
        """Render ``resp`` once (leaving room for the TSIG RR within ``max_size``) and append a TSIG
        computed over exactly those bytes, with the request MAC, at ``time_signed`` (default ``now``).
        Raises dns.exception.TooBig if it does not fit."""
        resp.tsig = None
        unsigned = resp.to_wire(max_size=max_size - signed_size(signer.key, len(other)))
        signed, _ = tsig_sign(unsigned, signer.key, now if time_signed is None else time_signed,
                              signer.request_mac, signer.fudge, error, other)
        return signed

    def noerror(self, update: CheckedUpdate, now: float) -> bytes:
        """The signed NOERROR answer to a checked update, built as header and OPT RR (the granted lease,
        RFC 9664 §4) rather than by dnspython: the same bytes as :meth:`_error` and :meth:`render` make
        (tests/unit/test_dnsserver_core.py), a quarter of the time; docs/perf-dns.md."""
        req, lease = update.req, update.lease_reply
        flags = dns.flags.QR | (req.flags & dns.flags.RD) | (dns.opcode.UPDATE << 11)
        if req.edns < 0:  # no OPT in the request: none in the answer (and no lease to grant)
            unsigned = _HDR.pack(req.id, flags, 0, 0, 0, 0)
        else:
            options = b"" if lease is None else _OPTION.pack(LEASE_OTYPE, len(lease)) + lease
            payload = _EDNS_PAYLOAD if lease is None else _LEASE_PAYLOAD
            unsigned = (_HDR.pack(req.id, flags, 0, 0, 0, 1)
                        + _OPT.pack(0, dns.rdatatype.OPT, payload, 0, len(options)) + options)
        self.last_signed = True
        return tsig_sign(unsigned, update.signer.key, int(now), update.signer.request_mac,
                         update.signer.fudge)[0]

    def _error(self, req: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
        mode = (
            dns.message.CopyMode.NOTHING
            if req.opcode() == dns.opcode.UPDATE
            else dns.message.CopyMode.QUESTION
        )
        resp = dns.message.make_response(req, copy_mode=mode)
        resp.set_rcode(rcode)
        return resp

    def render(
        self,
        req: dns.message.Message,
        resp: dns.message.Message,
        signer: Signer | None,
        now: float,
        max_size: int | None,
        query_size: int | None = None,
    ) -> bytes:
        """The reply's wire form, within the requester's size limit (truncated, TC set, if it does not
        fit) and signed if the request was. Shared with the LLQ server.

        Over UDP (``max_size`` None) an unsigned reply is also held to :func:`unsigned_udp_limit` of the
        request's size (``query_size``), so that the server is no amplifier for spoofed sources."""
        if max_size is None:
            max_size = max(512, req.payload) if req.edns >= 0 else 512
            if signer is None:
                max_size = min(max_size, unsigned_udp_limit(query_size))
        max_size = min(max_size, 65535)
        self.last_signed = signer is not None
        try:
            if signer is not None:
                return self.sign(resp, signer, int(now), max_size=max_size)
            return resp.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            resp.answer = []
            resp.authority = []
            resp.additional = []
            resp.flags |= dns.flags.TC
            if signer is not None:
                return self.sign(resp, signer, int(now), max_size=max_size)
            return resp.to_wire(max_size=max_size)

    # ---- QUERY ----------------------------------------------------------------------------------------

    def _query(self, req: dns.message.Message, now: float, *, signed: bool) -> dns.message.Message:
        if len(req.question) != 1:
            return self._error(req, dns.rcode.FORMERR)
        q = req.question[0]
        if q.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY) or not self.store.in_zone(q.name):
            return self._error(req, dns.rcode.REFUSED)
        if q.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            return self._error(req, dns.rcode.REFUSED)
        if dns.rdatatype.is_metatype(q.rdtype) and q.rdtype != dns.rdatatype.ANY:
            return self._error(req, dns.rcode.FORMERR)
        resp = self._error(req, dns.rcode.NOERROR)
        resp.flags |= dns.flags.AA
        answer, rcode = self.answer(q.name, q.rdtype, now, private=signed)
        resp.set_rcode(rcode)
        resp.answer = answer
        if not answer:
            soa = dns.rrset.from_rdata(self.zone, min(ZONE_TTL, SOA_MINIMUM), self._soa(private=signed))
            resp.authority = [soa]
        return resp

    def _soa(self, *, private: bool) -> dns.rdata.Rdata:
        """The zone's SOA; in the public view with a fixed serial, since the serial counts the updates
        and would tell a stranger when the devices publish (or move)."""
        soa = self.store.soa()
        return soa if private else soa.replace(serial=PUBLIC_SERIAL)

    def answer(
        self, qname: dns.name.Name, qtype: int, now: float, *, private: bool = True
    ) -> tuple[list[dns.rrset.RRset], dns.rcode.Rcode]:
        """The answer RRsets and rcode for an in-zone question (NOERROR with none = NODATA).

        ``private`` False gives the public view, for requests not signed with an account key: only the
        server's own records (:meth:`public_rrsets`); any other name is NXDOMAIN, whether or not a
        device published it, so that the answer tells a stranger nothing (docs/hardening.md).
        A CNAME at the name answers any other type (not chased). No wildcard synthesis.
        """
        sets = self.store.rrsets(qname, now) if private else self.public_rrsets(qname, now)
        if qtype == dns.rdatatype.ANY:
            chosen = sorted(sets)
        elif qtype in sets:
            chosen = [qtype]
        elif dns.rdatatype.CNAME in sets:
            chosen = [dns.rdatatype.CNAME]
        else:
            chosen = []
        out: list[dns.rrset.RRset] = []
        for rdtype in chosen:
            rrs = sets[rdtype]
            rrset = dns.rrset.from_rdata_list(qname, rrs[0].ttl, [rr.rdata for rr in rrs])
            out.append(rrset)
        if out:
            return out, dns.rcode.NOERROR
        exists = self.store.name_exists(qname, now) if private else self._publicly_exists(qname)
        if exists:
            return [], dns.rcode.NOERROR
        return [], dns.rcode.NXDOMAIN

    def public_rrsets(self, qname: dns.name.Name, now: float) -> dict[int, list[StoredRR]]:
        """The RRsets at ``qname`` that anyone may read: those the server owns and devices cannot change
        (apex SOA and NS, the service SRV records, the server name's addresses). They name only the
        server, which whoever sends us a query knows already, and resolvers and clients that cannot sign
        (a zone delegated from the public DNS, a client finding the UPDATE server by SRV) need them."""
        store = self.store
        sets = {t: rrs for t, rrs in store.rrsets(qname, now).items() if store.is_protected(qname, t)}
        if dns.rdatatype.SOA in sets:
            sets[dns.rdatatype.SOA] = [StoredRR(rr.ttl, self._soa(private=False))
                                       for rr in sets[dns.rdatatype.SOA]]
        return sets

    def _publicly_exists(self, qname: dns.name.Name) -> bool:
        """Does ``qname`` exist in the public view: the apex, a name owning server records, or an empty
        non-terminal above one (``_udp.ZONE``, ``_tcp.ZONE``)?"""
        s = self.store
        owners = (s.zone, *s.srv_names, s.server)
        return any(s.in_zone(o) and s.is_protected(o, dns.rdatatype.ANY) and o.is_subdomain(qname)
                   for o in owners)

    # ---- UPDATE ---------------------------------------------------------------------------------------

    def _update(self, req: dns.update.UpdateMessage, wire: bytes, now: float, signer: Signer,
                max_size: int | None) -> bytes | CheckedUpdate:
        """Check an UPDATE: the refusal (remembered against replays), or the checked update."""
        try:
            changes, lease_reply, lease = check_update(self.store, self.policy, req, wire, now)
        except Reject as r:
            log.debug("update %d rejected: %s", req.id, dns.rcode.to_text(r.rcode))
            return self.commit(CheckedUpdate(req, wire, signer, [], None, None, max_size), r.rcode, now)
        return CheckedUpdate(req, wire, signer, changes, lease, lease_reply, max_size)

    def commit(self, update: CheckedUpdate, rcode: int, now: float, *, remember: bool = True,
               intent: int | None = None) -> bytes:
        """Answer a checked update with ``rcode`` (signed as its request was) and remember the answer
        against replays (unless not ``remember``: an error whose retry may fare better). NOERROR applies
        its changes to the store in the same transaction (the local server's update; the front's, once
        the primary took it: its ``intent`` dropped, :mod:`~tunneld.dnsserver.intents`), any other rcode
        changes nothing."""
        req, signer = update.req, update.signer

        def reply(resp: dns.message.Message) -> bytes:
            return self.render(req, resp, signer, now, update.max_size)

        remembered = functools.partial(ReplayCache.entry, signer.request_mac, signer.request_time,
                                       signer.request_fudge)
        if rcode != dns.rcode.NOERROR:
            out = reply(self._error(req, dns.rcode.Rcode.make(rcode)))
            if remember:
                with contextlib.suppress(DiskFull):  # reported by the store; the reply is still right
                    self._answered.remember(remembered(out), now)
            return out
        out = self.noerror(update, now)  # rendered before the update, so that it is committed with it
        try:
            changed = self.store.apply_update(update.changes, update.lease, now, remembered(out), intent)
        except DiskFull:  # reported once by the store
            return reply(self._error(req, dns.rcode.SERVFAIL))
        except Exception:
            log.exception("update %d failed; rolled back", req.id)
            return reply(self._error(req, dns.rcode.SERVFAIL))
        if changed:
            self.last_changes = list(update.changes)
        return out
