"""The watching service: the :class:`Watcher` core over one UDP socket, run by the :class:`Driver`.

It runs the watcher's long-lived queries against the account's DNS server: the account's browse PTR, then
each device's records. Each complete, consistent record set becomes a peer in the tunnel's table (through
the ``on_event`` callback the daemon gives); a device that goes away is forgotten. The queries carry TSIG
(for privacy), so the core runs on the wall clock. On shutdown the driver lets the LLQ cancellations leave.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import dns.name

from tunneld.proto.tsig import TsigKey
from tunneld.proto.watcher import Watcher, WatcherEvent
from tunneld.services.driver import Driver, ServerLink

log = logging.getLogger("tunneld.watch")

STOP_GRACE = 1.0  # seconds to let the LLQ cancellations leave on shutdown


class WatcherService(ServerLink[WatcherEvent]):
    def __init__(self, server: tuple[str, int], zone: str, own_name: str, key_secret: bytes,
                 on_event: Callable[[WatcherEvent], None]) -> None:
        key = TsigKey(dns.name.from_text(zone), key_secret)
        self.watcher = Watcher(zone, own_name, server=server, rand=os.urandom, key=key)
        super().__init__(self.watcher, server, grace=STOP_GRACE, name="watch")
        self._deliver = on_event

    def on_event(self, event: WatcherEvent) -> None:
        self._deliver(event)

    def ready(self, driver: Driver[WatcherEvent]) -> None:
        self.watcher.start(driver.now())

    async def renew(self) -> bool:
        """The network moved: a new socket, and every LLQ set up again from it."""
        if not await self.reopen():
            return False
        assert self.driver is not None
        self.watcher.renew(self.driver.now())
        self.driver.wake()
        return True

    def status(self) -> dict[str, Any]:
        return {"state": "watching", "server": f"{self.server[0]}:{self.server[1]}", **self.watcher.state}
