"""The rendezvous server's TCP under idle connections (RFC 7766 §6.2.3): served on loopback.

64 idle connections used to lock out every TCP client (the 65th was closed at once). Now idle connections
time out, a server near its cap shortens the timeout, and a new client is admitted by evicting the
longest-idle connection, never refused.
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TypeVar

import dns.message
import dns.name
import dns.rcode
import trio

from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.serve import serve
from tunneld.dnsserver.store import ZoneStore
from tunneld.dnsserver.tcp import ConnTable, TcpLimits, source_key

T = TypeVar("T")
DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)


def make_core() -> DnsCore:
    return DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 53), [account_key(bytes(32), DOMAIN)])


def free_port() -> int:
    """A port free for both UDP and TCP on loopback (the server binds both to one port)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(port)
    raise AssertionError("no free port")


async def served(nursery: trio.Nursery, core: DnsCore, limits: TcpLimits | None = None) -> int:
    for _ in range(5):
        port = free_port()
        try:
            await nursery.start(functools.partial(serve, core, "127.0.0.1", port, tcp=limits))
        except OSError:  # taken between the probe and the bind: try another
            continue
        return port
    raise AssertionError("could not bind")


async def connect(port: int, source: str) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def exchange(stream: trio.SocketStream) -> int | None:
    """One SOA query on ``stream``: the reply's rcode, or None if the server closed the connection
    without answering."""
    q = dns.message.make_query(ZONE, "SOA")
    wire = q.to_wire()
    try:
        await stream.send_all(struct.pack("!H", len(wire)) + wire)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            chunk = await stream.receive_some(65535)
            if not chunk:
                return None
            buf += chunk
    except (trio.BrokenResourceError, OSError):
        return None
    reply = dns.message.from_wire(buf[2:])
    assert reply.id == q.id
    return int(reply.rcode())


async def ask_tcp(port: int, source: str = "127.0.0.1") -> int | None:
    """One SOA query over a new TCP connection from ``source``."""
    stream = await connect(port, source)
    async with stream:
        return await exchange(stream)


async def idle_connection(port: int, source: str) -> trio.SocketStream:
    """A connection that asked once (so the server has surely accepted it) and then stays idle."""
    stream = await connect(port, source)
    assert await exchange(stream) == dns.rcode.NOERROR
    return stream


def test_idle_connections_do_not_lock_out_a_new_client() -> None:
    """The lockout that was measured: 64 idle connections, then every TCP client was refused."""

    async def main() -> list[int | None]:
        async with trio.open_nursery() as nursery:
            port = await served(nursery, make_core())
            # From 64 sources (127.0.0.0/8 is all loopback), so no per-source limit is involved.
            idle = [await idle_connection(port, f"127.0.1.{i + 1}") for i in range(64)]
            with trio.fail_after(5):
                results = [await ask_tcp(port, "127.0.2.1") for _ in range(3)]
            for s in idle:
                await s.aclose()
            nursery.cancel_scope.cancel()
        return results

    assert trio.run(main) == [dns.rcode.NOERROR] * 3


async def closed_by_server(stream: trio.SocketStream) -> bool:
    """Wait (bounded by the caller) until the server closes ``stream``: True at end of stream."""
    try:
        while await stream.receive_some(65535):
            pass
    except (trio.BrokenResourceError, OSError):  # a reset is a close too
        pass
    return True


def run_served(limits: TcpLimits, body: Callable[[int], Awaitable[T]]) -> T:
    async def main() -> T:
        async with trio.open_nursery() as nursery:
            port = await served(nursery, make_core(), limits)
            with trio.fail_after(10):
                result = await body(port)
            nursery.cancel_scope.cancel()
        return result
    return trio.run(main)


def test_at_the_total_cap_the_longest_idle_connection_makes_room() -> None:
    limits = TcpLimits(max_connections=8, per_source=8, idle_timeout=30.0, busy_idle_timeout=30.0)

    async def body(port: int) -> None:
        idle = [await idle_connection(port, f"127.0.1.{i + 1}") for i in range(8)]
        assert await exchange(idle[0]) == dns.rcode.NOERROR  # now the most recently active
        assert await ask_tcp(port, "127.0.2.1") == dns.rcode.NOERROR
        assert await closed_by_server(idle[1])  # the longest idle went
        for s in idle[2:] + idle[:1]:  # the others are still served
            assert await exchange(s) == dns.rcode.NOERROR
        for s in idle:
            await s.aclose()

    run_served(limits, body)


def test_a_source_over_its_cap_loses_its_own_longest_idle_connection() -> None:
    limits = TcpLimits(max_connections=64, per_source=3, idle_timeout=30.0, busy_idle_timeout=30.0)

    async def body(port: int) -> None:
        other = await idle_connection(port, "127.0.3.1")
        mine = [await idle_connection(port, "127.0.4.1") for _ in range(3)]
        assert await ask_tcp(port, "127.0.4.1") == dns.rcode.NOERROR
        assert await closed_by_server(mine[0])
        assert await exchange(other) == dns.rcode.NOERROR  # another source is untouched
        for s in [other, *mine]:
            await s.aclose()

    run_served(limits, body)


def test_a_silent_or_slow_client_is_closed_after_the_idle_timeout() -> None:
    limits = TcpLimits(idle_timeout=0.3, busy_idle_timeout=0.3)

    async def body(port: int) -> float:
        silent = await connect(port, "127.0.5.1")
        slow = await connect(port, "127.0.5.2")
        await slow.send_all(b"\x00")  # half a length prefix, and nothing more (slow-loris)
        start = trio.current_time()
        assert await closed_by_server(silent) and await closed_by_server(slow)
        await silent.aclose()
        await slow.aclose()
        return trio.current_time() - start

    assert run_served(limits, body) < 5  # well before the 10 s default (the bound is fail_after's)


def test_near_the_cap_waiting_connections_get_the_short_timeout() -> None:
    limits = TcpLimits(max_connections=4, per_source=4, idle_timeout=60.0, busy_idle_timeout=0.2,
                       busy_fraction=0.75)

    async def body(port: int) -> None:
        first = [await idle_connection(port, f"127.0.6.{i + 1}") for i in range(2)]  # 2 of 4: not busy
        third = await idle_connection(port, "127.0.6.3")  # 3 of 4: busy, and the first two's waits shrink
        for s in [*first, third]:
            assert await closed_by_server(s)
            await s.aclose()
        assert await ask_tcp(port, "127.0.6.9") == dns.rcode.NOERROR

    run_served(limits, body)


# ---- the table, sans I/O -------------------------------------------------------------------------


def test_table_evicts_by_idleness_and_counts() -> None:
    table = ConnTable(TcpLimits(max_connections=3, per_source=2, idle_timeout=10.0, busy_idle_timeout=1.0,
                                busy_fraction=0.99))
    a1, ev = table.admit("a", 0.0)
    b1, _ = table.admit("b", 1.0)
    a2, _ = table.admit("a", 2.0)
    assert ev == [] and len(table) == 3
    assert table.deadline(a1) == 1.0  # full: the short timeout for everyone
    table.active(a1, 5.0)  # a1 is now the most recently active
    a3, ev = table.admit("a", 6.0)  # a is at its cap of 2: its longest idle (a2) goes
    assert ev == [a2]
    c1, ev = table.admit("c", 7.0)  # total cap: the longest idle overall (b1) goes
    assert ev == [b1] and a1 in table and a3 in table and c1 in table
    table.remove(a1)
    assert table.deadline(a1) == float("-inf") and len(table) == 2
    assert table.idle_timeout() == 10.0 and table.deadline(c1) == 17.0
    assert table.counters["evicted: per source"] == 1 and table.counters["evicted: total"] == 1


def test_source_keys() -> None:
    assert source_key(("192.0.2.1", 53)) == "192.0.2.1"
    assert source_key(("::ffff:192.0.2.1", 53, 0, 0)) == "192.0.2.1"
    assert source_key(("2001:db8:1:2:3::4", 53, 0, 0)) == "2001:db8:1:2::/64"
    assert source_key(("fe80::1%eth0", 53, 0, 2)) == "fe80::/64"
    assert source_key(None) == "None"
