"""Finding the account's servers by SRV, against our own DNS core served on loopback."""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.store import ZoneStore
from tunneld.services.discover import LLQ_SERVICE, UPDATE_SERVICE, find_server

ZONE = "home.example.net"


async def serving(core: DnsCore, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname())
        while True:
            wire, src = await sock.recvfrom(65535)
            reply = core.handle(wire, src, 1_700_000_000.0)
            if reply is not None:
                await sock.sendto(reply, src)


def run(make_core: Callable[[int], DnsCore], service: str) -> tuple[tuple[str, int], tuple[str, int]]:
    async def main() -> tuple[tuple[str, int], tuple[str, int]]:
        async with trio.open_nursery() as nursery:
            # The SRV records point at port 7777 of ns.ZONE; the server itself listens elsewhere.
            addr = await nursery.start(serving, make_core(7777))
            with trio.fail_after(10):
                found = await find_server(addr, ZONE, service)
            nursery.cancel_scope.cancel()
        return addr, found
    return trio.run(main)


def core_with(addresses: tuple[str, ...]) -> Callable[[int], DnsCore]:
    def make(port: int) -> DnsCore:
        store = ZoneStore(":memory:", ZONE + ".", "ns." + ZONE + ".", port, llq_port=port + 1,
                          addresses=addresses)
        return DnsCore(store, [account_key(bytes(32), ZONE)])
    return make


def test_srv_target_with_an_address_is_followed() -> None:
    _addr, found = run(core_with(("127.0.0.1",)), UPDATE_SERVICE)
    assert found == ("127.0.0.1", 7777)
    _addr, found = run(core_with(("127.0.0.1",)), LLQ_SERVICE)
    assert found == ("127.0.0.1", 7778)


def test_srv_target_without_an_address_falls_back_to_the_configured_server() -> None:
    addr, found = run(core_with(()), UPDATE_SERVICE)
    assert found == addr


def test_no_srv_record_falls_back() -> None:
    addr, found = run(core_with(("127.0.0.1",)), "_nothing._udp")
    assert found == addr


def test_no_answer_falls_back_within_the_timeout() -> None:
    async def main() -> tuple[tuple[str, int], tuple[str, int]]:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            await silent.bind(("127.0.0.1", 0))  # bound, never answers
            addr = silent.getsockname()
            with trio.fail_after(5):
                return addr, await find_server(addr, ZONE, UPDATE_SERVICE)
    addr, found = trio.run(main)
    assert found == addr
