"""Checked UDP and ICMPv6 traffic between lab nodes, to run beside TCP streams (tools/tcpblast.py).

  python -m tools.traffic udp-recv ADDR PORT [--timeout S]
      bind ADDR:PORT, print {"listening": true}, then check every datagram until the sender's end
      marker (or --timeout seconds without any datagram); prints one JSON report
  python -m tools.traffic udp-send ADDR PORT [--count N] [--rate R]
      send N numbered datagrams, R a second (paced on an absolute schedule), then end markers;
      prints {"sent": n, "bytes": b, "seconds": t}

Every datagram is a header (magic, sequence number, length) and a body that both ends derive from the
sequence number, so the receiver checks each one byte for byte: a truncated, corrupted, misdelivered
or duplicated datagram is counted as such, not just as "something arrived". Sizes vary from a few
bytes to the most a 1400-byte tunnel MTU carries unfragmented (1352), and every FRAG_EVERY-th datagram
is larger than the MTU, so the kernel sends it as IPv6 fragments through the tunnel.

Imported, `UdpFlow` and `Ping` start the two ends in lab namespaces (ended by PID when the lab closes)
and return their reports. Only addresses inside the lab's namespaces are ever passed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

MAGIC = b"TDUD"
END = b"TDEN"
_HDR = struct.Struct("!4sQI")  # magic, sequence number, total length
MAX_UNFRAGMENTED = 1400 - 40 - 8  # tunnel MTU (tools/tunnel.py) - IPv6 header - UDP header
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
        print(json.dumps({"listening": True}), flush=True)
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


class UdpFlow:
    """A checked UDP flow from one lab node to another's ULA, run in the background."""

    def __init__(self, lab: Any, src: Any, dst: Any, port: int = 6001, count: int = 2000,
                 rate: float = 1000, timeout: float = 10) -> None:
        self.count = count
        self.receiver = lab.spawn(dst.host, [sys.executable, "-m", "tools.traffic", "udp-recv", dst.ula,
                                             str(port), "--timeout", str(timeout)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert self.receiver.stdout is not None
        line = self.receiver.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"udp receiver did not start: {line!r} {self.receiver.stderr.read()!r}")
        self.sender = lab.spawn(src.host, [sys.executable, "-m", "tools.traffic", "udp-send", dst.ula,
                                           str(port), "--count", str(count), "--rate", str(rate)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)

    def result(self, timeout: float = 60) -> tuple[dict[str, Any], dict[str, Any]]:
        """(sender's report, receiver's report); raises if either failed or did not finish in time."""
        out, err = self.sender.communicate(timeout=timeout)
        if self.sender.returncode != 0:
            raise RuntimeError(f"udp sender failed ({self.sender.returncode}): {err[-2000:]}")
        rout, rerr = self.receiver.communicate(timeout=timeout)
        if self.receiver.returncode != 0:
            raise RuntimeError(f"udp receiver failed ({self.receiver.returncode}): {rerr[-2000:]}")
        return json.loads(out), json.loads(rout)


_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


class Ping:
    """`ping -6` from one lab node to another's ULA in the background; `result()` parses its summary."""

    def __init__(self, lab: Any, src: Any, dst: Any, count: int = 100, interval: float = 0.02) -> None:
        self.proc = lab.spawn(src.host, ["ping", "-6", "-n", "-c", str(count), "-i", str(interval),
                                         "-W", "2", dst.ula],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self, timeout: float = 60) -> tuple[int, int]:
        """(transmitted, received)."""
        out, err = self.proc.communicate(timeout=timeout)
        m = _PING_SUMMARY.search(out)
        if m is None:
            raise RuntimeError(f"ping printed no summary (exit {self.proc.returncode}): {out[-1000:]} "
                               f"{err[-1000:]}")
        return int(m.group(1)), int(m.group(2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="traffic")
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("udp-recv")
    r.add_argument("addr")
    r.add_argument("port", type=int)
    r.add_argument("--timeout", type=float, default=10, help="give up after this long without a datagram")
    s = sub.add_parser("udp-send")
    s.add_argument("addr")
    s.add_argument("port", type=int)
    s.add_argument("--count", type=int, default=2000)
    s.add_argument("--rate", type=float, default=1000, help="datagrams a second")
    a = p.parse_args(argv)
    if a.mode == "udp-recv":
        report = _recv(a.addr, a.port, a.timeout)
    else:
        report = _send(a.addr, a.port, a.count, a.rate)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
