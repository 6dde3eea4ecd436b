"""Front mode through the trio listeners, on loopback: a device's UPDATE over UDP and TCP goes to a fake
primary (dnspython, over TCP) and back; one connection to the primary is reused; a silent primary is
SERVFAIL within the timeout; an expired lease is deleted on the primary by the sweep; with the store on
disk, the reply waits for the sync of its lease's intent and is never rate limited as unsigned.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.edns
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.update
import pytest
import trio
import trio.testing

from tunneld.dnsserver.core import DnsCore, Policy, account_key
from tunneld.dnsserver.front import Deletion, Forward, Front
from tunneld.dnsserver.primary import MAX_IN_FLIGHT
from tunneld.dnsserver.replay import ReplayCache
from tunneld.dnsserver.serve import MAX_WAITING, PrimaryLink, RrlLimits, serve
from tunneld.dnsserver.store import ZoneStore
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.dnsguard import MAX_MESSAGE
from tunneld.proto.tsig import TsigKey

from .test_dnsserver_tcp import free_port

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
ACCOUNT = account_key(bytes(range(32)), DOMAIN).dnspython()
FRONT = TsigKey(dns.name.from_text("front.example.com."), bytes(range(100, 132)))
HOST = dns.name.from_text("host", ZONE)


@dataclass
class FakePrimary:
    """Answers each UPDATE signed with the front key with ``rcode`` (None: never answers), and anything
    else (the change feed's serial check) with REFUSED."""

    rcode: dns.rcode.Rcode | None = dns.rcode.NOERROR
    delay: float = 0.0  # seconds before each answer
    connections: int = 0
    queries: int = 0  # anything but an UPDATE (refused)
    updates: list[dns.update.UpdateMessage] = field(default_factory=list)
    got: trio.Event = field(default_factory=trio.Event)

    async def handler(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        frames = FrameBuffer()
        async with stream:
            while data := await stream.receive_some(65535):
                frames.feed(data)
                while (wire := frames.next()) is not None:
                    msg = dns.message.from_wire(wire, keyring={FRONT.name: FRONT.dnspython()})
                    if not isinstance(msg, dns.update.UpdateMessage):  # the change feed's serial check
                        self.queries += 1
                        if self.rcode is not None:
                            refused = dns.message.make_response(msg)
                            refused.set_rcode(dns.rcode.REFUSED)
                            await stream.send_all(frame(refused.to_wire()))
                        continue
                    self.updates.append(msg)
                    self.got.set()
                    if self.rcode is not None:
                        await trio.sleep(self.delay)
                        resp = dns.message.make_response(msg)
                        resp.set_rcode(self.rcode)
                        await stream.send_all(frame(resp.to_wire()))


async def start(nursery: trio.Nursery, primary: FakePrimary, *, min_lease: int = 1800,
                timeout: float = 5.0, server_nursery: trio.Nursery | None = None, db: str = ":memory:",
                rrl: RrlLimits | None = None) -> tuple[int, Front]:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, primary.handler, 0, host="127.0.0.1"))
    primary_port = listeners[0].socket.getsockname()[1]
    store = ZoneStore(db, ZONE, "ns.example.com.", 53)
    core = DnsCore(store, [ACCOUNT], Policy(min_lease=min_lease))
    front = Front(store, FRONT, ("127.0.0.1", primary_port))
    front.timeout = timeout
    for _ in range(5):
        port = free_port()
        try:
            await (server_nursery or nursery).start(functools.partial(serve, core, "127.0.0.1", port,
                                                                      front=front, rrl=rrl))
        except OSError:
            continue
        return port, front
    raise AssertionError("could not bind")


def device_update(addr: str, lease: int = 3600) -> dns.update.UpdateMessage:
    upd = dns.update.UpdateMessage(ZONE)
    upd.add(HOST, 120, "AAAA", addr)
    upd.use_edns(0, options=[dns.edns.GenericOption(2, struct.pack("!I", lease))])  # type: ignore[arg-type]
    upd.use_tsig(ACCOUNT)
    return upd


async def over_udp(port: int, upd: dns.update.UpdateMessage,
                   wire: bytes | None = None) -> dns.message.Message:
    """Sign and send ``upd`` (or send ``wire``, its signed form already sent once: a copy)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.connect(("127.0.0.1", port))
        await sock.send(upd.to_wire() if wire is None else wire)
        reply = await sock.recv(65535)
    return dns.message.from_wire(reply, keyring={ACCOUNT.name: ACCOUNT}, request_mac=upd.mac)


async def over_tcp(stream: trio.SocketStream, frames: FrameBuffer,
                   upd: dns.update.UpdateMessage) -> dns.message.Message:
    await stream.send_all(frame(upd.to_wire()))
    while (wire := frames.next()) is None:
        frames.feed(await stream.receive_some(65535))
    return dns.message.from_wire(wire, keyring={ACCOUNT.name: ACCOUNT}, request_mac=upd.mac)


def test_updates_over_udp_and_tcp_are_answered_by_the_primary_over_one_connection() -> None:
    async def main() -> None:
        primary = FakePrimary()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                port, front = await start(nursery, primary)
                reply = await over_udp(port, device_update("fd00::1"))
                assert reply.rcode() == dns.rcode.NOERROR and [o.otype for o in reply.options] == [2]
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    frames = FrameBuffer()
                    for addr in ("fd00::2", "fd00::3"):
                        assert (await over_tcp(stream, frames, device_update(addr))).rcode() == 0
                primary.rcode = dns.rcode.REFUSED
                assert (await over_udp(port, device_update("fd00::4"))).rcode() == dns.rcode.REFUSED
                assert len(primary.updates) == 4 and primary.connections == 1
                assert all(u.edns < 0 for u in primary.updates)  # the leases stay with the front
                got = {rr.rdata.to_text() for rr in front.store.rrset(HOST, dns.rdatatype.AAAA, time.time())}
                assert got == {"fd00::1", "fd00::2", "fd00::3"}  # the refused one was not applied
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_silent_primary_is_servfail_within_the_timeout() -> None:
    async def main() -> None:
        primary = FakePrimary(rcode=None)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                port, front = await start(nursery, primary, timeout=0.5)
                t0 = trio.current_time()
                reply = await over_udp(port, device_update("fd00::1"))
                assert reply.rcode() == dns.rcode.SERVFAIL
                assert 0.5 <= trio.current_time() - t0 < 5
                assert front.counters["update: no reply from the primary"] == 1
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_expired_lease_is_deleted_on_the_primary() -> None:
    async def main() -> None:
        primary = FakePrimary()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                port, _ = await start(nursery, primary, min_lease=1)
                assert (await over_udp(port, device_update("fd00::1", lease=1))).rcode() == 0
                primary.got = trio.Event()
                await primary.got.wait()  # the sweep's delete, about a second later
                delete = primary.updates[-1]
                got = [(r.name, r.deleting, r.rdtype, [rd.to_text() for rd in r]) for r in delete.update]
                assert got == [(HOST, dns.rdataclass.NONE, dns.rdatatype.AAAA, ["fd00::1"])]
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_answer_after_the_server_was_told_to_stop_is_still_committed() -> None:
    async def main() -> None:
        primary = FakePrimary(delay=0.3)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as server:
                    port, front = await start(nursery, primary, server_nursery=server)
                    upd = device_update("fd00::7")
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    await stream.send_all(frame(upd.to_wire()))
                    await primary.got.wait()
                    server.cancel_scope.cancel()  # stopping while the primary holds the update
                await stream.aclose()
                # The primary took it: so does the front's store (with the lease), and the replay memory.
                assert front.counters["update: primary NOERROR"] == 1
                assert [rr.rdata.to_text() for rr in front.store.rrset(HOST, dns.rdatatype.AAAA, time.time())
                        ] == ["fd00::7"]
                assert len(ReplayCache(front.store)) == 1
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_link_bounds_what_waits_and_what_it_sends() -> None:
    async def main() -> None:
        primary = FakePrimary(rcode=None)  # never answers
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(functools.partial(trio.serve_tcp, primary.handler, 0,
                                                                  host="127.0.0.1"))
                link = PrimaryLink(listeners[0].socket.getsockname(), timeout=10)
                assert await link.exchange(Forward(1, bytes(MAX_MESSAGE + 1), b"")) is None
                assert link.counters["too large"] == 1 and primary.connections == 0
                upd = device_update("fd00::1")
                upd.use_tsig(FRONT.dnspython())
                wire = upd.to_wire()
                for i in range(MAX_IN_FLIGHT + MAX_WAITING):
                    nursery.start_soon(link.exchange, Forward(i, wire, b""))
                await trio.testing.wait_all_tasks_blocked()
                assert await link.exchange(Forward(999, wire, b"")) is None  # at once: too many wait
                assert link.counters["busy: refused"] == 1
                # MAX_IN_FLIGHT at a time on the wire, over one connection
                assert primary.connections == 1 and len(primary.updates) == MAX_IN_FLIGHT
                nursery.cancel_scope.cancel()  # the exchanges waiting are cancelled, the connection closed

    trio.run(main)


def test_a_late_noerror_records_the_lease_and_the_retry_gets_it_from_memory() -> None:
    """The primary applies an update but answers after the timeout: the device gets SERVFAIL, and when the
    answer comes on the still-open connection the front commits it:
    the record, its lease, the replay memory; the device's retransmission is answered NOERROR from memory
    and never forwarded again."""
    async def main() -> None:
        primary = FakePrimary(delay=1.5)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                port, front = await start(nursery, primary, timeout=1.0)
                upd = device_update("fd00::9")
                wire = upd.to_wire()
                assert (await over_udp(port, upd, wire)).rcode() == dns.rcode.SERVFAIL
                assert front.store.rrset(HOST, dns.rdatatype.AAAA, time.time()) == []
                primary.delay = 0.0  # the next is answered right after the late one
                assert (await over_udp(port, device_update("fd00::a"))).rcode() == dns.rcode.NOERROR
                assert front.counters["late update: primary NOERROR"] == 1
                got = {rr.rdata.to_text() for rr in front.store.rrset(HOST, dns.rdatatype.AAAA, time.time())}
                assert got == {"fd00::9", "fd00::a"}
                expiry = front.store.lease_expiry(HOST, dns.rdatatype.AAAA, upd.update[0][0])
                assert expiry is not None and 3000 < expiry - time.time() <= 3600
                assert (await over_udp(port, upd, wire)).rcode() == dns.rcode.NOERROR  # from memory
                assert len(primary.updates) == 2
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_on_disk_the_reply_waits_for_the_sync_of_its_intent_and_is_not_rate_limited(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The intent's sync runs in a worker thread (slowed here to 0.3 s) while the front reads the primary's
    answer and commits it; the device's reply goes only once the WAL is synced. Meanwhile unsigned queries
    from the same address are answered (and rate limited to one a second): the update's reply, signed, is
    exempt all the same."""
    fsyncs: list[tuple[float, str]] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        assert threading.current_thread() is not threading.main_thread()  # not the front's own thread
        fsyncs.append((time.monotonic(), os.readlink(f"/proc/self/fd/{fd}")))
        time.sleep(0.3)
        real_fsync(fd)

    async def main() -> None:
        primary = FakePrimary()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                port, front = await start(nursery, primary, db=str(tmp_path / "front.sqlite"),
                                          rrl=RrlLimits(answers_per_second=1, errors_per_second=1, burst=1,
                                                        slip=0))
                monkeypatch.setattr(os, "fsync", slow_fsync)
                upd = device_update("fd00::1")
                wire = upd.to_wire()  # signed once: its MAC is the one the reply is signed over
                sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
                with sock:
                    await sock.connect(("127.0.0.1", port))
                    await sock.send(wire)
                    while not front.store.rrset(HOST, dns.rdatatype.AAAA, time.time()):
                        await trio.sleep(0.01)  # committed: the reply waits for the sync now
                    for i in range(3):  # unsigned: the first answered, the others over the limit (dropped)
                        await sock.send(dns.message.make_query(ZONE, "SOA", id=i).to_wire())
                    while (reply := await sock.recv(65535))[:2] != wire[:2]:
                        pass
                    replied = time.monotonic()
                got = dns.message.from_wire(reply, keyring={ACCOUNT.name: ACCOUNT}, request_mac=upd.mac)
                assert got.rcode() == dns.rcode.NOERROR and got.had_tsig
                assert len(fsyncs) == 1 and fsyncs[0][1] == str(tmp_path / "front.sqlite-wal")
                assert replied - fsyncs[0][0] >= 0.3  # after the sync, not before
                assert front.store.db.execute("SELECT count(*) FROM intents").fetchone()[0] == 0
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_lease_sweeper_is_woken_only_by_a_lease_ending_before_it_looks_anyway() -> None:
    """Each update used to wake the sweeper, which then queried the store while the device's next update
    waited; now only one whose lease ends before the sweeper's next look does (a 1 s lease here)."""
    async def main() -> None:
        primary = FakePrimary()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                port, front = await start(nursery, primary, min_lease=1)
                looks: list[float] = []
                due = front.due_deletion

                def counted(now: float) -> Deletion | None:
                    looks.append(now)
                    return due(now)
                front.due_deletion = counted  # type: ignore[assignment,method-assign]
                await trio.testing.wait_all_tasks_blocked()
                for i in range(5):  # leases of an hour: the sweeper sleeps on
                    assert (await over_udp(port, device_update(f"fd00::{i + 1}"))).rcode() == 0
                await trio.testing.wait_all_tasks_blocked()
                assert looks == []
                assert (await over_udp(port, device_update("fd00::9", lease=1))).rcode() == 0
                await trio.testing.wait_all_tasks_blocked()
                assert len(looks) == 1  # woken at once, to sleep until that lease's end
                nursery.cancel_scope.cancel()

    trio.run(main)
