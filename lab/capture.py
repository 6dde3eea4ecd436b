"""Packet capture in a lab namespace (tcpdump) and a reader for what it wrote.

`capture()` runs tcpdump while a block runs; `udp_payloads()` reads the UDP payloads back out of the
classic pcap file (stdlib only), and `is_esp()` tells ESP from the non-ESP marker (RFC 3948).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from lab.netns import Host, Lab, LabError, wait_for

_LINKTYPE_ETHERNET = 1
_LINKTYPE_LINUX_SLL = 113


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


@contextlib.contextmanager
def capture(lab: Lab, host: Host, pcap: Path, bpf: str = "udp port 4500",
            iface: str = "eth0") -> Iterator[None]:
    """tcpdump on `iface` in `host`'s namespace, writing every packet to `pcap` as it arrives (-U);
    ready when tcpdump says it is listening, ended by PID (SIGINT) when the block exits."""
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
