"""The front's change feed: the primary's zone followed by NOTIFY, serial checks and zone transfers.

In front mode the primary holds the zone, and any change made there (a device's update the front forwarded,
a lease it deleted, or an operator's own nsupdate) must reach the LLQ watchers and DNS Push subscribers the
front serves. The primary NOTIFYs the front (RFC 1996, ``also-notify``, signed with the front key); the
front then asks the primary's SOA serial and, when it is newer than its replica's (RFC 1982), fetches the
changes (IXFR from its serial, AXFR when it has none or the changes do not apply), applies them
(:mod:`tunneld.dnsserver.replica`) and hands what changed to the LLQ server and the Push sessions. A NOTIFY
can be lost and a front restarted, so the serial is also checked every :data:`SOA_CHECK_INTERVAL`.

:class:`Feed` holds the decisions, sans-I/O (``now`` is wall-clock seconds: TSIG signs it); :class:`FeedTask`
runs them in trio over the :class:`~tunneld.dnsserver.primary.PrimaryLink`, one check at a time, with a
backoff after a failure. docs/protocol.md, "Front mode".
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

import trio
import trio.testing

from tunneld.dnsserver.replica import PRIMARY_SOA_KEY, ReplicaError, apply_transfer, primary_soa, soa_serial
from tunneld.dnsserver.store import AddRR, DeleteRR, DiskFull, ZoneStore
from tunneld.proto.errors import ParseError
from tunneld.proto.notify_wire import SoaQuery, notify_response, read_notify, read_soa_answer, soa_query
from tunneld.proto.tsig import TsigKey
from tunneld.proto.xfr import (
    Full,
    Incremental,
    TransferReader,
    TransferResult,
    ZoneRecord,
    serial_gt,
    transfer_query,
)

__all__ = ["RETRY_FIRST", "RETRY_MAX", "SOA_CHECK_INTERVAL", "Feed", "FeedTask", "Link"]

log = logging.getLogger(__name__)

SOA_CHECK_INTERVAL: Final = 30.0
"""Seconds between two checks of the primary's serial when no NOTIFY came: a NOTIFY lost (BIND repeats
one only a few times), or sent while the front was down, is caught up within this. The check is one small
signed query; dnsextd polled four times a second instead of listening."""
NOTIFY_GAP: Final = 0.1
"""Seconds a NOTIFY-made check waits after the previous check began. A stream of updates makes the primary
NOTIFY after each; one check then fetches them all (the front's own updates were announced when the primary
took them, so only operators' direct changes wait, by this at most), instead of a transfer per update
competing with the forwards for the link."""
NOTIFY_QUEUE: Final = 1024
NOTIFY_QUEUE_PER_SOURCE: Final = 8
"""NOTIFYs waiting for their answer, in all and from one address (they are checked when answered: forged
ones from elsewhere must not crowd out the primary's); beyond, dropped (counted): the primary repeats one
(RFC 1996 §3.6)."""
NOTIFY_IDLE_WAIT: Final = 0.05
"""Seconds a NOTIFY waits for the front to be idle before it is answered anyway (a busy front)."""
RETRY_FIRST: Final = 2.0
RETRY_MAX: Final = 60.0
"""A check or transfer that failed is tried again after RETRY_FIRST seconds, doubling up to RETRY_MAX."""

ZoneChanges = list[AddRR | DeleteRR]


class Feed:
    """The feed's state for one zone: when the next serial check is due, the backoff, and the replica's
    serial (kept in ``store``). ``interval`` is :data:`SOA_CHECK_INTERVAL` unless a test says otherwise."""

    def __init__(self, store: ZoneStore, key: TsigKey, *, interval: float = SOA_CHECK_INTERVAL,
                 rand: Callable[[int], bytes] = os.urandom) -> None:
        if not interval > 0:
            raise ValueError("the serial check interval must be positive")
        self.store = store
        self.key = key
        self.interval = interval
        self._rand = rand
        self._due = -math.inf  # at start: a check at once
        self._retry_at: float | None = None
        self._failures = 0
        self._full = False  # the next transfer is an AXFR (the changes did not apply)
        self._began = -math.inf  # when the last check began
        self._notified: int | None = None  # the newest serial a NOTIFY announced, not yet fetched
        self._soa_text: str | None = None  # the replica's SOA as stored, and as parsed
        self._soa: ZoneRecord | None = None
        self.counters: Counter[str] = Counter()

    def _id(self) -> int:
        return int.from_bytes(self._rand(2), "big")

    @property
    def serial(self) -> int | None:
        """The serial of the primary's zone the replica holds (None before the first transfer)."""
        soa = self._replica_soa()
        return None if soa is None else soa_serial(soa)

    def _replica_soa(self) -> ZoneRecord | None:
        """:func:`primary_soa`, parsed again only when the stored text changed: every NOTIFY asks it, and
        dnspython's parse of it cost 0.1 ms of the front's one thread each time."""
        text = self.store.meta(PRIMARY_SOA_KEY)
        if text != self._soa_text:
            self._soa_text, self._soa = text, primary_soa(self.store)
        return self._soa

    # ---- NOTIFY ---------------------------------------------------------------------------------------

    def notify(self, wire: bytes, now: float) -> bytes | None:
        """The answer to a NOTIFY from the primary (and a check made due, unless it says the serial we
        hold); None for a message that is not a NOTIFY for our zone signed with the front key (dropped)."""
        try:
            notify = read_notify(wire, self.store.zone, self.key, now)
        except ParseError as e:
            self.counters[f"notify: dropped ({e})"] += 1
            return None
        ours = self.serial
        if notify.serial is not None and ours is not None and not serial_gt(notify.serial, ours):
            self.counters["notify: nothing newer"] += 1
        else:
            self.counters["notify"] += 1
            self._due = min(self._due, max(now, self._began + NOTIFY_GAP))
            newest = self._notified
            if notify.serial is not None and (newest is None or serial_gt(notify.serial, newest)):
                self._notified = notify.serial
        return notify_response(notify, self.key, now)

    # ---- the check ------------------------------------------------------------------------------------

    def deadline(self) -> float:
        """When the next check is due (wall-clock seconds; past: now), not before a retry's time."""
        return max(self._due, self._retry_at or -math.inf)

    def notified_transfer(self, now: float) -> TransferReader | None:
        """A check starting ``now`` that a NOTIFY made: the reader of the IXFR from our serial when the
        NOTIFY (signed with the front key) announced a newer one, with no serial check first; None when a
        serial check is needed (no NOTIFY serial, no replica, or the next transfer must be an AXFR)."""
        notified, self._notified = self._notified, None
        current = None if self._full else self._replica_soa()
        if notified is None or current is None or not serial_gt(notified, soa_serial(current)):
            return None
        self._began, self._due = now, now + self.interval
        self.counters["transfer: IXFR (notified)"] += 1
        return TransferReader(transfer_query(self.store.zone, self.key, self._id(), now, current), self.key)

    def soa_query(self, now: float) -> SoaQuery:
        """The signed SOA query of a check starting ``now`` (the next periodic check counts from here)."""
        self._began, self._due = now, now + self.interval
        self.counters["serial check"] += 1
        return soa_query(self.store.zone, self.key, self._id(), now)

    def serial_answer(self, query: SoaQuery, reply: bytes | None, now: float) -> TransferReader | None:
        """The primary's answer to ``query`` (None: none came): the reader of the transfer to make if the
        primary's serial is newer than ours (or we have none), else None."""
        if reply is None:
            self.failed("serial check: no answer", now)
            return None
        try:
            serial = read_soa_answer(reply, query, self.key, now)
        except ParseError as e:
            self.failed(f"serial check: bad answer ({e})", now)
            return None
        current = None if self._full else self._replica_soa()
        if current is not None and not serial_gt(serial, soa_serial(current)):
            if serial == soa_serial(current):
                self._succeeded()
                return None
            # Older than ours (a primary restored from a backup): an IXFR would say "up to date", so the
            # whole zone is fetched again.
            self.counters["serial check: the primary's is older"] += 1
            current = None
        self.counters["transfer: AXFR" if current is None else "transfer: IXFR"] += 1
        return TransferReader(transfer_query(self.store.zone, self.key, self._id(), now, current), self.key)

    def transferred(self, result: TransferResult | None, now: float) -> ZoneChanges:
        """The transfer's result (None: it failed) applied to the replica; what changed."""
        if result is None:
            self.failed("transfer failed", now)
            return []
        if not isinstance(result, Full | Incremental):  # UpToDate: the serial moved back meanwhile
            self.counters["transfer: up to date"] += 1
            self._succeeded()
            return []
        try:
            changes = apply_transfer(self.store, result)
        except ReplicaError as e:
            self._full = True
            self.failed(f"transfer: {e}", now)
            return []
        except DiskFull:
            self.failed("transfer: the disk is full", now)
            return []
        self._full = False
        self._succeeded()
        self.counters["transfer: applied"] += 1
        self.counters["transfer: records changed"] += len(changes)
        log.info("zone %s: serial %d from the primary, %d change(s)", self.store.zone, result.serial,
                 len(changes))
        return changes

    def failed(self, why: str, now: float) -> None:
        """A check or transfer failed: retried after a backoff."""
        self.counters[why] += 1
        self._failures += 1
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** min(self._failures - 1, 16))
        self._retry_at = now + delay
        self._due = min(self._due, self._retry_at)
        log.warning("zone %s: %s; trying again in %.0f s", self.store.zone, why, delay)

    def _succeeded(self) -> None:
        self._failures, self._retry_at = 0, None


class Link(Protocol):
    """What the feed needs of its connection to the primary: a
    :class:`~tunneld.dnsserver.primary.PrimaryLink`."""

    async def exchange(self, forward: SoaQuery) -> bytes | None: ...

    async def transfer(self, reader: TransferReader, clock: Callable[[], float]) -> TransferResult | None: ...


Deliver = Callable[[Sequence[AddRR | DeleteRR], float], Awaitable[None]]
Send = Callable[[bytes, tuple[str, int]], Awaitable[None]]


class FeedTask:
    """The feed in trio: :meth:`run` checks when :class:`Feed` says (at start, after a NOTIFY, every
    interval, after a backoff) and ``deliver``\\ s what changed (to the LLQ server and the Push sessions);
    :meth:`notify` is the UDP listener's door for NOTIFY messages."""

    def __init__(self, feed: Feed, link: Link, deliver: Deliver, clock: Callable[[], float] = time.time,
                 max_sleep: float = 60.0) -> None:
        self.feed = feed
        self.link = link
        self.deliver = deliver
        self.clock = clock
        self.max_sleep = max_sleep  # the wall clock may jump: re-read it at least this often
        self._wake = trio.Event()
        self._notifies: deque[tuple[bytes, tuple[str, int]]] = deque()
        self._queued: Counter[str] = Counter()  # NOTIFYs queued per source address
        self._notified = trio.Event()

    def notify(self, wire: bytes) -> bytes | None:
        """The answer to a NOTIFY (None: dropped); the check it makes due starts at once."""
        reply = self.feed.notify(wire, self.clock())
        if reply is not None:
            self._wake.set()
        return reply

    def notify_later(self, wire: bytes, src: tuple[str, int]) -> None:
        """A NOTIFY from ``src``, answered by :meth:`answer_notifies` once the front is idle: the primary
        NOTIFYs right after answering each forward, and a NOTIFY read and answered then delayed the
        forward's commit or the next device's update by its own cost."""
        if len(self._notifies) >= NOTIFY_QUEUE or self._queued[src[0]] >= NOTIFY_QUEUE_PER_SOURCE:
            self.feed.counters["notify: dropped (queue full)"] += 1
            return
        self._queued[src[0]] += 1
        self._notifies.append((wire, src))
        self._notified.set()

    async def answer_notifies(self, send: Send) -> None:
        """Answer the queued NOTIFYs (through ``send``) when every other task of the front waits (for
        the primary, a request, a timer), or after :data:`NOTIFY_IDLE_WAIT` at most."""
        while True:
            await self._notified.wait()
            self._notified = trio.Event()
            with trio.move_on_after(NOTIFY_IDLE_WAIT):
                await trio.testing.wait_all_tasks_blocked()
            while self._notifies:
                wire, src = self._notifies.popleft()
                self._queued[src[0]] -= 1
                if not self._queued[src[0]]:
                    del self._queued[src[0]]
                reply = self.notify(wire)
                if reply is not None:
                    await send(reply, src)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            delay = min(max(self.feed.deadline() - self.clock(), 0.0), self.max_sleep)
            with trio.move_on_after(delay):
                await self._wake.wait()
            self._wake = trio.Event()
            if self.feed.deadline() > self.clock():
                continue
            try:
                changes = await self.check()
            except Exception:  # keep serving: the replica stays as it was, the check is tried again
                log.exception("zone %s: the change feed failed", self.feed.store.zone)
                self.feed.failed("feed: internal error", self.clock())
                continue
            if changes:
                await self.deliver(changes, self.clock())

    async def check(self) -> ZoneChanges:
        """One check: the serial, then the transfer if the primary has something newer (after a NOTIFY
        that said its serial: the transfer at once)."""
        reader = self.feed.notified_transfer(self.clock())
        if reader is not None:
            return self.feed.transferred(await self.link.transfer(reader, self.clock), self.clock())
        query = self.feed.soa_query(self.clock())
        reader = self.feed.serial_answer(query, await self.link.exchange(query), self.clock())
        if reader is None:
            return []
        return self.feed.transferred(await self.link.transfer(reader, self.clock), self.clock())
