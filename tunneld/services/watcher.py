"""The watching service: a thin trio adapter around the sans-I/O :class:`Watcher`.

It owns one UDP socket to the account's DNS server and runs the watcher's long-lived queries over it:
the account's browse PTR, then each device's records. Each complete, consistent record set becomes a
peer in the tunnel's table (through the `on_event` callback the daemon gives); a device that goes away
is forgotten. The queries carry TSIG (for privacy), so the watcher runs on the wall clock.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import dns.name
import trio

from tunneld.proto.tsig import TsigKey
from tunneld.proto.watcher import Watcher, WatcherEvent

log = logging.getLogger("tunneld.watch")

STOP_GRACE = 1.0  # seconds to let the LLQ cancellations leave on shutdown
MAX_MESSAGE = 65535


class WatcherService:
    def __init__(self, server: tuple[str, int], zone: str, own_name: str, key_secret: bytes,
                 on_event: Callable[[WatcherEvent], None]) -> None:
        key = TsigKey(dns.name.from_text(zone), key_secret)
        self.watcher = Watcher(zone, own_name, rand=os.urandom, key=key)
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
                    await self._send([t.wire for t in self.watcher.start(time.time())])
                    task_status.started()
                    while True:
                        deadline = self.watcher.deadline()
                        with trio.move_on_at(deadline if deadline is not None else math.inf):
                            await self._wake.wait()
                        self._wake = trio.Event()
                        out = self.watcher.poll(time.time())
                        await self._send([t.wire for t in out.transmits])
                        self._deliver(out.events)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_GRACE):
                    await self._send([t.wire for t in self.watcher.stop(time.time())])
                self._sock = None

    async def _receive(self, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                wire = await sock.recv(MAX_MESSAGE)
            except OSError as e:  # ICMP unreachable from an earlier send: keep listening
                log.debug("watch receive: %s", e)
                continue
            out = self.watcher.receive(wire, time.time())
            await self._send([t.wire for t in out.transmits])
            self._deliver(out.events)
            self._wake.set()  # the deadline may have moved (a new client, a refresh scheduled)

    def status(self) -> dict[str, Any]:
        return {"state": "watching", "server": f"{self.server[0]}:{self.server[1]}", **self.watcher.state}
