"""The daemon: the root nursery, the peer table and the two batched packet loops.

Packets flow one way through each loop:

    TUN --read batch--> group by destination ULA --seal_many per peer--> UDP (GSO runs)
    UDP --recv batch (GRO split)--> classify --open_many per SA--> inner-source check --> TUN

Control work (handshakes, timers, status) changes state only through the peer table's methods.
Everything runs in one trio thread: the loops never block, they drain what is ready and yield.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import signal
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from crypto.esp import NH_NONE, Kind, classify
from crypto.kdf import derive_esp_keymat
from tunneld.config import Config
from tunneld.identity import DeviceIdentity
from tunneld.keylog import KeyLog
from tunneld.net.tun import Tun
from tunneld.net.udp import Addr, UDPTransport, display_addr, to_socket_addr
from tunneld.proto import handshake as hs
from tunneld.proto.peer import Action, Peer, Session
from tunneld.services import control

log = logging.getLogger("tunneld")

TIMER_TICK = 0.25  # seconds: the timer loop's longest sleep, so newly armed timers are seen soon
UNDER_LOAD_BACKLOG = 64  # handshake messages in one receive batch that count as being under load


@dataclass
class Counters:
    rx_datagrams: int = 0
    rx_malformed: int = 0
    rx_unknown_spi: int = 0
    rx_keepalive: int = 0
    rx_handshake: int = 0
    tx_no_route: int = 0
    tx_no_endpoint: int = 0
    tun_write_drops: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class PeerTable:
    """Who is who: destination ULA -> peer, public key -> peer, inbound SPI -> (peer, session)."""

    def __init__(self) -> None:
        self.by_ula: dict[bytes, Peer] = {}
        self.by_key: dict[bytes, Peer] = {}
        self.by_spi: dict[int, tuple[Peer, Session]] = {}

    def add(self, peer: Peer) -> None:
        self.by_ula[peer.ula] = peer
        self.by_key[peer.public_key] = peer

    def __contains__(self, public_key: object) -> bool:  # the Handshaker's allowed-peers container
        return public_key in self.by_key

    def spi_in_use(self, spi: int) -> bool:
        return spi in self.by_spi

    def register(self, peer: Peer, session: Session) -> None:
        self.by_spi[session.inbound.spi] = (peer, session)

    def unregister(self, sessions: Iterable[Session]) -> None:
        for s in sessions:
            self.by_spi.pop(s.inbound.spi, None)


class Daemon:
    def __init__(self, config: Config, identity: DeviceIdentity, keylog: KeyLog | None = None) -> None:
        self.config = config
        self.identity = identity
        self.keylog = keylog
        self.timers = config.timers
        self.ula = identity.ula(config.account.domain)
        self.table = PeerTable()
        self.counters = Counters()
        for pc in config.peers:
            ep = to_socket_addr(str(pc.endpoint.host), pc.endpoint.port) if pc.endpoint else None
            self.table.add(Peer(name=pc.name, public_key=pc.public_key, ula=pc.ula.packed, endpoint=ep,
                                timers=self.timers))
        self.handshaker = hs.Handshaker(identity.private_key, config.psk, self.table,
                                        index_in_use=self.table.spi_in_use)
        self.tun: Tun | None = None
        self.udp: UDPTransport | None = None
        self.started_wall = time.time()

    # -- lifecycle ------------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        iface = self.config.interface
        self.udp = UDPTransport(iface.listen_port)
        try:
            self.tun = Tun(iface.name, iface.mtu)
            try:
                self.tun.configure(self.ula, self.config.prefix)
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._udp_loop)
                    await nursery.start(self._tun_loop)
                    await nursery.start(self._timer_loop)
                    await nursery.start(control.serve, iface.control_socket, self.handle_control)
                    log.info("up: %s %s, listening on UDP %d (GSO %s, GRO %s), %d peers",
                             self.tun.name, self.ula, self.udp.local_port,
                             "on" if self.udp.gso else "off", "on" if self.udp.gro else "off",
                             len(self.table.by_key))
                    task_status.started()
            finally:
                self.tun.close()  # removes the device, its address and route
        finally:
            self.udp.close()
            if self.keylog is not None:
                self.keylog.close()
            log.info("down: interface and routes removed")

    # -- sending (TUN -> UDP) -------------------------------------------------------------------------

    async def _tun_loop(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self.tun is not None and self.udp is not None
        tun, by_ula = self.tun, self.table.by_ula
        task_status.started()
        while True:
            await tun.wait_readable()
            packets: list[bytes] = []
            tun.read_batch(packets)
            groups: dict[bytes, list[bytes]] = defaultdict(list)
            for p in packets:
                if len(p) >= 40 and p[0] >> 4 == 6:
                    groups[p[24:40]].append(p)
            now = trio.current_time()
            for dst, plist in groups.items():
                peer = by_ula.get(dst)
                if peer is None:
                    self.counters.tx_no_route += len(plist)
                    continue
                await self._send_data(peer, plist, now)

    async def _send_data(self, peer: Peer, plist: list[bytes], now: float) -> None:
        assert self.udp is not None
        session = peer.sendable(now)
        if peer.wants_rekey(now) and not peer.handshake_in_progress():
            self._initiate(peer, now)
        if session is None:
            peer.staged.extend(plist)  # sent when the handshake completes (bounded deque)
            return
        if peer.endpoint is None:
            self.counters.tx_no_endpoint += len(plist)
            return
        wires = session.outbound.seal_many(plist)
        await self.udp.send_batch(wires, peer.endpoint)
        peer.tx_packets += len(plist)
        peer.tx_bytes += sum(map(len, plist))
        peer.data_sent(now)
        peer.any_authenticated_packet_sent(now)

    async def _send_keepalive(self, peer: Peer, now: float) -> None:
        assert self.udp is not None
        session = peer.sendable(now)
        if session is None or peer.endpoint is None:
            return
        await self.udp.send_one(session.outbound.seal(b"", next_header=NH_NONE), peer.endpoint)
        peer.any_authenticated_packet_sent(now)

    # -- receiving (UDP -> TUN) -----------------------------------------------------------------------

    async def _udp_loop(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self.udp is not None
        task_status.started()
        while True:
            udp = self.udp
            try:
                await udp.wait_readable()
            except (OSError, trio.ClosedResourceError):
                await trio.sleep(0)  # the socket was replaced by rebind(); wait on the new one
                continue
            batch: list[tuple[bytes, Addr]] = []
            try:
                udp.recv_batch(batch)
            except OSError:
                continue
            await self._handle_datagrams(batch)

    async def _handle_datagrams(self, batch: list[tuple[bytes, Addr]]) -> None:
        assert self.tun is not None
        self.counters.rx_datagrams += len(batch)
        now = trio.current_time()
        by_spi = self.table.by_spi
        esp: dict[int, list[bytes]] = defaultdict(list)
        last_src: dict[int, Addr] = {}
        control_msgs: list[tuple[bytes, Addr]] = []
        for data, src in batch:
            kind = classify(data)
            if kind is Kind.ESP:
                spi = int.from_bytes(data[:4], "big")
                esp[spi].append(data)
                last_src[spi] = src
            elif kind is Kind.CONTROL:
                control_msgs.append((data, src))
            elif kind is Kind.KEEPALIVE:
                self.counters.rx_keepalive += 1
            else:
                self.counters.rx_malformed += 1
        for spi, wires in esp.items():
            entry = by_spi.get(spi)
            if entry is None:
                self.counters.rx_unknown_spi += len(wires)
                continue
            peer, session = entry
            inbound = session.inbound
            dummies = inbound.rx_dummy
            inner = inbound.open_many(wires)
            authenticated = len(inner) + inbound.rx_dummy - dummies
            if not authenticated:
                continue
            dropped = peer.received_on(session, now)
            if dropped:
                self.table.unregister(dropped)
            src = last_src[spi]
            if peer.endpoint != src:
                # Roaming: the endpoint moves only on an authenticated packet (wireguard-go receive.go).
                log.info("peer %s moved to %s", peer.name, display_addr(src))
                peer.endpoint = src
            if peer.staged and peer.sendable(now) is not None:
                staged = list(peer.staged)
                peer.staged.clear()
                await self._send_data(peer, staged, now)
            if inner:
                # Cryptokey routing: an inner packet must come from the ULA bound to the key it used.
                ula = peer.ula
                good = [p for p in inner if p[8:24] == ula and len(p) >= 40]
                if len(good) != len(inner):
                    peer.dropped_spoofed += len(inner) - len(good)
                peer.rx_packets += len(good)
                peer.rx_bytes += sum(map(len, good))
                self.counters.tun_write_drops += self.tun.write_batch(good)
                peer.data_received(now)
            if peer.wants_rekey_on_receive(now) and not peer.handshake_in_progress():
                self._initiate(peer, now)
        if control_msgs:
            under_load = len(control_msgs) >= UNDER_LOAD_BACKLOG
            for data, src in control_msgs:
                await self._handle_control_message(data[4:], src, now, under_load)

    # -- handshakes -----------------------------------------------------------------------------------

    def _initiate(self, peer: Peer, now: float) -> None:
        assert self.udp is not None
        if peer.endpoint is None:
            return  # we can only answer this peer; it will contact us
        payload, _pending = self.handshaker.initiate(peer.public_key, now, time.time())
        self.udp.send_now(payload, peer.endpoint)
        peer.handshake_initiated(now)

    async def _handle_control_message(self, message: bytes, src: Addr, now: float, under_load: bool) -> None:
        assert self.udp is not None
        self.counters.rx_handshake += 1
        event = self.handshaker.receive(message, src, now, under_load)
        if isinstance(event, hs.InitiationReceived):
            peer = self.table.by_key[event.peer]
            self._install(peer, event.keys, now)
            peer.endpoint = src  # authenticated by the handshake itself
            self.udp.send_now(event.datagram, src)
        elif isinstance(event, hs.ResponseReceived):
            peer = self.table.by_key[event.peer]
            self._install(peer, event.keys, now)
            peer.endpoint = src
            peer.handshake_complete(now, time.time())
            staged = list(peer.staged)
            peer.staged.clear()
            if staged:
                await self._send_data(peer, staged, now)
            else:
                await self._send_keepalive(peer, now)  # key confirmation for the responder
        elif isinstance(event, hs.SendCookie):
            self.udp.send_now(event.datagram, src)
        elif isinstance(event, hs.Dropped):
            log.debug("handshake message from %s dropped: %s", display_addr(src), event.reason)

    def _install(self, peer: Peer, keys: hs.SessionKeys, now: float) -> None:
        suite = self.config.interface.suite
        outbound, inbound = keys.security_associations(suite)
        session = Session(outbound=outbound, inbound=inbound, created=now, initiator=keys.is_initiator,
                          confirmed=keys.is_initiator)
        self.table.unregister(peer.add_session(session, now))
        self.table.register(peer, session)
        if not keys.is_initiator:
            peer.last_handshake_wall = time.time()
            peer.handshakes += 1
        if self.keylog is not None:
            ipv6 = peer.endpoint is not None and not peer.endpoint[0].startswith("::ffff:")
            out_dir, in_dir = ("i2r", "r2i") if keys.is_initiator else ("r2i", "i2r")
            for sa, direction, tk in ((outbound, out_dir, keys.i2r if out_dir == "i2r" else keys.r2i),
                                      (inbound, in_dir, keys.i2r if in_dir == "i2r" else keys.r2i)):
                key, salt = derive_esp_keymat(tk, suite, direction)
                self.keylog.log(sa, key + salt, ipv6)

    # -- timers ---------------------------------------------------------------------------------------

    async def _timer_loop(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            now = trio.current_time()
            deadlines = [d for p in self.table.by_key.values() if (d := p.deadline()) is not None]
            wake = min([now + TIMER_TICK, *deadlines])
            await trio.sleep_until(max(wake, now))
            now = trio.current_time()
            for peer in list(self.table.by_key.values()):
                actions, dropped = peer.poll(now)
                self.table.unregister(dropped)
                for action in actions:
                    if action is Action.INITIATE:
                        self._initiate(peer, now)
                    elif action is Action.KEEPALIVE:
                        await self._send_keepalive(peer, now)
                    elif action is Action.GAVE_UP:
                        log.info("handshake with %s did not complete; giving up until there is traffic",
                                 peer.name)

    # -- rebind and status ----------------------------------------------------------------------------

    def rebind(self, port: int | None = None) -> None:
        """New outer socket (address or port); sessions stay, peers learn us from our next packet."""
        assert self.udp is not None
        self.udp.rebind(port)
        log.info("outer socket rebound to port %d", self.udp.local_port)

    def handle_control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return self.status()
        if cmd == "rebind":
            port = req.get("port")
            self.rebind(int(port) if port is not None else None)
            return {"ok": True, "listen_port": self.udp.local_port if self.udp else None}
        return {"error": f"unknown command {cmd!r}; known: status, rebind"}

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        udp = self.udp
        peers = []
        for p in self.table.by_key.values():
            cur = p.current
            peers.append({
                "name": p.name,
                "public_key": base64.b64encode(p.public_key).decode(),
                "ula": str(ipaddress.IPv6Address(p.ula)),
                "endpoint": display_addr(p.endpoint) if p.endpoint else None,
                "last_handshake": p.last_handshake_wall,
                "session_age": round(now - cur.created, 3) if cur else None,
                "handshakes": p.handshakes,
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
                "rx_packets": p.rx_packets,
                "tx_packets": p.tx_packets,
                "dropped_spoofed": p.dropped_spoofed,
                "dropped_inbound": sum(s.inbound.rx_dropped for s in p.sessions()),
                "replayed": sum(s.inbound.rx_replay for s in p.sessions()),
            })
        c = self.counters
        return {
            "interface": self.tun.name if self.tun else self.config.interface.name,
            "ula": str(self.ula),
            "public_key": self.identity.public_key_b64,
            "listen_port": udp.local_port if udp else None,
            "gso": bool(udp and udp.gso),
            "gro": bool(udp and udp.gro),
            "peers": peers,
            "counters": {
                "rx_datagrams": c.rx_datagrams, "rx_malformed": c.rx_malformed,
                "rx_unknown_spi": c.rx_unknown_spi, "rx_keepalive": c.rx_keepalive,
                "rx_handshake": c.rx_handshake, "tx_no_route": c.tx_no_route,
                "tx_no_endpoint": c.tx_no_endpoint, "tun_write_drops": c.tun_write_drops,
                "udp_send_errors": udp.send_errors if udp else 0,
                "handshake_drops": dict(self.handshaker.drops),
            },
        }


async def run_until_signalled(daemon: Daemon) -> None:
    """Run the daemon until SIGINT or SIGTERM, then cancel everything (clean shutdown)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def keylog_path(cli_value: str | None) -> Path | None:
    value = cli_value or os.environ.get("TUNNELD_KEYLOG")
    return Path(value) if value else None


