"""Front mode of the rendezvous server, sans-I/O: the devices' UPDATEs forwarded to a primary server.

In front mode (``serve-dns --primary``) a BIND, Knot or PowerDNS primary holds the zone and the front
keeps what no standard server does: the leases. A device's signed UPDATE is checked as the local server
checks it (:mod:`tunneld.dnsserver.update_check`); :class:`Front` then builds the same zone, prerequisite
and update sections under a new message ID, without the additional section (the Update Lease option and
the device's TSIG), signed with the front key, and reads the primary's reply (its TSIG verified over our
request's MAC). The device gets the primary's rcode, signed with the account key; the front applies a
taken update to its own store, which keeps each record's lease (on disk before the device is answered:
:mod:`tunneld.dnsserver.intents`, written while the primary works). An expired lease becomes a delete UPDATE
for exactly those records, retried with backoff until the primary takes it; only then are the rows
dropped, so the store itself is the durable queue of deletions. Why and how: docs/protocol.md, "Front mode".
"""

from __future__ import annotations

import base64
import logging
import os
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import dns.exception
import dns.name
import dns.rcode
import dns.rdata
import dns.update

from tunneld.dnsserver.intents import Intents
from tunneld.dnsserver.store import DiskFull, RRsetRemoval, ZoneStore
from tunneld.proto.dnsguard import ADDITIONAL, HEADER_SIZE
from tunneld.proto.dnswire import walk
from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import FUDGE, TsigError, TsigKey, sign, verify

if TYPE_CHECKING:
    from tunneld.dnsserver.core import CheckedUpdate, DnsCore

__all__ = ["DELETE_BATCH", "FORWARD_TIMEOUT", "Deletion", "Forward", "Front", "delete_update",
           "forwarded_update", "read_key_stanza", "read_reply"]

log = logging.getLogger(__name__)

FORWARD_TIMEOUT: Final = 5.0
"""Seconds the primary has to answer a forwarded UPDATE before the device gets SERVFAIL."""
DELETE_BATCH: Final = 64
"""Expired RRs deleted by one UPDATE (a batch stays far below 64 KiB)."""
RETRY_FIRST: Final = 5.0
RETRY_MAX: Final = 300.0
"""A delete the primary did not take is retried after RETRY_FIRST seconds, doubling up to RETRY_MAX."""
MAX_KEY_FILE: Final = 4096
"""Bytes read of a --primary-key file: a key stanza is some 100."""

_OPCODE_UPDATE: Final = 5  # RFC 2136 §1
_QR: Final = 0x8000
_IDFLAGS: Final = struct.Struct("!HH")


@dataclass(frozen=True, slots=True)
class Forward:
    """A signed UPDATE for the primary: its message ID and wire, and its TSIG MAC (the reply's is
    computed over it, RFC 8945 §4.3.1)."""

    msg_id: int
    wire: bytes
    mac: bytes


@dataclass(frozen=True, slots=True)
class Deletion:
    """A delete UPDATE for the primary, and the expired RRs it deletes."""

    forward: Forward
    rrs: tuple[tuple[dns.name.Name, dns.rdata.Rdata], ...]


def forwarded_update(device_wire: bytes, msg_id: int, key: TsigKey, now: float,
                     fudge: int = FUDGE) -> Forward:
    """The device's UPDATE (checked already) as the front sends it: the same zone, prerequisite and update
    sections byte for byte, no additional section (the Update Lease option, which the primary would
    ignore, and the device's TSIG), message ID ``msg_id``, signed with ``key`` at ``now``. Compression
    pointers only point backwards, so cutting the message at its additional section leaves them valid."""
    cut = next((r.offset for r in walk(device_wire) if r.section == ADDITIONAL), len(device_wire))
    header = struct.pack("!HH", msg_id, struct.unpack_from("!H", device_wire, 2)[0]) + device_wire[4:10]
    wire, mac = sign(header + b"\0\0" + device_wire[HEADER_SIZE:cut], key, int(now), fudge=fudge)
    return Forward(msg_id, wire, mac)


def delete_update(zone: dns.name.Name, rrs: tuple[tuple[dns.name.Name, dns.rdata.Rdata], ...], msg_id: int,
                  key: TsigKey, now: float, fudge: int = FUDGE) -> Forward:
    """An UPDATE deleting exactly these RRs (class NONE, RFC 2136 §2.5.4), signed with ``key``."""
    upd = dns.update.UpdateMessage(zone, id=msg_id)
    for owner, rdata in rrs:
        upd.delete(owner, rdata)
    wire, mac = sign(upd.to_wire(), key, int(now), fudge=fudge)
    return Forward(msg_id, wire, mac)


def read_reply(wire: bytes, forward: Forward, key: TsigKey, now: float) -> int:
    """The rcode of the primary's reply to ``forward``: a response to it (ID, QR, opcode), signed with
    ``key`` over our request's MAC. ParseError or TsigError otherwise."""
    if len(wire) < HEADER_SIZE:
        raise ParseError("short reply")
    msg_id, flags = _IDFLAGS.unpack_from(wire)
    if msg_id != forward.msg_id or not flags & _QR or (flags >> 11) & 0xF != _OPCODE_UPDATE:
        raise ParseError("not our reply")
    verify(wire, key, forward.mac, now)
    return int(flags) & 0xF


_STANZA: Final = re.compile(
    r'\s*key\s+"?(?P<name>[A-Za-z0-9._-]+)"?\s*\{\s*algorithm\s+"?(?P<alg>[A-Za-z0-9._-]+)"?\s*;'
    r'\s*secret\s+"(?P<secret>[A-Za-z0-9+/=]+)"\s*;\s*\}\s*;\s*')


def read_key_stanza(text: str) -> TsigKey:
    """The TSIG key of a BIND ``key "NAME" { algorithm ALG; secret "BASE64"; };`` statement (as
    ``tunneld account new`` prints them). ValueError saying what is wrong."""
    m = _STANZA.fullmatch(text)
    if m is None:
        raise ValueError('not one key statement: key "NAME" { algorithm hmac-sha256; secret "BASE64"; };')
    try:
        secret = base64.b64decode(m["secret"], validate=True)
        name = dns.name.from_text(m["name"])
    except (ValueError, dns.exception.DNSException) as e:
        raise ValueError(f"bad key name or secret: {e}") from None
    return TsigKey(name, secret, m["alg"])  # ValueError: an algorithm we do not have


class Front:
    """The front's state for one zone: forwards in progress, and the deletion of expired leases.

    One front per zone owns the leases (a second front would delete, at expiry, records the first one
    renewed: docs/protocol.md, "Front mode"). ``primary`` is where :mod:`tunneld.dnsserver.serve` sends.
    """

    def __init__(self, store: ZoneStore, key: TsigKey, primary: tuple[str, int], *,
                 rand: Callable[[int], bytes] = os.urandom, fudge: int = FUDGE) -> None:
        self.store = store
        self.key = key
        self.primary = primary
        self._rand = rand
        self._fudge = fudge
        self.timeout = FORWARD_TIMEOUT
        """Seconds the primary has to answer (the trio side's exchange timeout)."""
        self._forwarding: dict[bytes, int | None] = {}  # request MACs of updates being forwarded: intents
        self.intents = Intents(store)
        self._failures = 0
        self._retry_at: float | None = None
        self.counters: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<Front zone={self.store.zone} primary={self.primary}>"

    def start(self, now: float) -> None:
        """Before the first forward: the store's commits no longer wait for the disk, only the intents
        do (:mod:`tunneld.dnsserver.intents`), and those a crash or power cut left are recovered."""
        self.store.sync_intents_only()
        left = self.intents.recover(now)
        if left:
            log.info("%d lease(s) of updates unanswered at the last stop wait for the primary's zone", left)

    def _id(self) -> int:
        return int.from_bytes(self._rand(2), "big")

    # ---- device updates -------------------------------------------------------------------------------

    def forward(self, update: CheckedUpdate, now: float) -> Forward | None:
        """The UPDATE to send for a checked device update; None for a copy of one being forwarded (the
        device retransmitted before the primary answered: the copy is dropped, and the device's next
        retransmission gets the remembered answer)."""
        mac = update.signer.request_mac
        if mac in self._forwarding:
            self.counters["update: copy while forwarding"] += 1
            return None
        self._forwarding[mac] = None
        return forwarded_update(update.wire, self._id(), self.key, now, self._fudge)

    def sent(self, update: CheckedUpdate, now: float, sync: bool = True) -> bool:
        """The forward of ``update`` is on its way: the leases of the RRs it adds are written, and synced
        unless not ``sync`` (the caller syncs them), while the primary works
        (:mod:`tunneld.dnsserver.intents`). True if an intent was written."""
        mac = update.signer.request_mac
        if mac not in self._forwarding or self._forwarding[mac] is not None:
            return False
        self._forwarding[mac] = self.intents.write(update.changes, update.lease, now, sync)
        return self._forwarding[mac] is not None

    def answer(self, core: DnsCore, update: CheckedUpdate, forward: Forward, reply: bytes | None,
               now: float) -> bytes:
        """The device's answer, once the primary replied (``reply``) or not (None: timed out, or no
        connection). The primary's rcode is committed (:meth:`DnsCore.commit`: remembered against replays;
        NOERROR also applied to our store with the lease). No usable reply: SERVFAIL, not remembered, so
        that the device's retransmission is forwarded again."""
        intent = self._forwarding.pop(update.signer.request_mac, None)
        rcode = self._rcode(reply, forward, now, "update")
        if rcode is None:  # the primary may have taken it: the intent stays (intents.py)
            return core.commit(update, dns.rcode.SERVFAIL, now, remember=False)
        if rcode != dns.rcode.NOERROR:
            self.intents.drop(intent)
        return core.commit(update, rcode, now, intent=intent)

    def late(self, core: DnsCore, update: CheckedUpdate, forward: Forward, reply: bytes,
             now: float) -> bytes | None:
        """The primary's reply to a forward that timed out (its device got SERVFAIL), come later on the
        same connection: a NOERROR is committed as :meth:`answer` would have (the records are on the
        primary: without their lease here nothing would ever delete them), and the device's retry of the
        same request gets that answer from the replay memory. Returns it; None for any other reply."""
        if self._rcode(reply, forward, now, "late update") != dns.rcode.NOERROR:
            return None
        return core.commit(update, dns.rcode.NOERROR, now)

    def abandon(self, update: CheckedUpdate) -> None:
        """The forward ended without an answer to give (the device's connection went away)."""
        self._forwarding.pop(update.signer.request_mac, None)

    def _rcode(self, reply: bytes | None, forward: Forward, now: float, what: str) -> int | None:
        if reply is None:
            self.counters[f"{what}: no reply from the primary"] += 1
            return None
        try:
            rcode = read_reply(reply, forward, self.key, now)
        except (ParseError, TsigError) as e:
            self.counters[f"{what}: bad reply from the primary ({e})"] += 1
            return None
        self.counters[f"{what}: primary {dns.rcode.to_text(dns.rcode.Rcode.make(rcode))}"] += 1
        return rcode

    # ---- expired leases ---------------------------------------------------------------------------------

    def deadline(self) -> float | None:
        """When :meth:`due_deletion` next has work (wall-clock seconds; past: now)."""
        nxt = self.store.next_expiry()
        if nxt is None or self._retry_at is None:
            return nxt
        return max(nxt, self._retry_at)

    def due_deletion(self, now: float) -> Deletion | None:
        """The delete UPDATE for the RRs whose lease has ended (a batch of them), if any is due. Built when
        it is sent, after any update forwarded before it was answered, so that it never deletes a record
        a device renewed meanwhile."""
        if self._retry_at is not None and now < self._retry_at:
            return None
        rrs = tuple(self.store.expired(now, DELETE_BATCH))
        if not rrs:
            return None
        return Deletion(delete_update(self.store.zone, rrs, self._id(), self.key, now, self._fudge), rrs)

    def deleted(self, deletion: Deletion, reply: bytes | None, now: float) -> list[RRsetRemoval]:
        """The primary's reply to a deletion (None: none came): on NOERROR the RRs leave our store too
        (those renewed since stay) and are returned, for the LLQ and Push removal events; otherwise the
        deletion is retried later."""
        rcode = self._rcode(reply, deletion.forward, now, "lease delete")
        if rcode == dns.rcode.NOERROR:
            try:
                removed = self.store.forget(deletion.rrs, now)
            except DiskFull:
                rcode = None
            else:
                self._failures, self._retry_at = 0, None
                for r in removed:
                    log.info("lease expired: %s type %d (%d RR), deleted on the primary", r.owner, r.rdtype,
                             len(r.rrs))
                return removed
        self._failures += 1
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** min(self._failures - 1, 16))
        self._retry_at = now + delay
        log.warning("the primary %s did not take the deletion of %d expired record(s)%s; retrying in %.0f s",
                    self.primary, len(deletion.rrs),
                    "" if rcode is None else f" ({dns.rcode.to_text(dns.rcode.Rcode.make(rcode))})", delay)
        return []
