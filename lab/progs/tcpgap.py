"""A rate-limited TCP stream whose receiver timestamps its progress, to measure how long a stream
stalls while something changes under it (a move between networks).

  python -m lab.progs.tcpgap recv ADDR PORT                 accept one connection, read until EOF
  python -m lab.progs.tcpgap send ADDR PORT --rate B --seconds S   send B bytes/s for S seconds

The receiver prints {"listening": true}, then a progress line {"t": wall time, "bytes": total} at most
every 10 ms while bytes arrive, and always both ends of a silence of 10 ms or more (the last read
before it and the first after it), so a caller finds every stall to the read. Both end with a report
{"bytes": n, "seconds": t}. The sender never catches up more than 0.1 s of a stall: its rate stays the
rate asked for, not a burst that would load the machine.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from typing import Any

from lab.progs import accept_one, cli, endpoint, report

CHUNK = 16 * 1024
SLOT = 0.01  # seconds: progress resolution
CATCH_UP = 0.1  # seconds of a stall the sender may make up for


def recv(addr: str, port: int, timeout: float) -> dict[str, Any]:
    with accept_one(addr, port, timeout) as conn:
        n = 0
        t0 = time.monotonic()
        last: tuple[float, int] | None = None  # the latest read
        printed = 0.0  # wall time of the latest printed read
        while True:
            data = conn.recv(256 * 1024)
            if not data:
                break
            now = time.time()
            n += len(data)
            if last is not None and now - last[0] >= SLOT and last[0] > printed:
                report({"t": last[0], "bytes": last[1]})  # a silence ends: its start too
            if last is None or now - last[0] >= SLOT or now - printed >= SLOT:
                report({"t": now, "bytes": n})
                printed = now
            last = (now, n)
    return {"bytes": n, "seconds": time.monotonic() - t0}


def send(addr: str, port: int, rate: float, seconds: float, timeout: float) -> dict[str, Any]:
    chunk = bytes(range(256)) * (CHUNK // 256)
    interval = CHUNK / rate
    n = 0
    with socket.create_connection((addr, port), timeout=timeout) as s:
        t0 = time.monotonic()
        due = t0
        while (now := time.monotonic()) - t0 < seconds:
            if due > now:
                time.sleep(due - now)
            s.sendall(chunk)
            n += CHUNK
            due = max(due + interval, time.monotonic() - CATCH_UP)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # wait for the receiver's close, so every byte was delivered
    return {"bytes": n, "seconds": time.monotonic() - t0}


def _recv_args(p: argparse.ArgumentParser) -> None:
    endpoint(p)
    p.add_argument("--timeout", type=float, default=60, help="seconds any accept or read may take")


def _send_args(p: argparse.ArgumentParser) -> None:
    _recv_args(p)
    p.add_argument("--rate", type=float, required=True, help="bytes per second")
    p.add_argument("--seconds", type=float, required=True)


def main(argv: list[str] | None = None) -> int:
    return cli("tcpgap", {
        "recv": (_recv_args, lambda a: recv(a.addr, a.port, a.timeout)),
        "send": (_send_args, lambda a: send(a.addr, a.port, a.rate, a.seconds, a.timeout)),
    }, argv)


if __name__ == "__main__":
    sys.exit(main())
