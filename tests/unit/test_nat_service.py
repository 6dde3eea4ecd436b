"""The NAT service over the data plane's loops, in virtual time (fake UDP wire, tests/unit/fake_io.py): STUN
from the tunnel's own socket, a relay allocation made, published and handed to the tunnel core,
permissions for the peers, and everything redone after a network change."""

from __future__ import annotations

import ipaddress
from typing import ClassVar

import trio
import trio.testing

from tests.helpers import drbg
from tests.unit.fake_io import FakeTun, FakeUDP, Wire
from tests.unit.fake_turn import RELAY, FakeRelay
from tunneld.crypto.noise import generate_keypair
from tunneld.dataplane import Dataplane
from tunneld.net.udp import to_socket_addr
from tunneld.proto import stun_wire as sw
from tunneld.proto.core import Address
from tunneld.proto.stun_wire import turn_rest_credentials
from tunneld.proto.tunnel import TunnelCore
from tunneld.services.nat import CREDENTIAL_TTL, NatService, RelayLink, nat_mark

ME: Address = ("::ffff:192.168.1.2", 4500)  # the tunnel socket, behind the NAT
SEEN: Address = ("198.51.100.2", 40001)  # what the NAT makes of it (the servers' view)
STUN_A: Address = ("203.0.113.2", 5353)
STUN_B: Address = ("203.0.113.2", 3479)
PEER_ULA = ipaddress.IPv6Address("fd00:1::b")
PEER_AT: Address = ("::ffff:198.51.100.18", 4500)
SECRET = b"0123456789abcdef" * 4
WALL = 1_700_000_000.0


class Servers:
    """STUN servers and the TURN relay on the wire: each answers what it gets, as if through a NAT that
    maps our socket to SEEN (endpoint-independent) or, with `per_destination`, to one port per server."""

    def __init__(self, wire: Wire, per_destination: bool = False) -> None:
        self.wire = wire
        self.per_destination = per_destination
        user = f"{int(WALL) + CREDENTIAL_TTL}:desk"
        self.relay = FakeRelay({user: turn_rest_credentials(SECRET, "desk", int(WALL) + CREDENTIAL_TTL)[1]})
        self.ends = {addr: FakeUDP(wire, to_socket_addr(*addr)) for addr in (STUN_A, STUN_B, RELAY)}
        self.binding_requests = 0

    def seen(self, server: Address) -> Address:
        if not self.per_destination:
            return SEEN
        return SEEN[0], SEEN[1] + list(self.ends).index(server)

    async def serve(self, server: Address) -> None:
        end = self.ends[server]
        while True:
            await end.wait_readable()
            got: list[tuple[bytes, Address, int]] = []
            end.recv_runs(got)
            for data, source, _ in got:
                if server == RELAY:
                    answers = self.relay.handle(data, self.seen(server))
                else:
                    msg = sw.decode(data)
                    self.binding_requests += 1
                    mapped = sw.encode_xor_address(self.seen(server), msg.transaction_id)
                    answers = [sw.encode(sw.BINDING, sw.SUCCESS, msg.transaction_id,
                                         [(sw.XOR_MAPPED_ADDRESS, mapped)])]
                for answer in answers:
                    self.wire.carry(end.addr, source, [answer])


def run(per_destination: bool = False, relay: bool = True) -> dict[str, object]:
    wire = Wire(1, max_delay=0.005)
    priv, _ = generate_keypair()
    core = TunnelCore(priv, bytes(32), rand=drbg(1))
    core.add_peer("b", generate_keypair()[1], PEER_ULA, PEER_AT)
    udp = FakeUDP(wire, ME)
    plane = Dataplane(core, FakeTun(core.layout), udp, wall=lambda: WALL + trio.current_time())
    servers = Servers(wire, per_destination)
    changes: list[tuple[object, ...]] = []
    nat = NatService(core, plane, [STUN_A, STUN_B], RELAY if relay else None, SECRET, "desk",
                     lambda: changes.append(nat.published()), wall=lambda: WALL, rand=drbg(7))
    seen: dict[str, object] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            wire.nursery = nursery
            for server in servers.ends:
                nursery.start_soon(servers.serve, server)
            await nursery.start(plane.run)
            await nursery.start(nat.run)
            await trio.sleep(1.0)
            seen["before"] = nat.published()  # not behind a NAT (yet): nothing of ours to publish
            nat.set_behind_nat(True)
            await trio.sleep(3.0)
            seen["published"] = nat.published()
            seen["relay"] = core.relay
            seen["core_nat"] = core.nat
            seen["permissions"] = {a.relayed: set(a.permissions) for a in servers.relay.allocations.values()}
            seen["status"] = nat.status(trio.current_time())
            requests = servers.binding_requests
            allocations = len(servers.relay.requests)
            nat.network_changed()
            await trio.sleep(2.0)
            seen["redone"] = (servers.binding_requests - requests, len(servers.relay.requests) - allocations)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    seen["changes"] = changes
    seen["core"] = core
    return seen


def test_behind_an_endpoint_independent_nat_the_observed_endpoint_and_the_relay_are_published() -> None:
    seen = run()
    assert seen["before"] == (None, None, None)
    relayed = (RELAY[0], 50000)
    assert seen["published"] == ("198.51.100.2:40001", "ei", relayed)
    assert seen["core_nat"] == "ei"
    link = seen["relay"]
    assert isinstance(link, RelayLink) and link.server == to_socket_addr(*RELAY)  # the socket's spelling
    # The peer's address may send to our relayed address (per IP, in the relay's spelling).
    assert seen["permissions"] == {relayed: {"198.51.100.18"}}
    status = seen["status"]
    assert isinstance(status, dict)
    assert status["relay_state"] == "allocated" and status["kind"] == "endpoint-independent"
    assert status["observed"] == {"203.0.113.2:5353": "198.51.100.2:40001",
                                  "203.0.113.2:3479": "198.51.100.2:40001"}
    # A network change: a new STUN round to both servers at once, and a new allocation.
    stun_requests, relay_requests = seen["redone"]  # type: ignore[misc]
    assert stun_requests == 2 and relay_requests >= 1


def test_behind_a_per_destination_nat_the_address_is_published_marked_pd() -> None:
    seen = run(per_destination=True, relay=False)
    endpoint, mark, relayed = seen["published"]  # type: ignore[misc]
    assert endpoint.startswith("198.51.100.2:") and mark == "pd" and relayed is None
    assert seen["core_nat"] == "pd" and seen["relay"] is None


def test_relay_link_translates_between_the_socket_and_the_relays_spelling() -> None:
    class Turn:
        server = ("203.0.113.9", 3478)
        wrapped: ClassVar[list[Address]] = []

        def wrap(self, peer: Address, payload: bytes) -> bytes:
            self.wrapped.append(peer)
            return payload

        def unwrap(self, data: bytes, source: Address, now: float) -> tuple[Address, bytes] | None:
            assert source == self.server
            return ("198.51.100.18", 4500), data

    link = RelayLink(Turn())  # type: ignore[arg-type]
    assert link.server == ("::ffff:203.0.113.9", 3478)
    assert link.unwrap(b"x", ("::ffff:203.0.113.9", 3478), 0.0) == (("::ffff:198.51.100.18", 4500), b"x")
    link.wrap(("::ffff:198.51.100.18", 4500), b"y")
    assert Turn.wrapped == [("198.51.100.18", 4500)]
    assert nat_mark("unknown") == nat_mark("endpoint-independent") == "ei"
    assert nat_mark("per-destination") == "pd"
