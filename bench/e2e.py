"""End-to-end TCP throughput between two namespaces: plain veth, wireguard-go, and tunneld.

For each mode a fresh two-host lab (lab.topology.two_hosts) gets the mode's tunnel, and `iperf3 -c`
in a measures TCP throughput to `iperf3 -s -1` in b, `runs` times per streams count, with the CPU the
tunnel daemon on each side and the whole machine used around every run (bench.procs).

- veth: iperf3 straight over 192.0.2.x, no tunnel: the ceiling of this machine.
- wireguard-go: the userspace WireGuard baseline, MTU 1400, inner 2001:db8:77::1 / ::2.
- tunneld: `tunneld up` on both sides (lab.tunnel, MTU 1400) with `offload = false`, between the ULAs.
- tunneld-offload: the same with TUN segmentation offload (the default since it was measured).

Everything is measured within one invocation. How to read the CPU columns and what `--profile DIR`
does: docs/lab.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bench.procs import Recorder, log_tail, machine_busy_seconds, tree_cpu_seconds
from lab.netns import NETNS_PREFIX, Host, Lab, LabError, ping_until, terminate_as_exit, wait_for
from lab.topology import two_hosts
from lab.tunnel import IFNAME as TUNNELD_IF
from lab.tunnel import MTU, Node, setup_pair, start, write_private

MODES = ("veth", "wireguard-go", "tunneld", "tunneld-offload")
TUNNELD_MODES = ("tunneld", "tunneld-offload")  # the second with TUN segmentation offload on
IPERF_PORT = 5201
WG_PORT = 51820
WG_INNER = ("2001:db8:77::1", "2001:db8:77::2")
WG_RUN_DIR = Path("/var/run/wireguard")
SIDE_ROLE = {"a": "sender", "b": "receiver"}
PROFILE_TOP = 10


@dataclass
class Setup:
    """What the measurement loop needs from a mode: where to send, and which daemons to watch."""

    server_addr: str
    daemons: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)  # side ("a"/"b") -> daemon
    logs: dict[str, Path] = field(default_factory=dict)  # side -> daemon log, for error messages
    interfaces: list[str] = field(default_factory=list)
    tunnel_if: str = ""  # the tunnel interface in a: its tx counter proves the traffic went through it
    tag: str = ""  # prefix of profile file names ("offload-" for tunneld-offload)


# More measurements in a mode's lab after its TCP runs (bench/rows.py): (mode, lab, a, b, setup, rec, work).
Extra = Callable[[str, Lab, Host, Host, Setup, Recorder, Path], None]


# -- small helpers --------------------------------------------------------------------------------

def _alive(p: subprocess.Popen[Any], what: str, log: Path | None = None) -> bool:
    if p.poll() is not None:
        tail = log_tail(log)
        raise LabError(f"{what} exited with {p.returncode}" + (f": {tail}" if tail else ""))
    return True


def _ping_until(lab: Lab, h: Host, addr: str, timeout: float, what: str,
                watch: Sequence[tuple[subprocess.Popen[Any], str, Path | None]] = ()) -> None:
    """ping_until, failing at once if one of the watched daemons has exited."""
    ping_until(lab, h, addr, timeout, what, alive=lambda: [_alive(*w) for w in watch])


def _tx_bytes(lab: Lab, h: Host, ifname: str) -> int:
    link = json.loads(lab.ip(h, "-s", "-j", "link", "show", "dev", ifname))[0]
    return int(link["stats64"]["tx"]["bytes"])


def _listening(lab: Lab, h: Host, port: int) -> bool:
    out = lab.run(h, ["ss", "-ltnH", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


def iperf_server(lab: Lab, b: Host, setup: Setup, rec: Recorder, log: Path) -> subprocess.Popen[Any]:
    """A one-test iperf3 server on b at the setup's address, returned once it listens (its output to
    ``log``); LabError if it exits first or does not listen within 10 s."""
    with log.open("w") as logf:
        server = rec.spawn(lab, b, ["iperf3", "-s", "-1", "-B", setup.server_addr, "-p", str(IPERF_PORT)],
                           stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _alive(server, "iperf3 server", log) and _listening(lab, b, IPERF_PORT),
                 timeout=10, what="iperf3 server to listen")
    except BaseException:
        lab.stop(server)
        raise
    return server


# -- modes ----------------------------------------------------------------------------------------

def setup_veth(lab: Lab, a: Host, b: Host, work: Path, rec: Recorder) -> Setup:
    return Setup(server_addr=b.addr4)


def setup_wireguard_go(lab: Lab, a: Host, b: Host, work: Path, rec: Recorder,
                       cleanup: contextlib.ExitStack) -> Setup:
    """wireguard-go in both namespaces; interface names carry the lab id because the control
    sockets share one global folder (/var/run/wireguard) across namespaces."""
    suffix = lab.id[len(NETNS_PREFIX):]
    hosts = {"a": a, "b": b}
    names = {side: f"wg{suffix}{side}" for side in hosts}
    keys: dict[str, tuple[Path, str]] = {}
    for side in hosts:
        priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
        pub = subprocess.run(["wg", "pubkey"], input=priv + "\n", capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        path = work / f"{side}.key"
        write_private(path, priv + "\n")
        keys[side] = (path, pub)

    setup = Setup(server_addr=WG_INNER[1], interfaces=list(names.values()), tunnel_if=names["a"])
    for side, h in hosts.items():
        ifname = names[side]
        sock = WG_RUN_DIR / f"{ifname}.sock"
        if sock.exists():
            raise LabError(f"{sock} already exists: another wireguard-go uses the name {ifname}")
        # If wireguard-go dies by SIGKILL it leaves its socket behind; remove ours after the lab.
        cleanup.callback(sock.unlink, missing_ok=True)
        log = work / f"wireguard-go-{side}.log"
        with log.open("w") as logf:
            p = rec.spawn(lab, h, ["env", "WG_PROCESS_FOREGROUND=1", "wireguard-go", "-f", ifname],
                          stdout=logf, stderr=subprocess.STDOUT)
        setup.daemons[side], setup.logs[side] = p, log

        def ready(p: subprocess.Popen[Any] = p, sock: Path = sock, log: Path = log, side: str = side) -> bool:
            return _alive(p, f"wireguard-go in {side}", log) and sock.exists()

        wait_for(ready, timeout=10, what=f"wireguard-go control socket {sock}")

    for i, (side, h) in enumerate(hosts.items()):
        other = "b" if side == "a" else "a"
        ifname = names[side]
        peer_outer = (b if side == "a" else a).addr4
        lab.run(h, ["wg", "set", ifname, "private-key", str(keys[side][0]), "listen-port", str(WG_PORT),
                    "peer", keys[other][1], "endpoint", f"{peer_outer}:{WG_PORT}",
                    "allowed-ips", f"{WG_INNER[1 - i]}/128"])
        lab.addr(h, ifname, f"{WG_INNER[i]}/64")
        lab.ip(h, "link", "set", ifname, "mtu", str(MTU), "up")

    watch = [(setup.daemons[s], f"wireguard-go in {s}", setup.logs[s]) for s in hosts]
    _ping_until(lab, a, WG_INNER[1], 20, "the wireguard-go handshake (ping a -> b)", watch)
    _ping_until(lab, b, WG_INNER[0], 10, "wireguard-go ping b -> a", watch)
    return setup


def setup_tunneld(lab: Lab, a: Host, b: Host, work: Path, rec: Recorder, tunneld: Path,
                  offload: bool = False) -> Setup:
    """`tunneld up` on both sides, configured and started as the integration tests do (lab.tunnel)."""
    if not tunneld.exists():
        raise LabError(f"{tunneld} not found: install the project into this venv (pip install -e .)")
    nodes = {side: Node(h, work / side, h.addr4, offload=offload, exe=str(tunneld))
             for side, h in (("a", a), ("b", b))}
    setup_pair(lab, nodes["a"], nodes["b"])
    setup = Setup(server_addr=nodes["b"].ula, interfaces=[TUNNELD_IF], tunnel_if=TUNNELD_IF)
    for side, n in nodes.items():
        start(lab, n, timeout=20)
        assert n.proc is not None
        rec.pids.append(n.proc.pid)
        setup.daemons[side], setup.logs[side] = n.proc, n.log
    watch = [(setup.daemons[s], f"tunneld in {s}", setup.logs[s]) for s in nodes]
    _ping_until(lab, a, nodes["b"].ula, 30, "the tunneld handshake (ping6 a -> b's ULA)", watch)
    _ping_until(lab, b, nodes["a"].ula, 10, "tunneld ping6 b -> a's ULA", watch)
    return setup


# -- profiling ------------------------------------------------------------------------------------

@dataclass
class Profiler:
    """Runs `py-spy record` against the tunnel daemons during one iperf3 run and keeps what it got.

    Two py-spy processes per daemon, each with `-d <duration>`: the raw collapsed stacks (the top
    list is computed from them) pause the daemon for each sample, as py-spy does by default; the
    flamegraph SVG is sampled with --nonblocking, since two tracers pausing one process get in each
    other's way (py-spy then counts failed samples). A py-spy that fails is reported in one line
    and the benchmark goes on.
    """

    out_dir: Path
    pyspy: Path
    log: Callable[[str], None]
    results: list[dict[str, Any]] = field(default_factory=list)

    def start(self, daemons: dict[str, subprocess.Popen[Any]], tag: str, duration: int, rec: Recorder,
              started: list[tuple[str, str, Path, subprocess.Popen[Any], Path]]) -> None:
        """Start py-spy against each daemon, appending (side, format, output, process, log) to
        `started` as it goes, so that the caller can end them all if anything fails half-way."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for side, d in daemons.items():
            for fmt, ext, extra in (("raw", "txt", []), ("flamegraph", "svg", ["--nonblocking"])):
                out = self.out_dir / f"tunneld-{side}-{tag}.{ext}"
                out.unlink(missing_ok=True)
                errlog = self.out_dir / f".py-spy-{side}-{tag}-{ext}.log"
                with errlog.open("w") as errf:
                    p = subprocess.Popen([str(self.pyspy), "record", "-p", str(d.pid), "-d", str(duration),
                                          "-f", fmt, "-o", str(out), *extra],
                                         stdin=subprocess.DEVNULL, stdout=errf, stderr=subprocess.STDOUT)
                rec.pids.append(p.pid)
                started.append((side, fmt, out, p, errlog))

    @staticmethod
    def abandon(started: list[tuple[str, str, Path, subprocess.Popen[Any], Path]]) -> None:
        """On failure: end every py-spy still running (by PID) and remove its log."""
        for *_, p, errlog in started:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
            errlog.unlink(missing_ok=True)
        started.clear()

    def finish(self, started: list[tuple[str, str, Path, subprocess.Popen[Any], Path]], tag: str,
               timeout: float) -> None:
        """Wait (bounded) for every py-spy started by `start`, then record files, top frames, errors."""
        deadline = time.monotonic() + timeout
        per_side: dict[str, dict[str, Any]] = {}
        for side, fmt, out, p, errlog in started:
            entry = per_side.setdefault(side, {"side": side, "role": SIDE_ROLE.get(side, side), "tag": tag,
                                               "files": [], "errors": []})
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
                entry["errors"].append(f"py-spy ({fmt}) did not finish within {timeout:.0f} s")
            else:
                if p.returncode != 0 or not out.exists() or out.stat().st_size == 0:
                    msg = [ln.strip() for ln in log_tail(errlog).splitlines()
                           if ln.strip().startswith("Error")]
                    why = msg[0] if msg else (log_tail(errlog, 300).splitlines() or ["no output"])[-1].strip()
                    entry["errors"].append(f"py-spy ({fmt}) exit {p.returncode}: {why}")
            if out.exists() and out.stat().st_size > 0:
                entry["files"].append(str(out))
                if fmt == "raw":
                    entry.update(top_frames(out.read_text(errors="replace")))
                    # py-spy ends with "... Samples: N Errors: M": samples it failed to take
                    tail = log_tail(errlog).split("Errors:")
                    if len(tail) > 1 and tail[-1].split()[:1] and tail[-1].split()[0].isdigit():
                        entry["sample_errors"] = int(tail[-1].split()[0])
            errlog.unlink(missing_ok=True)
        for entry in per_side.values():
            if entry["errors"]:
                self.log(f"[tunneld] profile of tunneld in {entry['side']} ({tag}) failed: "
                         + "; ".join(entry["errors"]))
            self.results.append(entry)


def top_frames(raw: str, n: int = PROFILE_TOP) -> dict[str, Any]:
    """From py-spy's raw collapsed stacks ("outer;...;leaf count" per line): total samples, and the
    `n` frames with the most own (leaf) samples, as [frame, samples, percent]. Line numbers are
    dropped, so one function counts once however many of its lines were sampled."""
    own: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        name, sep, where = leaf.partition(" (")
        if sep and ":" in where:
            leaf = f"{name} ({where.rsplit(':', 1)[0]})"
        own[leaf] += int(count)
        total += int(count)
    top = [[frame, c, 100.0 * c / total] for frame, c in own.most_common(n)] if total else []
    return {"samples": total, "top": top}


# -- measuring ------------------------------------------------------------------------------------

def iperf_once(lab: Lab, a: Host, b: Host, setup: Setup, rec: Recorder, duration: int, streams: int,
               work: Path, profiler: Profiler | None = None) -> dict[str, Any]:
    """One iperf3 run a -> b, with the daemons' CPU time sampled around it (and profiled, if a
    profiler is given)."""
    slog = work / "iperf3-server.log"
    server = iperf_server(lab, b, setup, rec, slog)
    spies: list[tuple[str, str, Path, subprocess.Popen[Any], Path]] = []
    try:
        tx0 = _tx_bytes(lab, a, setup.tunnel_if) if setup.tunnel_if else 0
        if profiler is not None:
            profiler.start(setup.daemons, f"{setup.tag}P{streams}", duration, rec, spies)
        cpu0 = {side: tree_cpu_seconds(p.pid) for side, p in setup.daemons.items()}
        busy0 = machine_busy_seconds()
        t0 = time.monotonic()
        client = rec.spawn(lab, a, ["iperf3", "-c", setup.server_addr, "-p", str(IPERF_PORT),
                                    "-t", str(duration), "-P", str(streams), "-J"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = client.communicate(timeout=duration + 30)
        except subprocess.TimeoutExpired:
            lab.stop(client)
            raise LabError(f"iperf3 client did not finish within {duration + 30} s") from None
        elapsed = time.monotonic() - t0
        busy1 = machine_busy_seconds()
        cpu1 = {side: tree_cpu_seconds(p.pid) for side, p in setup.daemons.items()}
        tx1 = _tx_bytes(lab, a, setup.tunnel_if) if setup.tunnel_if else 0
        if profiler is not None:
            profiler.finish(spies, f"P{streams}", timeout=15)
            spies.clear()
        for side, p in setup.daemons.items():
            _alive(p, f"daemon in {side}", setup.logs.get(side))
    finally:
        Profiler.abandon(spies)  # only on failure: finish() has waited for them otherwise
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=5)
        lab.stop(server)
    try:
        data = json.loads(out)
    except json.JSONDecodeError:
        raise LabError(f"iperf3 client (exit {client.returncode}) printed no JSON: "
                       f"{(err or out).strip()[-1000:]}") from None
    if client.returncode != 0 or "error" in data:
        raise LabError(f"iperf3 client failed: {data.get('error', err.strip())}; "
                       f"server: {log_tail(slog, 500)}")
    end = data["end"]
    received = int(end["sum_received"]["bytes"])
    if setup.tunnel_if and tx1 - tx0 < received:
        # Less left through the tunnel than iperf3 delivered: the traffic went around the tunnel.
        raise LabError(f"{setup.tunnel_if} in a sent {tx1 - tx0} bytes but iperf3 received {received}: "
                       "the traffic did not go through the tunnel")
    return {
        "gbps": end["sum_received"]["bits_per_second"] / 1e9,
        "retransmits": int(end["sum_sent"].get("retransmits", 0)),
        "seconds": elapsed,
        "tunnel_tx_bytes": tx1 - tx0,
        "received_bytes": received,
        "cpu": {side: (cpu1[side] - cpu0[side]) / elapsed for side in setup.daemons},
        "busy": (busy1 - busy0) / elapsed,
    }


def _summary(mode: str, streams: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    g = [s["gbps"] for s in samples]
    sides = sorted({side for s in samples for side in s["cpu"]})
    return {
        "mode": mode,
        "streams": streams,
        "gbps_median": statistics.median(g),
        "gbps_min": min(g),
        "gbps_max": max(g),
        "retransmits_median": statistics.median(s["retransmits"] for s in samples),
        "cpu_cores_median": {side: statistics.median(s["cpu"][side] for s in samples) for side in sides},
        "busy_cores_median": statistics.median(s["busy"] for s in samples),
        "samples": samples,
    }


def run_mode(mode: str, streams_list: Sequence[int], duration: int, runs: int, tunneld: Path,
             log: Callable[[str], None], info: dict[str, Any],
             profiler: Profiler | None = None, extra: Extra | None = None) -> list[dict[str, Any]]:
    """Measure one mode in its own lab; `info` gets the lab id, namespaces and every PID started;
    `extra` measures more in the same lab after the TCP runs."""
    rec = Recorder()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-e2e-{mode}-")))
        cleanup = stack.enter_context(contextlib.ExitStack())  # runs after the lab has closed
        lab = stack.enter_context(Lab())
        info.update(lab_id=lab.id, pids=rec.pids)
        a, b = two_hosts(lab)
        info["namespaces"] = [a.netns, b.netns]
        log(f"[{mode}] lab {lab.id}: setting up")
        if mode == "veth":
            setup = setup_veth(lab, a, b, work, rec)
        elif mode == "wireguard-go":
            setup = setup_wireguard_go(lab, a, b, work, rec, cleanup)
        elif mode in TUNNELD_MODES:
            setup = setup_tunneld(lab, a, b, work, rec, tunneld, offload=mode == "tunneld-offload")
            setup.tag = "offload-" if mode == "tunneld-offload" else ""
        else:
            raise ValueError(f"unknown mode {mode!r}")
        info["interfaces"] = setup.interfaces
        samples: dict[int, list[dict[str, Any]]] = {n: [] for n in streams_list}
        for run in range(runs):
            for n in streams_list:  # interleaved, so drift in the machine's load hits all counts alike
                prof = profiler if (mode in TUNNELD_MODES and run == 0) else None
                s = iperf_once(lab, a, b, setup, rec, duration, n, work, prof)
                s["profiled"] = prof is not None
                samples[n].append(s)
                cpu = " ".join(f"{side}={c:.2f}" for side, c in s["cpu"].items())
                log(f"[{mode}] run {run + 1}/{runs} P={n}: {s['gbps']:.3f} Gb/s, "
                    f"{s['retransmits']} retransmits" + (f", daemon cores {cpu}" if cpu else "")
                    + f", machine busy {s['busy']:.2f}"
                    + (" (profiled)" if prof else ""))
        if extra is not None:
            extra(mode, lab, a, b, setup, rec, work)
    return [_summary(mode, n, samples[n]) for n in streams_list]


def run_e2e(modes: Sequence[str], streams_list: Sequence[int], duration: int, runs: int,
            tunneld: Path | None = None, log: Callable[[str], None] | None = None,
            profile_dir: Path | None = None, extra: Extra | None = None) -> dict[str, Any]:
    for tool in ("iperf3", "ip", "ss", "ping") + (("wireguard-go", "wg") if "wireguard-go" in modes else ()):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found (Debian: apt-get install iperf3 iproute2 iputils-ping "
                           f"wireguard-go wireguard-tools)")
    tunneld = tunneld or Path(sys.prefix) / "bin" / "tunneld"
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    result: dict[str, Any] = {"duration": duration, "runs": runs, "streams": list(streams_list),
                              "modes": list(modes), "cpu_count": os.cpu_count(), "mtu": MTU,
                              "rows": [], "ratios": {}, "labs": [], "errors": {}}
    profiler: Profiler | None = None
    if profile_dir is not None:
        result["profile"] = {"dir": str(profile_dir), "sides": [], "errors": []}
        pyspy = Path(sys.prefix) / "bin" / "py-spy"
        if not set(TUNNELD_MODES) & set(modes):
            result["profile"]["errors"].append("nothing profiled: --profile only profiles tunneld mode")
        elif not pyspy.exists():
            result["profile"]["errors"].append(f"{pyspy} not found (pip install py-spy); not profiled")
        else:
            profiler = Profiler(profile_dir, pyspy, log, result["profile"]["sides"])
        for err in result["profile"]["errors"]:
            log(f"[profile] {err}")
    with terminate_as_exit():
        for mode in modes:
            info: dict[str, Any] = {"mode": mode}
            try:
                rows = run_mode(mode, streams_list, duration, runs, tunneld, log, info, profiler, extra)
            except (LabError, subprocess.SubprocessError, OSError, KeyError, ValueError) as e:
                # Report it and go on with the other modes; the lab has been torn down already.
                log(f"[{mode}] failed: {e}")
                result["errors"][mode] = str(e)
            else:
                result["rows"] += rows
            result["labs"].append(info)
    med = {(r["mode"], r["streams"]): r["gbps_median"] for r in result["rows"]}
    measured = {r["mode"] for r in result["rows"]}
    for ours in TUNNELD_MODES:
        for base in ("wireguard-go", "veth"):
            if ours in measured and base in measured:
                result["ratios"][f"{ours}/{base}"] = {
                    str(n): med[(ours, n)] / med[(base, n)] for n in streams_list if med[(base, n)] > 0}
    return result


# -- output ---------------------------------------------------------------------------------------

def print_table(r: dict[str, Any], out: TextIO = sys.stdout) -> None:
    print(f"End-to-end TCP, iperf3 -t {r['duration']}, {r['runs']} run(s) per row, medians (min..max); "
          f"MTU {r['mtu']} in tunnels; {r['cpu_count']} CPUs", file=out)
    print("CPU = cores used by the tunnel daemon in host a (iperf3 client) / host b (server); "
          "busy = cores the whole machine kept busy (/proc/stat)", file=out)
    if "profile" in r:
        print("PROFILING ON (--profile): py-spy sampled both tunneld daemons during the first tunneld run "
              "of each streams count; those runs are slowed by it and are in the numbers below", file=out)
    head = f"| {'mode':<15} | {'streams':>7} | {'Gb/s (min..max)':<24} | {'retrans':>8} | " \
           f"{'CPU a':>6} | {'CPU b':>6} | {'busy':>5} |"
    print(head, file=out)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|", file=out)
    for row in r["rows"]:
        gb = f"{row['gbps_median']:.3f} ({row['gbps_min']:.3f}..{row['gbps_max']:.3f})"
        cpu = row["cpu_cores_median"]
        ca = f"{cpu['a']:.2f}" if "a" in cpu else "-"
        cb = f"{cpu['b']:.2f}" if "b" in cpu else "-"
        print(f"| {row['mode']:<15} | {row['streams']:>7} | {gb:<24} | {row['retransmits_median']:>8g} | "
              f"{ca:>6} | {cb:>6} | {row.get('busy_cores_median', 0):>5.2f} |", file=out)
    for name, per in r["ratios"].items():
        parts = [f"{n} stream{'s' if n != '1' else ''}: {v:.2f}x" for n, v in per.items()]
        print(f"{name} (median Gb/s): " + ", ".join(parts), file=out)
    for mode, err in r["errors"].items():
        print(f"{mode}: NOT MEASURED: {err.splitlines()[0] if err else 'failed'}", file=out)
    if "profile" in r:
        print_profile(r["profile"], out)


def print_profile(prof: dict[str, Any], out: TextIO = sys.stdout) -> None:
    """The top of each profile: the frames with the most own samples, as a share of all samples."""
    for err in prof["errors"]:
        print(f"profile: {err}", file=out)
    for side in prof["sides"]:
        head = f"Top of the profile: tunneld in {side['side']} ({side['role']}), {side['tag']}"
        files = ", ".join(side["files"]) or "no files"
        if not side.get("top"):
            why = "; ".join(side["errors"]) or "no samples"
            print(f"\n{head}: NOT PROFILED: {why} ({files})", file=out)
            continue
        failed = f" ({side['sample_errors']} failed)" if side.get("sample_errors") else ""
        print(f"\n{head}, {side['samples']} samples{failed}, own time per frame ({files}):", file=out)
        for frame, _count, pct in side["top"]:
            print(f"  {pct:5.1f}%  {frame}", file=out)
        for err in side["errors"]:
            print(f"  (also: {err})", file=out)


def main(args: argparse.Namespace) -> int:
    """Entry point for `python -m bench.throughput e2e` (arguments from add_arguments).

    Exit 0 when every mode was measured, 1 when a mode failed (the others are still reported),
    2 when not run as root.
    """
    return drive(args, lambda: run_e2e(args.modes, args.streams, args.duration, args.runs,
                                       Path(args.tunneld) if args.tunneld else None,
                                       profile_dir=Path(args.profile) if args.profile else None),
                 print_table, lambda r: dict(r["errors"]))


def drive(args: argparse.Namespace, measure: Callable[[], dict[str, Any]],
          show: Callable[[dict[str, Any]], None],
          failures: Callable[[dict[str, Any]], dict[str, str]]) -> int:
    """The e2e commands' common frame: root and argument checks (exit 2), the run (130 if interrupted),
    the result as JSON or tables, each failure on one line (exit 1 if any)."""
    if os.geteuid() != 0:
        print("bench e2e: needs root (network namespaces); run it with sudo", file=sys.stderr)
        return 2
    if args.duration < 1 or args.runs < 1:
        print("bench e2e: --duration and --runs must be at least 1", file=sys.stderr)
        return 2
    try:
        r = measure()
    except KeyboardInterrupt:  # the labs have been torn down on the way out
        print("bench e2e: interrupted; every namespace and process it started has been removed",
              file=sys.stderr)
        return 130
    if args.json:
        json.dump(r, sys.stdout, indent=2)
        print()
    else:
        show(r)
    failed = failures(r)
    for what, err in failed.items():
        print(f"bench e2e: {what} failed: {err}", file=sys.stderr)
    return 1 if failed else 0


def comma_subset(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated subset of ``choices`` (order kept, duplicates dropped);
    ``what`` names one item in the error ("mode", "row")."""
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what}(s) {', '.join(bad) or '(none)'}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))

    return parse


parse_modes = comma_subset(MODES, "mode")
"""argparse type for --modes: a comma-separated subset of MODES."""


def parse_streams(text: str) -> list[int]:
    """argparse type for --streams: comma-separated parallel stream counts (iperf3 -P), 1 to 128."""
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 or v > 128 for v in vals):
        raise argparse.ArgumentTypeError("give comma-separated integers from 1 to 128, e.g. 1,4")
    return list(dict.fromkeys(vals))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=int, default=10, help="seconds per iperf3 run (default 10)")
    p.add_argument("--runs", type=int, default=3, help="runs per mode and streams count (default 3)")
    p.add_argument("--streams", type=parse_streams, default=[1, 4],
                   help="comma-separated parallel streams, iperf3 -P (default 1,4)")
    p.add_argument("--modes", type=parse_modes, default=list(MODES),
                   help=f"comma-separated subset of {','.join(MODES)} (default all)")
    p.add_argument("--tunneld", default=None,
                   help="tunneld executable for tunneld mode (default: <sys.prefix>/bin/tunneld)")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="profile both tunneld daemons with py-spy during the first tunneld run of each "
                        "streams count: flamegraph SVG and raw stacks into DIR, top frames after the "
                        "table. Off by default: sampling costs CPU and changes the numbers")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
