"""The tunnel core's path logic: where a peer's datagrams go (direct, or through a relay) and when that
changes. A mixin of `TunnelCore` (`tunneld.proto.tunnel`), apart to keep each module readable; the state and
the pure decisions are `tunneld.proto.paths`'. docs/nat.md ("Paths: direct, punched, relayed") explains it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunneld.proto.core import Address
from tunneld.proto.paths import DIRECT, PUNCH_WINDOW, RELAY, UPGRADE_INTERVAL, PathChanged, Relay
from tunneld.proto.peer import Action, Peer
from tunneld.proto.stun_wire import is_stun
from tunneld.proto.tunnel_types import Counters, Flight, Output, PeerMoved, TunnelEvent

if TYPE_CHECKING:
    from tunneld.fastpath.runs import Burst


class PathMixin:
    """Path decisions carried out with the core's handshakes and keepalives (declared below)."""

    relay: Relay | None  # our TURN allocation, once the NAT service has one
    nat: str | None  # behind a NAT that maps nothing: "ei", "pd" or "unknown"; else None
    counters: Counters
    _events: list[TunnelEvent]

    if TYPE_CHECKING:
        def _initiate(self, peer: Peer, now: float, wall: float, out: Output, retry: bool = False,
                      to: Address | None = None) -> None: ...

        def _keepalive(self, peer: Peer, now: float, out: Output, to: Address | None = None) -> None: ...

        def _inbound(self, batch: list[tuple[bytes, Address]], now: float, wall: float, out: Output,
                     via: Address | None = None) -> None: ...

    def set_nat(self, kind: str | None) -> None:
        """Where we are: behind a NAT that maps nothing for us ("ei": endpoint-independent, "pd": per
        destination, "unknown"), or None (a mapped or public endpoint). Decides whether we punch."""
        self.nat = kind

    def _plan(self, peer: Peer, now: float) -> None:
        """A peer not talking to us was (re)learned: relay at once if punching cannot work, punch if its
        endpoint is punchable, else wait for traffic as before."""
        path = peer.path
        if path.relay_at_once(self.nat):
            assert path.peer_relay is not None
            self._to_relay(peer, now, self._events)
        elif path.punchable(self.nat is not None):
            assert path.direct is not None
            path.start_burst(path.direct, now, fallback=True)

    def _to_relay(self, peer: Peer, now: float, events: list[TunnelEvent]) -> None:
        """Send to the peer's relayed address from now on, beginning with a burst of handshakes."""
        relay = peer.path.peer_relay
        assert relay is not None
        peer.set_endpoint(relay, "relay", now)
        self._set_path(peer, RELAY, relay, None, now, events)
        peer.path.start_burst(relay, now, fallback=False)

    def _set_path(self, peer: Peer, kind: str, relay: Address | None, via: Address | None, now: float,
                  events: list[TunnelEvent]) -> None:
        if peer.path.set(kind, relay, via, now) and peer.endpoint is not None:
            events.append(PathChanged(peer.name, kind, peer.endpoint, relay))

    def _to(self, dest: Address, via: Address | None, datagrams: list[bytes],
            bursts: list[Burst] | None = None) -> Flight | None:
        """A flight to ``dest``: as it is, or, through our relay (``via``), each datagram wrapped and sent
        to the relay server (bursts split: the relayed path need not be fast). None if that relay is gone."""
        flight = Flight(dest, datagrams, bursts or [])
        if via is None:
            return flight
        relay = self.relay
        if relay is None or relay.server != via:
            self.counters.tx_no_relay += len(flight.all_datagrams())
            return None
        try:
            wrapped = [relay.wrap(dest, d) for d in flight.all_datagrams()]
        except ValueError:  # too long for one relayed message: cannot happen with our MTUs; never raise
            self.counters.tx_no_relay += 1
            return None
        self.counters.tx_relayed += len(wrapped)
        return Flight(via, wrapped)

    def _send(self, out: Output, dest: Address, via: Address | None, datagrams: list[bytes],
              bursts: list[Burst] | None = None) -> None:
        flight = self._to(dest, via, datagrams, bursts)
        if flight is not None:
            out.sends.append(flight)

    def _from_relay(self, batch: list[tuple[bytes, Address]], now: float, wall: float, out: Output) -> None:
        """Datagrams from our relay server: relayed data is unwrapped and processed as coming from the
        peer the relay names, through us; the rest that is STUN goes to the NAT service (TURN's answers)."""
        relay = self.relay
        assert relay is not None
        c = self.counters
        inner: list[tuple[bytes, Address]] = []
        for data, src in batch:
            c.rx_relayed += 1
            got = relay.unwrap(data, src, now)
            if got is not None:
                inner.append((got[1], got[0]))
            elif is_stun(data):
                c.rx_stun += 1
                out.stun.append((data, src))
            else:
                c.rx_malformed += 1
        if inner:
            self._inbound(inner, now, wall, out, via=relay.server)

    def _arrived(self, peer: Peer, src: Address, via: Address | None, now: float, out: Output) -> None:
        """An authenticated packet (or handshake message) came from `src` (through our relay: `via`).
        Roaming: the endpoint moves only on an authenticated packet (wireguard-go receive.go), and a
        relayed one does not take a peer off a direct path that is alive (`paths`)."""
        path = peer.path
        kind, relay = path.arrival(src, via)
        if kind == DIRECT:
            path.heard_directly(src, now)
        if path.burst_from is not None:
            path.stop_burst()  # punched (or the relay answered): nothing more to send on the schedule
        if path.keeps_direct(kind, now):
            return
        upgraded = kind == DIRECT and path.kind == RELAY
        if peer.endpoint != src or path.via != via:
            if kind == DIRECT and path.kind == DIRECT:
                out.events.append(PeerMoved(peer.name, src))
            peer.set_endpoint(src, "packet", now)
        elif peer.endpoint_source != "packet":
            peer.set_endpoint(src, "packet", now)  # confirmed by the peer itself
        self._set_path(peer, kind, relay, via, now, out.events)
        if upgraded:  # a direct probe got through: answer directly, so the peer moves over too
            self._keepalive(peer, now, out)

    def _poll_path(self, peer: Peer, now: float, wall: float, out: Output) -> None:
        """The path's plans that are due: the end of the punch window, the next handshake of a burst, a
        direct probe while relayed."""
        path = peer.path
        if path.fallback_at is not None and now >= path.fallback_at:
            path.fallback_at = None
            if not path.answered_since_burst(peer.received_at) and path.peer_relay is not None:
                self._to_relay(peer, now, out.events)  # and its first handshake below
        due = path.burst_due()
        if due is not None and now >= due:
            assert path.burst_to is not None
            path.burst_step += 1
            self._initiate(peer, now, wall, out, retry=True, to=path.burst_to)
        if path.upgrade_at is not None and now >= path.upgrade_at:
            path.upgrade_at = now + UPGRADE_INTERVAL
            if path.kind == RELAY and path.direct is not None:
                self._keepalive(peer, now, out, to=path.direct)

    def _path_failed(self, peer: Peer, now: float, action: Action) -> bool:
        """Sent and heard nothing back (INITIATE: keepalive + rekey timeout after data), or a handshake
        unanswered for PUNCH_WINDOW (RETRY): change path if there is another one. Direct -> the peer's
        relay; relayed -> punch the direct endpoint (the relay may be gone). True if the path changed."""
        path = peer.path
        if action is Action.RETRY and (peer.handshake_started is None or
                                       now - peer.handshake_started < PUNCH_WINDOW):
            return False
        if path.burst_due() is not None:
            return False  # a burst is under way
        if path.kind == DIRECT and path.peer_relay is not None and peer.endpoint != path.peer_relay:
            self._to_relay(peer, now, self._events)
            return True
        if path.kind == RELAY and path.direct is not None and path.nat != "pd" and self.nat != "pd":
            peer.set_endpoint(path.direct, "dns", now)
            self._set_path(peer, DIRECT, None, None, now, self._events)
            path.start_burst(path.direct, now, fallback=False)
            return True
        return False
