"""The tunnel's decisions, without I/O: packets and `now` in, datagrams and TUN packets out.

`TunnelCore` owns the peer table, the handshake engine and every per-packet decision:

    outbound(tun packets)   -> group by destination ULA, seal_many per peer -> datagrams per endpoint
    inbound(UDP datagrams)  -> classify (RFC 3948), open_many per SA, inner-source check -> TUN packets,
                               handshake messages -> replies; roaming on authenticated packets only
    poll(now)               -> the peers' timers: retries, keepalives, rekeys, expiry

It never reads a clock (callers pass `now`, monotonic, and `wall`, Unix time for the handshake's
TAI64N), never touches a socket and draws randomness only through the Handshaker's `rand`. The trio
daemon is a thin adapter around it, and tests run two cores against each other over a simulated
network in virtual time.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from crypto.esp import NH_NONE, Kind, SecurityAssociation, classify
from crypto.kdf import derive_esp_keymat
from tunneld.proto import handshake as hs
from tunneld.proto.peer import Action, Peer, Session, Timers
from tunneld.proto.runs import Burst, RxRun, TxRun

Addr = tuple[str, int]
# Datagrams to send, grouped by destination: a list of datagrams, or a `Burst` (a sealed run, from the
# offload path: datagrams back to back in one buffer).
Sends = list[tuple[Addr, list[bytes] | Burst]]
UNDER_LOAD_BACKLOG = 64  # handshake messages in one receive batch that count as being under load
# Called with each new SA, its KEYMAT (key || salt) and the peer's current endpoint, for the key log.
SessionHook = Callable[[SecurityAssociation, bytes, Addr | None], None]


@dataclass
class Counters:
    rx_datagrams: int = 0
    rx_malformed: int = 0
    rx_unknown_spi: int = 0
    rx_keepalive: int = 0
    rx_handshake: int = 0
    tx_no_route: int = 0
    tx_no_endpoint: int = 0
    # The fast path's share: runs sealed / opened in one piece, and the datagrams they held.
    tx_runs: int = 0
    tx_run_datagrams: int = 0
    rx_runs: int = 0
    rx_run_datagrams: int = 0


class TunnelCore:
    def __init__(self, private_key: bytes, psk: bytes, suite: str = "aes-256-gcm",
                 timers: Timers | None = None, rand: Callable[[int], bytes] = os.urandom) -> None:
        self.suite = suite
        self.timers = timers or Timers()
        self.by_ula: dict[bytes, Peer] = {}
        self.by_key: dict[bytes, Peer] = {}
        self.by_spi: dict[int, tuple[Peer, Session]] = {}
        self.handshaker = hs.Handshaker(private_key, psk, self.by_key, index_in_use=self.by_spi.__contains__,
                                        rand=rand)
        self.counters = Counters()
        self.events: deque[str] = deque(maxlen=256)  # human-readable happenings, drained by the adapter
        self.on_session: SessionHook | None = None

    def add_peer(self, name: str, public_key: bytes, ula: ipaddress.IPv6Address,
                 endpoint: Addr | None) -> Peer:
        if public_key in self.by_key or ula.packed in self.by_ula:
            raise ValueError(f"peer {name}: its key or ULA is already in the table")
        peer = Peer(name=name, public_key=public_key, ula=ula.packed, endpoint=endpoint, timers=self.timers)
        self.by_ula[peer.ula] = peer
        self.by_key[public_key] = peer
        return peer

    def learn_peer(self, name: str, public_key: bytes, ula: ipaddress.IPv6Address,
                   endpoint: Addr | None, now: float) -> Peer:
        """Add or update a peer learned from DNS (its records are checked by the caller: the ULA is
        the key's). A known peer gets the published endpoint unless it is already talking to us:
        an endpoint learned from authenticated packets is fresher than a DNS record."""
        peer = self.by_key.get(public_key)
        if peer is None:
            return self.add_peer(name, public_key, ula, endpoint)
        if endpoint is not None and peer.endpoint != endpoint and peer.sendable(now) is None:
            peer.endpoint = endpoint
            self.events.append(f"peer {name}: endpoint {endpoint[0]} port {endpoint[1]} from DNS")
        return peer

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
        self.events.append(f"peer {peer.name} removed")
        return True

    # -- TUN -> UDP ------------------------------------------------------------------------------------

    def outbound(self, packets: Iterable[bytes | TxRun], now: float, wall: float) -> Sends:
        """Seal packets from the TUN for their peers. A `TxRun` (a segmented superpacket) is sealed in
        one piece into a `Burst`; order is kept per destination."""
        groups: dict[bytes, list[bytes | TxRun]] = defaultdict(list)
        runs = False
        for p in packets:
            if isinstance(p, TxRun):
                groups[p.dst].append(p)
                runs = True
            elif len(p) >= 40 and p[0] >> 4 == 6:
                groups[p[24:40]].append(p)
        sends: Sends = []
        for dst, plist in groups.items():
            peer = self.by_ula.get(dst)
            if peer is None:
                self.counters.tx_no_route += sum(len(p.slots) if isinstance(p, TxRun) else 1 for p in plist)
                continue
            self._send_data(peer, plist, now, wall, sends, runs)
        return sends

    def _send_data(self, peer: Peer, plist: list[bytes | TxRun] | list[bytes], now: float, wall: float,
                   sends: Sends, runs: bool = False) -> None:
        """Seal for one peer; `runs` says whether `plist` may hold TxRuns (else: one seal_many, no scan)."""
        session = peer.sendable(now)
        if peer.wants_rekey(now) and not peer.handshake_in_progress():
            self._initiate(peer, now, wall, sends)
        if session is None:
            for p in plist:  # sent when the handshake completes (bounded deque)
                peer.staged.extend(p.packets() if isinstance(p, TxRun) else (p,))
            return
        if peer.endpoint is None:
            self.counters.tx_no_endpoint += sum(len(p.slots) if isinstance(p, TxRun) else 1 for p in plist)
            return
        sa = session.outbound
        if not runs:
            self._seal_loose(peer, sa, plist, sends)  # type: ignore[arg-type]
        else:
            loose: list[bytes] = []
            for p in plist:
                if not isinstance(p, TxRun):
                    loose.append(p)
                    continue
                if loose:
                    self._seal_loose(peer, sa, loose, sends)
                    loose = []
                sends.append((peer.endpoint, Burst(*sa.seal_run(p.slots))))
                self.counters.tx_runs += 1
                self.counters.tx_run_datagrams += len(p.slots)
                peer.tx_packets += len(p.slots)
                peer.tx_bytes += p.nbytes
            if loose:
                self._seal_loose(peer, sa, loose, sends)
        peer.data_sent(now)
        peer.any_authenticated_packet_sent(now)

    def _seal_loose(self, peer: Peer, sa: SecurityAssociation, plist: list[bytes], sends: Sends) -> None:
        assert peer.endpoint is not None
        sends.append((peer.endpoint, sa.seal_many(plist)))
        peer.tx_packets += len(plist)
        peer.tx_bytes += sum(map(len, plist))

    def _keepalive(self, peer: Peer, now: float, sends: Sends) -> None:
        session = peer.sendable(now)
        if session is None or peer.endpoint is None:
            return
        sends.append((peer.endpoint, [session.outbound.seal(b"", next_header=NH_NONE)]))
        peer.any_authenticated_packet_sent(now)

    # -- UDP -> TUN ------------------------------------------------------------------------------------

    def inbound(self, batch: Iterable[tuple[bytes, Addr]], now: float, wall: float,
                tun_out: list[bytes] | list[bytes | RxRun]) -> Sends:
        """Process received datagrams; appends packets for the TUN to `tun_out`, returns replies."""
        sends: Sends = []
        by_spi = self.by_spi
        # Grouped by (SPI, source): a source may become the peer's endpoint only if a datagram it
        # sent authenticated. (GRO hands us one source per receive, so the groups stay large.)
        esp: dict[tuple[int, Addr], list[bytes]] = defaultdict(list)
        control: list[tuple[bytes, Addr]] = []
        c = self.counters
        for data, src in batch:
            c.rx_datagrams += 1
            kind = classify(data)
            if kind is Kind.ESP:
                esp[int.from_bytes(data[:4], "big"), src].append(data)
            elif kind is Kind.CONTROL:
                control.append((data, src))
            elif kind is Kind.KEEPALIVE:
                c.rx_keepalive += 1
            else:
                c.rx_malformed += 1
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
            self._authenticated(peer, session, src, now, wall, sends)
            if inner:
                self._deliver(peer, inner, tun_out)
                peer.data_received(now)
            if peer.wants_rekey_on_receive(now) and not peer.handshake_in_progress():
                self._initiate(peer, now, wall, sends)
        if control:
            under_load = len(control) >= UNDER_LOAD_BACKLOG
            for data, src in control:
                self._on_handshake_message(data[4:], src, now, wall, under_load, sends)
        return sends

    def inbound_gro(self, batch: Iterable[tuple[bytes, Addr, int]], now: float, wall: float,
                    tun_out: list[bytes | RxRun]) -> Sends:
        """As `inbound`, for receives that may each hold several datagrams: (buffer, source, size) with
        datagrams of `size` bytes back to back (UDP GRO; the last may be shorter), size 0 for one
        datagram. A receive that is an in-order run of one SA's packets is opened in one piece
        (`SecurityAssociation.open_run`) and reaches `tun_out` as one `RxRun`; everything else is split
        and takes the per-datagram path of `inbound`. Arrival order is kept."""
        sends: Sends = []
        pending: list[tuple[bytes, Addr]] = []
        for data, src, size in batch:
            if size and len(data) > size:
                if pending:
                    sends += self.inbound(pending, now, wall, tun_out)
                    pending = []
                if self._open_run(data, size, src, now, wall, tun_out, sends):
                    continue
                pending.extend([(data[o:o + size], src) for o in range(0, len(data), size)])
            else:
                pending.append((data, src))
        if pending:
            sends += self.inbound(pending, now, wall, tun_out)
        return sends

    def _open_run(self, data: bytes, size: int, src: Addr, now: float, wall: float,
                  tun_out: list[bytes | RxRun], sends: Sends) -> bool:
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
        self._authenticated(peer, session, src, now, wall, sends)
        # Cryptokey routing for every packet at once: each inner source must be the peer's ULA.
        srcs = np.ndarray((k, 16), np.uint8, arena, 8, (stride, 1))
        if min(lengths) >= 40 and srcs.tobytes() == peer.ula * k:
            tun_out.append(RxRun(arena, stride, lengths))
            peer.rx_packets += k
            peer.rx_bytes += sum(lengths)
        else:
            self._deliver(peer, RxRun(arena, stride, lengths).packets(), tun_out)
        peer.data_received(now)
        if peer.wants_rekey_on_receive(now) and not peer.handshake_in_progress():
            self._initiate(peer, now, wall, sends)
        return True

    def _authenticated(self, peer: Peer, session: Session, src: Addr, now: float, wall: float,
                       sends: Sends) -> None:
        """Bookkeeping after packets from `src` authenticated under `session`: timers, roaming, and
        whatever was staged waiting for the session."""
        self._unregister(peer.received_on(session, now, wall))
        if peer.endpoint != src:
            # Roaming: the endpoint moves only on an authenticated packet (wireguard-go receive.go).
            self.events.append(f"peer {peer.name} moved to {src[0]} port {src[1]}")
            peer.endpoint = src
        if peer.staged and peer.sendable(now) is not None:
            staged = list(peer.staged)
            peer.staged.clear()
            self._send_data(peer, staged, now, wall, sends)

    @staticmethod
    def _deliver(peer: Peer, inner: list[bytes], tun_out: list[bytes] | list[bytes | RxRun]) -> None:
        # Cryptokey routing: an inner packet must come from the ULA bound to the key it used.
        ula = peer.ula
        good = [p for p in inner if p[8:24] == ula and len(p) >= 40]
        if len(good) != len(inner):
            peer.dropped_spoofed += len(inner) - len(good)
        peer.rx_packets += len(good)
        peer.rx_bytes += sum(map(len, good))
        tun_out.extend(good)

    # -- handshakes ------------------------------------------------------------------------------------

    def _initiate(self, peer: Peer, now: float, wall: float, sends: Sends, retry: bool = False) -> None:
        if peer.endpoint is None:
            return  # we can only answer this peer; it will contact us
        last = peer.last_sent_handshake
        if not retry and last is not None and now - last < self.timers.rekey_timeout:
            # As wireguard-go: no new handshake within rekey_timeout of our last initiation or
            # response; the one in flight (or the peer's) is about to complete.
            return
        payload, _pending = self.handshaker.initiate(peer.public_key, now, wall)
        sends.append((peer.endpoint, [payload]))
        peer.last_sent_handshake = now
        peer.handshake_initiated(now)

    def _on_handshake_message(self, message: bytes, src: Addr, now: float, wall: float, under_load: bool,
                              sends: Sends) -> None:
        self.counters.rx_handshake += 1
        event = self.handshaker.receive(message, src, now, under_load)
        if isinstance(event, hs.InitiationReceived):
            peer = self.by_key[event.peer]
            peer.endpoint = src  # authenticated by the handshake itself
            self._install(peer, event.keys, now, wall)
            sends.append((src, [event.datagram]))
            peer.last_sent_handshake = now
        elif isinstance(event, hs.ResponseReceived):
            peer = self.by_key[event.peer]
            peer.endpoint = src
            self._install(peer, event.keys, now, wall)
            peer.handshake_complete(now, wall)
            staged = list(peer.staged)
            peer.staged.clear()
            if staged:
                self._send_data(peer, staged, now, wall, sends)
            else:
                self._keepalive(peer, now, sends)  # key confirmation for the responder
        elif isinstance(event, hs.SendCookie):
            sends.append((src, [event.datagram]))

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

    def poll(self, now: float, wall: float) -> Sends:
        sends: Sends = []
        for peer in self.by_key.values():
            actions, dropped = peer.poll(now)
            self._unregister(dropped)
            for action in actions:
                if action is Action.RETRY:
                    self._initiate(peer, now, wall, sends, retry=True)
                elif action is Action.INITIATE:
                    self._initiate(peer, now, wall, sends)
                elif action is Action.KEEPALIVE:
                    self._keepalive(peer, now, sends)
                elif action is Action.GAVE_UP:
                    self.events.append(f"handshake with {peer.name} did not complete; "
                                       f"giving up until there is traffic")
        return sends

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
            })
        return out
