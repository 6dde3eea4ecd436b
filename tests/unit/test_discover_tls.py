"""Discovery over DNS over TLS (`[account] transport = "tls"`): find_server and find_relay ask the
server's TLS port over one TLS connection verified against the account CA, follow the TLS service SRV
records, and fall back to the configured server when TLS fails (a stranger's CA, nobody listening, a
server that never answers), within their timeouts. The server is our DNS core behind a small TLS listener
on loopback, with a certificate that names the zone only (the client checks the name)."""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import dns.message
import dns.name
import dns.rdata
import pytest
import trio

from tunneld.accountca import account_ca
from tunneld.crypto.kdf import derive_tsig_key
from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.store import AddRR, Lease, ZoneStore
from tunneld.dnsserver.tls import server_context
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.services import discover
from tunneld.services.discover import (
    PUSH_TLS_SERVICE,
    QUERY_TLS_SERVICE,
    UPDATE_TLS_SERVICE,
    TlsLookup,
    find_relay,
    find_server,
)

ZONE = "home.example.net"
SECRET = bytes(range(32))
TSIG = derive_tsig_key(SECRET, ZONE)
TLS_SRV_PORT = 7853  # what the SRV records say; the listener itself is elsewhere
T = TypeVar("T")


@dataclass
class Seen:
    connections: int = 0
    questions: list[str] = field(default_factory=list)


def make_core(*records: tuple[str, str, str], addresses: tuple[str, ...] = ("127.0.0.1",)) -> DnsCore:
    store = ZoneStore(":memory:", ZONE + ".", f"ns.{ZONE}.", 5353, addresses=addresses, tls_port=TLS_SRV_PORT)
    origin = dns.name.from_text(ZONE)
    if records:
        store.apply_update([AddRR(dns.name.from_text(owner, origin), 120, dns.rdata.from_text("IN", t, text))
                            for owner, t, text in records], Lease(7200, 7200), time.time())
    return DnsCore(store, [account_key(SECRET, ZONE)])


async def serve_tls(core: DnsCore, seen: Seen, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
    """DNS over TLS on a loopback port: each framed query answered by the core (as serve-dns does)."""
    ctx = server_context(SECRET, ZONE, [ZONE], int(time.time()))

    async def connection(stream: trio.SSLStream[trio.SocketStream]) -> None:
        seen.connections += 1
        frames = FrameBuffer()
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                frames.feed(bytes(data))
                while (wire := frames.next()) is not None:
                    seen.questions.append(str(dns.message.from_wire(wire, keyring=False).question[0]))
                    reply = core.handle(wire, ("127.0.0.1", 0), time.time(), max_size=65535)
                    if reply is not None:
                        await stream.send_all(frame(reply))

    listeners = await trio.open_ssl_over_tcp_listeners(0, ctx, host="127.0.0.1")
    task_status.started(listeners[0].transport_listener.socket.getsockname())
    await trio.serve_listeners(connection, listeners)


def lookup(core: DnsCore, ask: Callable[[tuple[str, int]], Awaitable[T]], seen: Seen | None = None) -> T:
    """What `ask(server)` finds, the server being `core` behind a TLS listener."""
    async def main() -> T:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_tls, core, seen or Seen())
            with trio.fail_after(10):
                found = await ask(server)
            nursery.cancel_scope.cancel()
        return found
    return trio.run(main)


def tls(secret: bytes = SECRET) -> TlsLookup:
    return TlsLookup.for_account(account_ca(secret, ZONE).pem, ZONE)


@pytest.mark.parametrize("service", [UPDATE_TLS_SERVICE, QUERY_TLS_SERVICE, PUSH_TLS_SERVICE])
def test_the_tls_srv_is_followed_over_one_tls_connection(service: str) -> None:
    seen = Seen()
    found = lookup(make_core(), lambda server: find_server(server, ZONE, service, TSIG, tls=tls()), seen)
    assert found == ("127.0.0.1", TLS_SRV_PORT)
    assert seen.connections == 1  # the SRV and the target's address on the same connection
    assert seen.questions == [f"{service}.{ZONE}. IN SRV", f"ns.{ZONE}. IN A"]


def test_without_an_address_the_configured_server_is_kept() -> None:
    seen = Seen()

    async def main() -> tuple[tuple[str, int], tuple[str, int]]:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_tls, make_core(addresses=()), seen)
            with trio.fail_after(10):
                found = await find_server(server, ZONE, UPDATE_TLS_SERVICE, TSIG, tls=tls())
            nursery.cancel_scope.cancel()
        return server, found

    server, found = trio.run(main)
    assert found == server
    assert seen.questions == [f"_dns-update-tls._tcp.{ZONE}. IN SRV", f"ns.{ZONE}. IN A",
                              f"ns.{ZONE}. IN AAAA"]


def test_the_relay_srv_is_looked_up_over_tls_signed() -> None:
    core = make_core(("_turn._udp", "SRV", f"0 0 3478 turn.{ZONE}."), ("turn", "A", "127.0.0.9"))
    seen = Seen()
    found = lookup(core, lambda server: find_relay(None, server, ZONE, TSIG, tls=tls()), seen)
    assert found == ("127.0.0.9", 3478)
    assert seen.connections == 1 and seen.questions[0] == f"_turn._udp.{ZONE}. IN SRV"
    # unsigned, the account's records are not shown: no relay
    assert lookup(core, lambda server: find_relay(None, server, ZONE, None, tls=tls())) is None


def test_a_server_under_another_accounts_ca_or_name_is_not_believed() -> None:
    seen = Seen()

    async def main() -> tuple[tuple[str, int], tuple[str, int], tuple[str, int] | None, tuple[str, int]]:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_tls, make_core(
                ("_turn._udp", "SRV", f"0 0 3478 turn.{ZONE}."), ("turn", "A", "127.0.0.9")), seen)
            stranger = tls(bytes(32))
            with trio.fail_after(10):
                found = await find_server(server, ZONE, UPDATE_TLS_SERVICE, TSIG, tls=stranger)
                relay = await find_relay(None, server, ZONE, TSIG, tls=stranger)
                # our CA, but the certificate names the zone, not another host
                elsewhere = await find_server(server, ZONE, UPDATE_TLS_SERVICE, TSIG,
                                              tls=TlsLookup(tls().context, "other.example.org"))
            nursery.cancel_scope.cancel()
        return server, found, relay, elsewhere

    server, found, relay, elsewhere = trio.run(main)
    assert found == server and relay is None and elsewhere == server
    assert seen.questions == []  # the handshake failed: no question was sent


def test_nobody_listening_falls_back_at_once() -> None:
    async def main() -> tuple[tuple[str, int], tuple[str, int], float]:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
            await closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
            addr = closed.getsockname()
            start = trio.current_time()
            with trio.fail_after(5):
                found = await find_server(addr, ZONE, UPDATE_TLS_SERVICE, TSIG, tls=tls())
            return addr, found, trio.current_time() - start
    addr, found, took = trio.run(main)
    assert found == addr and took < discover.EXCHANGE_TIMEOUT


def test_a_silent_server_falls_back_within_the_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discover, "CONNECT_TIMEOUT", 0.3)

    async def main() -> tuple[tuple[str, int], tuple[str, int]]:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
            await silent.bind(("127.0.0.1", 0))
            silent.listen(4)  # accepts (the kernel does), never speaks TLS
            addr = silent.getsockname()
            with trio.fail_after(3):
                return addr, await find_server(addr, ZONE, UPDATE_TLS_SERVICE, TSIG, tls=tls())
    addr, found = trio.run(main)
    assert found == addr


def test_a_server_that_stops_answering_is_given_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handshake completes, the SRV is never answered: one timeout, then no second question."""
    monkeypatch.setattr(discover, "EXCHANGE_TIMEOUT", 0.3)
    ctx = server_context(SECRET, ZONE, [ZONE], int(time.time()))
    received: list[bytes] = []

    async def mute(stream: trio.SSLStream[trio.SocketStream]) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                received.append(bytes(data))

    async def main() -> tuple[tuple[str, int], tuple[str, int]]:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_ssl_over_tcp_listeners(0, ctx, host="127.0.0.1")
            addr = listeners[0].transport_listener.socket.getsockname()
            nursery.start_soon(functools.partial(trio.serve_listeners, mute, listeners))
            with trio.fail_after(3):
                found = await find_server(addr, ZONE, UPDATE_TLS_SERVICE, TSIG, tls=tls())
            nursery.cancel_scope.cancel()
        return addr, found
    addr, found = trio.run(main)
    assert found == addr
    frames = FrameBuffer()
    for chunk in received:
        frames.feed(chunk)
    assert frames.next() is not None and frames.next() is None  # the SRV question alone
