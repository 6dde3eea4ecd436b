"""The watching service over DNS Push through a real TLS connection: a small DSO server written here (the
in-memory server of test_push_client behind TLS 1.3, with a certificate under the account CA, asking for
the client's) is what it talks to. The device presents its certificate, learns a host, survives the
server dropping the connection without losing it, and learns a removal pushed to it; with no TLS server
at all it follows the account by LLQ over UDP (our own server's cores on loopback)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import dns.name
import dns.rdatatype
import pytest
import trio

from tests.unit.test_dns_services import make_server, serving, until
from tests.unit.test_push_client import FakeServer, Q
from tunneld.accountca import account_ca
from tunneld.crypto.kdf import derive_tsig_key
from tunneld.device_cert import LIFETIME, RENEW_REMAINING, DeviceCertificates
from tunneld.dnsserver.store import AddRR, Lease
from tunneld.dnsserver.tls import server_context
from tunneld.proto import push_client, records
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.dso_wire import DsoMessage, PushRecord, Subscribe
from tunneld.proto.llq import LLQState
from tunneld.proto.watcher import PeerGone, PeerLearned, TransportStatus, WatcherEvent
from tunneld.services.tlsport import client_context
from tunneld.services.watcher import PushTransport, WatcherService

ZONE = "home.example.net"
SECRET = bytes(range(32))
BOB_KEY = bytes(range(1, 33))
BOB = records.HostRecords.derive("bob", ZONE, BOB_KEY, 4500, [ipaddress.IPv4Address("198.51.100.7")])


def zone_of(*hosts: records.HostRecords) -> dict[Q, list[dns.rdata.Rdata]]:
    browse = records.names_to_browse(ZONE)[0][0]
    zone: dict[Q, list[dns.rdata.Rdata]] = {}
    for h in hosts:
        for rrset in records.build(h, 300):
            zone.setdefault((rrset.name, dns.rdatatype.RdataType.make(rrset.rdtype)), []).extend(rrset)
    assert (browse, dns.rdatatype.PTR) in zone
    return zone


class TlsDsoServer:
    """The in-memory contract server behind TLS 1.3 on loopback, requiring a client certificate under the
    account CA; it can push to every connection and drop them all."""

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        self.ctx = server_context(SECRET, ZONE, [ZONE], int(time.time()))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_verify_locations(cadata=account_ca(SECRET, ZONE).pem.decode("ascii"))
        self.streams: dict[trio.SSLStream[trio.abc.Stream], trio.Lock] = {}
        self.peers: list[Any] = []

    async def run(self, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(("127.0.0.1", listeners[0].socket.getsockname()[1]))
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, tcp: trio.abc.Stream) -> None:
        stream = trio.SSLStream(tcp, self.ctx, server_side=True)
        lock = trio.Lock()
        try:
            await stream.do_handshake()
            self.peers.append(stream.getpeercert())
            self.streams[stream] = lock
            frames = FrameBuffer()
            while data := await stream.receive_some(65536):
                frames.feed(data)
                while (message := frames.next()) is not None:
                    async with lock:
                        for reply in self.fake.handle(message):
                            await stream.send_all(frame(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.streams.pop(stream, None)
            await trio.aclose_forcefully(stream)

    async def push(self, wire: bytes) -> None:
        for stream, lock in list(self.streams.items()):
            async with lock:
                await stream.send_all(frame(wire))

    async def drop_all(self) -> None:
        for stream in list(self.streams):
            self.streams.pop(stream, None)
            await trio.aclose_forcefully(stream)


def transport(server: tuple[str, int], clock: Callable[[], float] = time.time) -> PushTransport:
    """What the daemon gives the service: the device's certificates (as the config makes them, renewed at a
    connection when due by ``clock``) and the CA."""
    ca = account_ca(SECRET, ZONE)
    certificates = DeviceCertificates(ca, "alice", clock())

    def context() -> ssl.SSLContext:
        current = certificates.current(clock())
        return client_context(ca.pem, (current.chain, current.key))

    return PushTransport(server, context, ZONE)


def test_the_service_follows_the_account_by_push_and_survives_a_dropped_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(push_client, "RECONNECT_MIN", 0.1)  # the backoff's first step, for a quick test
    fake = FakeServer(zone_of(BOB), secret=derive_tsig_key(SECRET, ZONE), key_name=dns.name.from_text(ZONE))
    core, llq = make_server()
    events: list[WatcherEvent] = []

    def settled(service: WatcherService) -> bool:
        watches = service.watcher._watches.values()
        return bool(watches) and all(w.client.state == LLQState.ESTABLISHED for w in watches)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            udp = await nursery.start(serving, core, llq)
            tls = TlsDsoServer(fake)
            push_server = await nursery.start(tls.run)
            # The device's certificate has 9 days left by this clock: it is renewed at the next connection.
            offset = [-float(LIFETIME - RENEW_REMAINING + 86400)]
            service = WatcherService(udp, ZONE, "alice", derive_tsig_key(SECRET, ZONE), events.append,
                                     push=transport(push_server, lambda: time.time() + offset[0]))
            await nursery.start(service.run)
            await until(lambda: any(isinstance(e, PeerLearned) for e in events), "bob learned by Push")
            assert [e.host for e in events if isinstance(e, PeerLearned)] == [BOB]
            assert TransportStatus("push") in events
            assert llq.llq_ids() == []  # no LLQ at all
            subject = dict(x[0] for x in tls.peers[0]["subject"])
            assert subject["commonName"] == f"alice.{ZONE}"  # the device's certificate, verified
            status = service.status()
            assert status["transport"] == "push" and status["push_server"].endswith(f":{push_server[1]}")
            await until(lambda: settled(service), "every question subscribed")
            # The server drops the connection: the session reconnects and subscribes again; bob stays.
            fake.received.clear()
            offset[0] = 0.0
            await tls.drop_all()
            await until(lambda: len(tls.peers) == 2 and settled(service) and sum(
                isinstance(m, DsoMessage) and isinstance(m.primary, Subscribe) for m in fake.received)
                >= len(service.watcher._watches), "resubscribed on a new connection")
            assert not [e for e in events if isinstance(e, PeerGone)]
            first, second = (peer["serialNumber"] for peer in tls.peers)
            assert first != second  # the new connection presented a renewed certificate
            assert dict(x[0] for x in tls.peers[1]["subject"])["commonName"] == f"alice.{ZONE}"
            # A removal pushed now reaches the watcher.
            browse = records.names_to_browse(ZONE)[0][0]
            await tls.push(FakeServer.push([PushRecord.delete_rrset(browse, dns.rdatatype.PTR)]))
            await until(lambda: any(isinstance(e, PeerGone) for e in events), "bob gone by Push")
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_without_a_tls_server_the_service_follows_the_account_by_llq() -> None:
    core, llq = make_server()
    core.store.apply_update([AddRR(r.name, r.ttl, rd) for r in records.build(BOB, 60) for rd in r],
                            Lease(7200, 7200), time.time())
    events: list[WatcherEvent] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = ("127.0.0.1", s.getsockname()[1])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            udp = await nursery.start(serving, core, llq)
            service = WatcherService(udp, ZONE, "alice", derive_tsig_key(SECRET, ZONE), events.append,
                                     push=transport(closed))
            await nursery.start(service.run)
            await until(lambda: any(isinstance(e, PeerLearned) for e in events), "bob learned by LLQ")
            assert [e.host for e in events if isinstance(e, PeerLearned)] == [BOB]
            assert any(isinstance(e, TransportStatus) and e.transport == "llq" for e in events)
            assert len(llq.llq_ids()) >= 4
            assert service.status()["transport"] == "llq"
            nursery.cancel_scope.cancel()

    trio.run(main)
