"""The simulated peer set of the scale benchmark (bench/scale.py): many devices in one process.

Each `SimPeer` is one device: its own key and `Handshaker`, initiating to one server (a `tunneld up`
daemon), retrying after REKEY_TIMEOUT plus jitter and at once on a cookie as tunneld does, confirming the
session with a keepalive and sending one every `keepalive` seconds after. `SimPeer` is sans I/O (the
unit tests drive it against an in-memory responder); `run_peers` plays them all over one UDP socket each,
as `python -m bench.scale_peers SPEC.json` inside the benchmark's namespace, and prints JSON lines.
"""

from __future__ import annotations

import base64
import heapq
import json
import os
import random
import selectors
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunneld.crypto.esp import NH_NONE, SecurityAssociation
from tunneld.proto import constants as C
from tunneld.proto import handshake as hs

RECV_BATCH = 64  # datagrams read from one ready socket per turn


# -- the simulated peers (sans I/O) ---------------------------------------------------------------

@dataclass
class SimPeer:
    """One simulated device: initiates to the server, retries after REKEY_TIMEOUT (plus jitter) as
    tunneld does, retries at once on a cookie, confirms a session with a keepalive, then sends one every
    `keepalive` seconds and renews the session after REKEY_AFTER_TIME. `due` and `receive` return the
    UDP payloads to send to the server."""

    index: int
    handshaker: hs.Handshaker
    server_public: bytes
    suite: str
    keepalive: float
    start_at: float | None  # when to send the first initiation
    jitter: random.Random
    retry_at: float | None = None
    keepalive_at: float | None = None
    session_at: float | None = None
    outbound: SecurityAssociation | None = None
    first_sent: float | None = None
    completed: float | None = None  # when the first handshake completed
    initiations: int = 0
    cookies: int = 0
    handshakes: int = 0
    keepalives: int = 0
    rx_esp: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    scheduled: float | None = None  # the deadline the I/O loop has queued for this peer

    def setup(self, private: bytes) -> None:
        """What a subclass needs beyond the Handshaker (bench/scale_wg.py: the key itself)."""

    def renewal_at(self) -> float | None:
        """When the session is to be renewed (REKEY_AFTER_TIME after it began), unless a retry is pending."""
        if self.session_at is not None and self.retry_at is None:
            return self.session_at + C.REKEY_AFTER_TIME
        return None

    def has_session(self) -> bool:
        return self.outbound is not None

    def keepalive_payload(self) -> bytes:
        """An authenticated empty packet on the current session (the ESP dummy, next header 59)."""
        assert self.outbound is not None
        return self.outbound.seal(b"", next_header=NH_NONE)

    def deadline(self) -> float | None:
        times = [t for t in (self.start_at, self.retry_at, self.keepalive_at, self.renewal_at())
                 if t is not None]
        return min(times) if times else None

    def _initiate(self, now: float, wall: float) -> bytes:
        payload, _ = self.handshaker.initiate(self.server_public, now, wall)
        self.initiations += 1
        if self.first_sent is None:
            self.first_sent = now
        self.retry_at = now + C.REKEY_TIMEOUT + self.jitter.uniform(0, C.REKEY_TIMEOUT_JITTER_MAX)
        return payload

    def due(self, now: float, wall: float) -> list[bytes]:
        out = []
        if self.start_at is not None and now >= self.start_at:
            self.start_at = None
            out.append(self._initiate(now, wall))
        elif self.retry_at is not None and now >= self.retry_at:
            out.append(self._initiate(now, wall))
        elif (renew := self.renewal_at()) is not None and now >= renew:
            out.append(self._initiate(now, wall))  # renew; the old session carries on meanwhile
        if self.has_session() and self.keepalive_at is not None and now >= self.keepalive_at:
            out.append(self.keepalive_payload())
            self.keepalives += 1
            self.keepalive_at = now + self.keepalive
        return out

    def receive(self, data: bytes, source: tuple[str, int], now: float, wall: float) -> list[bytes]:
        if data[:4] != hs.MARKER:
            self.rx_esp += 1  # the daemon's keepalives: nothing to answer
            return []
        event = self.handshaker.receive(data[4:], source, now)
        if isinstance(event, hs.ResponseReceived):
            self.outbound, _inbound = event.keys.security_associations(self.suite)
            self.retry_at = None
            self.session_at = now
            self.handshakes += 1
            if self.completed is None:
                self.completed = now
            self.keepalive_at = now + self.keepalive
            self.keepalives += 1
            return [self.outbound.seal(b"", next_header=NH_NONE)]  # key confirmation for the responder
        if isinstance(event, hs.CookieReceived):
            self.cookies += 1
            return [self._initiate(now, wall)] if event.retry_now else []
        if isinstance(event, hs.Dropped):
            self.drops[event.reason] = self.drops.get(event.reason, 0) + 1
        return []


def make_peers(privates: Sequence[bytes], server_public: bytes, psk: bytes, suite: str, keepalive: float,
               rate: float, start: float, rand: Callable[[int], bytes] = os.urandom,
               kind: str = "tunneld") -> list[SimPeer]:
    """The simulated peers, the i-th first initiating at start + i / rate (all at once if rate <= 0);
    `kind` "wireguard" for WireGuard's own wire (bench/scale_wg.py)."""
    cls: type[SimPeer] = SimPeer
    if kind == "wireguard":
        from bench.scale_wg import WgPeer

        cls = WgPeer
    elif kind != "tunneld":
        raise ValueError(f"unknown kind of peer {kind!r}")
    peers = [cls(i, hs.Handshaker(p, psk, {server_public}, rand=rand), server_public, suite, keepalive,
                 start + (i / rate if rate > 0 else 0.0), random.Random(rand(16)))
             for i, p in enumerate(privates)]
    for peer, private in zip(peers, privates, strict=True):
        peer.setup(private)
    return peers


def handshake_summary(peers: Sequence[SimPeer]) -> dict[str, Any]:
    """Completions, failures and the time from the first initiation to the last first completion."""
    done = [p.completed for p in peers if p.completed is not None]
    first = min((p.first_sent for p in peers if p.first_sent is not None), default=None)
    waits = [p.completed - p.first_sent for p in peers
             if p.completed is not None and p.first_sent is not None]
    drops: dict[str, int] = {}
    for p in peers:
        for k, v in p.drops.items():
            drops[k] = drops.get(k, 0) + v
    seconds = max(done) - first if done and first is not None else None
    return {"peers": len(peers), "completed": len(done), "failed": len(peers) - len(done),
            "seconds": seconds, "handshakes_per_s": len(done) / seconds if seconds else None,
            "median_wait_s": statistics.median(waits) if waits else None,
            "initiations": sum(p.initiations for p in peers), "cookies": sum(p.cookies for p in peers),
            "drops": drops}


# -- the simulated peers' process (inside the sim namespace) ---------------------------------------

def _report(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _enough_files(n: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        want = n if hard == resource.RLIM_INFINITY else min(n, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def run_peers(spec: dict[str, Any]) -> dict[str, Any]:
    """Play every peer of `spec` (see `write_spec`) over one UDP socket each until SIGTERM: a "ready"
    line once all have completed a handshake (or `timeout` passed), a "done" line with the totals last."""
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    server = (str(spec["server"][0]), int(spec["server"][1]))
    sources = list(spec["sources"])
    privates = [bytes.fromhex(k) for k in spec["privates"]]
    _enough_files(len(privates) + 64)
    start = time.monotonic() + 0.05
    peers = make_peers(privates, base64.b64decode(spec["server_public"]), bytes.fromhex(spec["psk"]),
                       spec["suite"], float(spec["keepalive"]), float(spec["rate"]), start,
                       kind=str(spec.get("kind", "tunneld")))
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    send_errors = 0
    try:
        for i, p in enumerate(peers):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.setblocking(False)
            s.bind((sources[i % len(sources)], 0))
            sel.register(s, selectors.EVENT_READ, p)
        heap: list[tuple[float, int]] = []

        def schedule(p: SimPeer) -> None:
            d = p.deadline()
            if d is not None and (p.scheduled is None or d < p.scheduled):
                p.scheduled = d
                heapq.heappush(heap, (d, p.index))

        def send(p: SimPeer, payloads: list[bytes]) -> None:
            nonlocal send_errors
            for payload in payloads:
                try:
                    socks[p.index].sendto(payload, server)
                except OSError:
                    send_errors += 1

        for p in peers:
            schedule(p)
        ready_sent = False
        give_up = start + float(spec["timeout"])
        while not stop:
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                t, i = heapq.heappop(heap)
                p = peers[i]
                if t != p.scheduled:
                    continue  # replaced by an earlier deadline
                p.scheduled = None
                send(p, p.due(now, time.time()))
                schedule(p)
            if not ready_sent and (all(p.completed is not None for p in peers) or now >= give_up):
                _report({"phase": "ready", **handshake_summary(peers), "send_errors": send_errors})
                ready_sent = True
            wait = min(heap[0][0] - now, 0.2) if heap else 0.2
            for key, _ in sel.select(max(wait, 0.0)):
                p = key.data
                s = socks[p.index]
                for _ in range(RECV_BATCH):
                    try:
                        data, src = s.recvfrom(2048)
                    except BlockingIOError:
                        break
                    except OSError:  # an ICMP error queued on the socket
                        continue
                    now = time.monotonic()
                    send(p, p.receive(data, src, now, time.time()))
                schedule(p)
    finally:
        sel.close()
        for s in socks:
            s.close()
    return {"phase": "done", **handshake_summary(peers), "send_errors": send_errors,
            "handshakes": sum(p.handshakes for p in peers), "keepalives": sum(p.keepalives for p in peers),
            "rx_esp": sum(p.rx_esp for p in peers)}


def write_spec(path: Path, privates: Sequence[bytes], sources: Sequence[str], server: tuple[str, int],
               server_public: str, psk: bytes, suite: str, keepalive: float, rate: float,
               timeout: float, kind: str = "tunneld") -> None:
    """The simulated peers' instructions, private keys included: a file only its owner may read."""
    spec = {"server": list(server), "server_public": server_public, "psk": psk.hex(), "suite": suite,
            "keepalive": keepalive, "rate": rate, "timeout": timeout, "sources": list(sources),
            "privates": [k.hex() for k in privates], "kind": kind}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m bench.scale_peers SPEC.json (run by python -m bench.throughput scale)",
              file=sys.stderr)
        sys.exit(2)
    _report(run_peers(json.loads(Path(sys.argv[1]).read_text())))
