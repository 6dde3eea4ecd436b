"""The account's device names in the hosts file: one marked block of ``ULA NAME.DOMAIN NAME`` lines.

The block lists every device the daemon knows (itself, the configured peers, the peers the watcher learns),
is rewritten when a device comes or goes (debounced, and not at all when the text is unchanged), retried
after a failed write, and removed on a clean shutdown. Writing is tunneld.marked_block's. Why a hosts
block: docs/names.md.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import trio

from tunneld.config_model import NamesConfig
from tunneld.crypto.kdf import normalize_domain
from tunneld.marked_block import write_block
from tunneld.proto.records import check_name

__all__ = ["DEBOUNCE", "RETRY", "NamesService", "hosts_lines"]

log = logging.getLogger("tunneld.names")

DEBOUNCE = 0.25
"""Seconds to gather changes before a rewrite: a watcher's first answer brings every device at once."""

RETRY = 30.0
"""Seconds between attempts while the hosts file cannot be written (a read-only /etc, say)."""

Device = tuple[str, ipaddress.IPv6Address]
Writer = Callable[[Path, str, Sequence[str]], bool]


def hosts_lines(devices: Iterable[Device], domain: str, short_names: bool) -> list[str]:
    """The block's lines, sorted by name then address: ``ULA NAME.DOMAIN [NAME]``. A name that is not one
    LDH label is left out (it never is: the watcher checks names), so nothing odd reaches the file."""
    domain = normalize_domain(domain)
    lines: set[tuple[str, str]] = set()
    for name, ula in devices:
        try:
            label = check_name(name).lower()
        except ValueError:
            continue
        line = f"{ula} {label}.{domain}" + (f" {label}" if short_names else "")
        lines.add((label, line))
    return [line for _, line in sorted(lines)]


class NamesService:
    """Keeps the hosts block of one account. ``learned``/``gone`` are called from the daemon's event
    callbacks; ``run`` (in the daemon's nursery) writes, and removes the block when cancelled."""

    def __init__(self, config: NamesConfig, domain: str, devices: Iterable[tuple[bytes, str,
                 ipaddress.IPv6Address]] = (), *, debounce: float = DEBOUNCE,
                 write: Writer = write_block) -> None:
        self.config = config
        self.domain = normalize_domain(domain)
        self._static = {key: (name, ula) for key, name, ula in devices}  # itself and [[peer]]: kept
        self._learned: dict[bytes, Device] = {}
        self._debounce = debounce
        self._write = write
        self._changed = trio.Event()
        self.writes = 0
        self.error: str | None = None

    def learned(self, public_key: bytes, name: str, ula: ipaddress.IPv6Address) -> None:
        """A device's name and ULA, new or changed (a watcher's PeerLearned)."""
        if self._learned.get(public_key) != (name, ula):
            self._learned[public_key] = (name, ula)
            self._changed.set()

    def gone(self, public_key: bytes) -> None:
        """A device left (a watcher's PeerGone); a configured one stays in the block."""
        if self._learned.pop(public_key, None) is not None:
            self._changed.set()

    def lines(self) -> list[str]:
        devices = {**self._learned, **self._static}
        return hosts_lines(devices.values(), self.domain, self.config.short_names)

    def answer(self) -> dict[str, Any]:
        """The control socket's ``hosts`` answer: what the block holds (or would hold)."""
        return {"domain": self.domain, "enabled": self.config.enabled,
                "hosts_file": str(self.config.hosts_file), "lines": self.lines()}

    def status(self) -> dict[str, Any]:
        if not self.config.enabled:
            return {"state": "disabled"}
        return {"state": "error" if self.error else "ok", "hosts_file": str(self.config.hosts_file),
                "names": len(self.lines()), "writes": self.writes,
                **({"error": self.error} if self.error else {})}

    def _sync(self, lines: Sequence[str]) -> None:
        try:
            if self._write(self.config.hosts_file, self.domain, lines):
                self.writes += 1
                log.info("%s: %d names of %s", self.config.hosts_file, len(lines), self.domain)
            self.error = None
        except (OSError, ValueError) as e:
            message = f"cannot write {self.config.hosts_file}: {e}"
            if message != self.error:
                log.warning("%s", message)
            self.error = message

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if not self.config.enabled:
            task_status.started()
            return
        try:
            self._sync(self.lines())
            task_status.started()
            while True:
                # After a failed write, try again now and then even if nothing changes.
                with trio.move_on_after(RETRY if self.error else math.inf):
                    await self._changed.wait()
                await trio.sleep(self._debounce)
                self._changed = trio.Event()
                self._sync(self.lines())
        finally:
            # A clean shutdown takes its names away (after a crash the block stays until the next start).
            self._sync([])
