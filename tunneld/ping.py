"""`tunneld ping PEER`: authenticated probes through the tunnel, each with its path and round trip.

A probe is an ICMPv6 echo request to the peer's ULA: it leaves through the TUN, so ESP carries and
authenticates it both ways, and the echo reply proves the peer itself answered (a relay or a NAT cannot
forge it). After each reply the daemon's control socket says which path the peer is on (direct to an
endpoint, or relayed via a relay), as `tailscale ping` prints "via DERP" or "via IP:port". The path's
wording is shared with `tunneld status` (`path_line`).
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

ECHO_REQUEST, ECHO_REPLY = 128, 129  # RFC 4443 §4.1, §4.2
MAX_COUNT = 1000
MAX_WAIT = 30.0  # seconds, the longest a probe may wait for its reply


class PingError(Exception):
    """The peer is unknown, or probes cannot be sent (one line, with the fix)."""


@dataclass(frozen=True)
class Target:
    name: str
    ula: str


class Prober(Protocol):
    def probe(self, seq: int, timeout: float) -> float | None:
        """Send probe ``seq``; the round trip in seconds, or None without a reply within ``timeout``."""
        ...

    def close(self) -> None: ...


def find_peer(status: dict[str, Any], which: str) -> Target:
    """The peer ``which`` in a status reply: its name (any case, or NAME.DOMAIN) or its ULA."""
    peers = status.get("peers") or []
    try:
        address: ipaddress.IPv6Address | None = ipaddress.IPv6Address(which)
    except ValueError:
        address = None
    label = which.rstrip(".").split(".", 1)[0].lower()
    for p in peers:
        name, ula = str(p.get("name", "")), str(p.get("ula", ""))
        if (address is not None and ipaddress.IPv6Address(ula) == address) or \
                (address is None and name.lower() == label):
            return Target(name, ula)
    known = ", ".join(sorted(str(p.get("name")) for p in peers)) or "none yet"
    raise PingError(f"no peer {which!r}; known peers: {known} (see `tunneld status`)")


def path_text(peer: dict[str, Any]) -> str:
    """"direct 198.51.100.2:4500" or "relay via 203.0.113.9:3478": a peer's path in a status reply."""
    if peer.get("path") == "relay" and peer.get("relay"):
        return f"relay via {peer['relay']}"
    return f"direct {peer.get('endpoint') or '(no endpoint)'}"


def path_line(peer: dict[str, Any]) -> str:
    """`tunneld status`'s line: "  path: direct 198.51.100.2:4500, for 12 s"."""
    since = peer.get("path_since")
    return f"  path: {path_text(peer)}" + (f", for {since:g} s" if since is not None else "")


def describe_path(status: dict[str, Any], target: Target) -> str:
    """The path of the peer ``target`` in a status reply."""
    for p in status.get("peers") or []:
        if p.get("name") == target.name:
            return path_text(p)
    return "(peer gone)"


class IcmpProber:
    """ICMPv6 echo to one address: an unprivileged ping socket if the system allows, else a raw socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ident = os.getpid() & 0xFFFF
        self.token = os.urandom(8)
        try:
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6)
            self.raw = False
        except OSError:
            try:
                self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            except OSError as e:
                raise PingError(f"cannot open an ICMPv6 socket: {e.strerror or e}; run as root, or allow "
                                f"ping sockets (sysctl net.ipv4.ping_group_range)") from None
            self.raw = True

    def probe(self, seq: int, timeout: float) -> float | None:
        payload = struct.pack("!d", time.monotonic()) + self.token
        request = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, self.ident, seq & 0xFFFF) + payload
        sent = time.monotonic()
        try:
            self.sock.sendto(request, (self.address, 0))
        except OSError as e:
            raise PingError(f"cannot send to {self.address}: {e.strerror or e}; "
                            f"is `tunneld up` running?") from None
        deadline = sent + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                break
            data, source = self.sock.recvfrom(2048)
            if self._matches(data, source, seq):
                return time.monotonic() - sent
        return None

    def _matches(self, data: bytes, source: Any, seq: int) -> bool:
        if len(data) < 8 + 16 or data[0] != ECHO_REPLY:
            return False
        if ipaddress.IPv6Address(source[0].split("%", 1)[0]) != ipaddress.IPv6Address(self.address):
            return False
        ident, got_seq = struct.unpack("!HH", data[4:8])
        # A ping socket rewrites the identifier to its own port; a raw socket sees everyone's replies.
        return got_seq == seq & 0xFFFF and data[16:24] == self.token and (not self.raw or ident == self.ident)

    def close(self) -> None:
        self.sock.close()


def check_arguments(count: int, interval: float, timeout: float) -> str | None:
    """What is wrong with the arguments, as one line with the fix; None if nothing."""
    if not 1 <= count <= MAX_COUNT:
        return f"bad -c {count}: give 1 to {MAX_COUNT} probes"
    if not 0.1 <= timeout <= MAX_WAIT:
        return f"bad --timeout {timeout:g}: give 0.1 to {MAX_WAIT:g} seconds"
    if not 0.0 <= interval <= MAX_WAIT:
        return f"bad --interval {interval:g}: give 0 to {MAX_WAIT:g} seconds"
    return None


def run(which: str, count: int, interval: float, timeout: float, ask: Callable[[], dict[str, Any] | None],
        prober_for: Callable[[str], Prober] = IcmpProber, write: Callable[[str], None] = print,
        sleep: Callable[[float], None] = time.sleep) -> int:
    """Ping the peer ``count`` times; prints one line per probe and a summary. 0 if any reply came, 1 if
    none (or the daemon does not answer: ``ask`` gives None, having said why)."""
    status = ask()
    if status is None:
        return 1
    target = find_peer(status, which)
    prober = prober_for(target.ula)
    replies: list[float] = []
    try:
        for seq in range(1, count + 1):
            rtt = prober.probe(seq, timeout)
            path = describe_path(ask() or {}, target)
            if rtt is None:
                write(f"timeout from {target.name} ({target.ula}), {path}, after {timeout:g} s")
            else:
                replies.append(rtt)
                write(f"pong from {target.name} ({target.ula}), {path}, in {rtt * 1000:.1f} ms")
            if seq < count:
                sleep(interval)
    finally:
        prober.close()
    summary = f"{len(replies)}/{count} replies"
    if replies:
        summary += f", round trip min/avg/max {min(replies) * 1000:.1f}/" \
                   f"{sum(replies) / len(replies) * 1000:.1f}/{max(replies) * 1000:.1f} ms"
    write(summary)
    return 0 if replies else 1

