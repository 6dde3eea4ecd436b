"""The publisher over DNS over TLS (tunneld.services.tlsport) against serve-dns's own TLS listener on
loopback: records land and are withdrawn through the TLS connection, the connection comes back after the
server closed it for idleness, a server under another account's CA is refused, and a server that is down
costs one attempt per retry (the backoff), not a loop."""

from __future__ import annotations

import contextlib
import functools
import socket
import time

import dns.message
import dns.rdatatype
import pytest
import trio
import trio.testing

from tests.unit.test_dns_services import until
from tests.unit.test_dnsserver_tcp import free_port
from tunneld.accountca import account_ca
from tunneld.crypto.kdf import derive_tsig_key
from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.serve import serve
from tunneld.dnsserver.store import ZoneStore
from tunneld.dnsserver.tcp import TcpLimits
from tunneld.dnsserver.tls import server_context
from tunneld.proto import records
from tunneld.services.publisher import PublisherService, host_records
from tunneld.services.tlsport import TlsPort, client_context, tls_connector

ZONE = "home.example.net"
SECRET = bytes(range(32))


async def _serve(nursery: trio.Nursery, core: DnsCore, limits: TcpLimits | None = None) -> tuple[str, int]:
    ctx = server_context(SECRET, ZONE, [f"ns.{ZONE}", ZONE], int(time.time()))
    for _ in range(5):
        port, tls_port = free_port(), free_port()
        try:
            await nursery.start(functools.partial(serve, core, "127.0.0.1", port, tcp=limits,
                                                  tls=("127.0.0.1", tls_port, ctx)))
        except OSError:
            continue
        return "127.0.0.1", tls_port
    raise AssertionError("could not bind")


def _core() -> DnsCore:
    return DnsCore(ZoneStore(":memory:", ZONE + ".", "ns." + ZONE + ".", 53), [account_key(SECRET, ZONE)])


def test_the_publisher_publishes_over_tls_reconnects_and_withdraws() -> None:
    core = _core()
    aaaa = records.host_name(ZONE, "laptop")

    def published() -> bool:
        return bool(core.store.rrset(aaaa, dns.rdatatype.AAAA, time.time()))

    async def main() -> None:
        limits = TcpLimits(idle_timeout=0.3, busy_idle_timeout=0.3)
        async with trio.open_nursery() as nursery:
            server = await _serve(nursery, core, limits)
            service = PublisherService(server, ZONE, derive_tsig_key(SECRET, ZONE), 1800, start_delay=0.05,
                                       connect=tls_connector(account_ca(SECRET, ZONE).pem, ZONE))
            async with trio.open_nursery() as inner:
                await inner.start(service.run)
                service.set_records(host_records("laptop", ZONE, bytes(range(2, 34)), "192.0.2.7:4500"))
                await until(lambda: service.status()["state"] == "published", "published over TLS")
                assert published()
                port = service._sock
                assert isinstance(port, TlsPort) and port.connects == 1
                # The server closes the idle connection; the next change opens a new one.
                await until(lambda: port._stream is None, "the server closed the idle connection")
                service.set_records(host_records("laptop", ZONE, bytes(range(2, 34)), "192.0.2.8:4500"))
                await until(lambda: port.connects == 2 and service.status()["state"] == "published",
                            "republished over a new connection")
                inner.cancel_scope.cancel()
            assert not published()  # the withdrawal went over TLS too, within the grace
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_server_of_another_account_and_a_server_that_is_down_are_refused() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await _serve(nursery, _core())
            stranger = TlsPort(server, client_context(account_ca(bytes(32), ZONE).pem), ZONE)
            with trio.fail_after(10):
                try:
                    await stranger.sendto(b"\0" * 12, server)
                    raise AssertionError("a server under another CA was trusted")
                except OSError as e:
                    assert "TLS to" in str(e)
            assert stranger.connect_errors == 1
            nursery.cancel_scope.cancel()
        # Nothing listens: one attempt, then the backoff answers at once without trying.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = ("127.0.0.1", s.getsockname()[1])
        down = TlsPort(closed, client_context(account_ca(SECRET, ZONE).pem), ZONE)
        for _ in range(3):  # within RECONNECT_BACKOFF of each other
            with pytest.raises(OSError):
                await down.sendto(b"\0" * 12, closed)
        assert down.connect_errors == 1 and down.connects == 0
        down.close()  # a send after close (racing a reopen) is a send error the driver counts, no crash
        with pytest.raises(OSError):
            await down.sendto(b"\0" * 12, closed)
        with pytest.raises(trio.ClosedResourceError):  # and the driver's receiver ends
            await down.recvfrom(65535)

    trio.run(main)


def test_the_owner_is_told_of_a_lost_connection_but_not_of_one_it_dropped() -> None:
    """on_lost: the server closing an idle connection, and a failed attempt, are reported (the watcher's
    Push session resubscribes); drop() closes without a report, and the next send opens a new one."""
    async def main() -> None:
        lost: list[str] = []
        async with trio.open_nursery() as nursery:
            server = await _serve(nursery, _core(), TcpLimits(idle_timeout=0.3, busy_idle_timeout=0.3))
            port = TlsPort(server, client_context(account_ca(SECRET, ZONE).pem), ZONE)
            port.on_lost = lost.append
            nursery.start_soon(_drain, port)
            query = dns.message.make_query(ZONE, "SOA").to_wire()
            await port.sendto(query, server)
            await until(lambda: bool(lost), "the idle connection's end reported")
            assert "closed by the server" in lost[0] and port.connects == 1
            await port.sendto(query, server)
            assert port.connects == 2 and port._stream is not None
            port.drop()
            assert port._stream is None
            await trio.testing.wait_all_tasks_blocked()  # the receiver saw the dropped stream end
            assert len(lost) == 1
            await port.sendto(query, server)
            assert port.connects == 3
            port.close()
            nursery.cancel_scope.cancel()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = ("127.0.0.1", s.getsockname()[1])
        down = TlsPort(closed, client_context(account_ca(SECRET, ZONE).pem), ZONE)
        down.on_lost = lost.append
        with pytest.raises(OSError):
            await down.sendto(b"\0" * 12, closed)
        assert len(lost) == 2 and "TLS to 127.0.0.1" in lost[1]

    trio.run(main)


async def _drain(port: TlsPort) -> None:
    with contextlib.suppress(trio.ClosedResourceError):
        while True:
            await port.recvfrom(65535)
