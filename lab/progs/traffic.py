"""Checked UDP traffic between lab nodes, to run beside TCP streams (lab.progs.tcpblast).

  python -m lab.progs.traffic udp-recv ADDR PORT [--timeout S]
      bind ADDR:PORT, print {"listening": true}, then check every datagram until the sender's end
      marker (or --timeout seconds without any datagram); prints one JSON report
  python -m lab.progs.traffic udp-send ADDR PORT [--count N] [--rate R]
      send N numbered datagrams, R a second (paced on an absolute schedule), then end markers;
      prints {"sent": n, "bytes": b, "seconds": t}

Every datagram is a header (magic, sequence number, length) and a body that both ends derive from the
sequence number, so the receiver checks each one byte for byte: a truncated, corrupted, misdelivered
or duplicated datagram is counted as such, not just as "something arrived". Sizes vary from a few
bytes to the most a 1400-byte tunnel MTU carries unfragmented (1352), and every FRAG_EVERY-th datagram
is larger than the MTU, so the kernel sends it as IPv6 fragments through the tunnel.

lab.flows.UdpFlow starts the two ends in lab namespaces. Only addresses inside the lab's namespaces
are ever passed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import socket
import struct
import sys
import time
from typing import Any

from lab import progs
from lab.progs import cli, endpoint

MAGIC = b"TDUD"
END = b"TDEN"
_HDR = struct.Struct("!4sQI")  # magic, sequence number, total length
MAX_UNFRAGMENTED = 1400 - 40 - 8  # tunnel MTU (lab/tunnel.py) - IPv6 header - UDP header
FRAG_EVERY = 16
FRAG_SIZE = 2600  # two IPv6 fragments at MTU 1400
_PATTERN = hashlib.shake_256(b"tunneld traffic").digest(1 << 16)
END_MARKERS = 20


def datagram_size(seq: int) -> int:
    if seq % FRAG_EVERY == FRAG_EVERY - 1:
        return FRAG_SIZE
    return _HDR.size + (seq * 7919) % (MAX_UNFRAGMENTED - _HDR.size + 1)


def datagram(seq: int) -> bytes:
    """Datagram number `seq`: its header, then a slice of a fixed pattern that depends on `seq`."""
    size = datagram_size(seq)
    off = (seq * 4099) % (len(_PATTERN) - size)
    return _HDR.pack(MAGIC, seq, size) + _PATTERN[off:off + size - _HDR.size]


def _recv(addr: str, port: int, timeout: float) -> dict[str, Any]:
    seen: set[int] = set()
    report = {"received": 0, "intact": 0, "corrupt": 0, "duplicates": 0, "fragmented": 0, "bytes": 0,
              "max_seq": -1, "ended": False}
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((addr, port))
        s.settimeout(timeout)
        progs.report({"listening": True})
        with contextlib.suppress(TimeoutError):
            while True:
                data = s.recv(65535)
                if data[:4] == END:
                    report["ended"] = True
                    break
                report["received"] += 1
                if len(data) < _HDR.size:
                    report["corrupt"] += 1
                    continue
                magic, seq, size = _HDR.unpack_from(data)
                if magic != MAGIC or size != len(data) or datagram(seq) != data:
                    report["corrupt"] += 1
                    continue
                if seq in seen:
                    report["duplicates"] += 1
                    continue
                seen.add(seq)
                report["intact"] += 1
                report["bytes"] += len(data)
                report["fragmented"] += size > MAX_UNFRAGMENTED
                report["max_seq"] = max(report["max_seq"], seq)
    return report


def _send(addr: str, port: int, count: int, rate: float) -> dict[str, Any]:
    n = nbytes = 0
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        t0 = time.monotonic()
        for seq in range(count):
            due = t0 + seq / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing, not synchronisation
            d = datagram(seq)
            with contextlib.suppress(BlockingIOError, OSError):  # a full queue drops, as UDP may
                s.sendto(d, (addr, port))
                n += 1
                nbytes += len(d)
        dt = time.monotonic() - t0
        for _ in range(END_MARKERS):  # several, in case one is lost; the receiver stops at the first
            with contextlib.suppress(OSError):
                s.sendto(END, (addr, port))
            time.sleep(0.01)
    return {"sent": n, "bytes": nbytes, "seconds": dt}


def _recv_args(p: argparse.ArgumentParser) -> None:
    endpoint(p)
    p.add_argument("--timeout", type=float, default=10, help="give up after this long without a datagram")


def _send_args(p: argparse.ArgumentParser) -> None:
    endpoint(p)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--rate", type=float, default=1000, help="datagrams a second")


def main(argv: list[str] | None = None) -> int:
    return cli("traffic", {
        "udp-recv": (_recv_args, lambda a: _recv(a.addr, a.port, a.timeout)),
        "udp-send": (_send_args, lambda a: _send(a.addr, a.port, a.count, a.rate)),
    }, argv)


if __name__ == "__main__":
    sys.exit(main())
