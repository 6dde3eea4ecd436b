"""The front's WAL syncs (tunneld.dnsserver.walsync) with os.fsync replaced by a gate the test opens: one
sync at a time in a worker thread, each covering every commit marked before it began (group commit); a
waiter returns once its commit is covered; a failed sync is logged once and does not hold replies; when
the task stops, no one waits for it."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from tunneld.dnsserver.walsync import WalSync


@pytest.fixture
def wal(tmp_path: Path) -> WalSync:
    db = sqlite3.connect(tmp_path / "front.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    db.close()
    return WalSync(str(tmp_path / "front.sqlite"))


class Gate:
    """os.fsync that records its calls and blocks until the test opens it (or raises ``error``)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.open = threading.Event()
        self.error: OSError | None = None

    def __call__(self, fd: int) -> None:
        self.calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        if not self.open.wait(timeout=10):
            raise AssertionError("the gate was never opened")
        if self.error is not None:
            raise self.error


def test_marks_made_during_a_sync_share_the_next_one(wal: WalSync, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate()
    monkeypatch.setattr(os, "fsync", gate)

    async def main() -> None:
        done: list[int] = []

        async def waiter(ticket: int) -> None:
            await wal.wait(ticket)
            done.append(ticket)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wal.run)
                first = wal.mark()
                nursery.start_soon(waiter, first)
                while not gate.calls:  # the first sync has begun (in its thread)
                    await trio.sleep(0.001)
                second, third = wal.mark(), wal.mark()
                nursery.start_soon(waiter, second)
                nursery.start_soon(waiter, third)
                await trio.sleep(0.05)
                assert done == [] and len(gate.calls) == 1  # nothing returns before its sync
                gate.open.set()
                while len(done) < 3:
                    await trio.sleep(0.001)
                assert sorted(done) == [1, 2, 3]
                assert len(gate.calls) == 2 and wal.counters["syncs"] == 2  # the two later ones: one sync
                assert set(gate.calls) == {str(tmp_path / "front.sqlite-wal")}
                nursery.cancel_scope.cancel()

    trio.run(main)
    wal.close()


def test_a_failed_sync_is_logged_once_and_releases_its_waiters(wal: WalSync, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    gate = Gate()
    gate.error = OSError(5, "Input/output error")
    gate.open.set()
    monkeypatch.setattr(os, "fsync", gate)

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wal.run)
                for _ in range(3):
                    await wal.wait(wal.mark())
                assert wal.failed and wal.counters["sync failed"] == 3
                gate.error = None
                await wal.wait(wal.mark())
                assert not wal.failed
                nursery.cancel_scope.cancel()

    with caplog.at_level(logging.ERROR, logger="tunneld.dnsserver.walsync"):
        trio.run(main)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["syncing the zone database's journal "
                                                                      f"{wal.path} failed"]
    wal.close()


def test_waiters_do_not_outlive_the_task_nor_their_timeout(wal: WalSync,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate()
    monkeypatch.setattr(os, "fsync", gate)

    async def main() -> None:
        with trio.fail_after(10):
            ticket = wal.mark()  # no task runs: only the timeout ends the wait
            start = trio.current_time()
            await wal.wait(ticket, timeout=0.05)
            assert trio.current_time() - start >= 0.05
            assert wal.counters["reply sent before its sync (timeout)"] == 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wal.run)
                while not gate.calls:
                    await trio.sleep(0.001)
                nursery.cancel_scope.cancel()  # shutting down while a sync is in its thread
                gate.open.set()
            await wal.wait(wal.mark())  # stopped: returns at once

    trio.run(main)
    wal.close()
