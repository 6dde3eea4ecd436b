"""Network changes, decided from the kernel's tables: what the host's connectivity is, and when it moved.

Pure: :func:`build_snapshot` turns plain rows of the routing and address tables into a
:class:`NetSnapshot`, and :class:`NetWatch` debounces snapshots into one :class:`NetworkChanged` per move
(a move is several netlink events: link down, addresses and routes gone, link up, DHCP's address, its
route). The netlink reading is in :mod:`tunneld.net.netwatch`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Final

from tunneld.proto.core import Outbox

__all__ = ["IfAddr", "NetSnapshot", "NetWatch", "NetworkChanged", "Route", "build_snapshot"]

QUIET: Final = 0.25
"""Seconds without a new netlink event before a change is believed (the events of one move come in a
burst; DHCP's address and route follow the link within milliseconds on a LAN)."""
MAX_DELAY: Final = 2.0
"""Seconds after the first event of a burst by which a change is reported however busy netlink stays."""

# linux/if_addr.h address flags and linux/rtnetlink.h scopes: an address to use must be settled and global.
IFA_F_TEMPORARY: Final = 0x01
IFA_F_DADFAILED: Final = 0x08
IFA_F_DEPRECATED: Final = 0x20
IFA_F_TENTATIVE: Final = 0x40
RT_SCOPE_UNIVERSE: Final = 0

MOVES: Final = frozenset({"default-route", "gateway", "primary-address", "ipv6", "manual"})
"""The kinds of change that move the host (``addresses`` alone does not)."""


@dataclass(frozen=True, slots=True)
class Route:
    """A default route (destination prefix length 0) from the main table."""

    family: int
    gateway: str | None
    ifindex: int
    prefsrc: str | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class IfAddr:
    ifindex: int
    family: int
    address: str
    prefixlen: int
    scope: int = RT_SCOPE_UNIVERSE
    flags: int = 0


@dataclass(frozen=True, slots=True)
class NetSnapshot:
    """What the host's connectivity is, outside the tunnel."""

    gateway4: str | None = None
    ifindex4: int | None = None
    address4: str | None = None
    """Our IPv4 address toward the default gateway (the one a NAT sees)."""
    gateway6: str | None = None
    address6: str | None = None
    """A settled global IPv6 address on the IPv6 default route's interface (None: no IPv6 reachability)."""
    addresses: frozenset[str] = field(default_factory=frozenset)
    """Every settled global address of the host's interfaces (the tunnel's excluded)."""

    def changes(self, old: NetSnapshot) -> frozenset[str]:
        """What differs from ``old``: default-route, gateway, primary-address, ipv6, addresses."""
        out = set()
        if (self.gateway4 is None) != (old.gateway4 is None) or self.ifindex4 != old.ifindex4:
            out.add("default-route")
        if self.gateway4 != old.gateway4:
            out.add("gateway")
        if self.address4 != old.address4:
            out.add("primary-address")
        if self.address6 != old.address6 or self.gateway6 != old.gateway6:
            out.add("ipv6")
        if self.addresses != old.addresses:
            out.add("addresses")
        return frozenset(out)

    def describe(self) -> dict[str, object]:
        return {"gateway4": self.gateway4, "address4": self.address4, "gateway6": self.gateway6,
                "address6": self.address6, "addresses": sorted(self.addresses)}


@dataclass(frozen=True, slots=True)
class NetworkChanged:
    """The network moved: generation counts the moves since start (0 is the network at start)."""

    generation: int
    old: NetSnapshot
    new: NetSnapshot
    changed: frozenset[str]
    at: float

    @property
    def vanished(self) -> frozenset[str]:
        """Our addresses that are gone: sockets bound to them must be reopened."""
        return self.old.addresses - self.new.addresses

    @property
    def moved(self) -> bool:
        """Whether what depends on where we are must be redone: the way out changed, or an address we
        may be using is gone. A new address alone (DAD finishing, a temporary IPv6 address rotating)
        moves nothing."""
        return bool(self.changed & MOVES) or bool(self.vanished)


def _usable(a: IfAddr, excluded: Collection[int]) -> bool:
    return (a.ifindex not in excluded and a.scope == RT_SCOPE_UNIVERSE
            and not a.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED))


def _best_route(routes: Iterable[Route], family: int, excluded: Collection[int]) -> Route | None:
    best: Route | None = None
    for r in routes:
        if r.family != family or r.ifindex in excluded:
            continue
        if family == socket.AF_INET and r.gateway is None:
            continue  # a device route (point-to-point uplinks) still counts for IPv6 only
        if best is None or r.priority < best.priority:
            best = r
    return best


def build_snapshot(routes: Iterable[Route], addrs: Iterable[IfAddr],
                   excluded: Collection[int] = ()) -> NetSnapshot:
    """The snapshot from the default routes and addresses; interfaces in ``excluded`` (the tunnel's
    own) do not count."""
    routes, addrs = list(routes), [a for a in addrs if _usable(a, excluded)]
    r4 = _best_route(routes, socket.AF_INET, excluded)
    address4 = None
    if r4 is not None:
        address4 = r4.prefsrc
        if address4 is None:
            gw = ipaddress.IPv4Address(r4.gateway) if r4.gateway else None
            on_link = sorted(
                (gw is None or gw not in ipaddress.IPv4Network(f"{a.address}/{a.prefixlen}", strict=False),
                 a.address)
                for a in addrs if a.family == socket.AF_INET and a.ifindex == r4.ifindex)
            address4 = on_link[0][1] if on_link else None
    r6 = _best_route(routes, socket.AF_INET6, excluded)
    address6 = None
    if r6 is not None:
        # Prefer a stable address (not temporary, not deprecated): it is what peers should reach.
        v6 = sorted((bool(a.flags & IFA_F_DEPRECATED), bool(a.flags & IFA_F_TEMPORARY), a.address)
                    for a in addrs if a.family == socket.AF_INET6 and a.ifindex == r6.ifindex)
        address6 = v6[0][2] if v6 else None
    return NetSnapshot(
        gateway4=r4.gateway if r4 else None, ifindex4=r4.ifindex if r4 else None, address4=address4,
        gateway6=(r6.gateway or "") if r6 and address6 else None, address6=address6,
        addresses=frozenset(a.address for a in addrs))


class NetWatch(Outbox[NetworkChanged]):
    """Debounces snapshots: a change is reported once netlink has been quiet for ``quiet`` seconds, or
    ``max_delay`` after the burst began, and only if the snapshot differs from the last one reported.
    It sends nothing; :meth:`force` is the manual form (``tunneld rebind``)."""

    def __init__(self, initial: NetSnapshot, now: float, quiet: float = QUIET,
                 max_delay: float = MAX_DELAY) -> None:
        super().__init__()
        self.current = initial
        self.generation = 0
        self.changed_at = now
        self.last_changes: frozenset[str] = frozenset()
        self.quiet, self.max_delay = quiet, max_delay
        self._pending: NetSnapshot | None = None
        self._first = self._last = 0.0
        self._forced = False
        self.bursts = 0

    def observe(self, snapshot: NetSnapshot, now: float) -> None:
        """A fresh reading of the tables after a netlink event."""
        if self._pending is None:
            self._first = now
            self.bursts += 1
        self._pending, self._last = snapshot, now

    def force(self, snapshot: NetSnapshot, now: float) -> None:
        """Report a change at the next poll even if nothing differs (the user asked for a rebind)."""
        self.observe(snapshot, now)
        self._forced = True
        self._last = self._first = now - max(self.quiet, self.max_delay)

    def deadline(self) -> float | None:
        if self._pending is None:
            return None
        return min(self._last + self.quiet, self._first + self.max_delay)

    def poll(self, now: float) -> None:
        due = self.deadline()
        if due is None or now < due:
            return
        assert self._pending is not None
        new, forced = self._pending, self._forced
        self._pending, self._forced = None, False
        changed = new.changes(self.current) | (frozenset({"manual"}) if forced else frozenset())
        if not changed:
            return
        self.generation += 1
        self._emit(NetworkChanged(self.generation, self.current, new, changed, now))
        self.current, self.changed_at, self.last_changes = new, now, changed

    def close(self, now: float) -> None:
        self._pending = None

    def finished(self) -> bool:
        return True
