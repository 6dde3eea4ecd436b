"""The control socket: JSON lines over a Unix socket for `tunneld status` and `rebind`.

A request is one JSON object on one line, e.g. {"cmd": "status"}; the answer is one JSON line. The socket
survives any input: a request is bounded (MAX_REQUEST bytes, MAX_DEPTH nesting, checked before json.loads
so that deep nesting cannot exhaust the stack), read under a timeout in its own task so a slow client
blocks nobody, and whatever goes wrong -- a bad request, an exception in the handler -- is answered with
{"error": ...}. The path is locked (flock on ``<path>.lock``) for the daemon's life: a second daemon with
the same path refuses to start instead of taking the socket over, and a daemon only ever unlinks the
socket it bound itself.

Access: mode 0600, or 0660 with the daemon's group (``tunneld``) once it runs unprivileged. Each client is
known by SO_PEERCRED: root and the daemon's own user may do everything, anyone else who could connect (the
group) only the READ_ONLY commands (docs/privilege.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from itertools import accumulate
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger("tunneld.control")

MAX_REQUEST = 64 * 1024
"""Bytes of one request line: a request is a few dozen bytes; anything near this is not one."""
MAX_DEPTH = 8
"""Nesting of arrays and objects in a request: ours have depth 1."""
READ_TIMEOUT = 5.0
"""Seconds for a client to send its whole request line."""
WRITE_TIMEOUT = 5.0
"""Seconds for a client to take the answer."""
MAX_CLIENTS = 64
"""Connections served at once; more are closed at once (each lives at most the timeouts above)."""
CONNECT_TIMEOUT = 1.0
"""Seconds to find out whether an existing socket file has a live listener."""

READ_ONLY: frozenset[str] = frozenset({"status", "hosts"})
"""What a client other than root and the daemon's own user may ask: these only read."""

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

# A JSON string, terminated or not; possessive, so a scan never backtracks (linear in the input).
_STRING = re.compile(r'"[^"\\]*+(?:\\[\s\S]?[^"\\]*+)*+"?')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class ControlError(Exception):
    """The control socket cannot be set up (its path is another daemon's, or unusable): one line."""


class BadRequest(ValueError):
    """A request that is not one bounded JSON object."""


def shorten(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages that echo part of a request."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text``, outside strings (an upper bound of what
    json.loads would recurse into, for any text)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def parse_request(data: bytes) -> dict[str, Any]:
    """The request in ``data`` (one line, the newline optional); BadRequest for anything else."""
    line = data.split(b"\n", 1)[0]
    if len(line) > MAX_REQUEST:
        raise BadRequest(f"request longer than {MAX_REQUEST} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request is not UTF-8") from None
    openers = text.count("[") + text.count("{")  # a bound of the depth that usually spares the scan
    if openers > MAX_DEPTH and nesting_depth(text) > MAX_DEPTH:
        raise BadRequest(f"request nested deeper than {MAX_DEPTH}")
    try:
        req = json.loads(text or "null")
    except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, (and, defensively)
        raise BadRequest(f"not JSON: {shorten(str(e), 100)}") from None
    if not isinstance(req, dict):
        raise BadRequest("request is not a JSON object")
    return req


def _line(reply: dict[str, Any]) -> bytes:
    return (json.dumps(reply) + "\n").encode()  # NaN and Infinity as Python's json reads them


async def answer(data: bytes, handler: Handler, *, privileged: bool = True) -> bytes:
    """The answer line for the request in ``data``. Never raises (but for cancellation): a bad request
    and a failing handler are answered with {"error": ...}, and the failure is logged without the
    request's contents. A client that is not ``privileged`` gets only the READ_ONLY commands."""
    try:
        req = parse_request(data)
    except BadRequest as e:
        return _line({"error": f"bad request: {e}"})
    cmd = req.get("cmd")
    what = cmd if isinstance(cmd, str) and cmd.isidentifier() and len(cmd) <= 20 else "?"
    if not privileged and cmd not in READ_ONLY:
        return _line({"error": f"{what} needs root (other users may only use "
                               f"{', '.join(sorted(READ_ONLY))})"})
    try:
        reply = await handler(req)
        return _line(reply)
    except Exception as e:  # every failure is an answer, never the end of the control socket
        log.error("control request %s failed: %s", what, type(e).__name__)
        log.debug("control request %s failed", what, exc_info=True)
        return _line({"error": f"internal error in {what} ({type(e).__name__}); see the daemon's log"})


# -- the listening socket ---------------------------------------------------------------------------


def _lock(path: Path) -> int:
    """An exclusive flock on ``<path>.lock``, or ControlError: the path is someone else's."""
    lock_path = path.with_name(path.name + ".lock")
    fix = "stop it, or give this daemon its own [interface] control_socket"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                     0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ControlError(f"{lock_path} is a symbolic link; remove it, or set [interface] "
                               f"control_socket to another path") from None
        raise ControlError(f"cannot open {lock_path}, the lock of control socket {path}: {e.strerror}; "
                           f"is it another user's tunneld? {fix}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ControlError(f"{lock_path} is not a regular file; remove it, or set [interface] "
                               f"control_socket to another path")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ControlError(f"control socket {path} belongs to another running tunneld (it holds "
                               f"{lock_path.name}); {fix}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _clear_stale(path: Path) -> None:
    """Remove a socket left by a daemon that died (we hold the lock); refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; remove it, or set [interface] "
                           f"control_socket to another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(CONNECT_TIMEOUT)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: stale
        except OSError:
            raise ControlError(f"cannot tell whether {path} is in use; remove it if no tunneld runs, "
                               f"or set [interface] control_socket to another path") from None
        else:
            raise ControlError(f"control socket {path} is in use by a process that holds no lock (an "
                               f"older tunneld?); stop it, or set [interface] control_socket to "
                               f"another path")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class Listener:
    """The bound control socket and its lock, from :meth:`open` until :meth:`close`."""

    def __init__(self, path: Path, sock: socket.socket, lock_fd: int) -> None:
        self.path = path
        self._sock = sock
        self._lock_fd = lock_fd
        st = os.stat(path)
        self.identity = (st.st_dev, st.st_ino)  # what we unlink at the end, and nothing else
        self.clients = 0

    @classmethod
    def open(cls, path: Path, group: int | None = None) -> Listener:
        """Lock ``path``, clear a stale socket, bind and listen; ControlError otherwise. The socket is mode
        0600, or 0660 owned by ``group`` if given (made by binding with that effective gid: no CAP_CHOWN
        needed)."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as e:
            raise ControlError(f"cannot create {path.parent} for the control socket: {e.strerror}; "
                               f"create it, or set [interface] control_socket") from None
        lock_fd = _lock(path)
        try:
            _clear_stale(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                # 0600 (status shows endpoints, counters), or 0660 for the group that may read them.
                old_umask, old_egid = os.umask(0o177 if group is None else 0o117), os.getegid()
                try:
                    if group is not None and group != old_egid:
                        os.setegid(group)
                    sock.bind(str(path))
                finally:
                    if os.getegid() != old_egid:
                        os.setegid(old_egid)
                    os.umask(old_umask)
                sock.listen(16)
                sock.setblocking(False)
                return cls(path, sock, lock_fd)
            except OSError as e:
                sock.close()
                raise ControlError(f"cannot listen on control socket {path}: {e.strerror or e}; check "
                                   f"the directory, or set [interface] control_socket") from None
        except BaseException:
            os.close(lock_fd)
            raise

    async def serve(self, handler: Handler, *, read_timeout: float = READ_TIMEOUT,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.from_stdlib_socket(self._sock)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                conn, _ = await sock.accept()
                if self.clients >= MAX_CLIENTS:
                    conn.close()
                    continue
                self.clients += 1
                nursery.start_soon(self._client, conn, handler, read_timeout)

    async def _client(self, conn: trio.socket.SocketType, handler: Handler, read_timeout: float) -> None:
        try:
            with conn:
                data = await _read_request(conn, read_timeout)
                if data is None:
                    return  # stalled or gone: cut off
                reply = await answer(data, handler, privileged=peer_privileged(conn))
                with trio.move_on_after(WRITE_TIMEOUT):
                    while reply:
                        sent = await conn.send(reply)
                        reply = reply[sent:]
        except OSError:
            pass  # the client went away (reset, broken pipe): nothing to answer
        finally:
            self.clients -= 1

    def close(self) -> None:
        """Close the socket, unlink it if the path is still ours, and release the lock."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                self.path.unlink()
        except OSError as e:  # gone already, or its directory changed, or is root's and we are not
            log.debug("control socket %s not removed: %s", self.path, e.strerror)
        finally:
            self._sock.close()
            os.close(self._lock_fd)


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (socket(7), SO_PEERCRED)


def peer_privileged(conn: trio.socket.SocketType | socket.socket) -> bool:
    """Whether the client on ``conn`` is root or the daemon's own user (SO_PEERCRED, taken by the kernel
    when it connected)."""
    try:
        _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return False
    return uid in (0, os.geteuid())


async def _read_request(conn: trio.socket.SocketType, timeout: float) -> bytes | None:
    """Up to the first newline (or the end, or MAX_REQUEST + 1 bytes); None if it took too long."""
    buf = bytearray()
    with trio.move_on_after(timeout):
        while b"\n" not in buf and len(buf) <= MAX_REQUEST:
            chunk = await conn.recv(MAX_REQUEST + 1 - len(buf))
            if not chunk:
                break
            buf += chunk
        return bytes(buf)
    return None


def request(path: Path, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Blocking client for the CLI: OSError if the daemon cannot be reached, ValueError for an answer
    that is not one JSON object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n") and len(buf) <= 16 << 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ValueError("the daemon closed the connection without answering (too busy?)")
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise ValueError("daemon answered with something other than a JSON object")
    return reply
