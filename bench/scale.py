"""Scale: one `tunneld up` daemon with many peers (`python -m bench.throughput scale`).

One lab: a and b on a veth (as bench/e2e.py) and a host `sim` on a second link of b. Each run restarts b
twice, in alternating order: once with a as its only peer, once with N more [[peer]] entries (keys made
here, the config checked by tunneld's own loader) while one process in `sim` plays the N devices
(bench/scale_peers.py: one Handshaker and UDP socket each, from its own address of 10.77.0.0/16, so
that b's per-source limits see N devices). Reported: b's RSS (VmRSS, VmHWM) with one peer, with N
configured, after the N handshakes and after the stream; the time from the first initiation to the last
completed handshake, failures, b's CPU seconds meanwhile and what its handshake defences did; and one
iperf3 TCP stream a -> b with and without the N live sessions beside it (the ratio is the figure).
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from bench.scale_peers import write_spec
from tunneld.crypto.noise import public_key

SIM_NET = "10.77.0.0/16"  # RFC 1918: the simulated peers' addresses, inside the lab's namespaces only
SIM_LINK = ("198.51.100.1", "198.51.100.2")  # b and sim on their link (RFC 5737)
MAX_PEERS = 65_000  # addresses in SIM_NET
PEER_NAME = "sim{}"


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


def log_problems(text: str, limit: int = 20) -> list[str]:
    """The lines of a tunneld log that report an error or a traceback (the first `limit`)."""
    bad = [line for line in text.splitlines()
           if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]
    return bad[:limit]


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a live process, in bytes."""
    got = parse_proc_status(Path(f"/proc/{pid}/status").read_text())
    if set(got) != {"VmRSS", "VmHWM"}:
        raise ValueError(f"/proc/{pid}/status has no VmRSS/VmHWM (a kernel thread or a zombie?)")
    return got


# -- the benchmark (root) -------------------------------------------------------------------------

@dataclass
class Settings:
    """How big and how long; `quick` is the test's."""

    peers: int = 1000
    duration: int = 10  # seconds per iperf3 run
    runs: int = 3  # runs with and without the peers
    rate: float = 0.0  # first initiations per second (0: all at once)
    keepalive: float = 25.0  # seconds between a simulated peer's keepalives (WireGuard's usual setting)
    sources: int = 0  # distinct source addresses (0: one per peer)
    timeout: float = 120.0  # seconds the handshakes may take
    idle: float = 3.0  # seconds over which b's CPU is measured with nothing but timers to run

    @classmethod
    def quick(cls) -> Settings:
        return cls(peers=100, duration=2, runs=1, timeout=30.0, idle=1.0)


def _stream(lab: Any, a: Any, b: Any, rec: Any, work: Path, s: Settings, log: Callable[[str], None],
            what: str) -> dict[str, Any]:
    """One iperf3 TCP stream a -> b (bench.e2e.iperf_once) with both daemons' CPU."""
    from bench.e2e import Setup, iperf_once
    from lab.tunnel import IFNAME

    setup = Setup(server_addr=b.ula, interfaces=[IFNAME], tunnel_if=IFNAME)
    for side, n in (("a", a), ("b", b)):
        setup.daemons[side], setup.logs[side] = n.proc, n.log
    r = iperf_once(lab, a.host, b.host, setup, rec, s.duration, 1, work)
    log(f"[scale] {what}: {r['gbps']:.3f} Gb/s, {r['retransmits']} retransmits, "
        f"daemon cores a={r['cpu']['a']:.2f} b={r['cpu']['b']:.2f}")
    return r


def _stream_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    g = [x["gbps"] for x in samples]
    return {"gbps_median": statistics.median(g), "gbps_min": min(g), "gbps_max": max(g),
            "retransmits_median": statistics.median(x["retransmits"] for x in samples),
            "cpu_b_median": statistics.median(x["cpu"]["b"] for x in samples), "samples": samples}


def _sim_sessions(st: dict[str, Any]) -> int:
    """How many simulated peers the daemon's status shows with a live session."""
    return sum(1 for p in st["peers"] if p["name"].startswith("sim") and p.get("session_age") is not None)


def run_scale(s: Settings, tunneld: Path, work: Path, log: Callable[[str], None],
              info: dict[str, Any]) -> dict[str, Any]:
    """The whole row in one lab (files in `work`); `info` gets the lab id, namespaces and every PID.

    Each run measures b once with a as its only peer and once with the simulated peers, in alternating
    order (ABBA), b restarted with the matching config before each, so that drift in the machine's load
    falls on both alike."""
    from bench.e2e import _ping_until
    from bench.procs import Recorder, log_tail, tree_cpu_seconds
    from lab import progs
    from lab.netns import Lab, LabError
    from lab.topology import two_hosts
    from lab.tunnel import Node, setup_pair, start, status
    from tunneld.config import load_account_secret, load_config
    from tunneld.crypto.kdf import derive_psk

    rec = Recorder()
    result: dict[str, Any] = {"settings": s.__dict__.copy(), "cpu_count": os.cpu_count(),
                              "without": [], "with": []}
    with Lab() as lab:
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
        keys = generate_keys(s.peers)
        big_config = base_config + peers_toml([pub for _, pub in keys])
        b.config.write_text(big_config)
        config = load_config(b.config)  # validated as `tunneld up` will
        if len(config.peers) != s.peers + 1:
            raise LabError(f"{b.config} has {len(config.peers)} peers, not {s.peers + 1}")
        spec = work / "peers.json"
        write_spec(spec, [priv for priv, _ in keys], [source_address(i) for i in range(s.sources or s.peers)],
                   (SIM_LINK[0], b.port), b.public_key,
                   derive_psk(load_account_secret(work / "secret"), config.account.domain),
                   config.interface.suite, s.keepalive, s.rate, s.timeout)

        def restart_b(text: str) -> float:
            """b (re)started with config `text`, both ways pinged; the seconds its start took."""
            if b.proc is not None:
                lab.stop(b.proc)
            b.config.write_text(text)
            t0 = time.monotonic()
            start(lab, b, timeout=60)
            took = time.monotonic() - t0
            for n in (a, b):
                assert n.proc is not None
                if n.proc.pid not in rec.pids:
                    rec.pids.append(n.proc.pid)
            # b first: a restarted b initiates, so a need not wait out its session with the old b
            watch = [(n.proc, f"tunneld in {n.host.name}", n.log) for n in (a, b) if n.proc is not None]
            _ping_until(lab, hb, a.ula, 30, "tunneld ping6 b -> a", watch)
            _ping_until(lab, ha, b.ula, 30, "tunneld ping6 a -> b", watch)
            return took

        def idle_cpu() -> float:
            """b's CPU share (cores) over `s.idle` seconds with no traffic but keepalives: its timers."""
            assert b.proc is not None
            cpu0, t0 = tree_cpu_seconds(b.proc.pid), time.monotonic()
            time.sleep(s.idle)  # a measuring window, not a wait for anything
            return (tree_cpu_seconds(b.proc.pid) - cpu0) / (time.monotonic() - t0)

        def without(run: int) -> None:
            restart_b(base_config)
            assert b.proc is not None
            rss, idle = memory(b.proc.pid), idle_cpu()
            stream = _stream(lab, a, b, rec, work, s, log, f"run {run + 1}: one stream, b with one peer")
            result["without"].append({"rss": rss, "idle_cores": idle, "stream": stream,
                                      "rss_after_stream": memory(b.proc.pid)})

        def with_peers(run: int) -> None:
            got: dict[str, Any] = {"start_seconds": restart_b(big_config)}
            assert b.proc is not None
            got["rss_configured"] = memory(b.proc.pid)
            cpu0 = tree_cpu_seconds(b.proc.pid)
            sim_log = work / f"peers-{run}.log"
            with sim_log.open("w") as errf:
                sim_proc = lab.spawn(sim, [sys.executable, "-m", "bench.scale_peers", str(spec)],
                                     cwd=progs.REPO, stdout=subprocess.PIPE, stderr=errf, text=True)
            rec.pids.append(sim_proc.pid)
            lines = progs.Lines(sim_proc)
            try:
                got["handshakes"] = lines.until(lambda o: o.get("phase") == "ready", s.timeout + 60)
            except (TimeoutError, EOFError) as e:
                raise LabError(f"the simulated peers did not report: {e}; {log_tail(sim_log)}") from None
            got["handshake_cpu_seconds"] = tree_cpu_seconds(b.proc.pid) - cpu0
            got["rss_after_handshakes"] = memory(b.proc.pid)
            st = status(b)
            got["sessions"] = _sim_sessions(st)
            got["handshake_load"] = st["counters"]["handshake_load"]
            got["handshake_drops"] = st["counters"]["handshake_drops"]
            got["idle_cores"] = idle_cpu()
            h = got["handshakes"]
            log(f"[scale] run {run + 1}: {h['completed']}/{s.peers} handshakes in {h['seconds'] or 0:.2f} s; "
                f"b holds {got['sessions']} sessions with them")
            got["stream"] = _stream(lab, a, b, rec, work, s, log,
                                    f"run {run + 1}: one stream, b with {s.peers} idle peers")
            got["rss_after_stream"] = memory(b.proc.pid)
            got["sessions_after"] = _sim_sessions(status(b))
            sim_proc.send_signal(signal.SIGTERM)
            try:
                got["peers_done"] = lines.until(lambda o: o.get("phase") == "done", 15)
            except (TimeoutError, EOFError) as e:
                raise LabError(f"the simulated peers did not finish: {e}; {log_tail(sim_log)}") from None
            lab.stop(sim_proc)
            result["with"].append(got)

        log(f"[scale] lab {lab.id}: {s.runs} run(s), b with one peer and with {s.peers} more")
        start(lab, a, timeout=60)
        assert a.proc is not None
        rec.pids.append(a.proc.pid)
        result["rss_a_one_peer"] = memory(a.proc.pid)
        for run in range(s.runs):
            for phase in ((without, with_peers) if run % 2 == 0 else (with_peers, without)):
                phase(run)
        # Every start of b appends to one log: what went wrong in any of them (kept short).
        result["daemon_log_problems"] = log_problems(b.log.read_text(errors="replace"))
    result["stream_one_peer"] = _stream_summary([x["stream"] for x in result["without"]])
    result["stream_idle_peers"] = _stream_summary([x["stream"] for x in result["with"]])
    base = result["stream_one_peer"]["gbps_median"]
    result["stream_ratio"] = result["stream_idle_peers"]["gbps_median"] / base if base > 0 else None
    return result


# -- output and command line ----------------------------------------------------------------------

def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _mem(samples: list[dict[str, int]]) -> str:
    """Median VmRSS and highest VmHWM over the runs, in MiB, as two table cells."""
    rss = statistics.median(m["VmRSS"] for m in samples)
    return f"{rss / 2**20:>9.1f} | {max(m['VmHWM'] for m in samples) / 2**20:>9.1f}"


def print_table(r: dict[str, Any], out: TextIO = sys.stdout) -> None:
    s, w = r["settings"], r["with"]
    n = s["peers"]
    pace = f"at {s['rate']:g}/s" if s["rate"] > 0 else "all at once"
    print(f"Scale: tunneld in b with {n} simulated peers (one process in a namespace, one UDP socket each, "
          f"{s['sources'] or n} source addresses, first initiations {pace}); {s['runs']} run(s); "
          f"{r['cpu_count']} CPUs", file=out)
    print("| b's memory (median VmRSS, highest VmHWM) | VmRSS MiB | VmHWM MiB |", file=out)
    print("|------------------------------------------|----------:|----------:|", file=out)
    rows = (("one peer", [x["rss"] for x in r["without"]]),
            ("one peer, after the stream", [x["rss_after_stream"] for x in r["without"]]),
            (f"{n} more peers configured", [x["rss_configured"] for x in w]),
            (f"after the {n} handshakes", [x["rss_after_handshakes"] for x in w]),
            ("after the stream", [x["rss_after_stream"] for x in w]))
    for label, samples in rows:
        print(f"| {label:<40} | {_mem(samples)} |", file=out)
    idle = (statistics.median(x["idle_cores"] for x in r["without"]),
            statistics.median(x["idle_cores"] for x in w))
    print(f"(a, with one peer: {r['rss_a_one_peer']['VmRSS'] / 2**20:.1f} MiB.) b idle, its timers only "
          f"(median over {s['idle']:g} s): {idle[0]:.4f} cores with one peer, {idle[1]:.4f} with {n} more "
          "and their live sessions", file=out)
    print("\n| run | completed | failed | seconds | per s | median wait s | b CPU s | initiations | cookies "
          "| under load | b sessions | b start s | b drops |", file=out)
    print("|----:|----------:|-------:|--------:|------:|--------------:|--------:|------------:|--------:"
          "|-----------:|-----------:|----------:|---------|", file=out)
    for i, x in enumerate(w, start=1):
        h, load = x["handshakes"], x["handshake_load"]
        secs = f"{h['seconds']:.2f}" if h["seconds"] is not None else "-"
        rate = f"{h['handshakes_per_s']:.0f}" if h["handshakes_per_s"] else "-"
        wait = f"{h['median_wait_s']:.2f}" if h["median_wait_s"] is not None else "-"
        drops = ", ".join(f"{k} {v}" for k, v in sorted(x["handshake_drops"].items())) or "none"
        print(f"| {i:>3} | {h['completed']:>9} | {h['failed']:>6} | {secs:>7} | {rate:>5} | {wait:>13} | "
              f"{x['handshake_cpu_seconds']:>7.2f} | {h['initiations']:>11} | {h['cookies']:>7} | "
              f"{load['under_load_episodes']:>10} | {x['sessions']:>10} | {x['start_seconds']:>9.2f} | "
              f"{drops} |", file=out)
    print(f"\nOne TCP stream a -> b, iperf3 -t {s['duration']}, {s['runs']} run(s), medians (min..max)",
          file=out)
    print("| b's peers                    | Gb/s (min..max)          | retrans | CPU b |", file=out)
    print("|------------------------------|--------------------------|--------:|------:|", file=out)
    for key, label in (("stream_one_peer", "a only"), ("stream_idle_peers", f"a + {n} idle, live sessions")):
        x = r[key]
        gb = f"{x['gbps_median']:.3f} ({x['gbps_min']:.3f}..{x['gbps_max']:.3f})"
        print(f"| {label:<28} | {gb:<24} | {x['retransmits_median']:>7g} | {x['cpu_b_median']:>5.2f} |",
              file=out)
    for line in r["daemon_log_problems"]:
        print(f"b's log: {line}", file=out)
    if r["stream_ratio"] is not None:
        print(f"with idle peers / without (median Gb/s): {r['stream_ratio']:.2f}x; b still held "
              f"{min(x['sessions_after'] for x in w)}+ sessions with the simulated peers after each stream",
              file=out)


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
