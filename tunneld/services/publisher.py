"""The publishing service: a thin trio adapter around the sans-I/O :class:`dnsupdate.Publisher`.

It owns one UDP socket connected to the account's DNS UPDATE server. It hands the publisher the answers,
``now`` and ``wall``, sends what the publisher returns, and sleeps until the publisher's deadline or until
something changes (an answer arrived, or the daemon gave it new records because the public endpoint moved).
On cancellation (clean shutdown) it withdraws our records, shielded and bounded by :data:`STOP_GRACE`, so a
stopped device does not stay published until its lease runs out -- or forever, on a server that ignores
leases, as BIND does.

The browse PTR (``_autotunnel._udp.DOMAIN PTR``) is the one RRset shared by every device of the account:
it is declared shared to the publisher, which adds and deletes only our record there (class NONE), so
publishing or withdrawing never removes another device from discovery.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import time
from collections.abc import Sequence
from typing import Any

import dns.rdatatype
import dns.rrset
import trio

from tunneld.proto import records
from tunneld.proto.dnsupdate import Failed, Published, Publisher, Transmit, Withdrawn, startup_delay

log = logging.getLogger("tunneld.publish")

RECORD_TTL = 60  # seconds: endpoints move, so peers must not cache them for long
STOP_GRACE = 2.0  # seconds to wait for the withdrawal's answer on shutdown
MAX_ANSWER = 65535


def host_records(name: str, domain: str, public_key: bytes, endpoint: str) -> list[dns.rrset.RRset]:
    """Our RRsets for the public endpoint ``"a.b.c.d:port"`` (or ``"[v6]:port"``), the browse PTR to us
    included (see the module docstring)."""
    host, _, port = endpoint.rpartition(":")
    address = ipaddress.ip_address(host.strip("[]"))
    rec = records.HostRecords.derive(name, domain, public_key, int(port), [address])
    return records.build(rec, RECORD_TTL)


class PublisherService:
    def __init__(self, server: tuple[str, int], zone: str, key_secret: bytes, lease: int,
                 start_delay: float | None = None, algorithm: str = "hmac-sha256") -> None:
        # `tunneld account new` prints the key as "DOMAIN.": the key is named after the account's zone.
        self.publisher = Publisher(zone, zone, key_secret, algorithm=algorithm, lease=lease,
                                   shared=[(records.browse_name(zone), dns.rdatatype.PTR)])
        self.server = server
        self.start_delay = startup_delay() if start_delay is None else start_delay
        self._sock: trio.socket.SocketType | None = None
        self._rrsets: list[dns.rrset.RRset] | None = None  # what we should publish; None: nothing yet
        self._dirty = False  # _rrsets changed since we last handed them to the publisher
        self._started = False  # the first publication went out
        self._wake = trio.Event()
        self.send_errors = 0

    # -- the daemon's side -------------------------------------------------------------------------------

    def set_records(self, rrsets: Sequence[dns.rrset.RRset] | None) -> None:
        """New records to publish (the public endpoint moved); None keeps what is published."""
        if rrsets is None:
            return
        new = list(rrsets)
        if self._rrsets is not None and _same(new, self._rrsets):
            return
        self._rrsets = new
        self._dirty = True
        self._wake.set()

    def status(self, now: float) -> dict[str, Any]:
        st = self.publisher.state
        if st.withdrawn:
            state = "withdrawn"
        elif st.pending:
            state = "publishing"
        elif st.published:
            state = "published"
        elif self._rrsets is None:
            state = "waiting"
        elif st.rcode not in (None, "NOERROR"):
            state = "failed"
        else:
            state = "publishing"
        message = st.message
        if state == "waiting":
            message = "no public endpoint yet: nothing to publish"
        lease = st.lease_granted if st.lease_granted is not None else st.lease_requested
        lease_left = round(st.expires_at - now, 1) if st.published and st.expires_at is not None else None
        return {
            "state": state,
            "server": _show_server(self.server),
            "zone": st.zone,
            "rcode": st.rcode,
            "message": message,
            "unsigned_error": st.unsigned_error,
            "lease": lease,
            "lease_requested": st.lease_requested,
            "lease_granted": st.lease_granted,
            "server_ignores_lease": st.server_ignores_lease,
            "lease_left": lease_left,
            "next_refresh_in": (round(st.next_refresh_at - now, 1)
                                if st.next_refresh_at is not None and not st.withdrawn else None),
            "published": st.published,
            "records": [line for r in (self._rrsets or []) for line in r.to_text().splitlines()],
            "dropped": dict(self.publisher.counters),
        }

    # -- the loop ----------------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        try:
            await sock.connect(self.server)  # the kernel drops datagrams from any other source
            self._sock = sock
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive, sock)
                    task_status.started()
                    await self._loop()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_GRACE):
                    await self._withdraw(sock)
        finally:
            self._sock = None
            sock.close()

    async def _loop(self) -> None:
        # RFC 9664 §4.2: a random delay before the first registration, so devices that boot together
        # (after a power cut) do not all hit the server at once.
        await trio.sleep(self.start_delay)
        while True:
            now, wall = trio.current_time(), time.time()
            if self._dirty and self._rrsets is not None:
                self._dirty = False
                if self._started:
                    await self._send([self.publisher.endpoint_changed(self._rrsets, now, wall)])
                else:
                    self._started = True
                    await self._send([self.publisher.publish(self._rrsets, now, wall)])
            deadline = self.publisher.deadline()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._wake.wait()
            self._wake = trio.Event()
            self._log_events()
            await self._send(self.publisher.poll(trio.current_time(), time.time()))
            self._log_events()

    async def _receive(self, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                data = await sock.recv(MAX_ANSWER)
            except OSError as e:  # ICMP port unreachable and friends: the publisher times out and retries
                log.debug("update server %s: %s", _show_server(self.server), e)
                continue
            self.publisher.receive(data, trio.current_time(), time.time())
            self._wake.set()  # the deadline moved (an answer ends the retransmissions)

    async def _send(self, transmits: Sequence[Transmit]) -> None:
        sock = self._sock
        if sock is None:
            return
        for t in transmits:
            try:
                await sock.send(t.payload)
            except OSError as e:  # no route right now: the publisher retransmits and retries
                self.send_errors += 1
                log.debug("update to %s failed: %s", _show_server(self.server), e)

    async def _withdraw(self, sock: trio.socket.SocketType) -> None:
        """Delete our records before we go: one UPDATE, retransmitted, until answered or STOP_GRACE."""
        t = self.publisher.withdraw(trio.current_time(), time.time())
        if t is None:
            return
        await self._send([t])
        while self.publisher.state.pending:
            deadline = self.publisher.deadline()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                try:
                    data = await sock.recv(MAX_ANSWER)
                except OSError:
                    data = b""
                if data:
                    self.publisher.receive(data, trio.current_time(), time.time())
            await self._send(self.publisher.poll(trio.current_time(), time.time()))
        self._log_events()

    def _log_events(self) -> None:
        for event in self.publisher.events:
            if isinstance(event, Published):
                log.info("published our records on %s (lease %d s%s)", _show_server(self.server), event.lease,
                         "" if event.granted else ", server ignores leases")
            elif isinstance(event, Withdrawn):
                log.info("withdrew our records from %s", _show_server(self.server))
            elif isinstance(event, Failed):
                log.warning("publishing on %s failed: %s", _show_server(self.server), event.message)
        self.publisher.events.clear()


def _same(a: Sequence[dns.rrset.RRset], b: Sequence[dns.rrset.RRset]) -> bool:
    return len(a) == len(b) and all(x == y and x.ttl == y.ttl for x, y in zip(a, b, strict=True))


def _show_server(server: tuple[str, int]) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def disabled_status(message: str) -> dict[str, Any]:
    """The `publish` object of `tunneld status` when there is no publisher: the same keys."""
    return {
        "state": "disabled", "server": None, "zone": None, "rcode": None, "message": message,
        "unsigned_error": False, "lease": None, "lease_requested": None, "lease_granted": None,
        "server_ignores_lease": False, "lease_left": None, "next_refresh_in": None, "published": False,
        "records": [], "dropped": {},
    }
