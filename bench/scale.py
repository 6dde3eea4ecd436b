"""Scale: one daemon with many peers, tunneld and wireguard-go (`python -m bench.throughput scale`).

Each mode in its own lab: a and b on a veth (as bench/e2e.py) and a host `sim` on a second link of b.
Each run restarts b twice, in alternating order: once with a as its only peer, once with N more peers
(tunneld: [[peer]] tables, checked by tunneld's own loader; wireguard-go: [Peer] sections,
bench/scale_wg.py) while one process in `sim` plays the N devices (bench/scale_peers.py: one handshake
state and UDP socket each, from its own address of 10.77.0.0/16, so that b's per-source limits see N
devices). Reported: b's RSS (VmRSS, VmHWM) with one peer, with N configured, after the N handshakes and
after the stream; the time from the first initiation to the last completed handshake, failures, b's CPU
seconds meanwhile and what its handshake defences did; b's idle CPU (its timers); and one iperf3 TCP
stream a -> b with and without the N live sessions beside it (the ratio is the figure). docs/fastpath.md
("Scale: 1,000 peers") has a run and what it shows.
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

from bench.e2e import comma_subset
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


def _stream_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    g = [x["gbps"] for x in samples]
    return {"gbps_median": statistics.median(g), "gbps_min": min(g), "gbps_max": max(g),
            "retransmits_median": statistics.median(x["retransmits"] for x in samples),
            "cpu_b_median": statistics.median(x["cpu"]["b"] for x in samples), "samples": samples}


def _sim_sessions(st: dict[str, Any]) -> int:
    """How many simulated peers the daemon's status shows with a live session."""
    return sum(1 for p in st["peers"] if p["name"].startswith("sim") and p.get("session_age") is not None)


class TunneldPair:
    """`tunneld up` in a and b (lab.tunnel), b restartable with or without the simulated peers' [[peer]]
    tables (checked by tunneld's own loader first)."""

    def __init__(self, lab: Any, ha: Any, hb: Any, work: Path, rec: Any, tunneld: Path,
                 sim_publics: Sequence[bytes]) -> None:
        from lab.netns import LabError
        from lab.tunnel import Node, setup_pair
        from tunneld.config import load_account_secret, load_config
        from tunneld.crypto.kdf import derive_psk

        self.lab, self.rec = lab, rec
        self.a, self.b = (Node(h, work / h.name, h.addr4, exe=str(tunneld)) for h in (ha, hb))
        setup_pair(lab, self.a, self.b)
        self.base = self.b.config.read_text()
        self.big = self.base + peers_toml(sim_publics)
        self.b.config.write_text(self.big)
        config = load_config(self.b.config)  # validated as `tunneld up` will
        if len(config.peers) != len(sim_publics) + 1:
            raise LabError(f"{self.b.config} has {len(config.peers)} peers, not {len(sim_publics) + 1}")
        self.server_public, self.port, self.suite = self.b.public_key, self.b.port, config.interface.suite
        self.psk = derive_psk(load_account_secret(work / "secret"), config.account.domain)

    def _up(self, n: Any) -> None:
        from lab.tunnel import start

        start(self.lab, n, timeout=60)
        self.rec.pids.append(n.proc.pid)

    def start_a(self) -> None:
        self._up(self.a)

    def restart_b(self, big: bool) -> float:
        """b (re)started with or without the simulated peers, both ways pinged; the seconds its start took."""
        from bench.e2e import _ping_until

        a, b = self.a, self.b
        if b.proc is not None:
            self.lab.stop(b.proc)
        b.config.write_text(self.big if big else self.base)
        t0 = time.monotonic()
        self._up(b)
        took = time.monotonic() - t0
        # b first: a restarted b initiates, so a need not wait out its session with the old b
        watch = [(n.proc, f"tunneld in {n.host.name}", n.log) for n in (a, b) if n.proc is not None]
        _ping_until(self.lab, b.host, a.ula, 30, "tunneld ping6 b -> a", watch)
        _ping_until(self.lab, a.host, b.ula, 30, "tunneld ping6 a -> b", watch)
        return took

    def pid(self, side: str) -> int:
        proc = (self.a if side == "a" else self.b).proc
        assert proc is not None
        return int(proc.pid)

    def sessions(self) -> int:
        from lab.tunnel import status

        return _sim_sessions(status(self.b))

    def defences(self) -> tuple[dict[str, Any], dict[str, int]]:
        """What b's handshake defences did (`tunneld status`): load, and drops by reason."""
        from lab.tunnel import status

        counters = status(self.b)["counters"]
        return counters["handshake_load"], counters["handshake_drops"]

    def setup(self) -> Any:
        from bench.e2e import Setup
        from lab.tunnel import IFNAME

        setup = Setup(server_addr=self.b.ula, interfaces=[IFNAME], tunnel_if=IFNAME)
        for side, n in (("a", self.a), ("b", self.b)):
            assert n.proc is not None
            setup.daemons[side], setup.logs[side] = n.proc, n.log
        return setup

    def problems(self) -> list[str]:
        """Every start of b appends to one log: what went wrong in any of them (kept short)."""
        return log_problems(self.b.log.read_text(errors="replace"))

    def close(self) -> None:
        """Nothing: the lab ends the daemons."""


def run_scale(s: Settings, mode: str, tunneld: Path, work: Path, log: Callable[[str], None],
              info: dict[str, Any]) -> dict[str, Any]:
    """The row of one mode in its own lab (files in `work`); `info` gets the lab id, namespaces, PIDs.

    Each run measures b once with a as its only peer and once with the simulated peers, in alternating
    order (ABBA), b restarted before each, so that drift in the machine's load falls on both alike."""
    from bench.procs import Recorder, log_tail, tree_cpu_seconds
    from bench.scale_wg import WgPair
    from lab import progs
    from lab.netns import Lab, LabError
    from lab.topology import two_hosts

    rec = Recorder()
    result: dict[str, Any] = {"mode": mode, "without": [], "with": []}
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
        keys = generate_keys(s.peers)
        publics = [pub for _, pub in keys]
        pair: TunneldPair | WgPair
        if mode == "tunneld":
            pair = TunneldPair(lab, ha, hb, work, rec, tunneld, publics)
            spec_args: tuple[str, int, bytes, str, str] = (
                pair.server_public, pair.port, pair.psk, pair.suite, "tunneld")
        else:
            from bench.scale_wg import NO_PSK, WG_PORT

            pair = WgPair(lab, ha, hb, work, rec, publics)
            spec_args = (base64.b64encode(pair.public("b")).decode(), WG_PORT, NO_PSK, "", "wireguard")
        spec = work / f"peers-{mode}.json"
        public, port, psk, suite, kind = spec_args
        write_spec(spec, [priv for priv, _ in keys], [source_address(i) for i in range(s.sources or s.peers)],
                   (SIM_LINK[0], port), public, psk, suite, s.keepalive, s.rate, s.timeout, kind)

        def idle_cpu() -> float:
            """b's CPU share (cores) over `s.idle` seconds with no traffic but keepalives: its timers."""
            pid = pair.pid("b")
            cpu0, t0 = tree_cpu_seconds(pid), time.monotonic()
            time.sleep(s.idle)  # a measuring window, not a wait for anything
            return (tree_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)

        def stream(what: str) -> dict[str, Any]:
            from bench.e2e import iperf_once

            r = iperf_once(lab, ha, hb, pair.setup(), rec, s.duration, 1, work)
            log(f"[scale {mode}] {what}: {r['gbps']:.3f} Gb/s, {r['retransmits']} retransmits, "
                f"daemon cores a={r['cpu']['a']:.2f} b={r['cpu']['b']:.2f}")
            return r

        def without(run: int) -> None:
            pair.restart_b(big=False)
            rss, idle = memory(pair.pid("b")), idle_cpu()
            got = stream(f"run {run + 1}: one stream, b with one peer")
            result["without"].append({"rss": rss, "idle_cores": idle, "stream": got,
                                      "rss_after_stream": memory(pair.pid("b"))})

        def with_peers(run: int) -> None:
            got: dict[str, Any] = {"start_seconds": pair.restart_b(big=True)}
            pid = pair.pid("b")
            got["rss_configured"] = memory(pid)
            cpu0 = tree_cpu_seconds(pid)
            sim_log = work / f"peers-{mode}-{run}.log"
            with sim_log.open("w") as errf:
                sim_proc = lab.spawn(sim, [sys.executable, "-m", "bench.scale_peers", str(spec)],
                                     cwd=progs.REPO, stdout=subprocess.PIPE, stderr=errf, text=True)
            rec.pids.append(sim_proc.pid)
            lines = progs.Lines(sim_proc)
            try:
                got["handshakes"] = lines.until(lambda o: o.get("phase") == "ready", s.timeout + 60)
            except (TimeoutError, EOFError) as e:
                raise LabError(f"the simulated peers did not report: {e}; {log_tail(sim_log)}") from None
            got["handshake_cpu_seconds"] = tree_cpu_seconds(pid) - cpu0
            got["rss_after_handshakes"] = memory(pid)
            got["sessions"] = pair.sessions()
            got["handshake_load"], got["handshake_drops"] = pair.defences()
            got["idle_cores"] = idle_cpu()
            h = got["handshakes"]
            log(f"[scale {mode}] run {run + 1}: {h['completed']}/{s.peers} handshakes in "
                f"{h['seconds'] or 0:.2f} s; b holds {got['sessions']} sessions with them")
            got["stream"] = stream(f"run {run + 1}: one stream, b with {s.peers} idle peers")
            got["rss_after_stream"] = memory(pid)
            got["sessions_after"] = pair.sessions()
            sim_proc.send_signal(signal.SIGTERM)
            try:
                got["peers_done"] = lines.until(lambda o: o.get("phase") == "done", 15)
            except (TimeoutError, EOFError) as e:
                raise LabError(f"the simulated peers did not finish: {e}; {log_tail(sim_log)}") from None
            lab.stop(sim_proc)
            result["with"].append(got)

        log(f"[scale {mode}] lab {lab.id}: {s.runs} run(s), b with one peer and with {s.peers} more")
        try:
            pair.start_a()
            result["rss_a_one_peer"] = memory(pair.pid("a"))
            for run in range(s.runs):
                for phase in ((without, with_peers) if run % 2 == 0 else (with_peers, without)):
                    phase(run)
            result["daemon_log_problems"] = pair.problems()
        finally:
            pair.close()
    result["stream_one_peer"] = _stream_summary([x["stream"] for x in result["without"]])
    result["stream_idle_peers"] = _stream_summary([x["stream"] for x in result["with"]])
    base = result["stream_one_peer"]["gbps_median"]
    result["stream_ratio"] = result["stream_idle_peers"]["gbps_median"] / base if base > 0 else None
    return result


# -- output and command line ----------------------------------------------------------------------

def _mem(samples: list[dict[str, int]]) -> str:
    """Median VmRSS and highest VmHWM over the runs, in MiB, as two table cells."""
    rss = statistics.median(m["VmRSS"] for m in samples)
    return f"{rss / 2**20:>9.1f} | {max(m['VmHWM'] for m in samples) / 2**20:>9.1f}"


MODES = ("tunneld", "wireguard-go")


def print_mode(r: dict[str, Any], s: dict[str, Any], out: TextIO = sys.stdout) -> None:
    """The tables of one mode."""
    w, n, mode = r["with"], s["peers"], r["mode"]
    print(f"\n{mode} in b", file=out)
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
        drops = ", ".join(f"{k} {v}" for k, v in sorted(x["handshake_drops"].items())) or (
            "none" if load else "-")
        episodes = load.get("under_load_episodes", "-")
        print(f"| {i:>3} | {h['completed']:>9} | {h['failed']:>6} | {secs:>7} | {rate:>5} | {wait:>13} | "
              f"{x['handshake_cpu_seconds']:>7.2f} | {h['initiations']:>11} | {h['cookies']:>7} | "
              f"{episodes:>10} | {x['sessions']:>10} | {x['start_seconds']:>9.2f} | {drops} |", file=out)
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


def print_table(r: dict[str, Any], out: TextIO = sys.stdout) -> None:
    s = r["settings"]
    n = s["peers"]
    pace = f"at {s['rate']:g}/s" if s["rate"] > 0 else "all at once"
    print(f"Scale: b with {n} simulated peers (one process in a namespace, one UDP socket each, "
          f"{s['sources'] or n} source addresses, first initiations {pace}); {s['runs']} run(s); "
          f"{r['cpu_count']} CPUs", file=out)
    for mode in r["modes"]:
        if mode in r["results"]:
            print_mode(r["results"][mode], s, out)
        else:
            print(f"\n{mode}: NOT MEASURED: {(r['errors'].get(mode) or 'failed').splitlines()[0]}", file=out)


def run_modes(s: Settings, modes: Sequence[str], tunneld: Path, work: Path,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Every mode in its own lab, one after the other; a mode that fails is reported, the others go on."""
    from lab.netns import LabError

    r: dict[str, Any] = {"settings": s.__dict__.copy(), "cpu_count": os.cpu_count(), "modes": list(modes),
                         "results": {}, "errors": {}, "labs": []}
    for mode in modes:
        info: dict[str, Any] = {"mode": mode}
        (work / mode).mkdir()
        try:
            r["results"][mode] = run_scale(s, mode, tunneld, work / mode, log, info)
        except (LabError, subprocess.SubprocessError, OSError, KeyError, ValueError) as e:
            log(f"[scale {mode}] failed: {e}")
            r["errors"][mode] = str(e)
        r["labs"].append(info)
    return r


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings()
    p.add_argument("--modes", type=comma_subset(MODES, "mode"), default=list(MODES),
                   help=f"comma-separated subset of {','.join(MODES)} (default both)")
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
    result: dict[str, Any] = {}

    def work(tmp: Path) -> dict[str, Any]:
        result.update(run_modes(s, args.modes, tunneld, tmp, lambda m: print(m, file=sys.stderr, flush=True)))
        return result

    rc = run_in_lab("scale", work, args.json, print_table)
    for mode, err in result.get("errors", {}).items():
        print(f"bench scale: {mode} failed: {err}", file=sys.stderr)
    return 1 if rc == 0 and result.get("errors") else rc
