"""What a NAT does to one UDP socket, stdlib only: the mappings it gets toward several STUN servers,
and whether two such sockets behind two NATs can reach each other by simultaneous sends.

  python -m lab.progs.punch mapping PORT SERVER:SPORT...
      From one socket bound to PORT (0: any), a STUN Binding request to each SERVER:SPORT (retried
      every 50 ms, 3 s at most); prints {"local": port, "mapped": ["addr:port", ...]} in that order.
  python -m lab.progs.punch punch PORT SERVER:SPORT SECONDS
      Prints {"observed": "addr:port"} (the socket's endpoint as the STUN server saw it), then reads
      the peer's observed endpoint as one line "addr:port" on stdin, then sends a datagram to it every
      20 ms for at most SECONDS, answering nothing; it stops 0.2 s after it has both heard the peer and
      heard that the peer heard it. Prints {"heard": n, "from": "addr:port" | null, "acked": bool,
      "after": seconds from the first send to the first datagram heard | null}.

Each datagram sent to the peer is b"punch <number heard so far>", so "acked" means the peer's counter
was above zero. The STUN requests are RFC 8489 Binding requests; only XOR-MAPPED-ADDRESS is read.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import struct
import sys
import time
from typing import Any

from lab.progs import cli, report

MAGIC_COOKIE = 0x2112A442  # RFC 8489 section 6
BINDING_REQUEST, BINDING_SUCCESS = 0x0001, 0x0101
ATTR_XOR_MAPPED_ADDRESS = 0x0020  # RFC 8489 section 14.2
STUN_TIMEOUT, STUN_RETRY, PUNCH_EVERY, LINGER = 3.0, 0.05, 0.02, 0.2


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _xor_mapped(data: bytes, txid: bytes) -> str | None:
    """The XOR-MAPPED-ADDRESS (IPv4) of a Binding success response to `txid`, else None."""
    if len(data) < 20:
        return None
    mtype, length, cookie = struct.unpack("!HHI", data[:8])
    if mtype != BINDING_SUCCESS or cookie != MAGIC_COOKIE or data[8:20] != txid:
        return None
    body, i = data[20:20 + length], 0
    while i + 4 <= len(body):
        atype, alen = struct.unpack("!HH", body[i:i + 4])
        value = body[i + 4:i + 4 + alen]
        if atype == ATTR_XOR_MAPPED_ADDRESS and alen == 8 and value[1] == 1:
            port = struct.unpack("!H", value[2:4])[0] ^ (MAGIC_COOKIE >> 16)
            addr = bytes(a ^ c for a, c in zip(value[4:8], struct.pack("!I", MAGIC_COOKIE), strict=True))
            return f"{socket.inet_ntoa(addr)}:{port}"
        i += 4 + (alen + 3) // 4 * 4
    return None


def stun(s: socket.socket, server: tuple[str, int]) -> str:
    """The socket's endpoint as `server` sees it (its XOR-MAPPED-ADDRESS)."""
    txid = os.urandom(12)
    request = struct.pack("!HHI", BINDING_REQUEST, 0, MAGIC_COOKIE) + txid
    deadline = time.monotonic() + STUN_TIMEOUT
    while time.monotonic() < deadline:
        s.sendto(request, server)
        wait_until = min(deadline, time.monotonic() + STUN_RETRY)
        while (left := wait_until - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                break
            try:
                data, src = s.recvfrom(2048)
            except ConnectionRefusedError:  # an ICMP error from an earlier send
                continue
            mapped = _xor_mapped(data, txid) if src == server else None
            if mapped is not None:
                return mapped
    raise TimeoutError(f"no STUN answer from {server[0]}:{server[1]} in {STUN_TIMEOUT} s")


def _socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    return s


def mapping(a: argparse.Namespace) -> dict[str, Any]:
    with _socket(a.port) as s:
        return {"local": s.getsockname()[1], "mapped": [stun(s, _endpoint(x)) for x in a.servers]}


def punch(a: argparse.Namespace) -> dict[str, Any]:
    with _socket(a.port) as s:
        report({"observed": stun(s, _endpoint(a.server))})
        peer = _endpoint(sys.stdin.readline().strip())
        heard, source, acked, after = 0, None, False, None
        start = time.monotonic()
        deadline, next_send = start + a.seconds, start
        while (now := time.monotonic()) < deadline:
            if now >= next_send:
                s.sendto(f"punch {heard}".encode(), peer)
                next_send = now + PUNCH_EVERY
            if not select.select([s], [], [], max(0.0, min(next_send, deadline) - now))[0]:
                continue
            try:
                data, src = s.recvfrom(2048)
            except ConnectionRefusedError:  # the peer's NAT answered an early send with ICMP
                continue
            if not data.startswith(b"punch "):
                continue
            heard += 1
            if source is None:
                source, after = f"{src[0]}:{src[1]}", round(time.monotonic() - start, 3)
            if not acked and data[6:].strip() != b"0":
                acked = True
                deadline = min(deadline, time.monotonic() + LINGER)
        return {"heard": heard, "from": source, "acked": acked, "after": after}


def _add_mapping(p: argparse.ArgumentParser) -> None:
    p.add_argument("port", type=int)
    p.add_argument("servers", nargs="+")


def _add_punch(p: argparse.ArgumentParser) -> None:
    p.add_argument("port", type=int)
    p.add_argument("server")
    p.add_argument("seconds", type=float)


if __name__ == "__main__":
    sys.exit(cli("punch", {"mapping": (_add_mapping, mapping), "punch": (_add_punch, punch)}))
