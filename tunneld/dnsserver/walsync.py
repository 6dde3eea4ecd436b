"""The front's disk syncs, in a worker thread and shared: group commit of the store's write-ahead log.

A forwarded update's lease must be on disk before its device is answered
(:mod:`tunneld.dnsserver.intents`). Synced by SQLite inside the commit, the sync held the front's one
thread for half a millisecond, often more when the primary syncs its own journal at the same moment, and
the primary's answer waited behind it. Here the intent's commit is written unsynced and the WAL file is
synced by :func:`os.fsync` in a worker thread while the thread goes on (reads the primary's answer,
commits it); the device's reply waits for the sync. One sync runs at a time and covers every commit
written before it began, so the forwards in flight at once share their syncs.

SQLite itself syncs the WAL only at checkpoints with ``synchronous=NORMAL``, and keeps the file (and its
inode) while the database is open: a descriptor opened once stays valid. SQLite takes no locks on the WAL
file, so this second descriptor does not disturb its POSIX locks.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from tunneld.dnsserver.store import ZoneStore

__all__ = ["SYNC_WAIT", "WalSync"]

SYNC_WAIT: Final = 5.0
"""Seconds a reply waits for its sync at most (a disk that hangs: the reply goes, counted)."""

log = logging.getLogger(__name__)


class WalSync:
    """Syncs of one database's WAL file (``path`` + ``-wal``, which must exist: the store is in WAL
    mode). :meth:`mark` after each commit that must reach the disk, :meth:`wait` before answering for it;
    :meth:`run` is the task that syncs."""

    def __init__(self, path: str) -> None:
        self.path = f"{path}-wal"
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._written = 0  # commits marked
        self._synced = 0  # commits known to be on disk
        self._wake = trio.Event()
        self._done = trio.Event()
        self.failed = False  # the last sync failed (logged once until one succeeds)
        self._stopped = False  # run() ended (shutting down): no one syncs, no one waits
        self.counters: Counter[str] = Counter()

    @classmethod
    def of(cls, store: ZoneStore) -> WalSync | None:
        """The syncs of ``store``'s WAL; None when it has none (not in WAL mode: in memory, say)."""
        if store.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            return None
        return cls(store.path)

    def close(self) -> None:
        os.close(self._fd)

    def mark(self) -> int:
        """A commit to be synced was written: its ticket for :meth:`wait`. The sync starts at once."""
        self._written += 1
        self._wake.set()
        return self._written

    async def wait(self, ticket: int, timeout: float = SYNC_WAIT) -> None:
        """Until the commit of ``ticket`` is on disk (or a sync failed: logged; nothing better to do),
        ``timeout`` seconds at most."""
        with trio.move_on_after(timeout) as scope:
            while self._synced < ticket and not self._stopped:
                await self._done.wait()
        if scope.cancelled_caught:
            self.counters["reply sent before its sync (timeout)"] += 1

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._synced < self._written:
                    target = self._written  # every commit written before the sync begins
                    self.counters["syncs"] += 1
                    try:
                        await trio.to_thread.run_sync(os.fsync, self._fd)
                    except OSError as e:
                        self.counters["sync failed"] += 1
                        if not self.failed:
                            log.error("syncing the zone database's journal %s failed: %s", self.path, e)
                        self.failed = True
                    else:
                        self.failed = False
                    self._synced = target
                    self._done.set()
                    self._done = trio.Event()
        finally:
            self._stopped = True
            self._done.set()
