"""The tunnel's decisions, without I/O: packets and `now` in, one `Output` out.

`TunnelCore` owns the peer table, the handshake engine and every per-packet decision:

    outbound(tun packets, runs) -> group by destination ULA, seal per peer -> datagrams and GSO bursts
    inbound(UDP datagrams)      -> classify (RFC 3948; STUN out to the NAT service; our relay's data
                                   unwrapped), open per SA, inner-source check -> TUN packets and runs,
                                   handshake messages -> replies; roaming on authenticated packets only
    poll(now)                   -> the peers' timers: retries, keepalives, rekeys, expiry, and their
                                   paths' plans: punching, relay fallback, direct probes (`paths`)

Each call returns one `Output` (as boringtun's TunnResult, for a batch): what to write to the TUN, what
to send, what happened. It never reads a clock (callers pass `now`, monotonic, and `wall`, Unix time for
the handshake's TAI64N), never touches a socket and draws randomness only through the `rand` it is given.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from tunneld.crypto.esp import LAYOUT, NH_NONE, Kind, SecurityAssociation, classify
from tunneld.crypto.kdf import derive_esp_keymat
from tunneld.crypto.layout import SealLayout
from tunneld.fastpath.runs import Burst, RxRun, TxRun
from tunneld.proto import handshake as hs
from tunneld.proto.core import Address
from tunneld.proto.paths import DIRECT, FRESH_PACKET, RELAY, PathChanged
from tunneld.proto.peer import Action, Peer, Session, Timers
from tunneld.proto.stun_wire import is_stun
from tunneld.proto.tunnel_paths import PathMixin
from tunneld.proto.tunnel_types import (
    Counters,
    EndpointFromDns,
    Flight,
    HandshakeGaveUp,
    Output,
    PeerMoved,
    PeerRemoved,
    TunnelEvent,
)

__all__ = ["FRESH_PACKET", "PERSISTENT_KEEPALIVE", "Counters", "EndpointFromDns", "Flight", "HandshakeGaveUp",
           "Output", "PathChanged", "PeerMoved", "PeerRemoved", "TunnelCore", "TunnelEvent"]

PERSISTENT_KEEPALIVE = 25.0  # seconds, as WireGuard's usual setting: under every common NAT's UDP timeout
# Called with each new SA, its KEYMAT (key || salt) and the peer's current endpoint, for the key log.
SessionHook = Callable[[SecurityAssociation, bytes, Address | None], None]


class TunnelCore(PathMixin):
    def __init__(self, private_key: bytes, psk: bytes, suite: str = "aes-256-gcm",
                 timers: Timers | None = None, rand: Callable[[int], bytes] = os.urandom) -> None:
        self.suite = suite
        self.timers = timers or Timers()
        self.rand = rand
        self.by_ula: dict[bytes, Peer] = {}
        self.by_key: dict[bytes, Peer] = {}
        self.by_spi: dict[int, tuple[Peer, Session]] = {}
        self.handshaker = hs.Handshaker(private_key, psk, self.by_key, index_in_use=self.by_spi.__contains__,
                                        rand=rand)
        self.counters = Counters()
        self.persistent_keepalive: float | None = None
        self._events: list[TunnelEvent] = []  # handed out with the next Output
        self.on_session: SessionHook | None = None
        self.relay = None  # our TURN allocation (`paths.Relay`), once the NAT service has one
        self.nat: str | None = None  # behind a NAT that maps nothing: "ei", "pd" or "unknown"; else None

    @property
    def layout(self) -> SealLayout:
        """How the TUN's segmenter lays out plaintexts for this core's security associations."""
        return LAYOUT

    def events(self) -> list[TunnelEvent]:
        """What happened since the last call (the same events each `Output` carries)."""
        out, self._events = self._events, []
        return out

    def _output(self) -> Output:
        out = Output()
        if self._events:
            out.events, self._events = self._events, []
        return out

    def add_peer(self, name: str, public_key: bytes, ula: ipaddress.IPv6Address,
                 endpoint: Address | None, source: str = "config", now: float | None = None) -> Peer:
        if public_key in self.by_key or ula.packed in self.by_ula:
            raise ValueError(f"peer {name}: its key or ULA is already in the table")
        peer = Peer(name=name, public_key=public_key, ula=ula.packed, timers=self.timers, rand=self.rand)
        peer.set_endpoint(endpoint, source if endpoint is not None else "none", now)
        peer.path.direct = endpoint
        peer.path.since = now
        peer.persistent_keepalive = self.persistent_keepalive
        self.by_ula[peer.ula] = peer
        self.by_key[public_key] = peer
        return peer

    def learn_peer(self, name: str, public_key: bytes, ula: ipaddress.IPv6Address,
                   endpoint: Address | None, now: float, nat: str | None = None,
                   relay: Address | None = None) -> Peer:
        """Add or update a peer learned from DNS (its records are checked by the caller: the ULA is
        the key's). A known peer gets the published endpoint unless an authenticated packet came from
        it within FRESH_PACKET: the endpoint it talks to us from beats a record, which may lag. A peer
        that publishes no endpoint keeps the one its packets showed. ``nat`` and ``relay`` are its TXT's
        marks: a peer not talking to us is then punched, or reached through its relay (`paths`)."""
        peer = self.by_key.get(public_key)
        fresh = peer is not None and peer.heard_from_within(now, FRESH_PACKET)
        if peer is None:
            peer = self.add_peer(name, public_key, ula, endpoint, "dns", now)
        elif endpoint is not None and peer.endpoint != endpoint and not fresh:
            peer.set_endpoint(endpoint, "dns", now)
            self._set_path(peer, DIRECT, None, None, now, self._events)
            self._events.append(EndpointFromDns(name, endpoint))
        path = peer.path
        path.nat, path.peer_relay = nat, relay
        direct_fresh = path.direct_heard is not None and now - path.direct_heard <= FRESH_PACKET
        if endpoint is not None and not direct_fresh:
            path.direct = endpoint
        if not fresh:
            self._plan(peer, now)
        return peer

    def set_persistent_keepalive(self, seconds: float | None) -> None:
        """Keep every peer's path open (we sit behind a NAT that maps nothing for us, so a peer can reach
        us only through the binding our own packets hold open); None stops it."""
        self.persistent_keepalive = seconds
        for peer in self.by_key.values():
            peer.persistent_keepalive = seconds

    def roamed(self, now: float, wall: float) -> Output:
        """Our network changed: tell every peer where we are now, at once, by an authenticated packet from
        the new address (a keepalive on a live session, else a handshake), so that a peer that only sends
        learns our new endpoint within one round trip."""
        out = self._output()
        for peer in self.by_key.values():
            path = peer.path
            if path.via is not None:  # through our old allocation, which is gone with the old network
                target = path.peer_relay or path.direct
                if target is None:
                    continue
                peer.set_endpoint(target, "relay" if target == path.peer_relay else "dns", now)
                kind = RELAY if target == path.peer_relay else DIRECT
                self._set_path(peer, kind, target if kind == RELAY else None, None, now, out.events)
            if peer.endpoint is None:
                continue
            if peer.sendable(now) is not None and not peer.wants_rekey(now):
                self._keepalive(peer, now, out)
            else:  # a handshake in progress began elsewhere (or nowhere: offline): begin it again from here
                self._initiate(peer, now, wall, out, retry=True)
        return out

    def forget_peer(self, public_key: bytes) -> bool:
        """Remove a peer (its records were withdrawn or expired): its sessions and SPIs go with it,
        and no packet is sent to or accepted from it afterwards."""
        peer = self.by_key.pop(public_key, None)
        if peer is None:
            return False
        self.by_ula.pop(peer.ula, None)
        for session in peer.sessions():
            self.by_spi.pop(session.inbound.spi, None)
        # The handshaker keeps the peer's last timestamp: if it comes back, an initiation captured
        # before still counts as a replay.
        self.handshaker.cancel(public_key)
        self._events.append(PeerRemoved(peer.name))
        return True

    # -- TUN -> UDP ------------------------------------------------------------------------------------

    def outbound(self, packets: Sequence[bytes], runs: Sequence[TxRun], now: float, wall: float) -> Output:
        """Seal packets from the TUN for their peers: loose packets, and runs (segmented superpackets,
        each after the first `run.at` loose packets), each run sealed in one piece into a `Burst`.
        Order is kept per destination (a run's `at` is rewritten to count its destination's packets)."""
        out = self._output()
        if not runs:
            groups: dict[bytes, list[bytes]] = defaultdict(list)
            for p in packets:
                if len(p) >= 40 and p[0] >> 4 == 6:
                    groups[p[24:40]].append(p)
            for dst, plist in groups.items():
                peer = self.by_ula.get(dst)
                if peer is None:
                    self.counters.tx_no_route += len(plist)
                    continue
                self._send_data(peer, plist, (), now, wall, out)
            return out
        # With runs: group both kinds by destination, each run's `at` counted again within its group.
        both: dict[bytes, tuple[list[bytes], list[TxRun]]] = {}
        r, nruns = 0, len(runs)
        for i, p in enumerate(packets):
            while r < nruns and runs[r].at <= i:
                self._group_run(both, runs[r])
                r += 1
            if len(p) >= 40 and p[0] >> 4 == 6:
                g = both.get(p[24:40])
                if g is None:
                    g = both[p[24:40]] = ([], [])
                g[0].append(p)
        for run in runs[r:]:
            self._group_run(both, run)
        for dst, (plist, rlist) in both.items():
            peer = self.by_ula.get(dst)
            if peer is None:
                self.counters.tx_no_route += len(plist) + sum(run.count for run in rlist)
                continue
            self._send_data(peer, plist, rlist, now, wall, out)
        return out

    @staticmethod
    def _group_run(groups: dict[bytes, tuple[list[bytes], list[TxRun]]], run: TxRun) -> None:
        g = groups.get(run.dst)
        if g is None:
            g = groups[run.dst] = ([], [])
        run.at = len(g[0])
        g[1].append(run)

    def _send_data(self, peer: Peer, loose: list[bytes], runs: Sequence[TxRun], now: float, wall: float,
                   out: Output) -> None:
        """Seal for one peer, in order: `loose` packets, with each run after the first `run.at` of them."""
        session = peer.sendable(now)
        if peer.wants_rekey(now) and not peer.handshake_in_progress():
            self._initiate(peer, now, wall, out)
        if session is None:  # sent when the handshake completes (bounded deque)
            if runs:
                prev = 0
                for run in runs:
                    peer.staged.extend(loose[prev : run.at])
                    peer.staged.extend(run.packets())
                    prev = max(prev, run.at)
                loose = loose[prev:]
            peer.staged.extend(loose)
            return
        if peer.endpoint is None:
            self.counters.tx_no_endpoint += len(loose) + sum(run.count for run in runs)
            return
        sa = session.outbound
        if not runs:
            datagrams = sa.seal_many(loose)
            self._send(out, peer.endpoint, peer.path.via, datagrams)
        else:
            # Sealed in sending order, so that sequence numbers follow the inner packets' order.
            datagrams = []
            bursts: list[Burst] = []
            c = self.counters
            prev = 0
            for run in runs:
                if run.at > prev:
                    datagrams += sa.seal_many(loose[prev : run.at])
                    prev = run.at
                buf, size = sa.seal_run(run.buf, run.stride, run.count, run.last)
                bursts.append(Burst(buf, size, len(datagrams)))
                c.tx_runs += 1
                c.tx_run_datagrams += run.count
                peer.tx_packets += run.count
                peer.tx_bytes += run.nbytes
            if prev < len(loose):
                datagrams += sa.seal_many(loose[prev:])
            self._send(out, peer.endpoint, peer.path.via, datagrams, bursts)
        peer.tx_packets += len(loose)
        peer.tx_bytes += sum(map(len, loose))
        peer.data_sent(now)
        peer.any_authenticated_packet_sent(now)

    def _keepalive(self, peer: Peer, now: float, out: Output, to: Address | None = None) -> None:
        """An empty authenticated packet on the current session, to the peer's endpoint (or to ``to``: a
        direct probe while relayed)."""
        session = peer.sendable(now)
        if session is None or peer.endpoint is None:
            return
        dest, via = (peer.endpoint, peer.path.via) if to is None else (to, None)
        self._send(out, dest, via, [session.outbound.seal(b"", next_header=NH_NONE)])
        peer.any_authenticated_packet_sent(now)

    # -- UDP -> TUN ------------------------------------------------------------------------------------

    def inbound(self, batch: Iterable[tuple[bytes, Address]], now: float, wall: float) -> Output:
        """Process received datagrams, one by one (the reference for `inbound_gro`)."""
        out = self._output()
        self.handshaker.load.begin_batch()
        self._inbound(batch, now, wall, out)
        self.handshaker.load.end_batch()
        return out

    def _inbound(self, batch: Iterable[tuple[bytes, Address]], now: float, wall: float, out: Output,
                 via: Address | None = None) -> None:
        """Classify and process; ``via`` is our relay server when ``batch`` came out of it (unwrapped)."""
        by_spi = self.by_spi
        # Grouped by (SPI, source): a source may become the peer's endpoint only if a datagram it
        # sent authenticated. (GRO hands us one source per receive, so the groups stay large.)
        esp: dict[tuple[int, Address], list[bytes]] = defaultdict(list)
        control: list[tuple[bytes, Address]] = []
        relayed: list[tuple[bytes, Address]] = []
        c = self.counters
        server = self.relay.server if self.relay is not None and via is None else None
        for data, src in batch:
            if src == server:
                relayed.append((data, src))
                continue
            c.rx_datagrams += 1
            kind = classify(data)
            if kind is Kind.ESP:
                if data[0] < 0x40 and is_stun(data):  # our SPIs start 0x80-0xff (handshake.INDEX_MIN)
                    c.rx_stun += 1
                    out.stun.append((data, src))
                    continue
                esp[int.from_bytes(data[:4], "big"), src].append(data)
            elif kind is Kind.CONTROL:
                control.append((data, src))
            elif kind is Kind.KEEPALIVE:
                c.rx_keepalive += 1
            else:
                c.rx_malformed += 1
        if relayed:
            self._from_relay(relayed, now, wall, out)
        for (spi, src), wires in esp.items():
            entry = by_spi.get(spi)
            if entry is None:
                c.rx_unknown_spi += len(wires)
                continue
            peer, session = entry
            if peer.expired(session, now):  # past reject_after_time, even before poll drops it
                peer.rx_dropped_retired += len(wires)
                continue
            inbound = session.inbound
            dummies = inbound.rx_dummy
            inner = inbound.open_many(wires)
            if not inner and inbound.rx_dummy == dummies:
                continue  # nothing from this source authenticated
            self._authenticated(peer, session, src, now, wall, out, via)
            if inner:
                self._deliver(peer, inner, out)
                peer.data_received(now)
            if peer.wants_rekey_on_receive(now) and not peer.handshake_in_progress():
                self._initiate(peer, now, wall, out)
        for data, src in control:  # after the data: their X25519 work shares one budget per batch
            self._on_handshake_message(data[4:], src, now, wall, out, via)

    def inbound_gro(self, batch: Iterable[tuple[bytes, Address, int]], now: float, wall: float) -> Output:
        """As `inbound`, for receives that may each hold several datagrams: (buffer, source, size) with
        datagrams of `size` bytes back to back (UDP GRO; the last may be shorter), size 0 for one
        datagram. A receive that is an in-order run of one SA's packets is opened in one piece
        (`SecurityAssociation.open_run`) and comes out as one `RxRun`; everything else is split and takes
        the per-datagram path of `inbound`. Arrival order is kept."""
        out = self._output()
        self.handshaker.load.begin_batch()  # one budget of handshake work for the whole receive
        pending: list[tuple[bytes, Address]] = []
        server = self.relay.server if self.relay is not None else None
        for data, src, size in batch:
            if size and len(data) > size:
                if pending:
                    self._inbound(pending, now, wall, out)
                    pending = []
                if src != server and self._open_run(data, size, src, now, wall, out):
                    continue
                pending.extend([(data[o:o + size], src) for o in range(0, len(data), size)])
            else:
                pending.append((data, src))
        if pending:
            self._inbound(pending, now, wall, out)
        self.handshaker.load.end_batch()
        return out

    def _open_run(self, data: bytes, size: int, src: Address, now: float, wall: float,
                  out: Output) -> bool:
        """The fast path of `inbound_gro` for one receive; False (nothing done) if it does not apply."""
        entry = self.by_spi.get(int.from_bytes(data[:4], "big"))
        if entry is None:
            return False  # also the non-ESP marker (SPI 0) of handshake messages
        peer, session = entry
        if peer.expired(session, now):
            return False
        opened = session.inbound.open_run(data, size)
        if opened is None:
            return False
        arena, stride, lengths = opened
        k = len(lengths)
        c = self.counters
        c.rx_datagrams += k
        c.rx_runs += 1
        c.rx_run_datagrams += k
        self._authenticated(peer, session, src, now, wall, out)
        # Cryptokey routing for every packet at once: each inner source must be the peer's ULA.
        srcs = np.ndarray((k, 16), np.uint8, arena, 8, (stride, 1))
        if min(lengths) >= 40 and srcs.tobytes() == peer.ula * k:
            out.tun_runs.append(RxRun(arena, stride, lengths, len(out.tun_packets)))
            peer.rx_packets += k
            peer.rx_bytes += sum(lengths)
        else:
            self._deliver(peer, RxRun(arena, stride, lengths).packets(), out)
        peer.data_received(now)
        if peer.wants_rekey_on_receive(now) and not peer.handshake_in_progress():
            self._initiate(peer, now, wall, out)
        return True

    def _authenticated(self, peer: Peer, session: Session, src: Address, now: float, wall: float,
                       out: Output, via: Address | None = None) -> None:
        """Bookkeeping after packets from `src` authenticated under `session`: timers, roaming, and
        whatever was staged waiting for the session."""
        self._unregister(peer.received_on(session, now, wall))
        self._arrived(peer, src, via, now, out)
        if peer.staged and peer.sendable(now) is not None:
            staged = list(peer.staged)
            peer.staged.clear()
            self._send_data(peer, staged, (), now, wall, out)

    @staticmethod
    def _deliver(peer: Peer, inner: list[bytes], out: Output) -> None:
        # Cryptokey routing: an inner packet must come from the ULA bound to the key it used.
        ula = peer.ula
        good = [p for p in inner if p[8:24] == ula and len(p) >= 40]
        if len(good) != len(inner):
            peer.dropped_spoofed += len(inner) - len(good)
        peer.rx_packets += len(good)
        peer.rx_bytes += sum(map(len, good))
        out.tun_packets.extend(good)

    # -- handshakes ------------------------------------------------------------------------------------

    def _initiate(self, peer: Peer, now: float, wall: float, out: Output, retry: bool = False,
                  to: Address | None = None) -> None:
        """A handshake initiation to the peer's endpoint (or to ``to``: punching a direct path)."""
        if peer.endpoint is None:
            return  # we can only answer this peer; it will contact us
        last = peer.last_sent_handshake
        if not retry and last is not None and now - last < self.timers.rekey_timeout:
            # As wireguard-go: no new handshake within rekey_timeout of our last initiation or
            # response; the one in flight (or the peer's) is about to complete.
            return
        payload, _pending = self.handshaker.initiate(peer.public_key, now, wall)
        dest, via = (peer.endpoint, peer.path.via) if to is None else (to, None)
        self._send(out, dest, via, [payload])
        peer.last_sent_handshake = now
        peer.handshake_initiated(now)

    def _on_handshake_message(self, message: bytes, src: Address, now: float, wall: float,
                              out: Output, via: Address | None = None) -> None:
        self.counters.rx_handshake += 1
        event = self.handshaker.receive(message, src, now)
        if isinstance(event, hs.InitiationReceived):
            peer = self.by_key[event.peer]
            self._arrived(peer, src, via, now, out)  # authenticated by the handshake itself
            peer.heard(now)
            self._install(peer, event.keys, now, wall)
            self._send(out, src, via, [event.datagram])  # the way it came
            peer.last_sent_handshake = now
        elif isinstance(event, hs.ResponseReceived):
            peer = self.by_key[event.peer]
            self._arrived(peer, src, via, now, out)
            peer.heard(now)
            self._install(peer, event.keys, now, wall)
            peer.handshake_complete(now, wall)
            staged = list(peer.staged)
            peer.staged.clear()
            if staged:
                self._send_data(peer, staged, (), now, wall, out)
            else:
                self._keepalive(peer, now, out)  # key confirmation for the responder
        elif isinstance(event, hs.SendCookie):
            self._send(out, src, via, [event.datagram])
        elif isinstance(event, hs.CookieReceived) and event.retry_now and event.peer in self.by_key:
            self._initiate(self.by_key[event.peer], now, wall, out, retry=True)  # now with mac2

    def _install(self, peer: Peer, keys: hs.SessionKeys, now: float, wall: float) -> None:
        outbound, inbound = keys.security_associations(self.suite)
        session = Session(outbound=outbound, inbound=inbound, created=now, initiator=keys.is_initiator,
                          confirmed=keys.is_initiator)
        self._unregister(peer.add_session(session, now))
        self.by_spi[inbound.spi] = (peer, session)
        if self.on_session is not None:
            out_dir, in_dir = ("i2r", "r2i") if keys.is_initiator else ("r2i", "i2r")
            for sa, direction in ((outbound, out_dir), (inbound, in_dir)):
                key, salt = derive_esp_keymat(keys.i2r if direction == "i2r" else keys.r2i, self.suite,
                                              direction)
                self.on_session(sa, key + salt, peer.endpoint)

    def _unregister(self, sessions: Iterable[Session]) -> None:
        for s in sessions:
            entry = self.by_spi.pop(s.inbound.spi, None)
            if entry is not None:  # keep its drop counts in the peer's totals
                entry[0].rx_dropped_retired += s.inbound.rx_dropped
                entry[0].rx_replay_retired += s.inbound.rx_replay

    # -- timers ----------------------------------------------------------------------------------------

    def deadline(self) -> float | None:
        ds = [d for p in self.by_key.values() if (d := p.deadline()) is not None]
        return min(ds) if ds else None

    def poll(self, now: float, wall: float) -> Output:
        out = self._output()
        for peer in self.by_key.values():
            actions, dropped = peer.poll(now)
            self._unregister(dropped)
            self._poll_path(peer, now, wall, out)
            for action in actions:
                if action in (Action.RETRY, Action.INITIATE) and self._path_failed(peer, now, action):
                    continue  # a new path was chosen, with its own burst of handshakes
                if action is Action.RETRY:
                    self._initiate(peer, now, wall, out, retry=True)
                elif action is Action.INITIATE:
                    self._initiate(peer, now, wall, out)
                elif action is Action.KEEPALIVE:
                    self._keepalive(peer, now, out)
                elif action is Action.PERSISTENT:
                    if peer.wants_rekey(now) and not peer.handshake_in_progress():
                        self._initiate(peer, now, wall, out)
                    self._keepalive(peer, now, out)
                elif action is Action.GAVE_UP:
                    out.events.append(HandshakeGaveUp(peer.name))
        return out

    # -- status ----------------------------------------------------------------------------------------

    def peer_status(self, now: float) -> list[dict[str, Any]]:
        out = []
        for p in self.by_key.values():
            cur = p.current
            out.append({
                "name": p.name,
                "public_key": base64.b64encode(p.public_key).decode(),
                "ula": str(ipaddress.IPv6Address(p.ula)),
                "endpoint": p.endpoint,
                "endpoint_source": p.endpoint_source,
                "endpoint_age": round(now - p.endpoint_at, 1) if p.endpoint_at is not None else None,
                "last_received_age": round(now - p.received_at, 1) if p.received_at is not None else None,
                "last_handshake": p.last_handshake_wall,
                "session_age": round(now - cur.created, 3) if cur else None,
                "handshakes": p.handshakes,
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
                "rx_packets": p.rx_packets,
                "tx_packets": p.tx_packets,
                "dropped_spoofed": p.dropped_spoofed,
                "dropped_inbound": p.rx_dropped_retired + sum(s.inbound.rx_dropped for s in p.sessions()),
                "replayed": p.rx_replay_retired + sum(s.inbound.rx_replay for s in p.sessions()),
                **p.path.status(now),
            })
        return out
