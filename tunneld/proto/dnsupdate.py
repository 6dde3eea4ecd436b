"""Publishing our records: DNS UPDATE (RFC 2136) signed with TSIG (RFC 8945), with an Update Lease (RFC 9664).

A sans-I/O core on the face of :mod:`tunneld.proto.core`, driven with ``now`` in Unix seconds (TSIG's Time
Signed, and leases that keep counting while a laptop sleeps). It talks to one server and drops datagrams
from anywhere else; randomness (message IDs, refresh jitter) comes from the injected ``rand``. Messages are
rendered once by dnspython and signed by :mod:`tunneld.proto.tsig`. :meth:`Publisher.close` withdraws our
records; :meth:`Publisher.finished` says when that is answered or given up. The rules it follows (one
atomic UPDATE, lease and refresh, retransmission and retry, which answers count), and why, are in
docs/protocol.md ("Publisher behaviour").
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update

from tunneld.proto.core import Address, Outbox
from tunneld.proto.dnsguard import parse
from tunneld.proto.dnswire import (
    UPDATE_LEASE_OPTION_CODE,
    UpdateLeaseOption,
    decode_update_lease,
    from_server,
)
from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import BADTIME, ERROR_NAMES, TsigError, TsigKey, TsigRecord, find_tsig
from tunneld.proto.tsig import sign as tsig_sign
from tunneld.proto.tsig import verify as tsig_verify

__all__ = [
    "DEFAULT_LEASE",
    "MAX_LEASE",
    "MIN_LEASE",
    "Event",
    "Failed",
    "Published",
    "Publisher",
    "PublisherState",
    "Withdrawn",
    "rcode_message",
    "startup_delay",
]

# -- constants ----------------------------------------------------------------------------------------------

DEFAULT_LEASE: Final = 5400  # our default: 90 min
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
EDNS_PAYLOAD: Final = 1232  # DNS flag day 2020: a UDP payload size that avoids fragmentation

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


class Publisher(Outbox["Event"]):
    """DNS UPDATE client state for one device's records in ``zone`` (see the module docstring)."""

    def __init__(self, zone: str | dns.name.Name, key_name: str | dns.name.Name, key_secret: bytes,
                 algorithm: str = "hmac-sha256", rand: Callable[[int], bytes] = os.urandom,
                 lease: int = DEFAULT_LEASE,
                 shared: Iterable[tuple[str | dns.name.Name, int]] = (), *, server: Address,
                 start_delay: float = 0.0) -> None:
        super().__init__()
        self.server = server
        self.start_delay = start_delay  # RFC 9664 §4.2: before the first registration (startup_delay())
        self._delay_until: float | None = None
        self._closed = False
        self.zone = zone if isinstance(zone, dns.name.Name) else dns.name.from_text(zone)
        name = key_name if isinstance(key_name, dns.name.Name) else dns.name.from_text(key_name)
        self._key = TsigKey(name, bytes(key_secret), algorithm)
        if not MIN_LEASE <= lease <= MAX_LEASE:
            raise ValueError(f"update lease must be {MIN_LEASE}-{MAX_LEASE} s")
        self.lease_requested = lease
        self.rand = rand
        self.counters: Counter[str] = Counter()
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

    def publish(self, rrsets: Iterable[dns.rrset.RRset], now: float) -> None:
        """Publish ``rrsets`` (replacing what we published before) in one UPDATE, sent now -- or, the
        first time, after the start-up delay."""
        rrsets = tuple(rrsets)
        for rrset in rrsets:
            if not rrset.name.is_subdomain(self.zone):
                raise ValueError(f"{rrset.name} is not in the zone {self.zone}")
            if rrset.rdclass != dns.rdataclass.IN or not len(rrset):
                raise ValueError(f"{rrset.name}: only non-empty class IN RRsets can be published")
        if self._closed:
            return
        self._rrsets = rrsets
        self._withdrawn = False
        if self._delay_until is None and self.start_delay > 0:
            self._delay_until = self._next_attempt = now + self.start_delay
        if self._delay_until is not None and now < self._delay_until:
            self._set_status(self._rcode, "waiting for the start-up delay before the first registration")
            return
        self._start(now, withdraw=False)

    def endpoint_changed(self, rrsets: Iterable[dns.rrset.RRset], now: float) -> None:
        """The public endpoint moved: republish at once, whatever the refresh schedule."""
        self.counters["endpoint changed"] += 1
        self.publish(rrsets, now)

    def withdraw(self, now: float) -> None:
        """Delete every RRset we own (clean shutdown), if any. Nothing is refreshed after."""
        self._rrsets = ()
        self._withdrawn = True
        self._next_attempt = None
        if not self._owned:
            self._txn = None
            self._set_status(None, "nothing to withdraw")
            return
        self._start(now, withdraw=True)

    def close(self, now: float) -> None:
        """The goodbye: withdraw our records; nothing is published after."""
        self._closed = True
        self.withdraw(now)

    def finished(self) -> bool:
        """Closed, and the withdrawal answered or given up."""
        return self._closed and self._txn is None

    def poll(self, now: float) -> None:
        """Run the timers that are due: retransmission or timeout, lease expiry, refresh or retry."""
        txn = self._txn
        if txn is not None and now >= txn.next_at:
            if txn.attempts >= len(RETRANSMIT_INTERVALS):
                self._timeout(txn, now)
            else:
                self._transmit(txn, now)
        if self._published and self._expires_at is not None and now >= self._expires_at:
            self._published = False
            self._set_status(self._rcode, "our records' lease ran out on the server without a successful "
                             "refresh: they are no longer published; " + self._message, self._unsigned)
        if (self._txn is None and self._next_attempt is not None and now >= self._next_attempt
                and self._rrsets and not self._withdrawn):
            self._start(now, withdraw=False)

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

    def receive(self, data: bytes, source: Address, now: float) -> None:
        """An answer from the update server; anything that is not a verified answer to the pending
        transaction is counted and dropped. Never raises for network input."""
        if not from_server(source, self.server):
            self._drop("not from the server")
            return
        try:
            self._receive(data, now)
        except ParseError as e:
            self._drop(f"parse error: {e}")

    # -- sending -----------------------------------------------------------------------------------------

    def _start(self, now: float, *, withdraw: bool) -> None:
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
        payload, mac = tsig_sign(msg.to_wire(), self._key, int(now))  # rendered once, then signed
        # After success we own exactly what this message added: it deleted everything else we owned.
        self._txn = _Txn(withdraw, message_id, payload, mac, new, first_sent=now)
        # Until the server confirms, whatever we just sent may be there: own its union with the old set.
        self._owned = self._owned | new
        what = "withdrawing our records" if withdraw else f"publishing {len(self._rrsets)} RRsets"
        self._set_status(self._rcode, f"{what} in {self.zone}: waiting for the server", self._unsigned)
        self.counters["updates sent"] += 1
        self._transmit(self._txn, now)

    def _transmit(self, txn: _Txn, now: float) -> None:
        if txn.attempts:
            self.counters["retransmissions"] += 1
        txn.next_at = now + RETRANSMIT_INTERVALS[txn.attempts]
        txn.attempts += 1
        self._send(self.server, txn.payload)

    # -- receiving ---------------------------------------------------------------------------------------

    def _drop(self, reason: str, txn: _Txn | None = None) -> None:
        self.counters[reason] += 1
        if txn is not None:
            txn.dropped[reason] += 1

    def _receive(self, wire: bytes, now: float) -> None:
        msg = parse(wire)  # bounded first; the TSIG RR is kept unverified (we verify it below)
        if not msg.flags & dns.flags.QR:
            self._drop("not a response")
            return
        if msg.opcode() != dns.opcode.UPDATE:
            self._drop("not an update response")
            return
        txn = self._txn
        if txn is None:
            self._drop("no update pending")
            return
        if msg.id != txn.message_id:
            self._drop("wrong id")
            return
        tsig = find_tsig(wire)
        rcode = dns.rcode.to_text(msg.rcode())
        signed = False
        if tsig is not None and tsig.error:
            rcode = ERROR_NAMES.get(tsig.error, f"TSIG error {tsig.error}")
        if tsig is not None and tsig.mac:
            try:
                tsig_verify(wire, self._key, txn.mac, None if tsig.error == BADTIME else now, tsig)
            except TsigError as e:
                self._drop(f"tsig {e}", txn)
                return
            signed = True
        if msg.rcode() == dns.rcode.NOERROR and (tsig is None or not tsig.error):
            if not signed:
                self._drop("unsigned success", txn)
                return
            self._success(msg, txn, now)
            return
        self._failure(rcode, txn, now, unsigned=not signed, tsig=tsig if signed else None)
        return

    def _success(self, msg: dns.message.Message, txn: _Txn, now: float) -> None:
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
        self._emit(event)

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
                 tsig: TsigRecord | None) -> None:
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
        self._emit(event)

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
        self._emit(event)

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
