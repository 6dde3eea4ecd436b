"""PrimaryLink against a scripted primary on loopback: exchanges pipelined on one connection and answered in
any order, a reply with an unknown ID counted and dropped, a lost connection resending what was on it, a
message ID in flight waited for, the timeout with a late answer handed on, and a transfer taking its turn
between the exchanges (none in flight while it is read, none sent until it is done).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, cast

import trio
import trio.testing

from tunneld.dnsserver.front import Forward
from tunneld.dnsserver.primary import MAX_IN_FLIGHT, PrimaryLink
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.xfr import TransferReader


def request(msg_id: int) -> Forward:
    return Forward(msg_id, msg_id.to_bytes(2, "big") + b"request.....", b"")


def answer(msg_id: int, tag: bytes = b"") -> bytes:
    return msg_id.to_bytes(2, "big") + b"answer......" + tag


@dataclass
class Scripted:
    """A primary that answers only when the test says: every message it got, by connection number, and
    the streams to answer (or close) on."""

    got: list[tuple[int, bytes]] = field(default_factory=list)
    streams: list[trio.SocketStream] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    async def handler(self, stream: trio.SocketStream) -> None:
        conn = len(self.streams)
        self.streams.append(stream)
        frames = FrameBuffer()
        try:
            while data := await stream.receive_some(65535):
                frames.feed(data)
                while (wire := frames.next()) is not None:
                    self.got.append((conn, wire))
                    self.changed.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def wait_for(self, count: int) -> None:
        while len(self.got) < count:
            self.changed = trio.Event()
            await self.changed.wait()

    async def send(self, conn: int, *wires: bytes) -> None:
        await self.streams[conn].send_all(b"".join(frame(w) for w in wires))


_LINKS: list[PrimaryLink] = []


async def start(nursery: trio.Nursery, timeout: float = 5.0) -> tuple[Scripted, PrimaryLink]:
    primary = Scripted()
    listeners = await nursery.start(functools.partial(trio.serve_tcp, primary.handler, 0, host="127.0.0.1"))
    _LINKS.append(PrimaryLink(listeners[0].socket.getsockname()[:2], timeout=timeout))
    return primary, _LINKS[-1]


def run(test: Any) -> None:
    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                try:
                    await test(nursery)
                finally:
                    while _LINKS:
                        _LINKS.pop().close_now()  # the link keeps its connection for the next exchange
                nursery.cancel_scope.cancel()

    trio.run(main)


async def collect(link: PrimaryLink, forward: Forward, into: dict[int, bytes | None], **kw: Any) -> None:
    into[forward.msg_id] = await link.exchange(forward, **kw)


def test_exchanges_are_pipelined_and_matched_by_id_in_any_order() -> None:
    async def test(nursery: trio.Nursery) -> None:
        primary, link = await start(nursery)
        replies: dict[int, bytes | None] = {}
        async with trio.open_nursery() as exchanges:
            for i in (1, 2, 3):
                exchanges.start_soon(collect, link, request(i), replies)
            await primary.wait_for(3)  # all three sent before any answer: pipelined
            assert [c for c, _ in primary.got] == [0, 0, 0]
            await primary.send(0, answer(3, b"c"), answer(1, b"a"))
            await primary.send(0, answer(2, b"b"))
        assert replies == {1: answer(1, b"a"), 2: answer(2, b"b"), 3: answer(3, b"c")}
        assert link.counters["connections"] == 1 and "timeout" not in link.counters

    run(test)


def test_a_reply_with_an_unknown_id_is_counted_and_dropped() -> None:
    async def test(nursery: trio.Nursery) -> None:
        primary, link = await start(nursery)
        replies: dict[int, bytes | None] = {}
        async with trio.open_nursery() as exchanges:
            exchanges.start_soon(collect, link, request(7), replies)
            await primary.wait_for(1)
            await primary.send(0, answer(8), answer(7))
        assert replies == {7: answer(7)} and link.counters["stray reply"] == 1

    run(test)


def test_a_lost_connection_sends_what_was_on_it_again_on_a_new_one() -> None:
    async def test(nursery: trio.Nursery) -> None:
        primary, link = await start(nursery)
        replies: dict[int, bytes | None] = {}
        async with trio.open_nursery() as exchanges:
            for i in (1, 2):
                exchanges.start_soon(collect, link, request(i), replies)
            await primary.wait_for(2)
            await primary.streams[0].aclose()  # both in flight when the primary closes
            await primary.wait_for(4)
            assert sorted(primary.got) == sorted([(0, request(1).wire), (0, request(2).wire),
                                                  (1, request(1).wire), (1, request(2).wire)])
            await primary.send(1, answer(2), answer(1))
        assert replies == {1: answer(1), 2: answer(2)}
        assert link.counters["connections"] == 2 and link.counters["connection lost: sent again"] == 2

    run(test)


def test_a_connection_lost_twice_fails_the_exchange() -> None:
    async def test(nursery: trio.Nursery) -> None:
        primary, link = await start(nursery)
        replies: dict[int, bytes | None] = {}
        async with trio.open_nursery() as exchanges:
            exchanges.start_soon(collect, link, request(1), replies)
            for n in (1, 2):
                await primary.wait_for(n)
                await primary.streams[n - 1].aclose()
        assert replies == {1: None} and link.counters["connection failed"] == 1

    run(test)


def test_a_message_id_in_flight_is_not_sent_twice_at_once() -> None:
    async def test(nursery: trio.Nursery) -> None:
        primary, link = await start(nursery)
        replies: list[bytes | None] = []

        async def one() -> None:
            replies.append(await link.exchange(request(5)))

        async with trio.open_nursery() as exchanges:
            exchanges.start_soon(one)
            exchanges.start_soon(one)
            await primary.wait_for(1)
            await trio.testing.wait_all_tasks_blocked()
            assert len(primary.got) == 1  # the second waits for the first's answer
            await primary.send(0, answer(5, b"first"))
            await primary.wait_for(2)
            await primary.send(0, answer(5, b"second"))
        assert replies == [answer(5, b"first"), answer(5, b"second")]
        assert link.counters["waited for a message ID in flight"] == 1

    run(test)


def test_a_timeout_is_none_and_the_late_answer_is_handed_on() -> None:
    async def test(nursery: trio.Nursery) -> None:
        primary, link = await start(nursery, timeout=0.3)
        late: list[bytes] = []
        t0 = trio.current_time()
        assert await link.exchange(request(1), late.append) is None
        assert 0.3 <= trio.current_time() - t0 < 2 and link.counters["timeout"] == 1
        replies: dict[int, bytes | None] = {}
        async with trio.open_nursery() as exchanges:
            exchanges.start_soon(collect, link, request(2), replies)  # the connection is still in use
            await primary.wait_for(2)
            await primary.send(0, answer(1, b"late"), answer(2))
        assert replies == {2: answer(2)} and late == [answer(1, b"late")]
        assert link.counters["late reply"] == 1 and link.counters["connections"] == 1

    run(test)


def test_with_a_nursery_a_late_answer_is_read_without_another_exchange() -> None:
    async def test(nursery: trio.Nursery) -> None:
        primary, link = await start(nursery, timeout=0.3)
        link.nursery = nursery
        got = trio.Event()
        late: list[bytes] = []

        def on_late(wire: bytes) -> None:
            late.append(wire)
            got.set()

        assert await link.exchange(request(1), on_late) is None
        await primary.send(0, answer(3), answer(1, b"late"))  # a stray one first
        await got.wait()
        assert late == [answer(1, b"late")] and link.counters["stray reply"] == 1
        await trio.testing.wait_all_tasks_blocked()
        assert link._late_reader is None and not link._reading  # the reader is gone: nothing awaited
        replies: dict[int, bytes | None] = {}
        async with trio.open_nursery() as exchanges:  # and the connection still serves
            exchanges.start_soon(collect, link, request(2), replies)
            await primary.wait_for(2)
            await primary.send(0, answer(2))
        assert replies == {2: answer(2)} and link.counters["connections"] == 1

    run(test)


class _Reader:
    """What PrimaryLink.transfer uses of a TransferReader: its query, and feed (done at the first answer)."""

    def __init__(self) -> None:
        self.query = request(100)

    def feed(self, message: bytes, now: float) -> object:
        return ("transferred", message)


def test_a_transfer_waits_for_the_exchanges_in_flight_and_holds_new_ones() -> None:
    async def test(nursery: trio.Nursery) -> None:
        primary, link = await start(nursery)
        replies: dict[int, bytes | None] = {}
        result: list[object] = []

        async def transfer() -> None:
            result.append(await link.transfer(cast(TransferReader, _Reader()), trio.current_time))

        async with trio.open_nursery() as tasks:
            tasks.start_soon(collect, link, request(1), replies)
            await primary.wait_for(1)
            tasks.start_soon(transfer)
            await trio.testing.wait_all_tasks_blocked()
            tasks.start_soon(collect, link, request(2), replies)  # asked during the transfer's turn
            await trio.testing.wait_all_tasks_blocked()
            assert len(primary.streams) == 1 and len(primary.got) == 1  # the transfer waits for 1
            await primary.send(0, answer(1))
            await primary.wait_for(2)
            assert primary.got[1] == (1, request(100).wire)  # on its own connection; 2 not sent yet
            await trio.testing.wait_all_tasks_blocked()
            assert len(primary.got) == 2 and 1 in replies
            await primary.send(1, answer(100))
            await primary.wait_for(3)
            assert primary.got[2] == (0, request(2).wire) and result == [("transferred", answer(100))]
            await primary.send(0, answer(2))
        assert replies == {1: answer(1), 2: answer(2)}

    run(test)


def test_no_late_answer_is_read_while_a_transfer_is() -> None:
    """A late answer commits an update: one read while a transfer is would be undone when the transfer,
    begun before it, is applied. The transfer ends the late reader; the answer waits for the next
    exchange."""
    async def test(nursery: trio.Nursery) -> None:
        primary, link = await start(nursery, timeout=0.3)
        link.nursery = nursery
        late: list[bytes] = []
        result: list[object] = []
        assert await link.exchange(request(1), late.append) is None
        await trio.testing.wait_all_tasks_blocked()
        assert link._late_reader is not None  # reading for it

        async def transfer() -> None:
            result.append(await link.transfer(cast(TransferReader, _Reader()), trio.current_time))

        async with trio.open_nursery() as tasks:
            tasks.start_soon(transfer)
            await primary.wait_for(2)  # the transfer's query, on its own connection
            assert primary.got[1] == (1, request(100).wire) and link._late_reader is None
            await primary.send(0, answer(1, b"late"))
            await trio.testing.wait_all_tasks_blocked()
            assert late == []  # not read during the transfer
            await primary.send(1, answer(100))
        assert result == [("transferred", answer(100))] and late == []
        replies: dict[int, bytes | None] = {}
        async with trio.open_nursery() as exchanges:
            exchanges.start_soon(collect, link, request(2), replies)
            await primary.wait_for(3)
            await primary.send(0, answer(2))
        assert late == [answer(1, b"late")] and replies == {2: answer(2)}

    run(test)


def test_in_flight_is_bounded() -> None:
    async def test(nursery: trio.Nursery) -> None:
        primary, link = await start(nursery)
        replies: dict[int, bytes | None] = {}

        def got_ids(first: int, last: int) -> list[int]:
            return [int.from_bytes(w[:2], "big") for _, w in primary.got[first:last]]

        async with trio.open_nursery() as exchanges:
            for i in range(MAX_IN_FLIGHT + 3):
                exchanges.start_soon(collect, link, request(i), replies)
            await primary.wait_for(MAX_IN_FLIGHT)
            await trio.testing.wait_all_tasks_blocked()
            assert len(primary.got) == MAX_IN_FLIGHT
            await primary.send(0, answer(got_ids(0, 1)[0]))
            await primary.wait_for(MAX_IN_FLIGHT + 1)  # one answered: one more goes
            await trio.testing.wait_all_tasks_blocked()
            assert len(primary.got) == MAX_IN_FLIGHT + 1
            await primary.send(0, *(answer(i) for i in got_ids(1, MAX_IN_FLIGHT + 1)))
            await primary.wait_for(MAX_IN_FLIGHT + 3)
            await primary.send(0, *(answer(i) for i in got_ids(MAX_IN_FLIGHT + 1, MAX_IN_FLIGHT + 3)))
        assert replies == {i: answer(i) for i in range(MAX_IN_FLIGHT + 3)}
        assert "stray reply" not in link.counters
        assert sorted(got_ids(0, MAX_IN_FLIGHT + 3)) == list(range(MAX_IN_FLIGHT + 3))

    run(test)


def test_random_orders_strays_and_losses_never_give_an_exchange_another_ones_answer() -> None:
    """A primary answering in a random order, with stray IDs mixed in, that drops the connection now and
    then: every exchange ends with its own answer or None, within its timeout, and nothing is left."""
    import random

    async def test(nursery: trio.Nursery) -> None:
        rng = random.Random(18)
        primary, link = await start(nursery, timeout=2.0)
        replies: dict[int, bytes | None] = {}

        async def answering() -> None:
            answered = 0
            while answered < 400:
                await trio.sleep(0.002)
                conn = len(primary.streams) - 1
                todo = [w for c, w in primary.got if c == conn]
                rng.shuffle(todo)
                wires = [answer(int.from_bytes(w[:2], "big"), w[2:4]) for w in todo[:rng.randint(0, 5)]]
                if rng.random() < 0.2:
                    wires.append(answer(60000 + rng.randint(0, 99)))  # never asked
                try:
                    if rng.random() < 0.03:
                        await primary.streams[conn].aclose()
                        continue
                    if wires:
                        await primary.send(conn, *wires)
                except (trio.BrokenResourceError, trio.ClosedResourceError, IndexError):
                    continue
                answered += 1

        async with trio.open_nursery() as tasks:
            tasks.start_soon(answering)
            async with trio.open_nursery() as exchanges:
                for i in range(60):
                    exchanges.start_soon(collect, link, request(i), replies)
                    if i % 7 == 0:
                        await trio.sleep(0.01)
            tasks.cancel_scope.cancel()
        assert sorted(replies) == list(range(60))
        for i, reply in replies.items():
            assert reply is None or reply[:2] == i.to_bytes(2, "big"), (i, reply)
        assert sum(r is not None for r in replies.values()) > 30  # most got through
        assert link._pending == {} and not link._reading
        assert link.counters["stray reply"] and link.counters["connections"] > 1, link.counters

    run(test)
