"""Scale: one `tunneld up` daemon with many peers (`python -m bench.throughput scale`).

In one lab (a and b on a veth, as bench/e2e.py, and a host `sim` on a second link of b), b first runs
with a as its only peer: its RSS, and one iperf3 TCP stream a -> b. Then b restarts with N more
[[peer]] entries (keys generated here, the config validated by tunneld's own loader), and one process
in `sim` plays all N peers (`python -m bench.scale peers SPEC`): one Handshaker and one UDP socket per
peer, each from its own address of 10.77.0.0/16 (so the daemon's per-source limits see N devices, as
they would), initiating to b at `rate` per second, retrying and answering cookies as tunneld does, then
confirming each session and sending a keepalive every `keepalive` seconds. Reported: b's RSS (VmRSS,
VmHWM) with one peer, with N configured and after the N handshakes; the time from the first initiation
to the last completed handshake, completions, failures, b's CPU seconds meanwhile and what its
handshake defences did; then the same TCP stream while the N sessions stay live, beside the first.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import heapq
import json
import os
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tunneld.crypto.esp import NH_NONE, SecurityAssociation
from tunneld.crypto.noise import public_key
from tunneld.proto import constants as C
from tunneld.proto import handshake as hs

SIM_NET = "10.77.0.0/16"  # RFC 1918: the simulated peers' addresses, inside the lab's namespaces only
SIM_LINK = ("198.51.100.1", "198.51.100.2")  # b and sim on their link (RFC 5737)
MAX_PEERS = 65_000  # addresses in SIM_NET
PEER_NAME = "sim{}"
RECV_BATCH = 64  # datagrams read from one ready socket per turn


# -- pure helpers (tests/unit/test_bench_scale.py) ------------------------------------------------

def source_address(i: int) -> str:
    """The i-th simulated source address (0-based) in SIM_NET: 10.77.0.1, 10.77.0.2, ..."""
    if not 0 <= i < MAX_PEERS:
        raise ValueError(f"source index {i} outside 0..{MAX_PEERS - 1}")
    host = i + 1
    return f"10.77.{host >> 8}.{host & 0xFF}"


def generate_keys(n: int, rand: Callable[[int], bytes] = os.urandom) -> list[tuple[bytes, bytes]]:
    """n (private, public) X25519 key pairs."""
    out = []
    for _ in range(n):
        private = rand(32)
        out.append((private, public_key(private)))
    return out


def peers_toml(publics: Sequence[bytes]) -> str:
    """[[peer]] tables for the simulated peers, without endpoints: they contact the daemon."""
    return "".join(f'\n[[peer]]\nname = "{PEER_NAME.format(i)}"\n'
                   f'public_key = "{base64.b64encode(k).decode()}"\n' for i, k in enumerate(publics))


def parse_proc_status(text: str) -> dict[str, int]:
    """VmRSS and VmHWM in bytes from /proc/PID/status (fields missing from the text are left out)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    return out


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a live process, in bytes."""
    got = parse_proc_status(Path(f"/proc/{pid}/status").read_text())
    if set(got) != {"VmRSS", "VmHWM"}:
        raise ValueError(f"/proc/{pid}/status has no VmRSS/VmHWM (a kernel thread or a zombie?)")
    return got


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

    def deadline(self) -> float | None:
        times = [t for t in (self.start_at, self.retry_at, self.keepalive_at) if t is not None]
        if self.session_at is not None and self.retry_at is None:
            times.append(self.session_at + C.REKEY_AFTER_TIME)
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
        elif (self.session_at is not None and self.retry_at is None
              and now >= self.session_at + C.REKEY_AFTER_TIME):
            out.append(self._initiate(now, wall))  # renew; the old session carries on meanwhile
        if self.outbound is not None and self.keepalive_at is not None and now >= self.keepalive_at:
            out.append(self.outbound.seal(b"", next_header=NH_NONE))
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
               rate: float, start: float, rand: Callable[[int], bytes] = os.urandom) -> list[SimPeer]:
    """The simulated peers, the i-th first initiating at start + i / rate (all at once if rate <= 0)."""
    return [SimPeer(i, hs.Handshaker(p, psk, {server_public}, rand=rand), server_public, suite, keepalive,
                    start + (i / rate if rate > 0 else 0.0), random.Random(rand(16)))
            for i, p in enumerate(privates)]


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
                       spec["suite"], float(spec["keepalive"]), float(spec["rate"]), start)
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
               timeout: float) -> None:
    """The simulated peers' instructions, private keys included: a file only its owner may read."""
    spec = {"server": list(server), "server_public": server_public, "psk": psk.hex(), "suite": suite,
            "keepalive": keepalive, "rate": rate, "timeout": timeout, "sources": list(sources),
            "privates": [k.hex() for k in privates]}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)


# -- the benchmark (root) -------------------------------------------------------------------------

@dataclass
class Settings:
    """How big and how long; `quick` is the test's."""

    peers: int = 1000
    duration: int = 10  # seconds per iperf3 run
    runs: int = 3  # runs with and without the peers
    rate: float = 200.0  # first initiations per second (0: all at once)
    keepalive: float = 25.0  # seconds between a simulated peer's keepalives (WireGuard's usual setting)
    sources: int = 0  # distinct source addresses (0: one per peer)
    timeout: float = 120.0  # seconds the handshakes may take

    @classmethod
    def quick(cls) -> Settings:
        return cls(peers=100, duration=2, runs=1, timeout=30.0)


def _tunneld_setup(lab: Any, a: Any, b: Any, rec: Any) -> Any:
    from bench.e2e import Setup
    from lab.tunnel import IFNAME

    setup = Setup(server_addr=b.ula, interfaces=[IFNAME], tunnel_if=IFNAME)
    for side, n in (("a", a), ("b", b)):
        assert n.proc is not None
        setup.daemons[side], setup.logs[side] = n.proc, n.log
        if n.proc.pid not in rec.pids:
            rec.pids.append(n.proc.pid)
    return setup


def _streams(lab: Any, a: Any, b: Any, rec: Any, work: Path, s: Settings, log: Callable[[str], None],
             what: str) -> list[dict[str, Any]]:
    from bench.e2e import iperf_once

    setup = _tunneld_setup(lab, a, b, rec)
    out = []
    for i in range(s.runs):
        r = iperf_once(lab, a.host, b.host, setup, rec, s.duration, 1, work)
        log(f"[scale] {what}, run {i + 1}/{s.runs}: {r['gbps']:.3f} Gb/s, {r['retransmits']} retransmits, "
            f"daemon cores a={r['cpu']['a']:.2f} b={r['cpu']['b']:.2f}")
        out.append(r)
    return out


def _stream_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    g = [x["gbps"] for x in samples]
    return {"gbps_median": statistics.median(g), "gbps_min": min(g), "gbps_max": max(g),
            "retransmits_median": statistics.median(x["retransmits"] for x in samples),
            "cpu_b_median": statistics.median(x["cpu"]["b"] for x in samples), "samples": samples}


def run_scale(s: Settings, tunneld: Path, work: Path, log: Callable[[str], None],
              info: dict[str, Any]) -> dict[str, Any]:
    """The whole row in one lab (files in `work`); `info` gets the lab id, namespaces and every PID."""
    from bench.e2e import _ping_until
    from bench.procs import Recorder, log_tail, tree_cpu_seconds
    from lab import progs
    from lab.netns import Lab, LabError
    from lab.topology import two_hosts
    from lab.tunnel import Node, setup_pair, start, status
    from tunneld.config import load_account_secret, load_config
    from tunneld.crypto.kdf import derive_psk

    if not 1 <= s.peers <= MAX_PEERS:
        raise ValueError(f"peers must be 1..{MAX_PEERS}")
    rec = Recorder()
    result: dict[str, Any] = {"settings": s.__dict__.copy(), "cpu_count": os.cpu_count()}
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab())
        info.update(lab_id=lab.id, pids=rec.pids)
        ha, hb = two_hosts(lab)
        sim = lab.host("sim")
        info["namespaces"] = [h.netns for h in lab.hosts]
        lab.veth(hb, "eth1", sim, "eth0")
        lab.addr(hb, "eth1", f"{SIM_LINK[0]}/24")
        lab.addr(sim, "eth0", f"{SIM_LINK[1]}/24")
        lab.ip(sim, "route", "add", "local", SIM_NET, "dev", "lo")  # any address of it may be bound
        lab.ip(hb, "route", "add", SIM_NET, "via", SIM_LINK[1])
        a, b = (Node(h, work / h.name, h.addr4, exe=str(tunneld)) for h in (ha, hb))
        setup_pair(lab, a, b)
        base_config = b.config.read_text()

        def up(n: Node) -> None:
            start(lab, n, timeout=60)
            assert n.proc is not None
            rec.pids.append(n.proc.pid)

        def pings() -> None:  # b first: a restarted b initiates, so a need not wait out its old session
            watch = [(n.proc, f"tunneld in {n.host.name}", n.log) for n in (a, b) if n.proc is not None]
            _ping_until(lab, hb, a.ula, 30, "tunneld ping6 b -> a", watch)
            _ping_until(lab, ha, b.ula, 30, "tunneld ping6 a -> b", watch)

        log(f"[scale] lab {lab.id}: b with one peer")
        up(a)
        up(b)
        pings()
        assert a.proc is not None and b.proc is not None
        result["rss_a_one_peer"] = memory(a.proc.pid)
        result["rss_one_peer"] = memory(b.proc.pid)
        without = _streams(lab, a, b, rec, work, s, log, "one stream, b with one peer")

        log(f"[scale] b restarts with {s.peers} more peers")
        keys = generate_keys(s.peers)
        b.config.write_text(base_config + peers_toml([pub for _, pub in keys]))
        config = load_config(b.config)  # validated as `tunneld up` will
        if len(config.peers) != s.peers + 1:
            raise LabError(f"{b.config} has {len(config.peers)} peers, not {s.peers + 1}")
        lab.stop(b.proc)
        t0 = time.monotonic()
        up(b)
        result["start_seconds"] = time.monotonic() - t0
        pings()
        assert b.proc is not None
        result["rss_configured"] = memory(b.proc.pid)

        secret = load_account_secret(work / "secret")
        sources = [source_address(i) for i in range(s.sources or s.peers)]
        spec = work / "peers.json"
        write_spec(spec, [priv for priv, _ in keys], sources, (SIM_LINK[0], b.port), b.public_key,
                   derive_psk(secret, config.account.domain), config.interface.suite, s.keepalive, s.rate,
                   s.timeout)
        cpu0 = tree_cpu_seconds(b.proc.pid)
        sim_log = work / "peers.log"
        with sim_log.open("w") as errf:
            sim_proc = lab.spawn(sim, [sys.executable, "-m", "bench.scale", "peers", str(spec)],
                                 cwd=progs.REPO, stdout=subprocess.PIPE, stderr=errf, text=True)
        rec.pids.append(sim_proc.pid)
        lines = progs.Lines(sim_proc)
        try:
            ready = lines.until(lambda o: o.get("phase") == "ready", s.timeout + 60)
        except (TimeoutError, EOFError) as e:
            raise LabError(f"the simulated peers did not report: {e}; {log_tail(sim_log)}") from None
        result["handshake_cpu_seconds"] = tree_cpu_seconds(b.proc.pid) - cpu0
        result["handshakes"] = ready
        result["rss_after_handshakes"] = memory(b.proc.pid)
        st = status(b)
        peers = [p for p in st["peers"] if p["name"].startswith("sim")]
        result["daemon_peers_with_session"] = sum(1 for p in peers if p.get("session_age") is not None)
        result["handshake_load"] = st["counters"]["handshake_load"]
        result["handshake_drops"] = st["counters"]["handshake_drops"]
        log(f"[scale] {ready['completed']}/{s.peers} handshakes in {ready['seconds'] or 0:.2f} s; "
            f"the daemon holds {result['daemon_peers_with_session']} sessions")

        with_peers = _streams(lab, a, b, rec, work, s, log, f"one stream, b with {s.peers} idle peers")
        result["rss_after_streams"] = memory(b.proc.pid)
        st = status(b)
        result["daemon_peers_with_session_after"] = sum(
            1 for p in st["peers"] if p["name"].startswith("sim") and p.get("session_age") is not None)
        sim_proc.send_signal(signal.SIGTERM)
        try:
            result["peers_done"] = lines.until(lambda o: o.get("phase") == "done", 15)
        except (TimeoutError, EOFError) as e:
            raise LabError(f"the simulated peers did not finish: {e}; {log_tail(sim_log)}") from None
        lab.stop(sim_proc)
    result["stream_one_peer"] = _stream_summary(without)
    result["stream_idle_peers"] = _stream_summary(with_peers)
    base = result["stream_one_peer"]["gbps_median"]
    result["stream_ratio"] = result["stream_idle_peers"]["gbps_median"] / base if base > 0 else None
    return result


# -- output and command line ----------------------------------------------------------------------

def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def print_table(r: dict[str, Any], out: TextIO = sys.stdout) -> None:
    s, h = r["settings"], r["handshakes"]
    n = s["peers"]
    print(f"Scale: tunneld in b with {n} simulated peers (one process in a namespace, one UDP socket and "
          f"source address each, first initiations at {s['rate']:g}/s); {r['cpu_count']} CPUs", file=out)
    print("| b's memory                      | VmRSS MiB | VmHWM MiB |", file=out)
    print("|---------------------------------|----------:|----------:|", file=out)
    for key, label in (("rss_one_peer", "one peer"), ("rss_configured", f"{n} more peers configured"),
                       ("rss_after_handshakes", f"after {h['completed']} handshakes"),
                       ("rss_after_streams", "after the streams")):
        m = r[key]
        print(f"| {label:<31} | {_mb(m['VmRSS']):>9} | {_mb(m['VmHWM']):>9} |", file=out)
    load = r["handshake_load"]
    secs = f"{h['seconds']:.2f}" if h["seconds"] is not None else "-"
    rate = f"{h['handshakes_per_s']:.0f}" if h["handshakes_per_s"] else "-"
    wait = f"{h['median_wait_s']:.2f}" if h["median_wait_s"] is not None else "-"
    print("\n| handshakes | completed | failed | seconds | per s | median wait s | b CPU s | initiations "
          "| cookies | under load | b drops |", file=out)
    print("|-----------:|----------:|-------:|--------:|------:|--------------:|--------:|------------:"
          "|--------:|-----------:|--------|", file=out)
    drops = ", ".join(f"{k} {v}" for k, v in sorted(r["handshake_drops"].items())) or "none"
    print(f"| {n:>10} | {h['completed']:>9} | {h['failed']:>6} | {secs:>7} | {rate:>5} | {wait:>13} | "
          f"{r['handshake_cpu_seconds']:>7.2f} | {h['initiations']:>11} | {h['cookies']:>7} | "
          f"{load['under_load_episodes']:>10} | {drops} |", file=out)
    print(f"b holds {r['daemon_peers_with_session']} live sessions with the simulated peers after the "
          f"handshakes, {r['daemon_peers_with_session_after']} after the streams; b started in "
          f"{r['start_seconds']:.2f} s with {n + 1} peers", file=out)
    print(f"\nOne TCP stream a -> b, iperf3 -t {s['duration']}, {s['runs']} run(s), medians (min..max)",
          file=out)
    print("| b's peers                    | Gb/s (min..max)          | retrans | CPU b |", file=out)
    print("|------------------------------|--------------------------|--------:|------:|", file=out)
    for key, label in (("stream_one_peer", "a only"), ("stream_idle_peers", f"a + {n} idle, live sessions")):
        x = r[key]
        gb = f"{x['gbps_median']:.3f} ({x['gbps_min']:.3f}..{x['gbps_max']:.3f})"
        print(f"| {label:<28} | {gb:<24} | {x['retransmits_median']:>7g} | {x['cpu_b_median']:>5.2f} |",
              file=out)
    if r["stream_ratio"] is not None:
        print(f"with idle peers / without (median Gb/s): {r['stream_ratio']:.2f}x", file=out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings()
    p.add_argument("--peers", type=int, default=d.peers, help=f"simulated peers (default {d.peers})")
    p.add_argument("--duration", type=int, default=d.duration, help="seconds per iperf3 run (default 10)")
    p.add_argument("--runs", type=int, default=d.runs,
                   help="iperf3 runs with and without the peers (default 3)")
    p.add_argument("--rate", type=float, default=d.rate,
                   help=f"first initiations per second, 0 for all at once (default {d.rate:g})")
    p.add_argument("--sources", type=int, default=d.sources,
                   help="distinct source addresses the peers share (default: one per peer)")
    p.add_argument("--keepalive", type=float, default=d.keepalive,
                   help=f"seconds between a peer's keepalives (default {d.keepalive:g})")
    p.add_argument("--tunneld", default=None, help="tunneld executable (default: <sys.prefix>/bin/tunneld)")
    p.add_argument("--quick", action="store_true", help="100 peers, one 2-second run each way: for tests")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def settings(args: argparse.Namespace) -> Settings:
    """The settings from the command line; --quick replaces the defaults, explicit flags still win."""
    base, default = (Settings.quick() if args.quick else Settings()), Settings()
    chosen = {k: getattr(args, k) for k in ("peers", "duration", "runs", "rate", "sources", "keepalive")
              if getattr(args, k) != getattr(default, k)}
    s = Settings(**{**base.__dict__, **chosen})
    if not 1 <= s.peers <= MAX_PEERS or s.duration < 1 or s.runs < 1 or s.keepalive <= 0 or s.sources < 0:
        raise ValueError(f"need 1 <= --peers <= {MAX_PEERS}, --duration and --runs >= 1, --keepalive > 0, "
                         "--sources >= 0")
    return s


def main(args: argparse.Namespace) -> int:
    """`python -m bench.throughput scale`: 0 when measured, 1 on failure, 2 on bad usage or without root."""
    if os.geteuid() != 0:
        print("bench scale: needs root (network namespaces); run it with sudo", file=sys.stderr)
        return 2
    try:
        s = settings(args)
    except ValueError as e:
        print(f"bench scale: {e}", file=sys.stderr)
        return 2
    from bench.procs import run_in_lab

    tunneld = Path(args.tunneld) if args.tunneld else Path(sys.prefix) / "bin" / "tunneld"
    info: dict[str, Any] = {}

    def work(tmp: Path) -> dict[str, Any]:
        r = run_scale(s, tunneld, tmp, lambda msg: print(msg, file=sys.stderr, flush=True), info)
        r["lab"] = info
        return r

    return run_in_lab("scale", work, args.json, print_table)


if __name__ == "__main__":
    if sys.argv[1:2] != ["peers"] or len(sys.argv) != 3:
        print("usage: python -m bench.scale peers SPEC.json (run by python -m bench.throughput scale)",
              file=sys.stderr)
        sys.exit(2)
    _report(run_peers(json.loads(Path(sys.argv[2]).read_text())))
