"""A TCP stream whose integrity both ends check: the receiver and the sender each print the byte
count and SHA-256 of what crossed, so a test compares the two.

  python -m tools.tcpblast serve ADDR PORT            accept one connection, read to EOF
  python -m tools.tcpblast send ADDR PORT --bytes N   send N pseudo-random bytes
  python -m tools.tcpblast send ADDR PORT --seconds S send for S seconds

Both print one JSON line: {"bytes": n, "sha256": hex, "seconds": t}. The server prints
{"listening": true} first, so a caller can wait for it instead of sleeping.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time

CHUNK = 256 * 1024


def serve(addr: str, port: int, timeout: float) -> None:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((addr, port))
        ls.listen(1)
        ls.settimeout(timeout)
        print(json.dumps({"listening": True}), flush=True)
        conn, _ = ls.accept()
        with conn:
            conn.settimeout(timeout)
            h = hashlib.sha256()
            n = 0
            t0 = time.monotonic()
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                h.update(data)
                n += len(data)
        print(json.dumps({"bytes": n, "sha256": h.hexdigest(), "seconds": time.monotonic() - t0}),
              flush=True)


def send(addr: str, port: int, nbytes: int | None, seconds: float | None, timeout: float) -> None:
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
    print(json.dumps({"bytes": n, "sha256": h.hexdigest(), "seconds": dt}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tcpblast")
    sub = p.add_subparsers(dest="mode", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("addr")
    sv.add_argument("port", type=int)
    sv.add_argument("--timeout", type=float, default=60)
    sd = sub.add_parser("send")
    sd.add_argument("addr")
    sd.add_argument("port", type=int)
    g = sd.add_mutually_exclusive_group(required=True)
    g.add_argument("--bytes", type=int)
    g.add_argument("--seconds", type=float)
    sd.add_argument("--timeout", type=float, default=60)
    a = p.parse_args(argv)
    if a.mode == "serve":
        serve(a.addr, a.port, a.timeout)
    else:
        send(a.addr, a.port, a.bytes, a.seconds, a.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
