"""SSH host keys: ours, read for the publisher, and the peers', kept in a block of the known-hosts file.

:func:`load_host_keys` reads this machine's OpenSSH public host keys (``[ssh] host_keys``, a glob) at start.
:class:`KnownHostsService` keeps one marked block in ``[ssh] known_hosts`` with every learned peer's
verified keys (``NAME.DOMAIN,NAME,ULA ALGORITHM BASE64``), rewritten when a peer comes, changes its key or
goes, and removed when the service is cancelled (clean shutdown); through the names writer
(tunneld.blockwriter) when the daemon runs unprivileged. docs/names.md, "SSH host keys".
"""

from __future__ import annotations

import glob
import ipaddress
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from tunneld import marked_block
from tunneld.proto import hostkeys
from tunneld.proto.errors import ParseError

log = logging.getLogger("tunneld.hostkeys")


def load_host_keys(pattern: str | None) -> list[hostkeys.HostKey]:
    """Our host keys from the ``.pub`` files matching ``pattern`` (None: none), in file-name order; an
    unreadable or malformed file is skipped with a warning, and at most :data:`hostkeys.MAX_KEYS` are kept."""
    keys: list[hostkeys.HostKey] = []
    for name in sorted(glob.glob(pattern)) if pattern else []:
        try:
            with open(name, "rb") as f:
                data = f.read(hostkeys.MAX_LINE + 1)
            key = hostkeys.read_public_key(data.decode("ascii").split("\n", 1)[0])
        except (OSError, UnicodeDecodeError, ParseError) as e:
            log.warning("host key %s skipped: %s", name, e)
            continue
        if key in keys:
            continue
        if len(keys) == hostkeys.MAX_KEYS:
            log.warning("more than %d host keys: %s and later ones are not published",
                        hostkeys.MAX_KEYS, name)
            break
        keys.append(key)
    return keys


class KnownHostsService:
    """The peers' host keys in a marked block of ``path``, for the account ``domain``."""

    def __init__(self, path: Path, domain: str,
                 write: Callable[[Path, str, Sequence[str]], bool] = marked_block.write_block) -> None:
        self.path = path
        self.domain = domain
        self._write_block = write  # the names writer's, once the daemon runs unprivileged
        self._lines: dict[str, list[str]] = {}  # by lower-case peer name
        self._keys: dict[str, tuple[hostkeys.HostKey, ...]] = {}  # the same peers' keys
        self.writes = 0

    def lines(self) -> list[str]:
        """The block's lines, by peer name."""
        return [line for name in sorted(self._lines) for line in self._lines[name]]

    def fingerprints(self) -> list[dict[str, str]]:
        """Every held key as ``{name, algorithm, fingerprint}`` (``SHA256:...``), by peer name: what
        ``tunneld hosts`` shows, to compare with ``ssh-keygen -l`` on the peer."""
        return [{"name": name, "algorithm": key.algorithm, "fingerprint": key.fingerprint_text}
                for name in sorted(self._keys) for key in self._keys[name]]

    def learned(self, name: str, ula: ipaddress.IPv6Address, keys: tuple[hostkeys.HostKey, ...]) -> None:
        """The peer ``name`` is known with these verified keys (none: it has no lines)."""
        lines = hostkeys.known_hosts_lines(self.domain, name, ula, keys)
        if lines:
            self._lines[name.lower()] = lines
            self._keys[name.lower()] = keys
        else:
            self._lines.pop(name.lower(), None)
            self._keys.pop(name.lower(), None)
        self._write()

    def gone(self, name: str) -> None:
        self._keys.pop(name.lower(), None)
        if self._lines.pop(name.lower(), None) is not None:
            self._write()

    def _write(self) -> None:
        try:
            if self._write_block(self.path, self.domain, self.lines()):
                self.writes += 1
                log.info("known hosts %s: %d keys of %d peers", self.path, len(self.lines()),
                         len(self._lines))
        except (OSError, ValueError) as e:
            log.warning("cannot write the known-hosts block in %s: %s", self.path, e)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Write the (empty) block at start, so a crashed run's stale keys go; remove it when cancelled."""
        self._write()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self._lines.clear()
            self._keys.clear()
            self._write()

    def status(self) -> dict[str, Any]:
        return {"state": "on", "file": str(self.path), "lines": self.lines()}
