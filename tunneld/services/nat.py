"""NAT traversal for the daemon: the STUN client and the TURN client, run over the tunnel's own UDP socket.

The endpoint a NAT maps belongs to one socket, so both clients must send from the tunnel's: the data plane
owns it. Each client runs on the common driver over a `TunnelPort`: what the tunnel core hands out as STUN
(`Output.stun`) comes in through a bounded memory channel, and sends go out through the data plane's
transport. The cores speak plain addresses (IPv4 as IPv4); the socket speaks the dual-stack spelling
(IPv4-mapped IPv6): the port and `RelayLink` translate.

Behind a NAT that maps nothing for us, the observed endpoint is published (marked `nat=ei` or `nat=pd`)
and, with a relay configured or found by SRV, an allocation is made, kept, published (`relay=`) and
handed to the tunnel core (`TunnelCore.relay`), with permissions for every known peer's addresses.
docs/nat.md, "Paths: direct, punched, relayed", says what the tunnel does with them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from tunneld.dataplane import Dataplane
from tunneld.net.udp import display_addr, to_socket_addr
from tunneld.proto.core import Address
from tunneld.proto.stun import (
    PER_DESTINATION,
    UNKNOWN,
    NatKind,
    Observed,
    ServerFailed,
    StunClient,
    StunEvent,
    normal_address,
)
from tunneld.proto.stun_wire import turn_rest_credentials
from tunneld.proto.tunnel import TunnelCore
from tunneld.proto.turn import (
    Allocated,
    AllocationFailed,
    AllocationLost,
    PermissionFailed,
    TurnClient,
    TurnEvent,
)
from tunneld.services.driver import Driver

__all__ = ["NatService", "RelayLink", "TunnelPort", "nat_mark"]

log = logging.getLogger("tunneld.nat")

PORT_QUEUE = 64  # STUN datagrams waiting for a client: beyond, dropped (the clients retransmit)
TICK = 2.0  # seconds: permissions and channels follow the peer table this often
RETRY_ALLOCATION = 15.0  # seconds after a failed or lost allocation before the next try
CREDENTIAL_TTL = 24 * 3600  # seconds a TURN REST username stays valid (renewed for each allocation)


def nat_mark(kind: str) -> str:
    """The TXT `nat=` mark for a STUN verdict: "pd" only when two servers saw two mappings; one server
    (unknown) is taken as endpoint-independent: punching costs a few handshakes, and the relay follows."""
    return "pd" if kind == PER_DESTINATION else "ei"


class TunnelPort:
    """A socket face (`recvfrom`/`sendto`) for the driver over the tunnel's UDP socket."""

    def __init__(self, dataplane: Dataplane, capacity: int = PORT_QUEUE) -> None:
        self.dataplane = dataplane
        self._tx, self._rx = trio.open_memory_channel[tuple[bytes, Address]](capacity)
        self.dropped = 0

    def push(self, data: bytes, source: Address) -> None:
        """A STUN datagram from the tunnel socket (dual-stack spelling)."""
        try:
            self._tx.send_nowait((data, normal_address(source)))
        except trio.WouldBlock:
            self.dropped += 1

    async def recvfrom(self, bufsize: int) -> tuple[bytes, Address]:
        return await self._rx.receive()

    async def sendto(self, data: bytes, address: Address) -> int:
        await self.dataplane.udp.send_batch([data], to_socket_addr(*address))
        return len(data)


class RelayLink:
    """The TURN client as the tunnel core's `paths.Relay`, in the socket's spelling of addresses."""

    def __init__(self, turn: TurnClient) -> None:
        self.turn = turn
        self.server: Address = to_socket_addr(*turn.server)

    def wrap(self, peer: Address, payload: bytes) -> bytes:
        return self.turn.wrap(normal_address(peer), payload)

    def unwrap(self, data: bytes, source: Address, now: float) -> tuple[Address, bytes] | None:
        got = self.turn.unwrap(data, normal_address(source), now)
        return None if got is None else (to_socket_addr(*got[0]), got[1])


class NatService:
    """STUN rounds and the relay allocation; `on_change` hears when what we publish should change."""

    def __init__(self, core: TunnelCore, dataplane: Dataplane, stun_servers: Sequence[Address],
                 relay: Address | None, turn_secret: bytes | None, user: str,
                 on_change: Callable[[], None], *, wall: Callable[[], float] = time.time,
                 rand: Callable[[int], bytes] = os.urandom, stun_interval: float = 25.0) -> None:
        self.core = core
        self.dataplane = dataplane
        self.user = user
        self.turn_secret = turn_secret
        self.on_change = on_change
        self.wall = wall
        self.behind_nat = False
        self.observed: dict[Address, Address] = {}
        self.kind: str | None = None
        self.mapped: Address | None = None
        self.relayed: Address | None = None
        self.relay_state = "not configured" if relay is None else "idle"
        self.relay_error: str | None = None
        self._retry_at: float | None = None
        self.stun: StunClient | None = None
        self.turn: TurnClient | None = None
        self._drivers: list[Driver[Any]] = []
        self._ports: list[TunnelPort] = []
        if stun_servers:
            self.stun = StunClient([normal_address(s) for s in stun_servers], rand, interval=stun_interval)
        if relay is not None and turn_secret is not None:
            self.turn = TurnClient(normal_address(relay), *self._credentials(), rand=rand)

    def _credentials(self) -> tuple[str, str]:
        assert self.turn_secret is not None
        return turn_rest_credentials(self.turn_secret, self.user, int(self.wall()) + CREDENTIAL_TTL)

    # -- running -----------------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            cores: list[tuple[str, Any, Callable[[Any], None]]] = []
            if self.stun is not None:
                cores.append(("stun", self.stun, self._on_stun))
            if self.turn is not None:
                cores.append(("turn", self.turn, self._on_turn))
            for name, core, handler in cores:
                port = TunnelPort(self.dataplane)
                driver: Driver[Any] = Driver(core, [port], on_event=handler, name=name, grace=1.0)
                self._ports.append(port)
                self._drivers.append(driver)
                await nursery.start(driver.run)
            self.dataplane.on_stun = self._feed
            nursery.start_soon(self._ticker)
            task_status.started()

    def _feed(self, data: bytes, source: Address) -> None:
        for port in self._ports:  # each client drops what is not its own (transaction IDs, source)
            port.push(data, source)

    def _wake(self) -> None:
        for driver in self._drivers:
            driver.wake()

    async def _ticker(self) -> None:
        while True:
            self.tick(trio.current_time())
            await trio.sleep(TICK)

    def tick(self, now: float) -> None:
        """Permissions and channels for the peers of the moment; a new allocation when one is due."""
        turn = self.turn
        if turn is None:
            return
        if self.behind_nat and turn.state in ("idle", "failed", "lost", "closed") and \
                (self._retry_at is None or now >= self._retry_at):
            self._allocate(now)
        if turn.state == "allocated":
            turn.permit(self._peer_ips(), now)
            for peer in self.core.by_key.values():
                if peer.path.via is not None and peer.endpoint is not None:
                    turn.bind_channel(normal_address(peer.endpoint), now)
        self._wake()

    def _peer_ips(self) -> set[str]:
        """Every address a peer may send to our relayed address from: its published or direct endpoint,
        and where it talks to us from now (permissions are per IP, RFC 8656 §9)."""
        ips = set()
        for peer in self.core.by_key.values():
            for addr in (peer.path.direct, peer.endpoint if peer.path.via is not None else None):
                if addr is not None:
                    ips.add(normal_address(addr)[0])
        return ips

    def _allocate(self, now: float) -> None:
        assert self.turn is not None
        self.turn.set_credentials(*self._credentials())
        self.turn.start(now)
        self.relay_state, self._retry_at = "allocating", None
        self._wake()

    # -- the daemon's side -------------------------------------------------------------------------------

    def set_behind_nat(self, behind: bool) -> None:
        """Whether we sit behind a NAT that maps nothing for us (the uplink says): then our observed
        endpoint is published and the relay allocated."""
        self.behind_nat = behind
        self.core.set_nat(nat_mark(self.kind or UNKNOWN) if behind else None)
        if behind and self.turn is not None and self.turn.state == "idle":
            self._allocate(trio.current_time())

    def network_changed(self) -> None:
        """A new network: a new STUN round at once, and a new allocation (the old one's 5-tuple is gone)."""
        now = trio.current_time()
        self.observed.clear()
        self.kind = self.mapped = None
        if self.stun is not None:
            self.stun.check(now)
        if self.turn is not None and self.behind_nat:
            self.core.relay, self.relayed = None, None
            self._allocate(now)
        self._wake()

    def published(self) -> tuple[str | None, str | None, tuple[str, int] | None]:
        """(endpoint "ip:port", nat mark, relayed address) to publish while behind an unmapped NAT."""
        if not self.behind_nat or self.kind is None:
            return None, None, self.relayed
        mapped = self.mapped or next(iter(self.observed.values()), None)
        if mapped is None:
            return None, None, self.relayed
        return display_addr(to_socket_addr(*mapped)), nat_mark(self.kind), self.relayed

    # -- events ------------------------------------------------------------------------------------------

    def _on_stun(self, event: StunEvent) -> None:
        if isinstance(event, Observed):
            self.observed[event.server] = event.mapped
        elif isinstance(event, ServerFailed):
            log.info("STUN server %s: %s", display_addr(to_socket_addr(*event.server)), event.reason)
        elif isinstance(event, NatKind):
            changed = (event.kind, event.mapped) != (self.kind, self.mapped)
            self.kind, self.mapped = event.kind, event.mapped
            log.info("NAT: %s, observed %s", event.kind, event.mapped or dict(self.observed))
            if self.behind_nat:
                self.core.set_nat(nat_mark(event.kind))
            if changed:
                self.on_change()

    def _on_turn(self, event: TurnEvent) -> None:
        now = trio.current_time()
        if isinstance(event, Allocated):
            assert self.turn is not None
            self.relayed, self.relay_state, self.relay_error = event.relayed, "allocated", None
            self.core.relay = RelayLink(self.turn)
            log.info("relay: allocated %s on %s", display_addr(to_socket_addr(*event.relayed)),
                     display_addr(to_socket_addr(*self.turn.server)))
            self.tick(now)
            self.on_change()
        elif isinstance(event, AllocationFailed | AllocationLost):
            reason = f"{event.code} {event.reason}" if isinstance(event, AllocationFailed) else event.reason
            log.warning("relay: %s: %s", "allocation failed" if isinstance(event, AllocationFailed) else
                        "allocation lost", reason)
            self.core.relay, self.relayed = None, None
            self.relay_state, self.relay_error = "failed", reason
            self._retry_at = now + RETRY_ALLOCATION
            self.on_change()
        elif isinstance(event, PermissionFailed):
            log.info("relay: permission for %s refused (%d)", event.ip, event.code)

    def status(self, now: float) -> dict[str, Any]:
        def show(a: Address | None) -> str | None:
            return display_addr(to_socket_addr(*a)) if a else None

        return {
            "state": "behind an unmapped NAT" if self.behind_nat else "mapped or public",
            "observed": {show(s): show(m) for s, m in self.observed.items()},
            "kind": self.kind or "unknown",
            "relay_server": show(self.turn.server) if self.turn else None,
            "relay_state": self.relay_state,
            "relayed": show(self.relayed),
            "relay_error": self.relay_error,
            "next_try": None if self._retry_at is None else max(0.0, round(self._retry_at - now, 1)),
            "dropped": sum(p.dropped for p in self._ports),
        }

