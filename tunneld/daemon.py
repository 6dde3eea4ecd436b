"""The daemon: the root nursery around a TunnelCore, its TUN and UDP socket, and the services.

The packet loops are `tunneld.dataplane`'s; this module opens the devices, wires the services (port
mapping, publishing, discovery, control) and reports status. Everything runs in one trio thread. Start-up
order: control socket, UDP socket, TUN with its address and route, then the drop to the unprivileged user
(tunneld.privdrop, before anything can start a thread), then the services (docs/privilege.md).
"""

from __future__ import annotations

import base64
import ctypes
import ipaddress
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from tunneld import privdrop
from tunneld.blockwriter import CONTROL_SOCKET, HOSTS, KNOWN_HOSTS, BlockWriter
from tunneld.config import Config
from tunneld.crypto.esp import SecurityAssociation
from tunneld.dataplane import Dataplane
from tunneld.identity import DeviceIdentity
from tunneld.keylog import KeyLog
from tunneld.marked_block import write_block
from tunneld.net import netwatch
from tunneld.net.netwatch import read_snapshot
from tunneld.net.tun import Tun
from tunneld.net.udp import Addr, UDPTransport, display_addr, to_socket_addr
from tunneld.privdrop import Plan
from tunneld.proto.dnsframe import DOT_PORT
from tunneld.proto.netchange import NetWatch, NetworkChanged
from tunneld.proto.tunnel import PERSISTENT_KEEPALIVE, TunnelCore
from tunneld.proto.watcher import PeerGone, PeerLearned, PeerRejected, WatcherEvent
from tunneld.sdnotify import Notifier
from tunneld.services import control
from tunneld.services.discover import (
    LLQ_SERVICE,
    PUSH_TLS_SERVICE,
    UPDATE_SERVICE,
    UPDATE_TLS_SERVICE,
    TlsLookup,
    find_relay,
    find_server,
)
from tunneld.services.driver import ServerPort, connect_udp
from tunneld.services.hostkeys import KnownHostsService, load_host_keys
from tunneld.services.names import NamesService
from tunneld.services.nat import NatService
from tunneld.services.publisher import PublisherService, disabled_status, host_records
from tunneld.services.tlsport import client_context, tls_connector
from tunneld.services.uplink import Uplink
from tunneld.services.watcher import PushTransport, WatcherService

log = logging.getLogger("tunneld")

M_TRIM_THRESHOLD = -1  # glibc malloc.h: mallopt parameter
KEEP_FREED_BYTES = 64 << 20
READY_PUBLISH_WAIT = 10.0  # seconds READY=1 waits for the first publication's answer (docs/observability.md)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed heap memory instead of returning it to the kernel at once: the fast path
    frees a few 60 KB buffers per superpacket, and with glibc's default 128 KB trim threshold the heap
    shrinks and the next run faults its pages back in (docs/fastpath.md has the measurement). Returns
    False where this is not glibc (nothing changes then)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    except (OSError, AttributeError):
        return False


class Daemon:
    def __init__(self, config: Config, identity: DeviceIdentity, keylog: KeyLog | None = None,
                 notifier: Notifier | None = None, *, privileges: Plan | None = None,
                 writer: BlockWriter | None = None) -> None:
        """``privileges``: the drop once the TUN and sockets are open (None: none); ``writer``: the names
        writer the hosts and known-hosts blocks go through (None: written by this process)."""
        self.config = config
        self.notifier = Notifier.from_env() if notifier is None else notifier  # connected now, as root
        self.privileges = privileges
        self.writer = writer
        self.identity = identity
        self.keylog = keylog
        self.ula = identity.ula(config.account.domain)
        self.core = TunnelCore(identity.private_key, config.psk, suite=config.interface.suite,
                               timers=config.timers)
        for pc in config.peers:
            ep = to_socket_addr(str(pc.endpoint.host), pc.endpoint.port) if pc.endpoint else None
            self.core.add_peer(pc.name, pc.public_key, pc.ula, ep)
        self.static_peers = frozenset(pc.public_key for pc in config.peers)  # never forgotten by DNS
        me = [(identity.public_key, config.account.name, self.ula)] if config.account.name else []
        self.names = NamesService(config.names, config.account.domain,
                                  [*me, *((pc.public_key, pc.name, pc.ula) for pc in config.peers)],
                                  write=writer.writer(HOSTS) if writer else write_block)
        self.watcher: WatcherService | None = None
        self.host_keys = load_host_keys(config.ssh.host_keys)  # ours, published as SSHFP + TXT
        self.known_hosts: KnownHostsService | None = None  # the peers', with the watcher
        if keylog is not None:
            self.core.on_session = self._log_keys
        self.tun: Tun | None = None
        self.udp: UDPTransport | None = None
        self.dataplane: Dataplane | None = None
        self.uplink = Uplink(config.portmap, self._local_port, self._on_endpoint)
        self.publisher: PublisherService | None = None
        self.nat: NatService | None = None
        self.network: NetWatch | None = None
        self.last_change_at: float | None = None
        self.last_redone: list[str] = []
        self._nursery: trio.Nursery | None = None
        self.up = False  # every service started (the control socket answers before: "starting")

    # -- lifecycle ------------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        iface = self.config.interface
        keep_freed_memory()
        # The control socket's lock first: a second daemon with the same path stops before touching
        # any port or device.
        try:
            account = self.privileges.account if self.privileges else None
            listener = control.Listener.open(iface.control_socket, group=account.gid if account else None)
            if self.writer is not None:  # it removes the socket from root's directory when we are gone
                self.writer.control_socket_bound(listener.identity)
            try:
                await self._run(listener, task_status)
            finally:
                listener.close()
        finally:
            if self.keylog is not None:
                self.keylog.close()

    async def _run(self, listener: control.Listener, task_status: Any) -> None:
        iface = self.config.interface
        self.udp = UDPTransport(iface.listen_port)
        try:
            self.tun = Tun(iface.name, iface.mtu, self.core.layout, offload=iface.offload)
            try:
                self.tun.configure(self.ula, self.config.prefix)
                if self.privileges is not None:  # everything that needs root is open: drop it
                    log.info("%s", self.privileges.apply())
                self.dataplane = Dataplane(self.core, self.tun, self.udp)
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.dataplane.run)
                    await nursery.start(listener.serve, self.handle_control)
                    if self.config.metrics.listen is not None:  # imported only when on (its import cost)
                        from tunneld.services.metrics import daemon_server
                        await nursery.start(daemon_server(self.status, self.config.metrics.listen).run)
                    self._nursery = nursery
                    await nursery.start(self.names.run)
                    await nursery.start(self._watch_network)
                    await self._start_nat()
                    await self.uplink.start(nursery)
                    await self._start_publisher()
                    await self._start_watcher()
                    log.info("up: %s %s, listening on UDP %d (GSO %s, GRO %s), %d peers",
                             self.tun.name, self.ula, self.udp.local_port,
                             "on" if self.udp.gso else "off", "on" if self.udp.gro else "off",
                             len(self.core.by_key))
                    self.up = True
                    task_status.started()
                    nursery.start_soon(self._announce_ready)
            finally:
                self.tun.close()  # removes the device, its address and route
        finally:
            self.udp.close()
            log.info("down: interface and routes removed")

    async def _announce_ready(self) -> None:
        """READY=1 to systemd once the first publication is answered (or after READY_PUBLISH_WAIT), then
        a STATUS= line whenever the peer count changes."""
        if self.publisher is not None:
            with trio.move_on_after(READY_PUBLISH_WAIT):
                await self.publisher.answered.wait()
        self.notifier.ready(self.summary())
        await self.notifier.follow(self.summary)

    def summary(self) -> str:
        """One line for systemctl status: "up, 2 of 3 peers with a session"."""
        peers = self.core.by_key.values()
        return f"up, {sum(p.current is not None for p in peers)} of {len(peers)} peers with a session"

    def _log_keys(self, sa: SecurityAssociation, keymat: bytes, endpoint: Addr | None) -> None:
        assert self.keylog is not None
        self.keylog.log(sa, keymat, ipv6=endpoint is not None and not endpoint[0].startswith("::ffff:"))

    # -- where we are: port mapping, public endpoint, network changes ----------------------------------

    def _local_port(self) -> int:
        return self.udp.local_port if self.udp else 0

    def _on_endpoint(self, endpoint: str | None) -> None:
        """The uplink found our public endpoint (or that there is none): publish it, and keep NAT
        bindings open ourselves while nobody maps a port for us."""
        held_open = self.uplink.behind_unmapped_nat
        if endpoint is not None:
            log.info("public endpoint %s", endpoint)
        else:
            log.info("no public endpoint (%s): publishing our identity alone%s", self.uplink.static[1],
                     "; keeping NAT bindings open" if held_open else "")
        self.core.set_persistent_keepalive(PERSISTENT_KEEPALIVE if held_open else None)
        if self.nat is not None:
            self.nat.set_behind_nat(held_open)
        self._republish()

    async def _start_nat(self) -> None:
        """STUN and the TURN relay over the tunnel socket (docs/nat.md): the STUN servers of [nat] (by
        default the account's DNS server), the relay of [relay] or its _turn._udp SRV record."""
        assert self._nursery is not None and self.dataplane is not None
        cfg, acct = self.config, self.config.account
        stun = [addr for s in cfg.stun_servers if (addr := await _resolve(s.host, s.port)) is not None]
        tls = self._discovery_tls()
        dns_server = None if acct.server is None else (
            str(acct.server.host), DOT_PORT if tls is not None else acct.server.port)
        relay = await find_relay(cfg.relay.server, dns_server, acct.domain, cfg.tsig_key, acct.tsig_algorithm,
                                 tls=tls)
        if not stun and relay is None:
            return
        user = acct.name or self.identity.public_key_b64[:16]
        self.nat = NatService(self.core, self.dataplane, stun, relay, cfg.turn_secret, user, self._republish)
        await self._nursery.start(self.nat.run)

    @property
    def public_endpoint(self) -> str | None:
        """address:port seen from outside (port mapper or a public default route), or None."""
        return self.uplink.endpoint

    async def _watch_network(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self.tun is not None
        core = NetWatch(read_snapshot([self.tun.name]), trio.current_time())
        self.network = core
        await netwatch.watch(core, self.network_changed, [self.tun.name], task_status=task_status)

    async def network_changed(self, change: NetworkChanged | None) -> None:
        """The network moved (or the user asked, with None): redo everything that depended on it.
        The TUN and the security associations stay; sockets, mapping, endpoint and LLQs are redone."""
        assert self.udp is not None and self._nursery is not None and self.dataplane is not None
        now = trio.current_time()
        redone = []
        if change is not None and not change.moved:
            log.debug("new addresses, no move: %s", sorted(change.new.addresses - change.old.addresses))
            return
        if change is not None:
            log.info("network changed (%s): %s", ", ".join(sorted(change.changed)), change.new.describe())
        nursery = self._nursery

        async def tunnel_socket() -> bool:
            if self.udp is None or self.udp.bind_host not in (change.vanished if change else ()):
                return False
            self.udp.rebind(bind_host="::")
            return True

        async def tell_peers() -> bool:
            assert self.dataplane is not None
            await self.dataplane.send(self.core.roamed(now, time.time()))  # from our new address
            return True

        async def uplink() -> bool:
            await self.uplink.start(nursery)
            return True

        async def nat() -> bool:
            if self.nat is None:
                return False
            self.nat.network_changed()
            return True

        steps: list[tuple[str, Callable[[], Awaitable[bool]]]] = [
            ("tunnel socket", tunnel_socket), ("peers told", tell_peers),
            # The publisher's socket before the uplink: its new endpoint is republished through it.
            ("publisher socket", self.publisher.reopen if self.publisher else _nothing),
            ("uplink", uplink), ("stun and relay", nat),
            ("LLQs renewed", self.watcher.renew if self.watcher else _nothing),
        ]
        for what, step in steps:
            try:
                if await step():
                    state = self.uplink.status(now)["state"]
                    redone.append(f"uplink ({state})" if what == "uplink" else what)
            except OSError as e:  # no route (yet): the next change redoes it; the old state stays
                log.info("after the network change, %s failed: %s", what, e)
                redone.append(f"{what} failed: {e.strerror or e}")
        self.last_redone = redone
        self.last_change_at = now
        log.info("after the network change: %s", ", ".join(redone))

    def _republish(self) -> None:
        """Hand the publisher our records for the current public endpoint, or our identity alone without
        one (it republishes only what changed; the old endpoint's records are deleted)."""
        acct = self.config.account
        if self.publisher is None or acct.name is None:
            return
        endpoint, nat, relay = self.uplink.endpoint, None, None
        if self.nat is not None:  # behind a NAT that maps nothing: what STUN saw, and our relay
            observed, mark, relay = self.nat.published()
            if endpoint is None and observed is not None:
                endpoint, nat = observed, mark
        try:
            rrsets = host_records(acct.name, acct.domain, self.identity.public_key, endpoint, nat=nat,
                                  relay=relay, host_keys=self.host_keys)
        except ValueError as e:
            log.warning("cannot publish endpoint %s: %s", endpoint, e)
            return
        self.publisher.set_records(rrsets)

    async def _start_publisher(self) -> None:
        """Publish our records to the account's DNS UPDATE server, if one is configured; the service
        withdraws them when the nursery is cancelled (clean shutdown)."""
        assert self._nursery is not None
        acct = self.config.account
        if acct.server is None:
            return
        connect: Callable[[tuple[str, int]], Awaitable[ServerPort]]
        tls = self._discovery_tls()
        if tls is not None and self.config.account_ca is not None:
            # DNS over TLS, verified against the account CA: the server its _dns-update-tls._tcp SRV names,
            # else the configured server's host at RFC 7858's port.
            server = await find_server((str(acct.server.host), DOT_PORT), acct.domain, UPDATE_TLS_SERVICE,
                                       self.config.tsig_key, acct.tsig_algorithm, tls=tls)
            connect = tls_connector(self.config.account_ca, acct.domain, public_ca=acct.tls_public_ca)
        else:
            server = await find_server((str(acct.server.host), acct.server.port), acct.domain,
                                       UPDATE_SERVICE, self.config.tsig_key, acct.tsig_algorithm)
            connect = connect_udp
        self.publisher = PublisherService(server, acct.domain, self.config.tsig_key, acct.lease,
                                          algorithm=acct.tsig_algorithm, connect=connect)
        await self._nursery.start(self.publisher.run)
        self._republish()

    def _discovery_tls(self) -> TlsLookup | None:
        """How lookups reach the account's server over TLS (`[account] transport = "tls"`), or None: UDP."""
        acct, ca = self.config.account, self.config.account_ca
        if acct.transport != "tls" or ca is None:
            return None
        return TlsLookup.for_account(ca, acct.domain, public_ca=acct.tls_public_ca)

    # -- discovery ----------------------------------------------------------------------------------

    async def _start_watcher(self) -> None:
        """Learn the account's other devices from its DNS server: by DNS Push over TLS when the account's
        transport is TLS, else (and as Push's fallback) by long-lived queries over UDP."""
        assert self._nursery is not None
        acct = self.config.account
        if acct.server is None or acct.name is None:
            return
        host, key, algorithm = str(acct.server.host), self.config.tsig_key, acct.tsig_algorithm
        tls = self._discovery_tls()
        if tls is None:
            server = await find_server((host, acct.server.port), acct.domain, LLQ_SERVICE, key, algorithm)
        else:  # every lookup over TLS: the LLQ server (Push's fallback) too, else the configured one
            found = await find_server((host, DOT_PORT), acct.domain, LLQ_SERVICE, key, algorithm, tls=tls)
            server = (host, acct.server.port) if found == (host, DOT_PORT) else found
        if self.config.ssh.known_hosts is not None:
            write = self.writer.writer(KNOWN_HOSTS) if self.writer else write_block
            self.known_hosts = KnownHostsService(self.config.ssh.known_hosts, acct.domain, write)
            await self._nursery.start(self.known_hosts.run)
        push = None
        cert = self.config.client_certificate
        if tls is not None and self.config.account_ca is not None and cert is not None:
            # DNS Push where its _dns-push-tls._tcp SRV says, else on the server's DNS-over-TLS port, as a
            # member (the device's certificate); LLQ over UDP stays the fallback.
            push_at = await find_server((host, DOT_PORT), acct.domain, PUSH_TLS_SERVICE, key, algorithm,
                                        tls=tls)
            ca_pem, public_ca = self.config.account_ca, acct.tls_public_ca

            def context() -> ssl.SSLContext:  # at each connection: the certificate renewed when due
                current = cert.current(time.time())
                return client_context(ca_pem, (current.chain, current.key), public_ca=public_ca)

            push = PushTransport(push_at, context, acct.domain)
        self.watcher = WatcherService(server, acct.domain, acct.name, self.config.tsig_key,
                                      self._on_watch_event, host_keys=self.known_hosts is not None,
                                      push=push)
        await self._nursery.start(self.watcher.run)

    def _on_watch_event(self, event: WatcherEvent) -> None:
        now = trio.current_time()
        if isinstance(event, PeerLearned):
            host, ep = event.host, event.endpoint
            endpoint = to_socket_addr(*ep) if ep else None
            relay = to_socket_addr(*event.relay) if event.relay else None
            self.core.learn_peer(host.name, host.public_key, host.ula, endpoint, now, nat=event.nat,
                                 relay=relay)
            self.names.learned(host.public_key, host.name, host.ula)
            if self.known_hosts is not None:
                self.known_hosts.learned(host.name, host.ula, event.host_keys)
            log.info("peer %s (%s) learned from DNS %s", host.name, host.ula,
                     f"at {ep[0]} port {ep[1]}" if ep else "without an endpoint (it reaches us first)")
        elif isinstance(event, PeerGone):
            if self.known_hosts is not None:
                self.known_hosts.gone(event.name)
            if event.public_key not in self.static_peers:
                self.core.forget_peer(event.public_key)
                self.names.gone(event.public_key)
                log.info("peer %s is gone from DNS", event.name)
        elif isinstance(event, PeerRejected):
            log.warning("peer %s refused: %s", event.name, event.reason)

    def _publish_status(self) -> dict[str, Any]:
        if self.publisher is not None:
            return self.publisher.status(trio.current_time())
        if self.config.account.server is None:
            return disabled_status("no [account] server configured: publishing is off (finding the server "
                                   "through the _dns-update._udp SRV record is not implemented yet)")
        return disabled_status("not started")

    # -- control --------------------------------------------------------------------------------------

    async def rebind(self, port: int | None = None) -> None:
        """New outer socket (address or port), then the same path as a network change: sessions stay,
        peers hear from us at once, the mapping follows the new port, records and LLQs are redone.
        A port in use (OSError) or out of range (ValueError) changes nothing: the old socket stays."""
        assert self.udp is not None
        self.udp.rebind(port)
        log.info("outer socket rebound to port %d", self.udp.local_port)
        await self.network_changed(None)

    async def handle_control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return self.status()
        if cmd == "rebind":
            port = req.get("port")
            if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
                return {"error": f"rebind failed: port must be an integer from 0 to 65535, "
                                 f"not {control.shorten(port)}"}
            try:
                await self.rebind(port)
            except ValueError as e:
                return {"error": f"rebind failed: {e}"}
            except OSError as e:
                kept = self.udp.local_port if self.udp else None
                return {"error": f"rebind failed: cannot open UDP port {kept if port is None else port}: "
                                 f"{e.strerror or e}; the daemon keeps port {kept}"}
            return {"ok": True, "listen_port": self.udp.local_port if self.udp else None}
        if cmd == "hosts":
            kh = self.known_hosts
            return {**self.names.answer(), "known_hosts": str(kh.path) if kh else None,
                    "host_keys": kh.fingerprints() if kh else []}
        return {"error": f"unknown command {control.shorten(cmd)}; known: status, rebind, hosts"}

    def _network_status(self, now: float) -> dict[str, Any]:
        net = self.network
        return {
            "generation": net.generation if net else 0,
            "last_change_ago": None if self.last_change_at is None else round(now - self.last_change_at, 1),
            "changed": sorted(net.last_changes) if net else [],
            "redone": self.last_redone,
            "current": net.current.describe() if net else None,
            "keepalive": self.core.persistent_keepalive,
        }

    def status(self) -> dict[str, Any]:
        udp = self.udp
        now = trio.current_time()
        peers = self.core.peer_status(now)
        for p in peers:
            for key in ("endpoint", "relay", "peer_relay"):
                p[key] = display_addr(p[key]) if p[key] else None
            p["source"] = "config" if base64.b64decode(p["public_key"]) in self.static_peers else "dns"
        c = self.core.counters
        return {
            "state": "up" if self.up else "starting",
            "interface": self.tun.name if self.tun else self.config.interface.name,
            "ula": str(self.ula),
            "public_key": self.identity.public_key_b64,
            "listen_port": udp.local_port if udp else None,
            "gso": bool(udp and udp.gso),
            "gro": bool(udp and udp.gro),
            "offload": bool(self.tun and self.tun.offload),
            "offload_error": self.tun.offload_error if self.tun else None,
            "gso_max_size": self.tun.gso_max_size if self.tun else None,
            "public_endpoint": self.public_endpoint,
            "network": self._network_status(now),
            "portmap": self.uplink.status(now),
            "nat": self.nat.status(now) if self.nat else {"state": "disabled"},
            "publish": self._publish_status(),
            "watch": self.watcher.status() if self.watcher else {"state": "disabled"},
            "names": self.names.status(),
            "known_hosts": self.known_hosts.status() if self.known_hosts else {"state": "disabled"},
            "peers": peers,
            "counters": {
                "rx_datagrams": c.rx_datagrams, "rx_malformed": c.rx_malformed,
                "rx_unknown_spi": c.rx_unknown_spi, "rx_keepalive": c.rx_keepalive,
                "rx_handshake": c.rx_handshake, "tx_no_route": c.tx_no_route,
                "tx_no_endpoint": c.tx_no_endpoint,
                "tun_write_drops": self.dataplane.tun_write_drops if self.dataplane else 0,
                "tx_runs": c.tx_runs, "tx_run_datagrams": c.tx_run_datagrams,
                "rx_runs": c.rx_runs, "rx_run_datagrams": c.rx_run_datagrams,
                "tun_superpackets_written": self.tun.superpackets_written if self.tun else 0,
                "udp_send_errors": udp.send_errors if udp else 0,
                "handshake_drops": dict(self.core.handshaker.drops),
                "handshake_load": self.core.handshaker.load.status(now),
            },
        }


async def _nothing() -> bool:
    return False


async def _resolve(host: str, port: int) -> tuple[str, int] | None:
    """An IP literal as it is; a name through the system's resolver (None if it has no address)."""
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as e:
        log.info("STUN server %s: %s", host, e)
        return None
    return (str(infos[0][4][0]), port) if infos else None


async def run_until_signalled(daemon: Daemon) -> None:
    """Run the daemon until SIGINT or SIGTERM, then cancel everything (clean shutdown)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                daemon.notifier.stopping()
                nursery.cancel_scope.cancel()
                break


def prepare_privileges(config: Config) -> tuple[Plan | None, BlockWriter | None]:
    """The drop `up` does once its devices are open, and the names writer it forks first (now, while the
    process has one thread): it writes the hosts and known-hosts blocks and removes the control socket
    when the daemon has gone. PrivilegeError if the user is missing (docs/privilege.md)."""
    plan = privdrop.plan(config.service.user, config.interface.listen_port)
    if plan is None:
        log.warning('[service] user = "root": the daemon keeps root for its whole life')
    paths = {CONTROL_SOCKET: config.interface.control_socket}
    if config.names.enabled:
        paths[HOSTS] = config.names.hosts_file
    if config.ssh.known_hosts is not None:
        paths[KNOWN_HOSTS] = config.ssh.known_hosts
    if plan is None or plan.account is None:
        return plan, None
    return plan, BlockWriter.start(paths, config.account.domain)


def keylog_path(cli_value: str | None) -> Path | None:
    value = cli_value or os.environ.get("TUNNELD_KEYLOG")
    return Path(value) if value else None
