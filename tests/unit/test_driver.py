"""The one driver (services/driver.py) runs a core over loopback: receive, timers, events, the goodbye."""

from __future__ import annotations

import socket

import trio
import trio.testing

from tunneld.proto.core import Address, Outbox
from tunneld.services.driver import Driver


class PingCore(Outbox[str]):
    """Sends "ping" to a peer every `interval`; an answer "pong" is an event; close sends "bye" and is
    finished when "ok" comes back (or at once with `wait_for_ok=False`)."""

    def __init__(self, peer: Address, interval: float, wait_for_ok: bool = True) -> None:
        super().__init__()
        self.peer = peer
        self.interval = interval
        self.next: float | None = 0.0
        self.closed = False
        self.wait_for_ok = wait_for_ok
        self.ok = False
        self.bad = 0

    def receive(self, data: bytes, source: Address, now: float) -> None:
        if source != self.peer:
            self.bad += 1
        elif data == b"pong":
            self._emit(f"pong@{now:.1f}")
        elif data == b"ok":
            self.ok = True
        else:
            self.bad += 1

    def poll(self, now: float) -> None:
        if self.next is not None and now >= self.next:
            self._send(self.peer, b"ping")
            self.next = now + self.interval

    def deadline(self) -> float | None:
        return self.next

    def close(self, now: float) -> None:
        self.closed = True
        self.next = None
        self._send(self.peer, b"bye")

    def finished(self) -> bool:
        return self.ok or not self.wait_for_ok


async def _pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    a = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await a.bind(("127.0.0.1", 0))
    await b.bind(("127.0.0.1", 0))
    return a, b


async def _peer(sock: trio.socket.SocketType, seen: list[bytes], answer_bye: bool) -> None:
    while True:
        data, src = await sock.recvfrom(100)
        seen.append(data)
        if data == b"ping":
            await sock.sendto(b"pong", src)
        elif data == b"bye" and answer_bye:
            await sock.sendto(b"ok", src)


async def _test_timers_receive_events_and_goodbye_answered() -> None:
    a, b = await _pair()
    with a, b:
        core = PingCore(b.getsockname(), interval=0.05)
        got: list[str] = []
        seen: list[bytes] = []
        driver = Driver(core, [a], on_event=got.append, grace=2.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_peer, b, seen, True)
            with trio.fail_after(5):
                await nursery.start(driver.run)
                while len(got) < 3:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert len(got) >= 3 and all(e.startswith("pong@") for e in got)
        assert seen.count(b"ping") >= 3


async def _test_goodbye_waits_for_the_answer_within_grace() -> None:
    a, b = await _pair()
    with a, b:
        core = PingCore(b.getsockname(), interval=10.0)
        seen: list[bytes] = []
        driver = Driver(core, [a], grace=2.0)
        async with trio.open_nursery() as outer:
            outer.start_soon(_peer, b, seen, True)
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    await nursery.start(driver.run)
                    nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
        assert core.closed and core.ok  # the "ok" was received during the grace
        assert seen[-1] == b"bye"


async def _test_goodbye_is_bounded_when_nobody_answers() -> None:
    a, b = await _pair()
    with a, b:
        core = PingCore(b.getsockname(), interval=10.0)
        driver = Driver(core, [a], grace=0.2)
        start = trio.current_time()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(driver.run)
                assert (await b.recvfrom(100))[0] == b"ping"
                nursery.cancel_scope.cancel()
        assert core.closed and not core.ok
        assert trio.current_time() - start < 1.0
        assert (await b.recvfrom(100))[0] == b"bye"  # said once, then the grace ran out


async def _test_wake_flushes_outside_calls_and_foreign_sources_are_the_cores_business() -> None:
    a, b = await _pair()
    stranger = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with a, b, stranger:
        core = PingCore(b.getsockname(), interval=100.0, wait_for_ok=False)
        driver = Driver(core, [a], grace=0.5)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(5):
                await nursery.start(driver.run)
                assert (await b.recvfrom(100))[0] == b"ping"  # the first poll at start
                core._send(core.peer, b"extra")  # an outside call into the core ...
                driver.wake()  # ... is sent on wake
                assert (await b.recvfrom(100))[0] == b"extra"
                await stranger.sendto(b"pong", a.getsockname())
                while core.bad == 0:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert core.bad == 1


def test_timers_receive_events_and_goodbye_answered() -> None:
    trio.run(_test_timers_receive_events_and_goodbye_answered)


def test_goodbye_waits_for_the_answer_within_grace() -> None:
    trio.run(_test_goodbye_waits_for_the_answer_within_grace)


def test_goodbye_is_bounded_when_nobody_answers() -> None:
    trio.run(_test_goodbye_is_bounded_when_nobody_answers)


def test_wake_flushes_outside_calls_and_foreign_sources_are_the_cores_business() -> None:
    trio.run(_test_wake_flushes_outside_calls_and_foreign_sources_are_the_cores_business)


async def _test_reopen_moves_to_new_sockets_and_keeps_the_core() -> None:
    a, b = await _pair()
    a2 = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await a2.bind(("127.0.0.1", 0))
    with a, b, a2:
        core = PingCore(b.getsockname(), interval=100.0, wait_for_ok=False)
        got: list[str] = []
        driver = Driver(core, [a], on_event=got.append, grace=0.5)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(5):
                await nursery.start(driver.run)
                assert (await b.recvfrom(100))[1] == a.getsockname()
                driver.reopen([a2])
                a.close()  # the old socket goes; nothing breaks
                core._send(core.peer, b"ping")
                driver.wake()
                data, src = await b.recvfrom(100)
                assert (data, src) == (b"ping", a2.getsockname())
                await b.sendto(b"pong", a2.getsockname())  # answers reach the core on the new socket
                while not got:
                    await trio.sleep(0.01)
                assert core.next is not None and not core.closed  # the same core, its timer kept
            nursery.cancel_scope.cancel()
        assert len(got) == 1


def test_reopen_moves_to_new_sockets_and_keeps_the_core() -> None:
    trio.run(_test_reopen_moves_to_new_sockets_and_keeps_the_core)
