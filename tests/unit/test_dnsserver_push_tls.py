"""DNS Push on serve-dns's TLS listener, on loopback: a client certificate under the account CA makes a
member; without one a client still gets queries answered and may subscribe to the public names only; a
certificate under another CA fails the handshake; a session keeps answering ordinary queries, in order with
its PUSHes; UPDATEs over UDP reach the subscriber; the server's end closes the session."""

from __future__ import annotations

import functools
import os
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import dns.edns
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.update
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.unit.test_dnsserver_tcp import DOMAIN, ZONE, free_port, make_core
from tunneld.accountca import account_ca, issue_client, new_serial
from tunneld.dnsserver.core import account_key
from tunneld.dnsserver.serve import serve
from tunneld.dnsserver.tcp import SESSIONS_FULL_RETRY_MS, TcpLimits
from tunneld.dnsserver.tls import is_member, server_context
from tunneld.proto import dso_wire
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.dso_wire import DsoMessage, Keepalive, Push, RetryDelay, Subscribe
from tunneld.services.tlsport import client_context

SECRET = bytes(range(32))
NAME = f"ns.{DOMAIN}"
BOB = dns.name.from_text(f"bob.{DOMAIN}.")
KEY = account_key(bytes(32), DOMAIN).dnspython()  # make_core's account key


def client_ctx(tmp: Path, ca_secret: bytes = SECRET, device: str | None = "laptop") -> ssl.SSLContext:
    """A client context trusting the account CA, with a client certificate for ``device`` under the CA of
    ``ca_secret`` (None: no certificate)."""
    ctx = client_context(account_ca(SECRET, DOMAIN).pem)
    ctx.check_hostname = False  # loopback by address
    if device is not None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = int(time.time())
        cert = issue_client(account_ca(ca_secret, DOMAIN), device, key.public_key(), now - 3600, now + 86400,
                            new_serial(os.urandom))
        path = tmp / f"{device}-{ca_secret.hex()[:8]}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        ctx.load_cert_chain(path)
    return ctx


class Client:
    """A DSO client over one TLS connection: framed messages out, whole messages in."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.frames = FrameBuffer()

    async def send(self, wire: bytes) -> None:
        await self.stream.send_all(frame(wire))

    async def dso(self, message: DsoMessage) -> None:
        await self.send(dso_wire.encode(message))

    async def receive(self, timeout: float = 5.0) -> bytes | None:
        """The next message; None at the end of the stream. Fails after ``timeout``."""
        with trio.fail_after(timeout):
            while (wire := self.frames.next()) is None:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return None  # a TLS close without close_notify is an end of stream too
                if not data:
                    return None
                self.frames.feed(data)
            return wire

    async def nothing_within(self, seconds: float) -> bool:
        with trio.move_on_after(seconds):
            await self.receive(seconds + 1)
            return False
        return True


async def serve_tls(nursery: trio.Nursery, limits: TcpLimits | None = None) -> tuple[int, int]:
    """serve-dns with TLS on loopback: (UDP/TCP port, TLS port)."""
    ctx = server_context(SECRET, DOMAIN, [NAME], int(time.time()))
    for _ in range(5):
        port, tls_port = free_port(), free_port()
        try:
            await nursery.start(functools.partial(serve, make_core(), "127.0.0.1", port, tcp=limits,
                                                  tls=("127.0.0.1", tls_port, ctx)))
        except OSError:
            continue
        return port, tls_port
    raise AssertionError("could not bind")


async def connect(port: int, ctx: ssl.SSLContext) -> Client:
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx, https_compatible=False)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return Client(stream)


async def update_udp(port: int, add: str | None = None, delete: str | None = None) -> None:
    """A signed UPDATE for bob's A over UDP, as another device sends it; waits for its NOERROR."""
    upd = dns.update.UpdateMessage(ZONE)
    if add is not None:
        upd.add(BOB, 300, "A", add)
    if delete is not None:
        upd.delete(BOB, "A", delete)
    upd.use_edns(0, options=[dns.edns.GenericOption(2, struct.pack("!I", 3600))])  # RFC 9664 Update Lease
    upd.use_tsig(KEY)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock, trio.fail_after(5):
        await sock.sendto(upd.to_wire(), ("127.0.0.1", port))
        reply = dns.message.from_wire(await sock.recv(65535), keyring={KEY.name: KEY}, request_mac=upd.mac)
    assert reply.rcode() == dns.rcode.NOERROR


def run(test: Callable[[trio.Nursery, int, int], Awaitable[None]], limits: TcpLimits | None = None) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port, tls_port = await serve_tls(nursery, limits)
            await test(nursery, port, tls_port)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def subscribe(c: Client, name: dns.name.Name, rtype: int, msg_id: int) -> DsoMessage:
    await c.dso(DsoMessage(msg_id, (Subscribe(name, rtype),)))
    reply = await c.receive()
    assert reply is not None
    return dso_wire.decode(reply)


def push_of(wire: bytes | None) -> Push:
    assert wire is not None
    message = dso_wire.decode(wire)
    assert message.unidirectional and isinstance(message.primary, Push)
    return message.primary


def test_a_member_gets_an_update_sent_over_udp_and_queries_on_the_session_are_answered(
        tmp_path: Path) -> None:
    async def test(nursery: trio.Nursery, port: int, tls_port: int) -> None:
        c = await connect(tls_port, client_ctx(tmp_path))
        await c.dso(DsoMessage(1, (Keepalive(15_000, 60_000),)))
        reply = await c.receive()
        assert reply is not None and dso_wire.decode(reply).tlvs == (Keepalive(15_000, 60_000),)
        ack = await subscribe(c, BOB, dns.rdatatype.A, 2)
        assert ack.response and ack.rcode == dns.rcode.NOERROR
        await update_udp(port, add="192.0.2.1")
        [record] = push_of(await c.receive()).records
        assert record.added and record.rdata is not None and record.rdata.to_text() == "192.0.2.1"
        query = dns.message.make_query(BOB, "A")
        query.use_tsig(KEY)
        await c.send(query.to_wire())  # an ordinary signed query on the session: answered in the FIFO
        answer = await c.receive()
        assert answer is not None
        msg = dns.message.from_wire(answer, keyring={KEY.name: KEY}, request_mac=query.mac)
        assert msg.rcode() == dns.rcode.NOERROR and msg.answer[0][0].to_text() == "192.0.2.1"
        await update_udp(port, delete="192.0.2.1")
        [removal] = push_of(await c.receive()).records
        assert removal.ttl == dso_wire.DELETE_ONE_TTL
        await c.stream.aclose()

    run(test)


def test_a_query_pipelined_after_subscribe_is_answered_after_the_push(tmp_path: Path) -> None:
    """The contract's ordering: SUBSCRIBE and a signed QUERY for the same question in one write come back
    as the SUBSCRIBE's response, the PUSH of the current answer, then the query's answer."""
    async def test(nursery: trio.Nursery, port: int, tls_port: int) -> None:
        await update_udp(port, add="192.0.2.3")
        c = await connect(tls_port, client_ctx(tmp_path))
        query = dns.message.make_query(BOB, "A")
        query.use_tsig(KEY)
        await c.stream.send_all(frame(dso_wire.encode(DsoMessage(1, (Subscribe(BOB, dns.rdatatype.A),))))
                                + frame(query.to_wire()))
        ack, push, answer = [await c.receive() for _ in range(3)]
        assert ack is not None and dso_wire.decode(ack).response
        assert [r.rdata.to_text() for r in push_of(push).records if r.rdata is not None] == ["192.0.2.3"]
        assert answer is not None
        reply = dns.message.from_wire(answer, keyring={KEY.name: KEY}, request_mac=query.mac)
        assert reply.answer[0][0].to_text() == "192.0.2.3"
        await c.stream.aclose()

    run(test)


def test_without_a_certificate_queries_work_and_only_public_names_subscribe(tmp_path: Path) -> None:
    async def test(nursery: trio.Nursery, port: int, tls_port: int) -> None:
        c = await connect(tls_port, client_ctx(tmp_path, device=None))
        await c.send(dns.message.make_query(ZONE, "SOA").to_wire())  # dig +tls, kdig: no certificate
        reply = await c.receive()
        assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.NOERROR
        assert (await subscribe(c, BOB, dns.rdatatype.A, 1)).rcode == dns.rcode.REFUSED
        assert (await subscribe(c, ZONE, dns.rdatatype.SOA, 2)).rcode == dns.rcode.NOERROR
        [soa] = push_of(await c.receive()).records
        assert soa.rtype == dns.rdatatype.SOA
        await c.send(dns.message.make_query(ZONE, "NS").to_wire())  # still answered on the session
        reply = await c.receive()
        assert reply is not None and dns.message.from_wire(reply).answer
        await c.stream.aclose()

    run(test)


def test_a_certificate_under_another_ca_fails_the_handshake(tmp_path: Path) -> None:
    async def test(nursery: trio.Nursery, port: int, tls_port: int) -> None:
        # TLS 1.3: the server checks the client's certificate after its own Finished, so the client may
        # finish its side of the handshake; the server then closes the connection without an answer.
        try:
            c = await connect(tls_port, client_ctx(tmp_path, ca_secret=bytes(32)))
        except trio.BrokenResourceError:
            return
        try:
            await c.send(dns.message.make_query(ZONE, "SOA").to_wire())
            with trio.fail_after(5):
                assert await c.stream.receive_some(100) == b""
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(c.stream)

    run(test)


def test_an_unsubscribed_name_sends_nothing(tmp_path: Path) -> None:
    async def test(nursery: trio.Nursery, port: int, tls_port: int) -> None:
        c = await connect(tls_port, client_ctx(tmp_path))
        assert (await subscribe(c, dns.name.from_text(f"alice.{DOMAIN}."), dns.rdatatype.A, 1)).rcode == 0
        await update_udp(port, add="192.0.2.5")  # bob, not alice
        assert await c.nothing_within(0.3)
        await c.stream.aclose()

    run(test)


def test_a_client_gone_without_a_goodbye_ends_only_its_session(tmp_path: Path) -> None:
    """A client that closes its socket without TLS close_notify (or whose connection is reset while the
    server writes to it) ends its own session; the server goes on serving."""
    async def test(nursery: trio.Nursery, port: int, tls_port: int) -> None:
        for reset in (False, True):
            c = await connect(tls_port, client_ctx(tmp_path))
            assert (await subscribe(c, BOB, dns.rdatatype.A, 1)).rcode == 0
            sock = c.stream.transport_stream.socket
            if reset:  # SO_LINGER 0: close sends RST
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # no close_notify
            await update_udp(port, add=f"192.0.2.{10 + reset}")  # a PUSH towards the closed connection
        other = await connect(tls_port, client_ctx(tmp_path))
        ack, = [await subscribe(other, BOB, dns.rdatatype.A, 1)]
        assert ack.rcode == 0 and len(push_of(await other.receive()).records) == 2
        await other.stream.aclose()

    run(test)


def test_a_session_outlives_the_idle_timeout_and_the_message_cap(tmp_path: Path) -> None:
    """RFC 7766's idle timeout and message count end a request/response connection; a DSO session is
    ended by DSO's own timers instead."""
    async def test(nursery: trio.Nursery, port: int, tls_port: int) -> None:
        c = await connect(tls_port, client_ctx(tmp_path))
        assert (await subscribe(c, BOB, dns.rdatatype.A, 1)).rcode == 0
        for i in range(3):  # more messages than max_messages
            await c.dso(DsoMessage(10 + i, (Keepalive(15_000, 60_000),)))
            assert await c.receive() is not None
        await trio.sleep(0.6)  # twice the idle timeout, without a message
        await update_udp(port, add="192.0.2.7")
        assert push_of(await c.receive()).records[0].added
        await c.stream.aclose()

    run(test, TcpLimits(idle_timeout=0.3, busy_idle_timeout=0.3, max_messages=2))


def test_member_sessions_leave_the_eviction_order_and_strangers_sessions_do_not(tmp_path: Path) -> None:
    """Over the per-source cap, a new connection evicts the longest-idle one: a stranger's session (no
    certificate) too, but never a member's (it left the connection table when it became a session)."""
    async def test(nursery: trio.Nursery, port: int, tls_port: int) -> None:
        stranger = await connect(tls_port, client_ctx(tmp_path, device=None))
        assert (await subscribe(stranger, dns.name.from_text(f"{DOMAIN}."), dns.rdatatype.SOA, 1)).rcode == 0
        assert push_of(await stranger.receive()).records[0].added  # the SOA, public
        members = []
        for _ in range(3):  # the cap is 2 connections; a member's leaves the table once it subscribed
            members.append(await connect(tls_port, client_ctx(tmp_path)))
            assert (await subscribe(members[-1], BOB, dns.rdatatype.A, 1)).rcode == 0
        flood = [await connect(tls_port, client_ctx(tmp_path, device=None)) for _ in range(4)]
        assert await stranger.receive() is None  # evicted by the flood
        await update_udp(port, add="192.0.2.8")
        for m in members:  # three member sessions from one source, with a cap of two connections
            assert push_of(await m.receive()).records[0].added
            await m.stream.aclose()
        for c in (stranger, *flood):
            await trio.aclose_forcefully(c.stream)

    run(test, TcpLimits(per_source=2))


def test_a_member_session_over_the_sessions_cap_is_told_to_retry_later(tmp_path: Path) -> None:
    async def test(nursery: trio.Nursery, port: int, tls_port: int) -> None:
        first = await connect(tls_port, client_ctx(tmp_path))
        assert (await subscribe(first, BOB, dns.rdatatype.A, 1)).rcode == 0
        second = await connect(tls_port, client_ctx(tmp_path))
        await second.dso(DsoMessage(1, (Subscribe(BOB, dns.rdatatype.A),)))
        wire = await second.receive()
        assert wire is not None
        goodbye = dso_wire.decode(wire)
        assert goodbye.unidirectional and goodbye.rcode == 5, goodbye
        assert isinstance(goodbye.primary, RetryDelay) and goodbye.primary.delay == SESSIONS_FULL_RETRY_MS
        assert await second.receive() is None
        await update_udp(port, add="192.0.2.9")  # the first session is untouched
        assert push_of(await first.receive()).records[0].added
        for c in (first, second):
            await trio.aclose_forcefully(c.stream)

    run(test, TcpLimits(sessions_per_source=1))


def test_the_servers_end_closes_the_session(tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as server:
                _, tls_port = await serve_tls(server)
                c = await connect(tls_port, client_ctx(tmp_path))
                assert (await subscribe(c, BOB, dns.rdatatype.A, 1)).rcode == 0
                server.cancel_scope.cancel()  # serve-dns stops
            assert await c.receive() is None  # the client sees the end of the stream
            await trio.aclose_forcefully(c.stream)
            outer.cancel_scope.cancel()

    trio.run(main)


def test_is_member_needs_a_name_in_the_zone() -> None:
    assert is_member({"subject": ((("commonName", "laptop.example.com"),),)}, "example.com.")
    assert not is_member({"subject": ((("commonName", "laptop.example.org"),),)}, "example.com.")
    assert not is_member({}, "example.com.") and not is_member(None, "example.com.")
