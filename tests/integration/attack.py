"""Attacker's tools for the tunnel security tests: run as a script inside a lab namespace, or imported
for the pcap reader and the packet builders (no third-party imports, so importing it is free).

  python -m tests.integration.attack udp DST PORT HEXFILE [--sport N] [--src ADDR] [--repeat N]
      send every payload in HEXFILE (one hex string a line, an empty line is an empty datagram) as one
      UDP datagram to DST:PORT from a plain socket; with --drain S, then count the datagrams that come
      back until none has for S seconds; prints {"sent": n, "received": m}
  python -m tests.integration.attack inject DEV SRC DST [--count N]
      write N ICMPv6 echo requests SRC -> DST straight into the device DEV (an AF_PACKET socket, so the
      kernel's routing and source-address selection are bypassed: whatever SRC says is what the
      tunnel daemon reads from its TUN); prints {"sent": n}

Imported, it also gives `attack()` (run this script in a namespace) and `capture()` (tcpdump there).
Only addresses inside the lab's namespaces are ever passed as targets.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ETH_P_IPV6 = 0x86DD
_LINKTYPE_ETHERNET = 1
_LINKTYPE_LINUX_SLL = 113


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def icmpv6_echo(src: str, dst: str, ident: int, seq: int, data: bytes = b"tunneld-spoof") -> bytes:
    """A complete IPv6 packet carrying an ICMPv6 echo request, checksum included."""
    s = ipaddress.IPv6Address(src).packed
    d = ipaddress.IPv6Address(dst).packed
    body = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + data
    pseudo = s + d + struct.pack("!I3xB", len(body), 58)
    csum = _checksum(pseudo + body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    header = struct.pack("!IHBB", 6 << 28, len(body), 58, 64) + s + d
    return header + body


def udp_payloads(pcap: Path, src: str | None = None, dport: int | None = None) -> list[bytes]:
    """UDP payloads over IPv4 in a classic pcap file (tcpdump -w), optionally filtered by source
    address and destination port, in capture order."""
    raw = pcap.read_bytes()
    if len(raw) < 24:
        return []
    magic = raw[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{pcap}: not a pcap file")
    linktype = struct.unpack_from(endian + "I", raw, 20)[0]
    off = 24
    out: list[bytes] = []
    while off + 16 <= len(raw):
        incl = struct.unpack_from(endian + "I", raw, off + 8)[0]
        frame = raw[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < incl:
            break  # a record still being written
        if linktype == _LINKTYPE_ETHERNET:
            ethertype, ip = struct.unpack_from("!H", frame, 12)[0], frame[14:]
        elif linktype == _LINKTYPE_LINUX_SLL:
            ethertype, ip = struct.unpack_from("!H", frame, 14)[0], frame[16:]
        else:
            raise ValueError(f"{pcap}: link type {linktype} not handled")
        if ethertype != 0x0800 or len(ip) < 20 or ip[9] != 17:
            continue
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        if src is not None and socket.inet_ntoa(ip[12:16]) != src:
            continue
        udp = ip[ihl:total]
        if len(udp) < 8:
            continue
        if dport is not None and struct.unpack_from("!H", udp, 2)[0] != dport:
            continue
        out.append(bytes(udp[8:]))
    return out


def is_esp(payload: bytes) -> bool:
    """RFC 3948 classification: more than 8 bytes and a non-zero SPI (not the non-ESP marker)."""
    return len(payload) > 8 and payload[:4] != b"\0\0\0\0"


SCRIPT = str(Path(__file__).resolve())


def attack(lab: Any, host: Any, *args: str, timeout: float = 30) -> dict[str, Any]:
    """Run this script in `host`'s namespace (a tools.lab Lab and Host); returns its JSON report."""
    r = lab.run(host, [sys.executable, SCRIPT, *args], timeout=timeout)
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


@contextlib.contextmanager
def capture(lab: Any, host: Any, pcap: Path, bpf: str = "udp port 4500",
            iface: str = "eth0") -> Iterator[None]:
    """tcpdump on `iface` in `host`'s namespace, writing every packet to `pcap` as it arrives (-U);
    ready when tcpdump says it is listening, ended by PID (SIGINT) when the block exits."""
    from tools.lab import LabError, wait_for

    log = pcap.with_suffix(".tcpdump.log")
    with open(log, "wb") as f:  # the child keeps its own copy of the fd
        p = lab.spawn(host, ["tcpdump", "-Z", "root", "-i", iface, "-U", "-n", "-w", str(pcap), bpf],
                      stdout=subprocess.DEVNULL, stderr=f)

    def listening() -> bool:
        if p.poll() is not None:
            raise LabError(f"tcpdump exited with {p.returncode}: {log.read_text()[-2000:]}")
        return "listening on" in log.read_text()
    try:
        wait_for(listening, timeout=10, what="tcpdump to listen")
        yield
    finally:
        lab.stop(p, signal.SIGINT)


def _cmd_udp(a: argparse.Namespace) -> int:
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
    print(json.dumps({"sent": n, "received": got}), flush=True)
    return 0


def _cmd_inject(a: argparse.Namespace) -> int:
    with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IPV6)) as s:
        for i in range(a.count):
            s.sendto(icmpv6_echo(a.src, a.dst, 0x5EED, i + 1), (a.dev, ETH_P_IPV6))
    print(json.dumps({"sent": a.count}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attack")
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("udp")
    u.add_argument("dst")
    u.add_argument("port", type=int)
    u.add_argument("hexfile")
    u.add_argument("--sport", type=int, default=0)
    u.add_argument("--src", default="")
    u.add_argument("--repeat", type=int, default=1)
    u.add_argument("--drain", type=float, default=0.0,
                   help="then count what comes back until nothing has for this many seconds")
    u.set_defaults(func=_cmd_udp)
    i = sub.add_parser("inject")
    i.add_argument("dev")
    i.add_argument("src")
    i.add_argument("dst")
    i.add_argument("--count", type=int, default=1)
    i.set_defaults(func=_cmd_inject)
    a = p.parse_args(argv)
    return int(a.func(a))


if __name__ == "__main__":
    sys.exit(main())
