"""Finding the TURN relay: `[relay] server` first, else `_turn._udp.DOMAIN` SRV (RFC 5928) from the
account's DNS server (our own DNS core on loopback, queries signed with the account key), else none."""

from __future__ import annotations

import socket
import time

import dns.name
import dns.rdata
import trio

from tunneld.crypto.kdf import derive_tsig_key
from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.store import AddRR, Lease, ZoneStore
from tunneld.services.discover import find_relay

ZONE = "home.example.net"
SECRET = bytes(32)
TSIG = derive_tsig_key(SECRET, ZONE)


def _core(*records: tuple[str, str, str]) -> DnsCore:
    store = ZoneStore(":memory:", ZONE + ".", "ns." + ZONE + ".", 5353, addresses=("127.0.0.1",))
    origin = dns.name.from_text(ZONE)
    store.apply_update([AddRR(dns.name.from_text(owner, origin), 120, dns.rdata.from_text("IN", rdtype, text))
                        for owner, rdtype, text in records], Lease(7200, 7200), time.time())
    return DnsCore(store, [account_key(SECRET, ZONE)])


async def _serving(core: DnsCore, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname())
        while True:
            wire, src = await sock.recvfrom(65535)
            reply = core.handle(wire, src, time.time())
            if reply is not None:
                await sock.sendto(reply, src)


def _find(core: DnsCore, key: bytes | None = TSIG) -> tuple[str, int] | None:
    async def main() -> tuple[str, int] | None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(_serving, core)
            with trio.fail_after(10):
                found = await find_relay(None, server, ZONE, key)
            nursery.cancel_scope.cancel()
        return found
    return trio.run(main)


def test_configured_relay_wins_and_needs_no_dns() -> None:
    assert trio.run(find_relay, ("192.0.2.7", 3478), None, ZONE) == ("192.0.2.7", 3478)
    assert trio.run(find_relay, ("2001:db8::7", 3479), None, ZONE) == ("2001:db8::7", 3479)
    assert trio.run(find_relay, ("localhost", 3478), None, ZONE) in (("127.0.0.1", 3478), ("::1", 3478))


def test_srv_with_a_target_in_the_zone() -> None:
    core = _core(("_turn._udp", "SRV", f"0 0 3478 turn.{ZONE}."), ("turn", "A", "127.0.0.9"))
    assert _find(core) == ("127.0.0.9", 3478)


def test_srv_target_outside_the_zone_goes_to_the_system_resolver() -> None:
    core = _core(("_turn._udp", "SRV", "0 0 3479 localhost."))
    assert _find(core) in (("127.0.0.1", 3479), ("::1", 3479))


def test_no_srv_and_no_dns_server_mean_no_relay() -> None:
    assert _find(_core()) is None
    assert _find(_core(("_turn._udp", "SRV", "0 0 0 ."))) is None  # RFC 2782: decidedly not available
    assert trio.run(find_relay, None, None, ZONE) is None


def test_unsigned_lookup_is_not_shown_the_accounts_records() -> None:
    core = _core(("_turn._udp", "SRV", f"0 0 3478 turn.{ZONE}."), ("turn", "A", "127.0.0.9"))
    assert _find(core, None) is None
