"""systemd readiness (sd_notify(3)): ``READY=1``, ``STATUS=...`` and ``STOPPING=1`` for ``Type=notify``.

A few lines of our own rather than a dependency: one datagram per message on an AF_UNIX socket to
``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace). Without the variable every call does
nothing, so the daemon behaves the same outside systemd. The socket is connected when the notifier is made,
at start-up: the daemon may drop root later and could then no longer open a path it was allowed to reach.
A failed send is logged at debug and otherwise ignored: readiness is a courtesy, never a reason to stop.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import trio

log = logging.getLogger("tunneld.sdnotify")

STATUS_INTERVAL = 1.0  # seconds between looks at the peer count (a STATUS= line only when it changed)


def address(value: str) -> str | bytes | None:
    """The address ``$NOTIFY_SOCKET`` names: a path, or (``@name``) an abstract name; None if unusable."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op when there is none."""

    def __init__(self, target: str | bytes | None) -> None:
        self.sock: socket.socket | None = None
        if target is None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(target)
        except OSError as e:
            log.debug("NOTIFY_SOCKET %r: %s; no readiness messages", target, e)
            sock.close()
            return
        self.sock = sock

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        value = env.get("NOTIFY_SOCKET", "")
        return cls(address(value) if value else None)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *fields: str) -> bool:
        """One message of ``KEY=value`` fields (newline-separated, as sd_notify wants); True if it left."""
        if self.sock is None:
            return False
        text = "\n".join(f.replace("\n", " ") for f in fields)
        try:
            self.sock.send(text.encode())
        except OSError as e:
            log.debug("sd_notify %r: %s", text, e)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=shutting down")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def follow(self, summary: Callable[[], str], interval: float = STATUS_INTERVAL, *,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Send ``STATUS=<summary()>`` whenever it changes (looked at every ``interval`` seconds)."""
        last = summary()
        task_status.started()
        if not self.enabled:
            return
        while True:
            await trio.sleep(interval)
            now = summary()
            if now != last:
                self.status(now)
                last = now
