"""Attacker's tools for the tunnel security tests, run inside a lab namespace.

  python -m lab.progs.attack udp DST PORT HEXFILE [--sport N] [--src ADDR] [--repeat N]
      send every payload in HEXFILE (one hex string a line, an empty line is an empty datagram) as one
      UDP datagram to DST:PORT from a plain socket; with --drain S, then count the datagrams that come
      back until none has for S seconds; prints {"sent": n, "received": m}
  python -m lab.progs.attack inject DEV SRC DST [--count N]
      write N ICMPv6 echo requests SRC -> DST straight into the device DEV (an AF_PACKET socket, so the
      kernel's routing and source-address selection are bypassed: whatever SRC says is what the
      tunnel daemon reads from its TUN); prints {"sent": n}

`lab.progs.run(lab, host, "attack", ...)` runs it and returns the report. Only addresses inside the
lab's namespaces are ever passed as targets.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from lab.progs import cli

ETH_P_IPV6 = 0x86DD


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def icmpv6_echo(src: str, dst: str, ident: int, seq: int, data: bytes = b"tunneld-spoof") -> bytes:
    """A complete IPv6 packet carrying an ICMPv6 echo request, checksum included."""
    s = ipaddress.IPv6Address(src).packed
    d = ipaddress.IPv6Address(dst).packed
    body = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + data
    pseudo = s + d + struct.pack("!I3xB", len(body), 58)
    csum = checksum(pseudo + body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    header = struct.pack("!IHBB", 6 << 28, len(body), 58, 64) + s + d
    return header + body


def _cmd_udp(a: argparse.Namespace) -> dict[str, Any]:
    lines = Path(a.hexfile).read_text().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    payloads = [bytes.fromhex(line) for line in lines]
    fam = socket.AF_INET6 if ":" in a.dst else socket.AF_INET
    n = 0
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        if a.src or a.sport:
            s.bind((a.src or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), a.sport))
        for _ in range(a.repeat):
            for p in payloads:
                s.sendto(p, (a.dst, a.port))
                n += 1
        got = 0
        if a.drain > 0:
            s.settimeout(a.drain)
            with contextlib.suppress(TimeoutError):
                while True:
                    s.recv(65535)
                    got += 1
    return {"sent": n, "received": got}


def _cmd_inject(a: argparse.Namespace) -> dict[str, Any]:
    with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IPV6)) as s:
        for i in range(a.count):
            s.sendto(icmpv6_echo(a.src, a.dst, 0x5EED, i + 1), (a.dev, ETH_P_IPV6))
    return {"sent": a.count}


def _udp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("hexfile")
    p.add_argument("--sport", type=int, default=0)
    p.add_argument("--src", default="")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--drain", type=float, default=0.0,
                   help="then count what comes back until nothing has for this many seconds")


def _inject_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dev")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--count", type=int, default=1)


def main(argv: list[str] | None = None) -> int:
    return cli("attack", {"udp": (_udp_args, _cmd_udp), "inject": (_inject_args, _cmd_inject)}, argv)


if __name__ == "__main__":
    sys.exit(main())
