"""A peer's path, without I/O: direct (its own endpoint, punched through NATs if need be) or relayed (TURN).

`PathState` is kept per peer; its methods are the decisions (when to punch, when to fall back to a relay,
when to try direct again); `TunnelCore` carries them out with handshakes and keepalives. Sessions never
depend on the path: a path change moves where datagrams go, never which keys they use. docs/nat.md
("Paths: direct, punched, relayed") explains the design.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from tunneld.proto import constants as C
from tunneld.proto.core import Address

DIRECT: Final = "direct"
RELAY: Final = "relay"

# When both sides learn of each other (one LLQ round trip apart), each sends handshake initiations to the
# other's published endpoint at these offsets (seconds): the first ones open our NAT's binding toward the
# peer, a later one passes the peer's binding once the peer's first ones have opened it.
PUNCH_SCHEDULE: Final = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0)
# No authenticated packet from the peer this long after punching began: go through its relay if it has one.
PUNCH_WINDOW: Final = 3.0
# While relayed with a direct endpoint known, probe it this often (an authenticated keepalive; the peer
# probes too, so within one interval a probe finds the other side's NAT binding open).
UPGRADE_INTERVAL: Final = 20.0
# An endpoint learned from an authenticated packet this recent beats a DNS record, and a direct path heard
# from this recently is not left for a relayed packet: the peer is talking to us from there
# (keepalive_timeout + rekey_timeout: a live peer sends at least that often when spoken to).
FRESH_PACKET: Final = C.KEEPALIVE_TIMEOUT + C.REKEY_TIMEOUT


class Relay(Protocol):
    """What the tunnel needs of our TURN allocation (the TURN client core has exactly this).

    ``unwrap`` is called only for datagrams from ``server`` (ChannelData's first byte 0x40-0x4F may be an
    SPI's elsewhere); it returns (peer address, datagram) for relayed data, None otherwise."""

    server: Address

    def unwrap(self, data: bytes, source: Address, now: float) -> tuple[Address, bytes] | None: ...

    def wrap(self, peer: Address, payload: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class PathChanged:
    """A peer's path changed: ``direct`` to ``endpoint``, or ``relay`` through ``relay`` (the peer's relayed
    address, which we send to, or our relay server, through which we send to ``endpoint``)."""

    name: str
    path: str
    endpoint: Address
    relay: Address | None

    def __str__(self) -> str:
        where = f"{self.endpoint[0]} port {self.endpoint[1]}"
        if self.relay is None:
            return f"peer {self.name}: direct path to {where}"
        return f"peer {self.name}: relayed via {self.relay[0]} port {self.relay[1]} (to {where})"


@dataclass(slots=True)
class PathState:
    """One peer's path and what we know of its NAT. ``endpoint`` itself stays on the Peer."""

    kind: str = DIRECT
    since: float | None = None  # `now` when `kind`/`relay` last changed
    relay: Address | None = None  # the relay the path goes through (None: direct)
    via: Address | None = None  # our relay server when we send wrapped (the peer reached our allocation)
    direct: Address | None = None  # the peer's own endpoint: published, or an authenticated packet's source
    direct_heard: float | None = None  # last authenticated packet that arrived directly
    nat: str | None = None  # the peer's published nat= mark ("ei", "pd" or None)
    peer_relay: Address | None = None  # the peer's published relay= address
    burst_to: Address | None = None  # handshakes on PUNCH_SCHEDULE go there (punching, or a new relay)
    burst_from: float | None = None
    burst_step: int = 0
    fallback_at: float | None = None  # the punch window ends: relay unless the peer was heard
    upgrade_at: float | None = None  # relayed: the next direct probe

    # -- what arrived ------------------------------------------------------------------------------------

    def arrival(self, source: Address, via: Address | None) -> tuple[str, Address | None]:
        """The path an authenticated packet came by: through our relay (``via``), from the peer's relayed
        address, or directly."""
        if via is not None:
            return RELAY, via
        if source == self.peer_relay:
            return RELAY, source
        return DIRECT, None

    def keeps_direct(self, kind: str, now: float) -> bool:
        """A relayed packet does not move a peer off a direct path heard from within FRESH_PACKET (one
        direction may still be relayed for a while; ours works)."""
        return kind == RELAY and self.kind == DIRECT and self.direct_heard is not None and \
            now - self.direct_heard <= FRESH_PACKET

    def heard_directly(self, source: Address, now: float) -> None:
        self.direct, self.direct_heard = source, now
        self.upgrade_at = None

    def set(self, kind: str, relay: Address | None, via: Address | None, now: float) -> bool:
        """Take a path; True if it is another one than before (kind or relay)."""
        changed = (kind, relay) != (self.kind, self.relay)
        if changed or self.since is None:
            self.since = now
        self.kind, self.relay, self.via = kind, relay, via
        if kind == RELAY:
            if self.upgrade_at is None and self.direct is not None and self.nat != "pd":
                self.upgrade_at = now + UPGRADE_INTERVAL
        else:
            self.upgrade_at = None
        return changed

    # -- plans ---------------------------------------------------------------------------------------------

    def punchable(self, we_are_behind_nat: bool) -> bool:
        """Whether the peer's direct endpoint is worth punching: it says it is an observed binding of an
        endpoint-independent NAT, or we sit behind an unmapped NAT (any endpoint then needs our binding)."""
        return self.direct is not None and self.nat != "pd" and (self.nat == "ei" or we_are_behind_nat)

    def relay_at_once(self, our_nat: str | None) -> bool:
        """Either side maps per destination and the peer has a relay: punching cannot work, relay now."""
        return self.peer_relay is not None and (self.nat == "pd" or our_nat == "pd")

    def start_burst(self, to: Address, now: float, fallback: bool) -> None:
        self.burst_to, self.burst_from, self.burst_step = to, now, 0
        self.fallback_at = now + PUNCH_WINDOW if fallback and self.peer_relay is not None else None

    def stop_burst(self) -> None:
        self.burst_to = self.burst_from = self.fallback_at = None

    def burst_due(self) -> float | None:
        if self.burst_from is None or self.burst_step >= len(PUNCH_SCHEDULE):
            return None
        return self.burst_from + PUNCH_SCHEDULE[self.burst_step]

    def answered_since_burst(self, received_at: float | None) -> bool:
        return self.burst_from is not None and received_at is not None and received_at >= self.burst_from

    def deadline(self) -> float | None:
        times = [t for t in (self.burst_due(), self.fallback_at, self.upgrade_at) if t is not None]
        return min(times) if times else None

    def status(self, now: float) -> dict[str, object]:
        return {
            "path": self.kind,
            "path_since": round(now - self.since, 1) if self.since is not None else None,
            "relay": self.relay,
            "nat": self.nat,
            "peer_relay": self.peer_relay,
            "punching": self.burst_due() is not None,
        }
