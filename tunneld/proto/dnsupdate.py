"""Publishing our records: DNS UPDATE (RFC 2136) signed with TSIG (RFC 8945), with an Update Lease (RFC 9664).

Sans-I/O, like :mod:`tunneld.proto.natpmp`: a :class:`Publisher` takes datagrams, ``now`` (monotonic
seconds, for timers) and ``wall`` (Unix seconds, only for the TSIG Time Signed field) as arguments and
returns :class:`Transmit` tuples; it never reads a clock, never touches a socket, and draws randomness
(message IDs, refresh jitter) only through the injected ``rand``. The service owns a UDP socket towards
the update server (found with :func:`build_srv_query` / :func:`pick_srv_target`), calls :meth:`Publisher.poll`
at :meth:`Publisher.deadline`, and shows :attr:`Publisher.state` in ``tunneld status``.

**The clock stays out of dnspython.** dnspython builds and parses messages, but never signs or verifies:
``Message.to_wire()`` with a TSIG would read ``time.time()``, and ``dns.message.from_wire(keyring=...)``
validates against ``time.time()``. We render the update *without* TSIG, then :func:`tsig_sign` appends the
TSIG RR computed here (stdlib ``hmac``) with Time Signed = ``int(wall)``; responses are parsed with
``keyring=False`` (which skips dnspython's validation) and checked by :func:`tsig_verify` against the
request MAC and ``wall``. The key is a :class:`TsigKey`, whose repr never shows the secret (unlike
``dns.tsig.Key``).

Behaviour of :class:`Publisher`:

- **One atomic UPDATE per publication** (RFC 2136 §3.4): zone SOA in the zone section, no prerequisites
  (so a refresh succeeds whether or not the server still has our records, RFC 9664 §5), then in the
  update section "delete RRset" (class ANY, TTL 0) for every <name, type> we own -- those we publish now
  and those we published before, so a type that disappears is removed -- followed by our RRsets.
- **Lease** (RFC 9664 §4.2): every publishing UPDATE carries the 4-byte Update Lease option with the
  requested lease (default 90 min, allowed 30 min to 2 h). The granted lease in a NOERROR answer is
  obeyed whether shorter or longer (either form; the 8-byte form's LEASE counts, we publish no KEY RRs).
  No option in the answer (BIND ignores it) means the server does not do leases: we refresh as if the
  requested lease had been granted. Refresh at 80 % of the lease plus a random 0-5 % (§5), never sooner
  than :data:`MIN_REFRESH_INTERVAL`.
- **Retransmission** (RFC 1035 §4.2.1 style, the same bytes and ID each time): sends at 0, 1, 3 and 7 s;
  no verified answer by 15 s is a timeout ("is the server reachable?"). After a timeout or an error
  answer, the publication is retried after 30 s, doubling to 15 min; while a granted lease is still
  running the wait is also capped at a ninth of what is left of it (RFC 9664 §5: about nine evenly
  spaced retries before expiry).
- **Endpoint change**: :meth:`Publisher.endpoint_changed` republishes at once (replacing any pending
  transaction; late answers to the old one no longer match the ID and are dropped).
- **Withdraw**: :meth:`Publisher.withdraw` sends one UPDATE deleting every RRset we own (no lease option:
  deletions are permanent), retransmitted like the rest; nothing is refreshed afterwards.
- **Answers** must come from the pending transaction (QR set, opcode UPDATE, same ID). A NOERROR answer
  must carry a TSIG that verifies with the request MAC (§5.3) and a Time Signed within the fudge of our
  clock; anything else is dropped and counted. BADSIG and BADKEY answers are unsigned by design
  (RFC 8945 §5.3.2), and some servers answer other errors without TSIG: such error answers are accepted as
  the outcome, with ``unsigned`` set in the status because they cannot be authenticated. BADTIME answers are
  signed and verified (without the time check; their Other Data carries the server's clock, which the
  status message uses).
- **Robustness.** Malformed, truncated or foreign datagrams are counted in :attr:`Publisher.counters`;
  nothing from the network raises out of :meth:`Publisher.receive`.

Facts and sources: PROTOCOLS.md sections 4, 5.1 and 5.2.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rdtypes.IN.SRV
import dns.rrset
import dns.update

from tunneld.proto.dnswire import UPDATE_LEASE_OPTION_CODE, UpdateLeaseOption, decode_update_lease
from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import BADTIME, ERROR_NAMES, TsigError, TsigKey, TsigRecord, find_tsig
from tunneld.proto.tsig import sign as tsig_sign
from tunneld.proto.tsig import verify as tsig_verify

__all__ = [
    "DEFAULT_LEASE",
    "MAX_LEASE",
    "MIN_LEASE",
    "Failed",
    "Published",
    "Publisher",
    "PublisherState",
    "Transmit",
    "Withdrawn",
    "build_srv_query",
    "pick_srv_target",
    "rcode_message",
    "startup_delay",
]

# -- constants ----------------------------------------------------------------------------------------------

DEFAULT_LEASE: Final = 5400  # ARCHITECTURE.md: 90 min
MIN_LEASE: Final = 1800  # our range: 30 min (RFC 9664 §4.2: SHOULD be >= 1800 s)
MAX_LEASE: Final = 7200  # to 2 h (Apple dnsextd caps leases at 7200 s)
REFRESH_FRACTION: Final = 0.8  # RFC 9664 §5: refresh at 80 % of the lease ...
REFRESH_JITTER: Final = 0.05  # ... plus a random 0-5 %
MIN_REFRESH_INTERVAL: Final = 10.0  # our floor, so a tiny granted lease cannot make us spin
RETRANSMIT_INTERVALS: Final = (1.0, 2.0, 4.0, 8.0)  # waits after sends 1..4; the last one ends at 15 s
RETRY_MIN: Final = 30.0  # first retry after a failed transaction
RETRY_MAX: Final = 900.0  # doubling up to 15 min
STARTUP_DELAY_MAX_STEPS: Final = 300  # RFC 9664 §4.2: delay the first registration 0-3000 ms ...
STARTUP_DELAY_STEP: Final = 0.01  # ... in steps of at most 10 ms
UPDATE_SRV_SERVICE: Final = "_dns-update._udp"
EDNS_PAYLOAD: Final = 1232

class Transmit(NamedTuple):
    """A DNS message to send to the update server (UDP, port from SRV or 53)."""

    payload: bytes
    message_id: int


# -- status messages ----------------------------------------------------------------------------------------

_RCODE_ADVICE: Final = {
    "BADSIG": "the TSIG key does not match the server's: check the account secret on both",
    "BADKEY": ("the server does not know our TSIG key (name and algorithm): install the key stanza printed "
               "by 'tunneld account new' on the server, or check the account domain"),
    "BADTIME": "clocks differ by more than the fudge (300 s): fix the clock (NTP)",
    "BADTRUNC": "the server rejected our MAC length: use an untruncated algorithm (hmac-sha256)",
    "REFUSED": "the server refuses updates for this zone from us: check its update policy/ACL",
    "NOTAUTH": "the server is not authoritative for the zone, or rejected the key",
    "NOTZONE": "a record name lies outside the zone: check the configured account domain",
    "FORMERR": ("the server could not parse our update: it may not support DNS UPDATE, TSIG or the "
                "lease option"),
    "SERVFAIL": "the server failed while applying the update: check its logs; retrying later",
    "NOTIMP": "the server does not implement DNS UPDATE: point tunneld at an RFC 2136 server",
    "NXDOMAIN": "unexpected prerequisite failure (we send none): the server misbehaves",
    "YXDOMAIN": "unexpected prerequisite failure (we send none): the server misbehaves",
    "YXRRSET": "unexpected prerequisite failure (we send none): the server misbehaves",
    "NXRRSET": "unexpected prerequisite failure (we send none): the server misbehaves",
}


def rcode_message(rcode: str) -> str:
    """A status line naming an UPDATE failure and what to do about it."""
    return f"{rcode}: {_RCODE_ADVICE.get(rcode, 'unexpected answer from the update server')}"


# -- events and state ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """Our records are on the server for ``lease`` seconds (``granted``: the server sent a lease option;
    False means it ignores leases and ``lease`` is the one we asked for)."""

    lease: int
    granted: bool
    expires_at: float
    refresh_at: float


@dataclass(frozen=True)
class Withdrawn:
    """The server confirmed the deletion of our records."""


@dataclass(frozen=True)
class Failed:
    """An UPDATE failed: ``rcode`` is the RCODE or TSIG error name, or ``"TIMEOUT"``."""

    rcode: str
    message: str
    unsigned: bool = False


Event = Published | Withdrawn | Failed


@dataclass(frozen=True)
class PublisherState:
    """A status snapshot for ``tunneld status``."""

    zone: str
    key_name: str
    algorithm: str
    published: bool
    pending: bool
    rcode: str | None
    message: str
    unsigned_error: bool
    lease_requested: int
    lease_granted: int | None
    server_ignores_lease: bool
    expires_at: float | None
    next_refresh_at: float | None
    withdrawn: bool


@dataclass
class _Txn:
    withdraw: bool
    message_id: int
    payload: bytes
    mac: bytes
    owned_after: frozenset[tuple[dns.name.Name, int]]
    first_sent: float
    next_at: float = 0.0
    attempts: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


def _uniform(rand: Callable[[int], bytes]) -> float:
    """Uniform in [0, 1) from four random bytes."""
    return int.from_bytes(rand(4), "big") / 2**32


def startup_delay(rand: Callable[[int], bytes] = os.urandom) -> float:
    """RFC 9664 §4.2: wait a random 0-3000 ms, in 10 ms steps, before the first registration."""
    return STARTUP_DELAY_STEP * (int.from_bytes(rand(2), "big") % (STARTUP_DELAY_MAX_STEPS + 1))


# -- the publisher ------------------------------------------------------------------------------------------


class Publisher:
    """DNS UPDATE client state for one device's records in ``zone`` (see the module docstring)."""

    def __init__(self, zone: str | dns.name.Name, key_name: str | dns.name.Name, key_secret: bytes,
                 algorithm: str = "hmac-sha256", rand: Callable[[int], bytes] = os.urandom,
                 lease: int = DEFAULT_LEASE,
                 shared: Iterable[tuple[str | dns.name.Name, int]] = ()) -> None:
        self.zone = zone if isinstance(zone, dns.name.Name) else dns.name.from_text(zone)
        name = key_name if isinstance(key_name, dns.name.Name) else dns.name.from_text(key_name)
        self._key = TsigKey(name, bytes(key_secret), algorithm)
        if not MIN_LEASE <= lease <= MAX_LEASE:
            raise ValueError(f"update lease must be {MIN_LEASE}-{MAX_LEASE} s")
        self.lease_requested = lease
        self.rand = rand
        self.counters: Counter[str] = Counter()
        self.events: list[Event] = []
        self._rrsets: tuple[dns.rrset.RRset, ...] = ()
        self._owned: frozenset[tuple[dns.name.Name, int]] = frozenset()
        # RRsets other devices publish into too (the account's browse PTR): there we add and delete
        # only our own records (RFC 2136 §2.5.4), never the whole set, or we would delete the others.
        self.shared = frozenset((n if isinstance(n, dns.name.Name) else dns.name.from_text(n), int(t))
                                for n, t in shared)
        self._shared_rdatas: dict[tuple[dns.name.Name, int], frozenset[dns.rdata.Rdata]] = {}
        self._txn: _Txn | None = None
        self._published = False
        self._withdrawn = False
        self._lease_granted: int | None = None
        self._ignores_lease = False
        self._expires_at: float | None = None
        self._next_attempt: float | None = None  # refresh, or retry after a failure
        self._backoff = 0.0
        self._rcode: str | None = None
        self._message = "not started"
        self._unsigned = False

    def __repr__(self) -> str:
        return (f"<Publisher zone={self.zone} key={self._key.name} {self._key.algorithm} "
                f"published={self._published}>")

    # -- public API --------------------------------------------------------------------------------------

    @property
    def state(self) -> PublisherState:
        return PublisherState(
            zone=self.zone.to_text(), key_name=self._key.name.to_text(), algorithm=self._key.algorithm,
            published=self._published, pending=self._txn is not None, rcode=self._rcode,
            message=self._message, unsigned_error=self._unsigned, lease_requested=self.lease_requested,
            lease_granted=self._lease_granted, server_ignores_lease=self._ignores_lease,
            expires_at=self._expires_at, next_refresh_at=self._next_attempt, withdrawn=self._withdrawn)

    def publish(self, rrsets: Iterable[dns.rrset.RRset], now: float, wall: float) -> Transmit:
        """Publish ``rrsets`` (replacing what we published before) in one UPDATE, sent now."""
        rrsets = tuple(rrsets)
        for rrset in rrsets:
            if not rrset.name.is_subdomain(self.zone):
                raise ValueError(f"{rrset.name} is not in the zone {self.zone}")
            if rrset.rdclass != dns.rdataclass.IN or not len(rrset):
                raise ValueError(f"{rrset.name}: only non-empty class IN RRsets can be published")
        self._rrsets = rrsets
        self._withdrawn = False
        return self._start(now, wall, withdraw=False)

    def endpoint_changed(self, rrsets: Iterable[dns.rrset.RRset], now: float, wall: float) -> Transmit:
        """The public endpoint moved: republish at once, whatever the refresh schedule."""
        self.counters["endpoint changed"] += 1
        return self.publish(rrsets, now, wall)

    def withdraw(self, now: float, wall: float) -> Transmit | None:
        """Delete every RRset we own (clean shutdown); None if we own none. Nothing is refreshed after."""
        self._rrsets = ()
        self._withdrawn = True
        self._next_attempt = None
        if not self._owned:
            self._txn = None
            self._set_status(None, "nothing to withdraw")
            return None
        return self._start(now, wall, withdraw=True)

    def poll(self, now: float, wall: float) -> list[Transmit]:
        """Run the timers that are due: retransmission or timeout, lease expiry, refresh or retry."""
        out: list[Transmit] = []
        txn = self._txn
        if txn is not None and now >= txn.next_at:
            if txn.attempts >= len(RETRANSMIT_INTERVALS):
                self._timeout(txn, now)
            else:
                out.append(self._send(txn, now))
        if self._published and self._expires_at is not None and now >= self._expires_at:
            self._published = False
            self._set_status(self._rcode, "our records' lease ran out on the server without a successful "
                             "refresh: they are no longer published; " + self._message, self._unsigned)
        if (self._txn is None and self._next_attempt is not None and now >= self._next_attempt
                and self._rrsets and not self._withdrawn):
            out.append(self._start(now, wall, withdraw=False))
        return out

    def deadline(self) -> float | None:
        """When :meth:`poll` next has work, or None."""
        times = []
        if self._txn is not None:
            times.append(self._txn.next_at)
        elif self._next_attempt is not None and self._rrsets and not self._withdrawn:
            times.append(self._next_attempt)
        if self._published and self._expires_at is not None:
            times.append(self._expires_at)
        return min(times, default=None)

    def receive(self, wire: bytes, now: float, wall: float) -> list[Event]:
        """An answer from the update server; anything that is not a verified answer to the pending
        transaction is counted and dropped. Never raises for network input."""
        try:
            return self._receive(wire, now, wall)
        except ParseError as e:
            self._drop(f"parse error: {e}")
            return []

    # -- sending -----------------------------------------------------------------------------------------

    def _start(self, now: float, wall: float, *, withdraw: bool) -> Transmit:
        message_id = int.from_bytes(self.rand(2), "big")
        msg = dns.update.UpdateMessage(self.zone, id=message_id)
        new = frozenset() if withdraw else frozenset((r.name, int(r.rdtype)) for r in self._rrsets)
        for name, rdtype in sorted(self._owned | new):
            if (name, rdtype) in self.shared:
                for rd in sorted(self._shared_rdatas.get((name, rdtype), ()), key=str):
                    msg.delete(name, rd)  # only the record we put there
            else:
                msg.delete(name, dns.rdatatype.RdataType.make(rdtype))
        for rrset in self._rrsets:
            msg.add(rrset.name, rrset)
        # Until the server confirms, what we just sent may be there too: remember the union.
        for rrset in self._rrsets:
            key = (rrset.name, int(rrset.rdtype))
            if key in self.shared:
                self._shared_rdatas[key] = self._shared_rdatas.get(key, frozenset()) | frozenset(rrset)
        if not withdraw:
            msg.use_edns(0, payload=EDNS_PAYLOAD, options=[UpdateLeaseOption(self.lease_requested)])
        payload, mac = tsig_sign(msg.to_wire(), self._key, int(wall))  # no TSIG in msg: no clock read
        # After success we own exactly what this message added: it deleted everything else we owned.
        self._txn = _Txn(withdraw, message_id, payload, mac, new, first_sent=now)
        # Until the server confirms, whatever we just sent may be there: own its union with the old set.
        self._owned = self._owned | new
        what = "withdrawing our records" if withdraw else f"publishing {len(self._rrsets)} RRsets"
        self._set_status(self._rcode, f"{what} in {self.zone}: waiting for the server", self._unsigned)
        self.counters["updates sent"] += 1
        return self._send(self._txn, now)

    def _send(self, txn: _Txn, now: float) -> Transmit:
        if txn.attempts:
            self.counters["retransmissions"] += 1
        txn.next_at = now + RETRANSMIT_INTERVALS[txn.attempts]
        txn.attempts += 1
        return Transmit(txn.payload, txn.message_id)

    # -- receiving ---------------------------------------------------------------------------------------

    def _drop(self, reason: str, txn: _Txn | None = None) -> list[Event]:
        self.counters[reason] += 1
        if txn is not None:
            txn.dropped[reason] += 1
        return []

    def _receive(self, wire: bytes, now: float, wall: float) -> list[Event]:
        try:
            # keyring=False: dnspython keeps the TSIG RR but does not validate it (that would read the
            # clock); we verify below.
            msg = dns.message.from_wire(wire, keyring=False)
        except Exception as e:  # dnspython's parser raises many types for hostile input: none may escape
            raise ParseError("malformed" if wire else "truncated") from e
        if not msg.flags & dns.flags.QR:
            return self._drop("not a response")
        if msg.opcode() != dns.opcode.UPDATE:
            return self._drop("not an update response")
        txn = self._txn
        if txn is None:
            return self._drop("no update pending")
        if msg.id != txn.message_id:
            return self._drop("wrong id")
        tsig = find_tsig(wire)
        rcode = dns.rcode.to_text(msg.rcode())
        signed = False
        if tsig is not None and tsig.error:
            rcode = ERROR_NAMES.get(tsig.error, f"TSIG error {tsig.error}")
        if tsig is not None and tsig.mac:
            try:
                tsig_verify(wire, self._key, txn.mac, None if tsig.error == BADTIME else wall, tsig)
            except TsigError as e:
                return self._drop(f"tsig {e}", txn)
            signed = True
        if msg.rcode() == dns.rcode.NOERROR and (tsig is None or not tsig.error):
            if not signed:
                return self._drop("unsigned success", txn)
            return self._success(msg, txn, now)
        return self._failure(rcode, txn, now, unsigned=not signed, tsig=tsig if signed else None)

    def _success(self, msg: dns.message.Message, txn: _Txn, now: float) -> list[Event]:
        self._txn = None
        self._owned = txn.owned_after
        self._shared_rdatas = {} if txn.withdraw else {
            (r.name, int(r.rdtype)): frozenset(r) for r in self._rrsets
            if (r.name, int(r.rdtype)) in self.shared}
        self._backoff = 0.0
        self.counters["updates accepted"] += 1
        event: Event
        if txn.withdraw:
            self._published = False
            self._lease_granted = self._expires_at = self._next_attempt = None
            self._set_status("NOERROR", f"our records in {self.zone} were withdrawn")
            event = Withdrawn()
        else:
            granted = self._granted_lease(msg)
            lease = self.lease_requested if granted is None else granted
            self._ignores_lease = granted is None
            self._lease_granted = granted
            self._published = True
            self._expires_at = txn.first_sent + lease  # the server may have started it when we first sent
            refresh = lease * (REFRESH_FRACTION + REFRESH_JITTER * _uniform(self.rand))
            self._next_attempt = now + max(refresh, MIN_REFRESH_INTERVAL)
            if granted is None:
                how = (f"the server ignores the lease option, so we refresh as if our {lease} s lease was "
                       "granted")
            else:
                how = f"lease {granted} s granted"
            self._set_status("NOERROR", f"published {len(self._rrsets)} RRsets in {self.zone}: {how}")
            event = Published(lease, granted is not None, self._expires_at, self._next_attempt)
        self.events.append(event)
        return [event]

    def _granted_lease(self, msg: dns.message.Message) -> int | None:
        """LEASE from the first well-formed Update Lease option (either form), or None. The option class
        is not registered with dnspython (dnswire.UpdateLeaseOption says why): this decodes the data."""
        for option in msg.options:
            if int(option.otype) != UPDATE_LEASE_OPTION_CODE:
                continue
            if isinstance(option, UpdateLeaseOption):
                return option.lease
            data = option.to_wire()
            try:
                return decode_update_lease(data or b"")[0]
            except ParseError:
                # A signed NOERROR with a broken option: the update took effect; treat it as "no lease
                # option" (refresh at 80 % of ours) rather than discard the answer.
                self.counters["bad lease option"] += 1
        return None

    def _failure(self, rcode: str, txn: _Txn, now: float, *, unsigned: bool,
                 tsig: TsigRecord | None) -> list[Event]:
        self._txn = None
        self.counters[f"rcode {rcode}"] += 1
        message = rcode_message(rcode)
        if rcode == "BADTIME" and tsig is not None and len(tsig.other) == 6:
            hi, lo = struct.unpack("!HI", tsig.other)
            skew = ((hi << 32) | lo) - tsig.time_signed  # Other Data: the server's clock; Time Signed: ours
            if skew:
                direction = "ahead of" if skew > 0 else "behind"
                message += f" (the server's clock is {abs(skew)} s {direction} ours)"
        if unsigned:
            message += " [unsigned answer: cannot be authenticated]"
        if not txn.withdraw:
            message += self._schedule_retry(now)
        self._set_status(rcode, message, unsigned)
        event = Failed(rcode, self._message, unsigned)
        self.events.append(event)
        return [event]

    def _timeout(self, txn: _Txn, now: float) -> None:
        self._txn = None
        self.counters["timeouts"] += 1
        message = (f"timeout: is the server reachable? no valid answer to {txn.attempts} attempts over "
                   f"{sum(RETRANSMIT_INTERVALS):.0f} s")
        if txn.dropped:
            reasons = ", ".join(f"{k} x{v}" for k, v in sorted(txn.dropped.items()))
            message += f" (answers dropped: {reasons})"
        if not txn.withdraw:
            message += self._schedule_retry(now)
        self._set_status("TIMEOUT", message)
        event = Failed("TIMEOUT", message)
        self.events.append(event)

    def _schedule_retry(self, now: float) -> str:
        self._backoff = min(max(2 * self._backoff, RETRY_MIN), RETRY_MAX)
        delay = self._backoff
        if self._published and self._expires_at is not None and self._expires_at > now:
            delay = min(delay, max((self._expires_at - now) / 9, MIN_REFRESH_INTERVAL))
        self._next_attempt = now + delay
        return f"; retrying in {delay:.0f} s"

    def _set_status(self, rcode: str | None, message: str, unsigned: bool = False) -> None:
        self._rcode = rcode
        self._message = message
        self._unsigned = unsigned


# -- server discovery (RFC 2782, ARCHITECTURE.md "DNS records") ----------------------------------------------


def build_srv_query(domain: str | dns.name.Name, rand: Callable[[int], bytes] = os.urandom,
                    service: str = UPDATE_SRV_SERVICE) -> Transmit:
    """A recursive SRV query for ``<service>.<domain>`` (``_dns-update._udp`` by default)."""
    zone = domain if isinstance(domain, dns.name.Name) else dns.name.from_text(domain)
    qname = dns.name.from_text(service, zone)
    message_id = int.from_bytes(rand(2), "big")
    msg = dns.message.make_query(qname, dns.rdatatype.SRV, id=message_id)
    return Transmit(msg.to_wire(), message_id)


def pick_srv_target(wire: bytes, query: Transmit, rand: Callable[[int], bytes] = os.urandom,
                    ) -> tuple[str, int] | None:
    """(target host, port) from the answer to ``query``, chosen as RFC 2782 says: the lowest priority,
    then at random by weight. None if the answer has no SRV for the name, or the target is "." (the
    service is decidedly not available). Raises ParseError for a malformed or non-matching answer."""
    try:
        msg = dns.message.from_wire(wire, keyring=False)
        sent = dns.message.from_wire(query.payload)
    except Exception as e:  # as in Publisher.receive: any parser failure is a ParseError
        raise ParseError("malformed" if wire else "truncated") from e
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
