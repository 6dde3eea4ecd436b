"""A TCP stream whose integrity both ends check: the receiver and the sender each print the byte
count and SHA-256 of what crossed, so a test compares the two.

  python -m lab.progs.tcpblast serve ADDR PORT            accept one connection, read to EOF
  python -m lab.progs.tcpblast send ADDR PORT --bytes N   send N pseudo-random bytes
  python -m lab.progs.tcpblast send ADDR PORT --seconds S send for S seconds

Both print one JSON line: {"bytes": n, "sha256": hex, "seconds": t}. The server prints
{"listening": true} first, so a caller can wait for it instead of sleeping.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import time
from typing import Any

from lab.progs import accept_one, cli, endpoint

CHUNK = 256 * 1024


def serve(addr: str, port: int, timeout: float) -> dict[str, Any]:
    with accept_one(addr, port, timeout) as conn:
        h = hashlib.sha256()
        n = 0
        t0 = time.monotonic()
        while True:
            data = conn.recv(CHUNK)
            if not data:
                break
            h.update(data)
            n += len(data)
    return {"bytes": n, "sha256": h.hexdigest(), "seconds": time.monotonic() - t0}


def send(addr: str, port: int, nbytes: int | None, seconds: float | None, timeout: float) -> dict[str, Any]:
    pattern = os.urandom(CHUNK * 4)  # varied data, so a duplicated or misplaced segment changes the hash
    views = [memoryview(pattern)[i:i + CHUNK] for i in range(0, len(pattern), CHUNK // 3)]
    h = hashlib.sha256()
    n = 0
    with socket.create_connection((addr, port), timeout=timeout) as s:
        t0 = time.monotonic()
        i = 0
        while True:
            if nbytes is not None and n >= nbytes:
                break
            if seconds is not None and time.monotonic() - t0 >= seconds:
                break
            chunk = views[i % len(views)]
            i += 1
            if nbytes is not None:
                chunk = chunk[:nbytes - n]
            s.sendall(chunk)
            h.update(chunk)
            n += len(chunk)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # wait for the server's close, so every byte was delivered
        dt = time.monotonic() - t0
    return {"bytes": n, "sha256": h.hexdigest(), "seconds": dt}


def _serve_args(p: argparse.ArgumentParser) -> None:
    endpoint(p)
    p.add_argument("--timeout", type=float, default=60)


def _send_args(p: argparse.ArgumentParser) -> None:
    _serve_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--bytes", type=int)
    g.add_argument("--seconds", type=float)


def main(argv: list[str] | None = None) -> int:
    return cli("tcpblast", {
        "serve": (_serve_args, lambda a: serve(a.addr, a.port, a.timeout)),
        "send": (_send_args, lambda a: send(a.addr, a.port, a.bytes, a.seconds, a.timeout)),
    }, argv)


if __name__ == "__main__":
    sys.exit(main())
