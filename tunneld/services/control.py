"""The control socket: JSON lines over a Unix socket (mode 0600) for `tunneld status`.

A request is one JSON object on one line, e.g. {"cmd": "status"}; the answer is one JSON line.
Unknown commands and malformed requests get {"error": ...}; a client that stalls is cut off.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

MAX_REQUEST = 4096
CLIENT_TIMEOUT = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def serve(path: Path, handler: Handler, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket from a daemon that died; a live one would hold the port-ish lock
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is created 0600: status shows endpoints and counters
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_client, conn, handler)
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def _client(conn: trio.socket.SocketType, handler: Handler) -> None:
    with conn, trio.move_on_after(CLIENT_TIMEOUT):
        buf = b""
        while b"\n" not in buf and len(buf) < MAX_REQUEST:
            chunk = await conn.recv(MAX_REQUEST)
            if not chunk:
                break
            buf += chunk
        try:
            req = json.loads(buf.split(b"\n", 1)[0] or b"null")
            if not isinstance(req, dict):
                raise ValueError("request is not a JSON object")
            reply = await handler(req)
        except (ValueError, UnicodeDecodeError) as e:
            reply = {"error": f"bad request: {e}"}
        data = (json.dumps(reply) + "\n").encode()
        while data:
            sent = await conn.send(data)
            data = data[sent:]


def request(path: Path, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Blocking client for the CLI."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise ValueError("daemon answered with something other than a JSON object")
    return reply
