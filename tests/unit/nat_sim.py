"""A small in-memory internet for the tunnel core's path logic, in virtual time: hosts (TunnelCores) behind
NATs, a TURN-like relay server, links that can be blocked.

The NATs behave as Linux masquerade does by default: one public port per socket whatever the destination
(endpoint-independent mapping), and an inbound datagram passes only from an address the host has sent to
(address-and-port-dependent filtering), or `per_destination=True`: a new public port per destination (as
`masquerade fully-random`). The relay forwards between an allocation's owner (wrapped as ChannelData, from
the server's address) and anyone else (plain, from the relayed address); it is the memory fake of the TURN
client's `wrap`/`unwrap` face plus the server behind it.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from tunneld.proto.core import Address
from tunneld.proto.stun_wire import decode_channel_data, encode_channel_data, is_channel_data
from tunneld.proto.tunnel import Output, TunnelCore

LATENCY = 0.01  # seconds, every hop


@dataclass
class Host:
    name: str
    core: TunnelCore
    public_ip: str
    port: int = 4500
    behind_nat: bool = True
    per_destination: bool = False
    sent_to: set[Address] = field(default_factory=set)  # the NAT's filter: remote addresses we sent to
    ports: dict[Address, int] = field(default_factory=dict)  # per-destination mappings
    tun: list[bytes] = field(default_factory=list)
    events: list[object] = field(default_factory=list)
    stun: list[tuple[bytes, Address]] = field(default_factory=list)
    sent: list[tuple[float, Address, bytes]] = field(default_factory=list)  # (time, destination, datagram)

    @property
    def public(self) -> Address:
        """The endpoint a STUN server would see (the first mapping, for a per-destination NAT)."""
        return (self.public_ip, self.port)

    def mapped_for(self, dest: Address) -> Address:
        if not self.per_destination:
            return self.public
        if dest not in self.ports:
            self.ports[dest] = 20000 + len(self.ports)
        return (self.public_ip, self.ports[dest])

    def admits(self, source: Address, to: Address) -> bool:
        if not self.behind_nat:
            return True
        if source not in self.sent_to:
            return False
        return not self.per_destination or (self.public_ip, self.ports.get(source)) == to


class RelayServer:
    """The TURN server: allocations by owner host, channels per peer address."""

    def __init__(self, ip: str = "::ffff:203.0.113.50", port: int = 3478) -> None:
        self.address: Address = (ip, port)
        self.ip = ip
        self.owner_of: dict[Address, Host] = {}  # relayed address -> owner
        self.channels: dict[tuple[str, Address], int] = {}  # (owner, peer) -> channel
        self.peers: dict[tuple[str, int], Address] = {}  # (owner, channel) -> peer
        self.alive = True
        self._ports = itertools.count(49152)

    def allocate(self, owner: Host) -> FakeRelay:
        relayed = (self.ip, next(self._ports))
        self.owner_of[relayed] = owner
        owner.sent_to.add(self.address)  # the Allocate opened the owner's NAT toward the server
        owner.mapped_for(self.address)
        return FakeRelay(self, owner, relayed)

    def channel(self, owner: str, peer: Address) -> int:
        ch = self.channels.get((owner, peer))
        if ch is None:
            ch = self.channels[owner, peer] = 0x4000 + len(self.channels)
            self.peers[owner, ch] = peer
        return ch


@dataclass
class FakeRelay:
    """The client side, as `TunnelCore.relay` sees it (`paths.Relay`)."""

    server_side: RelayServer
    owner: Host
    relayed: Address

    @property
    def server(self) -> Address:
        return self.server_side.address

    def wrap(self, peer: Address, payload: bytes) -> bytes:
        return encode_channel_data(self.server_side.channel(self.owner.name, peer), payload)

    def unwrap(self, data: bytes, source: Address, now: float) -> tuple[Address, bytes] | None:
        if source != self.server or not is_channel_data(data):
            return None
        ch, payload = decode_channel_data(data)
        peer = self.server_side.peers.get((self.owner.name, ch))
        return None if peer is None else (peer, payload)


class Net:
    def __init__(self, relay: RelayServer | None = None) -> None:
        self.hosts: dict[str, Host] = {}
        self.relay = relay or RelayServer()
        self.blocked: set[frozenset[str]] = set()  # pairs of public IPs whose direct datagrams are dropped
        self.now = 0.0
        self._queue: list[tuple[float, int, str, bytes, Address, Address]] = []
        self._seq = itertools.count()
        self.delivered: list[tuple[float, str, Address, bytes]] = []  # (time, to host, source, datagram)

    def add(self, host: Host) -> Host:
        self.hosts[host.name] = host
        return host

    def host_at(self, address: Address) -> Host | None:
        for h in self.hosts.values():
            if address == h.public or (h.per_destination and address[0] == h.public_ip
                                       and address[1] in h.ports.values()):
                return h
        return None

    # -- sending -------------------------------------------------------------------------------------------

    def send(self, sender: Host, out: Output) -> None:
        sender.tun += out.tun_in_order()
        sender.events += out.events
        sender.stun += out.stun
        for flight in out.sends:
            for d in flight.all_datagrams():
                self._route(sender, flight.destination, d)

    def _route(self, sender: Host, dest: Address, data: bytes) -> None:
        sender.sent_to.add(dest)
        sender.sent.append((self.now, dest, data))
        source = sender.mapped_for(dest)
        heapq.heappush(self._queue, (self.now + LATENCY, next(self._seq), sender.name, data, source, dest))

    def _arrive(self, data: bytes, source: Address, dest: Address) -> None:
        relay = self.relay
        if dest == relay.address:  # from an owner, wrapped
            if not relay.alive or not is_channel_data(data):
                return
            owner = next((h for h in relay.owner_of.values() if source == h.mapped_for(dest)), None)
            if owner is None:
                return
            ch, payload = decode_channel_data(data)
            peer = relay.peers.get((owner.name, ch))
            relayed = next(r for r, h in relay.owner_of.items() if h is owner)
            if peer is not None:
                self._deliver(payload, relayed, peer)
            return
        if dest in relay.owner_of:  # to an allocation: to its owner, wrapped, from the server
            if not relay.alive:
                return
            owner = relay.owner_of[dest]
            wrapped = encode_channel_data(relay.channel(owner.name, source), data)
            self._deliver(wrapped, relay.address, owner.mapped_for(relay.address))
            return
        self._deliver(data, source, dest)

    def _deliver(self, data: bytes, source: Address, dest: Address) -> None:
        host = self.host_at(dest)
        if host is None or not host.admits(source, dest):
            return
        if frozenset((source[0], host.public_ip)) in self.blocked:
            return
        self.delivered.append((self.now, host.name, source, data))
        self.send(host, host.core.inbound([(data, source)], self.now, 1e9 + self.now))

    # -- time ----------------------------------------------------------------------------------------------

    def run(self, until: float) -> None:
        """Deliver and poll in time order up to ``until``. As the dataplane's timer loop, a deadline the
        last poll did not clear is polled again a tick later, never in a spin."""
        polled: dict[str, float] = {}
        for _ in range(200_000):
            due: dict[str, float] = {}
            for h in self.hosts.values():
                d = h.core.deadline()
                if d is not None:
                    last = polled.get(h.name, -1.0)
                    due[h.name] = d if d > last else last + 0.25
            next_poll = min(due.values()) if due else None
            next_msg = self._queue[0][0] if self._queue else None
            t = min(x for x in (next_poll, next_msg, until) if x is not None)
            if t >= until:
                self.now = until
                return
            self.now = t = max(t, self.now)
            if next_msg is not None and next_msg <= t:
                _, _, _, data, source, dest = heapq.heappop(self._queue)
                self._arrive(data, source, dest)
                continue
            for h in self.hosts.values():
                if h.name in due and due[h.name] <= t:
                    polled[h.name] = t
                    self.send(h, h.core.poll(t, 1e9 + t))
        raise AssertionError("the simulation did not settle")

    def send_packet(self, host: Host, packet: bytes) -> None:
        self.send(host, host.core.outbound([packet], [], self.now, 1e9 + self.now))
