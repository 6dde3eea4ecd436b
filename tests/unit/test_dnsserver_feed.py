"""The front's change feed (tunneld.dnsserver.feed): the decisions of Feed with a real store and signed
messages (NOTIFY answered or dropped, serial check, IXFR or AXFR, backoff, AXFR after changes that did not
apply), FeedTask in virtual time over a fake link (a check at start, at once after a NOTIFY, every
interval without one, no delivery for changes the replica already has), and PrimaryLink.transfer over
loopback TCP against an AXFR rendered by dnspython."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import trio
import trio.testing

from tunneld.dnsserver.feed import (
    NOTIFY_GAP,
    NOTIFY_IDLE_WAIT,
    NOTIFY_QUEUE,
    NOTIFY_QUEUE_PER_SOURCE,
    RETRY_FIRST,
    RETRY_MAX,
    SOA_CHECK_INTERVAL,
    Feed,
    FeedTask,
)
from tunneld.dnsserver.primary import PrimaryLink
from tunneld.dnsserver.replica import apply_transfer, primary_soa
from tunneld.dnsserver.store import AddRR, DeleteRR, ZoneStore
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.notify_wire import OPCODE_NOTIFY, SoaQuery
from tunneld.proto.tsig import TsigKey, sign
from tunneld.proto.xfr import (
    Diff,
    Full,
    Incremental,
    TransferQuery,
    TransferReader,
    TransferResult,
    ZoneRecord,
    front_key,
)

from .test_xfr import render

ZONE = dns.name.from_text("home.example.net.")
KEY = front_key(bytes(range(32)), "home.example.net")
OTHER = TsigKey(KEY.name, bytes(32))
AXFR, IXFR = 252, 251


def soa_record(serial: int) -> ZoneRecord:
    rdata = dns.rdata.from_text("IN", "SOA",
                                f"ns1.home.example.net. hostmaster.home.example.net. {serial} 60 60 3600 60")
    return ZoneRecord(ZONE, 60, rdata)


def rec(owner: str, text: str) -> ZoneRecord:
    return ZoneRecord(dns.name.from_text(owner, ZONE), 120, dns.rdata.from_text("IN", "AAAA", text))


A1 = rec("laptop", "fd00::1")
A2 = rec("desk", "fd00::2")


def new_feed(tmp_path: Path, interval: float = 30.0) -> Feed:
    store = ZoneStore(str(tmp_path / "front.db"), ZONE, "ns.home.example.net.", 53)
    return Feed(store, KEY, interval=interval, rand=lambda n: b"\x12\x34"[:n])


def soa_answer(query: SoaQuery, serial: int, now: float, key: TsigKey = KEY) -> bytes:
    """The primary's signed answer to the serial check."""
    msg = dns.message.make_response(dns.message.from_wire(query.wire, keyring=False))
    msg.flags |= dns.flags.AA
    rrset = dns.rrset.RRset(ZONE, dns.rdataclass.IN, dns.rdatatype.SOA)
    rrset.add(soa_record(serial).rdata, 60)
    msg.answer.append(rrset)
    return sign(msg.to_wire(), key, int(now), query.mac)[0]


def notify(now: float, serial: int | None = None, key: TsigKey | None = KEY) -> bytes:
    """A NOTIFY for the zone as BIND sends it (with the SOA when ``serial`` is given)."""
    msg = dns.message.make_query(ZONE, dns.rdatatype.SOA)
    msg.id = 0x4242
    msg.flags = dns.flags.Flag(dns.flags.AA)
    msg.set_opcode(dns.opcode.Opcode(OPCODE_NOTIFY))
    if serial is not None:
        rrset = dns.rrset.RRset(ZONE, dns.rdataclass.IN, dns.rdatatype.SOA)
        rrset.add(soa_record(serial).rdata, 60)
        msg.answer.append(rrset)
    wire = msg.to_wire()
    return wire if key is None else sign(wire, key, int(now))[0]


# -- Feed: the decisions ---------------------------------------------------------------------------------


def test_the_first_check_is_at_once_and_fetches_the_whole_zone_then_ixfr_from_its_soa(tmp_path: Path) -> None:
    feed = new_feed(tmp_path)
    now = time.time()
    assert feed.deadline() <= now and feed.serial is None
    q = feed.soa_query(now)
    plain = dns.message.from_wire(q.wire, keyring={KEY.name: KEY.dnspython()})  # signed with the front key
    assert plain.question[0].rdtype == dns.rdatatype.SOA and plain.had_tsig
    assert feed.deadline() == now + 30  # the next periodic check counts from this one
    reader = feed.serial_answer(q, soa_answer(q, 5, now), now)
    assert reader is not None and reader.query.rdtype == AXFR  # no replica yet
    assert feed.transferred(Full(soa_record(5), (A1,)), now) == [AddRR(A1.owner, A1.ttl, A1.rdata)]
    assert feed.serial == 5

    later = now + 30
    q = feed.soa_query(later)
    assert feed.serial_answer(q, soa_answer(q, 5, later), later) is None  # the same serial: nothing to fetch
    q = feed.soa_query(later)
    reader = feed.serial_answer(q, soa_answer(q, 6, later), later)
    assert reader is not None and reader.query.rdtype == IXFR and reader.query.current == soa_record(5)
    changes = feed.transferred(Incremental(soa_record(6), (Diff(5, (A1,), 6, (A2,)),)), later)
    assert changes == [DeleteRR(A1.owner, A1.rdata), AddRR(A2.owner, A2.ttl, A2.rdata)]
    assert feed.counters["transfer: AXFR"] == 1 and feed.counters["transfer: IXFR"] == 1
    assert feed.counters["transfer: applied"] == 2 and feed.counters["serial check"] == 3


def test_a_signed_notify_is_answered_and_makes_a_check_due(tmp_path: Path) -> None:
    feed = new_feed(tmp_path)
    now = time.time()
    apply_transfer(feed.store, Full(soa_record(5), ()))
    feed.soa_query(now)
    assert feed.deadline() == now + 30
    wire = notify(now, serial=6)
    reply = feed.notify(wire, now + 1)
    assert reply is not None
    request = dns.message.from_wire(wire, keyring={KEY.name: KEY.dnspython()})
    answer = dns.message.from_wire(reply, keyring={KEY.name: KEY.dnspython()}, request_mac=request.mac)
    assert answer.id == 0x4242 and answer.opcode() == OPCODE_NOTIFY and answer.flags & dns.flags.QR
    assert feed.deadline() == now + 1 and feed.counters["notify"] == 1

    # A NOTIFY of the serial we hold is answered but asks for nothing.
    feed.soa_query(now + 2)
    assert feed.notify(notify(now, serial=5), now + 3) is not None
    assert feed.deadline() == now + 32 and feed.counters["notify: nothing newer"] == 1


def test_the_replica_serial_is_parsed_once_per_stored_soa(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Every NOTIFY asks the replica's serial: the stored SOA is parsed again only when it changed (by a
    # transfer, through this feed or not).
    import tunneld.dnsserver.feed as feed_module
    parses: list[object] = []
    monkeypatch.setattr(feed_module, "primary_soa", lambda store: parses.append(store) or primary_soa(store))
    feed = new_feed(tmp_path)
    assert feed.serial is None and feed.serial is None and not parses  # nothing stored: nothing to parse
    apply_transfer(feed.store, Full(soa_record(5), ()))
    assert feed.serial == 5 and feed.serial == 5 and len(parses) == 1
    for _ in range(3):
        feed.notify(notify(time.time(), serial=6), time.time())
    assert len(parses) == 1 and feed.counters["notify"] == 3
    assert feed.transferred(Incremental(soa_record(6), (Diff(5, (), 6, (A1,)),)), time.time())
    assert feed.serial == 6 and len(parses) == 2
    assert feed.notify(notify(time.time(), serial=6), time.time()) is not None
    assert feed.counters["notify: nothing newer"] == 1


def test_a_notify_not_signed_with_the_front_key_is_dropped_and_counted(tmp_path: Path) -> None:
    feed = new_feed(tmp_path)
    now = time.time()
    feed.soa_query(now)
    for wire in (notify(now, key=None), notify(now, key=OTHER), notify(now - 3600), b"\x00" * 5):
        assert feed.notify(wire, now) is None
    assert sum(n for k, n in feed.counters.items() if k.startswith("notify: dropped")) == 4
    assert feed.deadline() == now + 30  # nothing made due


def test_failures_back_off_and_a_notify_does_not_cut_the_backoff(tmp_path: Path) -> None:
    feed = new_feed(tmp_path)
    now = time.time()
    delays = []
    for _ in range(8):
        q = feed.soa_query(now)
        assert feed.serial_answer(q, None, now) is None
        delays.append(feed.deadline() - now)
    assert delays == [min(RETRY_MAX, RETRY_FIRST * 2 ** i) for i in range(8)]
    feed.notify(notify(now, serial=9), now)
    assert feed.deadline() == now + RETRY_MAX
    # A wrongly signed answer is a failure too; a good one ends the backoff.
    q = feed.soa_query(now)
    assert feed.serial_answer(q, soa_answer(q, 5, now, key=OTHER), now) is None
    assert any(k.startswith("serial check: bad answer") for k in feed.counters)
    q = feed.soa_query(now)
    assert feed.serial_answer(q, soa_answer(q, 5, now), now) is not None
    assert feed.transferred(None, now) == [] and feed.counters["transfer failed"] == 1
    assert feed.deadline() == now + RETRY_MAX  # the ninth failure in a row
    q = feed.soa_query(now + 100)
    reader = feed.serial_answer(q, soa_answer(q, 5, now + 100), now + 100)
    assert feed.transferred(Full(soa_record(5), ()), now + 100) == [] and reader is not None
    assert feed.deadline() == now + 130  # back to the interval


def test_changes_that_do_not_apply_make_the_next_transfer_a_full_one(tmp_path: Path) -> None:
    feed = new_feed(tmp_path)
    now = time.time()
    apply_transfer(feed.store, Full(soa_record(5), (A1,)))
    assert feed.transferred(Incremental(soa_record(7), (Diff(6, (), 7, (A2,)),)), now) == []
    assert feed.serial == 5 and any(k.startswith("transfer: the incremental") for k in feed.counters)
    q = feed.soa_query(now)
    reader = feed.serial_answer(q, soa_answer(q, 5, now), now)  # even at the same serial
    assert reader is not None and reader.query.rdtype == AXFR
    assert feed.transferred(Full(soa_record(7), (A2,)), now) == [DeleteRR(A1.owner, A1.rdata),
                                                                AddRR(A2.owner, A2.ttl, A2.rdata)]
    q = feed.soa_query(now)
    reader = feed.serial_answer(q, soa_answer(q, 8, now), now)
    assert reader is not None and reader.query.rdtype == IXFR


def test_a_primary_older_than_the_replica_is_transferred_whole(tmp_path: Path) -> None:
    feed = new_feed(tmp_path)
    now = time.time()
    apply_transfer(feed.store, Full(soa_record(50), (A1,)))
    q = feed.soa_query(now)
    reader = feed.serial_answer(q, soa_answer(q, 7, now), now)  # a primary restored from a backup
    assert reader is not None and reader.query.rdtype == AXFR
    assert feed.counters["serial check: the primary's is older"] == 1
    assert feed.transferred(Full(soa_record(7), (A2,)), now) == [DeleteRR(A1.owner, A1.rdata),
                                                                AddRR(A2.owner, A2.ttl, A2.rdata)]
    assert feed.serial == 7


# -- FeedTask: the loop, in virtual time over a fake link ----------------------------------------------


class FakeLink:
    """Answers serial checks with ``serial`` and transfers with the next of ``results``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.serial = 5
        self.results: list[TransferResult] = []
        self.checks = 0
        self.transfers: list[int] = []  # the rdtype of each transfer query

    async def exchange(self, forward: SoaQuery) -> bytes | None:
        self.checks += 1
        await trio.sleep(0.01)
        return soa_answer(forward, self.serial, self.clock())

    async def transfer(self, reader: TransferReader, clock: Callable[[], float]) -> TransferResult | None:
        self.transfers.append(reader.query.rdtype)
        await trio.sleep(0.01)
        return self.results.pop(0)


def test_the_task_checks_at_start_after_a_notify_and_every_interval(tmp_path: Path) -> None:
    feed = new_feed(tmp_path, interval=30.0)
    base = 1_700_000_000.0

    async def main() -> None:
        clock = functools.partial(lambda: base + trio.current_time())
        link = FakeLink(clock)
        delivered: list[tuple[float, list[AddRR | DeleteRR]]] = []
        got = trio.Event()

        async def deliver(changes: Sequence[AddRR | DeleteRR], now: float) -> None:
            nonlocal got
            delivered.append((trio.current_time(), list(changes)))
            got.set()

        async def next_delivery() -> tuple[float, list[AddRR | DeleteRR]]:
            nonlocal got
            await got.wait()
            got = trio.Event()
            return delivered[-1]

        task = FeedTask(feed, link, deliver, clock=clock)
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                link.results.append(Full(soa_record(5), (A1,)))
                start = trio.current_time()
                await nursery.start(task.run)
                at, changes = await next_delivery()  # at start
                assert at - start < 1 and changes == [AddRR(A1.owner, A1.ttl, A1.rdata)]
                assert link.transfers == [AXFR]

                link.serial = 6
                link.results.append(Incremental(soa_record(6), (Diff(5, (), 6, (A2,)),)))
                sent = trio.current_time()
                assert task.notify(notify(clock(), serial=6)) is not None
                at, changes = await next_delivery()  # at once after the NOTIFY
                assert at - sent < 1 and changes == [AddRR(A2.owner, A2.ttl, A2.rdata)]
                assert link.transfers == [AXFR, IXFR]

                link.serial = 7  # a change whose NOTIFY was lost: the periodic check finds it
                link.results.append(Incremental(soa_record(7), (Diff(6, (A2,), 7, ()),)))
                at, changes = await next_delivery()
                assert 29 < at - sent < 31 and changes == [DeleteRR(A2.owner, A2.rdata)]

                # The front's own update coming back through the primary: transferred, nothing delivered.
                link.serial = 8
                link.results.append(Incremental(soa_record(8), (Diff(7, (), 8, (A1,)),)))
                checks = link.checks
                await trio.sleep(31)
                assert link.checks == checks + 1 and link.transfers == [AXFR, IXFR, IXFR, IXFR]
                assert len(delivered) == 3 and feed.serial == 8
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert primary_soa(feed.store) == soa_record(8)


def test_queued_notifies_are_answered_once_the_front_is_idle_or_after_the_wait(tmp_path: Path) -> None:
    feed = new_feed(tmp_path)
    src = ("192.0.2.53", 53)

    async def main() -> None:
        task = FeedTask(feed, FakeLink(time.time), lambda changes, now: trio.sleep(0))
        sent: list[tuple[float, bytes, tuple[str, int]]] = []

        async def send(reply: bytes, dest: tuple[str, int]) -> None:
            sent.append((trio.current_time(), reply, dest))

        async def busy(until: float) -> None:  # a front that never waits (a forward being checked)
            while trio.current_time() < until:
                await trio.lowlevel.cancel_shielded_checkpoint()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(task.answer_notifies, send)
                await trio.testing.wait_all_tasks_blocked()
                queued = trio.current_time()
                task.notify_later(notify(time.time(), serial=6), src)
                assert sent == []  # queued, not answered in the listener's turn
                while not sent:
                    await trio.sleep(0.001)  # idle
                assert sent[0][0] - queued < NOTIFY_IDLE_WAIT and sent[0][2] == src
                assert dns.message.from_wire(sent[0][1], keyring=False).opcode() == OPCODE_NOTIFY
                start = trio.current_time()
                nursery.start_soon(busy, start + 0.5)
                task.notify_later(notify(time.time(), serial=7), src)
                while len(sent) < 2:
                    await trio.sleep(0.01)
                assert NOTIFY_IDLE_WAIT <= sent[1][0] - start < 0.5  # answered while the front was still busy
                for _ in range(NOTIFY_QUEUE_PER_SOURCE + 3):  # one address holds a few places
                    task.notify_later(notify(time.time(), serial=8), src)
                assert feed.counters["notify: dropped (queue full)"] == 3
                for i in range(NOTIFY_QUEUE):  # forged ones from many addresses: bounded in all
                    task.notify_later(b"forged", (f"198.51.100.{i % 250}", 53 + i // 250))
                assert feed.counters["notify: dropped (queue full)"] == 3 + NOTIFY_QUEUE_PER_SOURCE
                nursery.cancel_scope.cancel()

    trio.run(main)


# -- PrimaryLink.transfer over loopback ------------------------------------------------------------------


def test_the_link_reads_a_transfer_on_a_connection_of_its_own(tmp_path: Path) -> None:
    feed = new_feed(tmp_path)
    records = [rec(f"d{i}", f"fd00::{i:x}") for i in range(300)]
    seen: list[int] = []
    cut_short = False

    def reader_for_axfr() -> TransferReader:
        now = time.time()
        q = feed.soa_query(now)
        reader = feed.serial_answer(q, soa_answer(q, 5, now), now)
        assert reader is not None
        return reader

    async def primary(stream: trio.SocketStream) -> None:
        frames = FrameBuffer()
        async with stream:
            while (wire := frames.next()) is None:
                frames.feed(await stream.receive_some(65535))
            plain = dns.message.from_wire(wire, keyring=False)
            dns.message.from_wire(wire, keyring={KEY.name: KEY.dnspython()})  # signed with the front key
            seen.append(plain.question[0].rdtype)
            query = TransferQuery(wire, plain.id, plain.mac, ZONE, None)
            messages = render(query, [soa_record(5), *records, soa_record(5)], per_message=40)
            for message in messages[:3] if cut_short else messages:
                await stream.send_all(frame(message))

    async def main() -> None:
        nonlocal cut_short
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, primary, 0, host="127.0.0.1"))
            link = PrimaryLink(listeners[0].socket.getsockname()[:2], timeout=5)
            with trio.fail_after(20):
                result = await link.transfer(reader_for_axfr(), time.time)
                assert isinstance(result, Full) and result.records == tuple(records)
                assert link.counters == {}
                cut_short = True  # a primary that closes the connection mid-answer: None, counted
                assert await link.transfer(reader_for_axfr(), time.time) is None
                assert link.counters == {"transfer: closed early": 1}
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert seen == [AXFR, AXFR]


def test_serve_dns_says_the_default_interval_and_takes_another() -> None:
    from tunneld.cli import UsageError, build_parser

    parser = build_parser()
    base = ["serve-dns", "--zone", "home.example.net", "--secret-file", "secret"]
    assert parser.parse_args([*base, "--primary-check", "2"]).primary_check == 2.0
    assert parser.parse_args(base).primary_check is None  # serve's default: SOA_CHECK_INTERVAL
    for bad in ("0", "-1", "soon"):
        with pytest.raises(UsageError):
            parser.parse_args([*base, "--primary-check", bad])
    sub = next(a for a in parser._actions if a.dest == "command" or getattr(a, "choices", None))
    assert isinstance(sub.choices, dict)
    help_text = sub.choices["serve-dns"].format_help()
    assert f"(default {SOA_CHECK_INTERVAL:g})" in " ".join(help_text.split())


def test_a_notify_that_says_a_newer_serial_is_fetched_by_ixfr_with_no_serial_check(tmp_path: Path) -> None:
    """A NOTIFY signed with the front key and carrying the primary's SOA: its serial is believed, and the
    check is the IXFR from ours at once (one exchange fewer per change); without a serial, or without a
    replica, the check asks the serial first."""
    feed = new_feed(tmp_path)
    now = time.time()
    assert feed.notified_transfer(now) is None  # no NOTIFY yet
    apply_transfer(feed.store, Full(soa_record(5), ()))
    assert feed.notify(notify(now, serial=7), now) is not None
    assert feed.notify(notify(now, serial=6), now) is not None  # an older one does not lower it
    reader = feed.notified_transfer(now)
    assert reader is not None and reader.query.rdtype == IXFR and reader.query.current == soa_record(5)
    assert feed.counters["transfer: IXFR (notified)"] == 1 and feed.counters["serial check"] == 0
    assert feed.deadline() == now + 30  # the periodic check counts from this one
    assert feed.notified_transfer(now) is None  # taken
    assert feed.notify(notify(now, serial=None), now + 1) is not None
    assert feed.notified_transfer(now + 1) is None  # no serial said: the serial check decides


def test_notifies_in_a_burst_make_one_check_per_gap(tmp_path: Path) -> None:
    """A stream of updates makes the primary NOTIFY after each: a NOTIFY within NOTIFY_GAP of the last
    check's start makes the next check due at that gap's end, not at once; after a quiet spell, at once."""
    feed = new_feed(tmp_path)
    now = time.time()
    apply_transfer(feed.store, Full(soa_record(5), ()))
    feed.soa_query(now)
    feed.notify(notify(now, serial=6), now + 0.01)
    assert feed.deadline() == now + NOTIFY_GAP
    feed.notify(notify(now, serial=7), now + 0.02)
    assert feed.deadline() == now + NOTIFY_GAP  # one check for both
    reader = feed.notified_transfer(now + NOTIFY_GAP)
    assert reader is not None and reader.query.current == soa_record(5)  # it fetches both changes
    later = now + NOTIFY_GAP + 5
    feed.notify(notify(later, serial=8), later)
    assert feed.deadline() == later
