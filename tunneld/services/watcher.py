"""The watching service: the :class:`Watcher` core over one UDP socket, run by the :class:`Driver`.

It runs the watcher's long-lived queries against the account's DNS server: the account's browse PTR, then
each device's records. Each complete, consistent record set becomes a peer in the tunnel's table (through
the ``on_event`` callback the daemon gives); a device that goes away is forgotten. The queries carry TSIG
(for privacy), so the core runs on the wall clock. On shutdown the driver lets the LLQ cancellations leave.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import dns.name
import trio

from tunneld.proto.tsig import TsigKey
from tunneld.proto.watcher import Watcher, WatcherEvent
from tunneld.services.driver import Driver

log = logging.getLogger("tunneld.watch")

STOP_GRACE = 1.0  # seconds to let the LLQ cancellations leave on shutdown


class WatcherService:
    def __init__(self, server: tuple[str, int], zone: str, own_name: str, key_secret: bytes,
                 on_event: Callable[[WatcherEvent], None]) -> None:
        key = TsigKey(dns.name.from_text(zone), key_secret)
        self.watcher = Watcher(zone, own_name, server=server, rand=os.urandom, key=key)
        self.server = server
        self.on_event = on_event

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            await sock.connect(self.server)  # the kernel drops datagrams from any other source
            driver = Driver(self.watcher, [sock], on_event=self.on_event, clock=time.time, grace=STOP_GRACE,
                            name="watch")
            self.watcher.start(driver.now())
            await driver.run(task_status=task_status)

    def status(self) -> dict[str, Any]:
        return {"state": "watching", "server": f"{self.server[0]}:{self.server[1]}", **self.watcher.state}
