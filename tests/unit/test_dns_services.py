"""The publishing and watching services (core + Driver + socket) against our own DNS server on loopback.

The server is the rendezvous server's cores (DnsCore and LLQServer) behind a small UDP loop, on the wall
clock as the real one. Publishing then shutting down must leave the zone without our records (the
withdrawal leaves through the driver's grace); watching must learn a device published in the zone, and
shutting down must cancel its LLQs.
"""

from __future__ import annotations

import ipaddress
import socket
import time

import dns.rdatatype
import trio

from tunneld.crypto.kdf import derive_tsig_key
from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.llq import LLQServer
from tunneld.dnsserver.store import AddRR, DeleteRRset, Lease, ZoneStore
from tunneld.proto import records
from tunneld.proto.watcher import PeerLearned, WatcherEvent
from tunneld.services.publisher import PublisherService, host_records
from tunneld.services.watcher import WatcherService

ZONE = "home.example.net"
SECRET = bytes(range(32))
BOB_KEY = bytes(range(1, 33))


def make_server() -> tuple[DnsCore, LLQServer]:
    store = ZoneStore(":memory:", ZONE + ".", "ns." + ZONE + ".", 53)
    core = DnsCore(store, [account_key(SECRET, ZONE)])
    return core, LLQServer(core)


async def serving(core: DnsCore, llq: LLQServer, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
    """What `tunneld serve-dns` does with a UDP datagram, without its TCP side and timers."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname())
        while True:
            wire, src = await sock.recvfrom(65535)
            now = time.time()
            out = llq.handle(wire, src, now)
            if out is None:
                core.last_changes = []
                reply = core.handle(wire, src, now)
                out = [] if reply is None else [(src, reply)]
                out += llq.changes(core.last_changes, now)
            for dest, data in out:
                assert isinstance(dest, tuple)
                await sock.sendto(data, dest)


async def until(check: object, what: str) -> None:
    """Wait (bounded) until ``check()`` holds, looking after each scheduling round."""
    assert callable(check)
    with trio.fail_after(10):
        while not check():
            await trio.sleep(0.01)
    assert check(), what


def test_publisher_service_publishes_then_withdraws_on_shutdown() -> None:
    core, llq = make_server()
    ours = host_records("laptop", ZONE, bytes(range(2, 34)), "192.0.2.7:4500")
    aaaa = records.host_name(ZONE, "laptop")

    def published() -> bool:
        return bool(core.store.rrset(aaaa, dns.rdatatype.AAAA, time.time()))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serving, core, llq)
            service = PublisherService(server, ZONE, derive_tsig_key(SECRET, ZONE), 1800, start_delay=0.05)
            async with trio.open_nursery() as inner:
                await inner.start(service.run)
                service.set_records(ours)
                await until(lambda: service.status()["state"] == "published", "the server's answer taken")
                assert published() and service.status()["lease_left"] > 1700
                inner.cancel_scope.cancel()
            # run() returned: the withdrawal was sent and answered within the driver's grace.
            assert not published()
            assert service.publisher.finished() and service.status()["state"] == "withdrawn"
            browse = core.store.rrset(records.browse_name(ZONE), dns.rdatatype.PTR, time.time())
            assert browse == []
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_watcher_service_learns_a_device_and_cancels_its_llqs_on_shutdown() -> None:
    core, llq = make_server()
    bob = records.HostRecords.derive("bob", ZONE, BOB_KEY, 4500, [ipaddress.IPv4Address("198.51.100.7")])
    now = time.time()
    core.store.apply_update([AddRR(r.name, r.ttl, rd) for r in records.build(bob, 60) for rd in r],
                            Lease(7200, 7200), now)
    events: list[WatcherEvent] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serving, core, llq)
            service = WatcherService(server, ZONE, "alice", derive_tsig_key(SECRET, ZONE), events.append)
            async with trio.open_nursery() as inner:
                await inner.start(service.run)
                await until(lambda: any(isinstance(e, PeerLearned) for e in events), "bob learned")
                learned = [e for e in events if isinstance(e, PeerLearned)]
                assert [e.host for e in learned] == [bob]
                assert len(llq.llq_ids()) >= 4  # the browse PTR and bob's questions, all established
                assert service.watcher.state["counters"].get("tsig rejected", 0) == 0
                inner.cancel_scope.cancel()
            await until(lambda: llq.llq_ids() == [], "every LLQ cancelled (lease 0) on shutdown")
            nursery.cancel_scope.cancel()

    trio.run(main)



def test_watcher_renews_its_llqs_from_a_new_socket_and_learns_what_changed_meanwhile() -> None:
    """After a network change the watcher reopens its socket and sets every LLQ up again from it: events
    then reach the new socket, and a change made while it was away (bob moved) is learned."""
    core, llq = make_server()
    bob = records.HostRecords.derive("bob", ZONE, BOB_KEY, 4500, [ipaddress.IPv4Address("198.51.100.7")])
    moved = records.HostRecords.derive("bob", ZONE, BOB_KEY, 4501, [ipaddress.IPv4Address("203.0.113.9")])
    core.store.apply_update([AddRR(r.name, r.ttl, rd) for r in records.build(bob, 60) for rd in r],
                            Lease(7200, 7200), time.time())
    events: list[WatcherEvent] = []

    def learned() -> list[records.HostRecords]:
        return [e.host for e in events if isinstance(e, PeerLearned)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serving, core, llq)
            service = WatcherService(server, ZONE, "alice", derive_tsig_key(SECRET, ZONE), events.append)
            await nursery.start(service.run)
            await until(lambda: learned() == [bob], "bob learned")
            assert service._sock is not None
            before = service._sock.getsockname()
            established = len(llq.llq_ids())
            # While "away", bob moves: the zone changes under LLQs that point at the old socket.
            new = [r for r in records.build(moved, 60) if r.rdtype != dns.rdatatype.PTR]
            core.store.apply_update([*(DeleteRRset(r.name, r.rdtype) for r in new),
                                     *(AddRR(r.name, r.ttl, rd) for r in new for rd in r)],
                                    Lease(7200, 7200), time.time())
            assert await service.renew()
            assert service._sock.getsockname() != before and service.reopened == 1
            await until(lambda: len(llq.llq_ids()) >= 2 * established, "every LLQ set up again")
            await until(lambda: moved.port in [h.port for h in learned()[1:]], "the move learned")
            nursery.cancel_scope.cancel()

    trio.run(main)
