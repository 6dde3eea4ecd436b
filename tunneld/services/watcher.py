"""The watching service: a thin trio adapter around the sans-I/O :class:`Watcher`.

It owns one UDP socket to the account's DNS server and runs the watcher's long-lived queries over it:
the account's browse PTR, then each device's records. Each complete, consistent record set becomes a
peer in the tunnel's table (through the `on_event` callback the daemon gives); a device that goes away
is forgotten. TSIG (seed §7.2: the queries carry TSIG for privacy) is done here, with dnspython and the
wall clock, which the sans-I/O core never reads.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.tsig
import trio

from tunneld.proto.watcher import Watcher, WatcherEvent

log = logging.getLogger("tunneld.watch")

STOP_GRACE = 1.0  # seconds to let the LLQ cancellations leave on shutdown
MAX_MESSAGE = 65535


class AccountTsig:
    """TSIG hooks for LLQ clients: sign requests and verify answers with the account key (hmac-sha256,
    named after the domain).

    An answer is signed over its request's MAC (RFC 8945 §5.3), so the MAC of each request we send is
    kept by message ID. Only requests: our acks of LLQ events are responses (QR=1) and nothing answers
    them. The server's events are unsolicited and signed without a request MAC, and their IDs are the
    server's choice: an event whose ID happens to equal one of our requests' fails the check against
    that request's MAC and is then checked as the unsolicited message it is. (Remembering acks and
    checking every message against the MAC stored under its ID lost an event per ~30 000, and with it
    every later event of that LLQ until the next refresh.)"""

    def __init__(self, zone: str, key_secret: bytes) -> None:
        name = dns.name.from_text(zone)
        self._name = name
        self._keyring = {name: dns.tsig.Key(name, key_secret, "hmac-sha256")}
        self._macs: dict[int, bytes] = {}

    def sign(self, message: dns.message.Message) -> bytes:
        message.use_tsig(self._keyring, self._name)
        wire = message.to_wire()
        if not message.flags & dns.flags.QR:
            self._macs[message.id] = message.mac or b""
            if len(self._macs) > 4096:  # bounded: the oldest requests' MACs are no longer needed
                for key in list(self._macs)[:1024]:
                    del self._macs[key]
        return wire

    def verify(self, wire: bytes) -> None:
        mac = self._macs.get(int.from_bytes(wire[:2], "big"))
        if mac is not None:
            try:
                dns.message.from_wire(wire, keyring=self._keyring, request_mac=mac)
                return
            except dns.tsig.BadSignature:
                pass  # not the answer to that request: an unsolicited message with the same ID
        dns.message.from_wire(wire, keyring=self._keyring, request_mac=b"")


class WatcherService:
    def __init__(self, server: tuple[str, int], zone: str, own_name: str, key_secret: bytes,
                 on_event: Callable[[WatcherEvent], None]) -> None:
        tsig = AccountTsig(zone, key_secret)
        self.watcher = Watcher(zone, own_name, rand=os.urandom, sign=tsig.sign, verify=tsig.verify)
        self.server = server
        self.on_event = on_event
        self._sock: trio.socket.SocketType | None = None
        self._wake = trio.Event()

    async def _send(self, wires: list[bytes]) -> None:
        sock = self._sock
        for wire in wires:
            if sock is None:
                return
            try:
                await sock.send(wire)
            except OSError as e:  # the server is unreachable for now: the clients retransmit
                log.debug("watch query to %s:%d failed: %s", *self.server, e)

    def _deliver(self, events: list[WatcherEvent]) -> None:
        for ev in events:
            self.on_event(ev)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        with sock:
            await sock.connect(self.server)
            self._sock = sock
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive, sock)
                    await self._send([t.wire for t in self.watcher.start(trio.current_time())])
                    task_status.started()
                    while True:
                        deadline = self.watcher.deadline()
                        with trio.move_on_at(deadline if deadline is not None else math.inf):
                            await self._wake.wait()
                        self._wake = trio.Event()
                        out = self.watcher.poll(trio.current_time())
                        await self._send([t.wire for t in out.transmits])
                        self._deliver(out.events)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_GRACE):
                    await self._send([t.wire for t in self.watcher.stop(trio.current_time())])
                self._sock = None

    async def _receive(self, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                wire = await sock.recv(MAX_MESSAGE)
            except OSError as e:  # ICMP unreachable from an earlier send: keep listening
                log.debug("watch receive: %s", e)
                continue
            out = self.watcher.receive(wire, trio.current_time())
            await self._send([t.wire for t in out.transmits])
            self._deliver(out.events)
            self._wake.set()  # the deadline may have moved (a new client, a refresh scheduled)

    def status(self) -> dict[str, Any]:
        return {"state": "watching", "server": f"{self.server[0]}:{self.server[1]}", **self.watcher.state}
