"""The names writer: a small process that keeps uid 0 to write the hosts and known-hosts blocks for a daemon
that no longer can.

`tunneld up` forks it before dropping to the ``tunneld`` user. It keeps root's uid (the files are root's,
mode 0644: it writes them as their owner) but no capability at all, sets no-new-privs, closes every other
file descriptor and serves one socketpair: a request names which file (``hosts`` or ``known_hosts``, whose
paths were fixed at fork time from the config: the daemon can never name another path), the account's
domain and the block's lines; every line is checked again here and written with
:func:`tunneld.marked_block.write_block`. It exits when the daemon's end closes, removing the daemon's
control socket (whose directory is root's) if it is still the one the daemon bound. docs/privilege.md.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import os
import re
import select
import signal
import socket
import stat
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from tunneld import marked_block, privdrop
from tunneld.crypto.kdf import normalize_domain
from tunneld.identity import account_prefix

__all__ = ["CONTROL_SOCKET", "HOSTS", "KNOWN_HOSTS", "BlockWriter", "check_line", "serve"]

log = logging.getLogger("tunneld.writer")

HOSTS: Final = "hosts"
KNOWN_HOSTS: Final = "known_hosts"
CONTROL_SOCKET: Final = "control_socket"
"""Not a block: the socket the daemon bound, by (device, inode), to remove when the daemon has gone."""
MAX_REQUEST: Final = 1 << 20
"""Bytes of one request: an account's block is a few kilobytes."""
MAX_LINES: Final = 4096
"""Lines of one block: far more devices and keys than an account has."""
REPLY_TIMEOUT: Final = 10.0
"""Seconds the daemon waits for a write to be done (a file on a slow disk, fsync included)."""
_LEN: Final = struct.Struct("!I")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_KEY_TYPE = re.compile(r"[a-z0-9][a-z0-9@.-]{0,63}\Z")
_MAX_KEY: Final = 16 * 1024  # base64 characters of one public key (an RSA 16384-bit key is ~2.8 KB)

Writer = Callable[[Path, str, Sequence[str]], bool]


def _check_host_name(name: str, domain: str | None) -> None:
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"{name!r} is not a host name")
    if domain is not None and "." in name and not name.lower().endswith("." + domain):
        raise ValueError(f"{name!r} is neither a short name nor a name under {domain}")


def _check_address(text: str, prefix: ipaddress.IPv6Network | None) -> None:
    address = ipaddress.ip_address(text)
    if prefix is not None and address not in prefix:
        raise ValueError(f"{text} is not an address of the account ({prefix})")


def _check_name_or_address(name: str, domain: str | None, prefix: ipaddress.IPv6Network | None) -> None:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        _check_host_name(name, domain)
    else:
        _check_address(name, prefix)


def check_line(kind: str, line: object, domain: str | None = None) -> str:
    """``line`` if it is a well-formed line of a ``kind`` block, else ValueError: ``ADDR NAME...`` for
    hosts, ``NAMES KEYTYPE BASE64`` (NAMES comma-separated names or addresses) for known_hosts. With the
    account's ``domain``, every name is a short name or one under the domain and every address is in
    the account's /48: a daemon taken over cannot pin another site's name or key."""
    if not isinstance(line, str) or len(line) > _MAX_KEY + 1024:
        raise ValueError("a line must be a string of bounded length")
    domain = None if domain is None else normalize_domain(domain)
    prefix = None if domain is None else account_prefix(domain)
    fields = line.split(" ")
    if kind == HOSTS:
        if len(fields) < 2:
            raise ValueError(f"hosts line {line!r} is not ADDRESS NAME...")
        _check_address(fields[0], prefix)
        for name in fields[1:]:
            _check_host_name(name, domain)
    elif kind == KNOWN_HOSTS:
        if len(fields) != 3:
            raise ValueError(f"known-hosts line {line!r} is not NAMES KEYTYPE BASE64")
        for name in fields[0].split(","):
            _check_name_or_address(name, domain, prefix)
        if not _KEY_TYPE.match(fields[1]) or not 0 < len(fields[2]) <= _MAX_KEY:
            raise ValueError(f"known-hosts line {line!r} has a bad key type or key")
        try:
            base64.b64decode(fields[2], validate=True)
        except binascii.Error:
            raise ValueError(f"known-hosts line {line!r}: the key is not base64") from None
    else:
        raise ValueError(f"unknown file {kind!r}")
    return line


def _frame(obj: Mapping[str, Any]) -> bytes:
    data = json.dumps(obj).encode()
    return _LEN.pack(len(data)) + data


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _read_frame(sock: socket.socket) -> Any:
    """One JSON value, length-prefixed and bounded; None at the end; ValueError if malformed."""
    head = _read_exactly(sock, _LEN.size)
    if head is None:
        return None
    (size,) = _LEN.unpack(head)
    if size > MAX_REQUEST:
        raise ValueError(f"a message larger than {MAX_REQUEST} bytes")
    data = _read_exactly(sock, size)
    if data is None:
        return None
    return json.loads(data)


def handle(request: object, paths: Mapping[str, Path], write: Writer = marked_block.write_block,
           account: str | None = None) -> dict[str, Any]:
    """The reply to one request: ``{"ok": true, "changed": bool}`` or ``{"error": ...}``. With the
    ``account``'s domain (fixed at fork), a request for another domain is refused."""
    try:
        if not isinstance(request, dict):
            raise ValueError("a request is a JSON object")
        kind, domain, lines = request.get("file"), request.get("domain"), request.get("lines")
        if kind not in (HOSTS, KNOWN_HOSTS) or kind not in paths:
            raise ValueError(f"no such file {kind!r}: the writer has {sorted(set(paths) - {CONTROL_SOCKET})}")
        if not isinstance(domain, str) or not isinstance(lines, list) or len(lines) > MAX_LINES:
            raise ValueError(f"a request names a domain and at most {MAX_LINES} lines")
        if account is not None and normalize_domain(domain) != normalize_domain(account):
            raise ValueError(f"the writer keeps the blocks of {account} only")
        checked = [check_line(kind, line, account) for line in lines]
        return {"ok": True, "changed": write(paths[kind], domain, checked)}
    except (OSError, ValueError) as e:
        return {"error": str(e)[:500]}


def serve(sock: socket.socket, paths: Mapping[str, Path], write: Writer = marked_block.write_block,
          account: str | None = None) -> None:
    """Answer requests on ``sock`` until its other end closes (or sends something unreadable); then
    remove the control socket registered by its identity, if ``paths`` names one and it is still there."""
    bound: tuple[int, int] | None = None
    try:
        while True:
            try:
                request = _read_frame(sock)
            except (OSError, ValueError) as e:
                log.warning("names writer: %s; stopping", e)
                return
            if request is None:
                return
            if isinstance(request, dict) and request.get("file") == CONTROL_SOCKET:
                identity = request.get("identity")
                if (CONTROL_SOCKET in paths and isinstance(identity, list) and len(identity) == 2
                        and all(type(i) is int for i in identity)):
                    bound = (identity[0], identity[1])
                    sock.sendall(_frame({"ok": True}))
                else:
                    sock.sendall(_frame({"error": "no control socket to register"}))
                continue
            sock.sendall(_frame(handle(request, paths, write, account)))
    finally:
        if bound is not None:
            _remove_socket(paths[CONTROL_SOCKET], bound)


def _remove_socket(path: Path, identity: tuple[int, int]) -> None:
    """Unlink ``path`` if it is the socket ``identity`` (device, inode): never another daemon's."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == identity:
            os.unlink(path)


class BlockWriter:
    """The daemon's end of the names writer."""

    def __init__(self, sock: socket.socket, pid: int, paths: Mapping[str, Path]) -> None:
        self._sock = sock
        self.pid = pid
        self.paths = dict(paths)

    @classmethod
    def start(cls, paths: Mapping[str, Path], account: str | None = None) -> BlockWriter:
        """Fork the writer for these files (and only the blocks of the ``account``'s domain, if given).
        Call it while the process has one thread (a fork copies only the calling thread) and before
        opening anything the writer must not hold."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the writer process (its behaviour is tested through the pair)
            code = 1
            try:
                parent.close()
                _become_writer(child)
                serve(child, paths, account=account)
                code = 0
            except BaseException as e:
                with contextlib.suppress(BaseException):
                    log.error("names writer failed: %s", e)
            finally:
                os._exit(code)
        child.close()
        parent.settimeout(REPLY_TIMEOUT)
        return cls(parent, pid, paths)

    def write(self, kind: str, domain: str, lines: Sequence[str]) -> bool:
        """Have the block of ``domain`` in the ``kind`` file hold ``lines``; False if nothing changed.
        OSError if the writer is gone or slow, ValueError with its reason if it refused or failed."""
        self._sock.sendall(_frame({"file": kind, "domain": domain, "lines": list(lines)}))
        try:
            reply = _read_frame(self._sock)
        except ValueError as e:
            raise OSError(f"the names writer answered nonsense: {e}") from None
        if not isinstance(reply, dict):
            raise OSError("the names writer is gone")
        if "error" in reply:
            raise ValueError(str(reply["error"]))
        return bool(reply.get("changed"))

    def control_socket_bound(self, identity: tuple[int, int]) -> None:
        """The control socket is bound (device, inode): the writer removes it once we are gone."""
        self._sock.sendall(_frame({"file": CONTROL_SOCKET, "identity": list(identity)}))
        reply = _read_frame(self._sock)
        if not isinstance(reply, dict) or "error" in reply:
            raise OSError(f"the names writer did not take the control socket: {reply}")

    def writer(self, kind: str) -> Writer:
        """A :data:`Writer` for the services: the path they pass must be the one the writer holds."""
        def write(path: Path, domain: str, lines: Sequence[str]) -> bool:
            if Path(path) != self.paths.get(kind):
                raise ValueError(f"the names writer writes {self.paths.get(kind)}, not {path}")
            return self.write(kind, domain, lines)
        return write

    def close(self, timeout: float = 5.0) -> None:
        """Close our end (the writer exits) and reap it."""
        self._sock.close()
        pidfd = os.pidfd_open(self.pid)
        try:
            exited = select.select([pidfd], [], [], timeout)[0]
        finally:
            os.close(pidfd)
        if not exited:
            log.warning("names writer %d did not exit; killing it", self.pid)
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def _become_writer(sock: socket.socket) -> None:
    """In the forked child: ignore the terminal's and the service manager's signals (the daemon's end
    closing is the signal to stop, after its last write), close every other descriptor, drop every
    capability."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    privdrop.drop_capabilities()
