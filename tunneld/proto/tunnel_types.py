"""What the tunnel core hands out: flights of datagrams, its events, one call's `Output`, and its counters.

Apart from `tunneld.proto.tunnel` so that the core and its path logic (`tunnel_paths`) share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunneld.fastpath.runs import Burst, RxRun, interleave
from tunneld.proto.core import Address
from tunneld.proto.paths import PathChanged


@dataclass(slots=True)
class Flight:
    """Datagrams to one destination, in this order: loose datagrams, with each sealed run (a `Burst`)
    sent after the first `burst.at` of them."""

    destination: Address
    datagrams: list[bytes]
    bursts: list[Burst] = field(default_factory=list)

    def all_datagrams(self) -> list[bytes]:
        """Every datagram in sending order, the bursts split (for tests and slow paths)."""
        out: list[bytes] = []
        prev = 0
        for b in self.bursts:
            out += self.datagrams[prev : b.at]
            out += b.datagrams()
            prev = max(prev, b.at)
        return out + self.datagrams[prev:]


@dataclass(frozen=True, slots=True)
class PeerMoved:
    """An authenticated packet came from a new endpoint: the peer roamed."""

    name: str
    endpoint: Address

    def __str__(self) -> str:
        return f"peer {self.name} moved to {self.endpoint[0]} port {self.endpoint[1]}"


@dataclass(frozen=True, slots=True)
class EndpointFromDns:
    """An idle peer's endpoint was replaced by the one its DNS records publish."""

    name: str
    endpoint: Address

    def __str__(self) -> str:
        return f"peer {self.name}: endpoint {self.endpoint[0]} port {self.endpoint[1]} from DNS"


@dataclass(frozen=True, slots=True)
class PeerRemoved:
    name: str

    def __str__(self) -> str:
        return f"peer {self.name} removed"


@dataclass(frozen=True, slots=True)
class HandshakeGaveUp:
    """No handshake completed within rekey_attempt_time; staged packets were dropped."""

    name: str

    def __str__(self) -> str:
        return f"handshake with {self.name} did not complete; giving up until there is traffic"


TunnelEvent = PeerMoved | EndpointFromDns | PeerRemoved | HandshakeGaveUp | PathChanged


@dataclass(slots=True)
class Output:
    """What one call into the core asks for: packets and runs for the TUN (each run written after the
    first `run.at` loose packets), flights of datagrams to send, what happened, and the STUN messages
    that arrived (for the NAT service's STUN and TURN clients)."""

    tun_packets: list[bytes] = field(default_factory=list)
    tun_runs: list[RxRun] = field(default_factory=list)
    sends: list[Flight] = field(default_factory=list)
    events: list[TunnelEvent] = field(default_factory=list)
    stun: list[tuple[bytes, Address]] = field(default_factory=list)

    def tun_in_order(self) -> list[bytes]:
        """Every packet for the TUN in order, the runs split (for tests and slow paths)."""
        return interleave(self.tun_packets, self.tun_runs)


@dataclass
class Counters:
    rx_datagrams: int = 0
    rx_malformed: int = 0
    rx_unknown_spi: int = 0
    rx_keepalive: int = 0
    rx_handshake: int = 0
    rx_stun: int = 0  # STUN messages handed out (Output.stun)
    rx_relayed: int = 0  # datagrams from our relay server (each unwrapped, or STUN)
    tx_relayed: int = 0  # datagrams sent wrapped through our relay
    tx_no_relay: int = 0  # to send through a relay we no longer have (dropped)
    tx_no_route: int = 0
    tx_no_endpoint: int = 0
    # The fast path's share: runs sealed / opened in one piece, and the datagrams they held.
    tx_runs: int = 0
    tx_run_datagrams: int = 0
    rx_runs: int = 0
    rx_run_datagrams: int = 0
