"""Signed DNS UPDATE rate, ours against BIND, and update-to-event latency with many LLQ or Push watchers.

One two-host lab (lab.topology.two_hosts). Host b runs, in the same run, `tunneld serve-dns` on
192.0.2.2:5353 (--default-lease 7200, so plain RFC 2136 updates are accepted) and BIND 9 (lab.bind)
on 192.0.2.2:5354, both authoritative for the same fresh account domain and both trusting the TSIG key
`tunneld account new` printed. The client (lab/progs/dns_client.py) runs in host a:

- updates: per round and server, N signed UPDATEs (one AAAA each, at distinct names) sent one at a
  time over UDP, then N more with W outstanding. Rounds alternate ours, BIND, ours, BIND, ... so that
  noise from other work on the machine falls on both alike; the table shows medians over the rounds,
  and the CPU time each server used per update. Every reply must be signed and NOERROR: any failure
  fails the run.
- events: K LLQ watchers (one process, one UDP socket each, TSIG-signed) on one name at our server,
  then M updates to that name, one after another; for every watcher x update, the time from the
  UPDATE's send to the kernel's receive timestamp of the watcher's event. BIND has no LLQ (RFC 8764).
- push: the same with K DNS Push sessions over TLS (serve-dns's --tls-listen on port 853), each with a
  client certificate under the account CA; LLQ and Push runs alternate (LLQ, Push, Push, LLQ) with half
  the updates each, and the samples of each kind are pooled.

Every process is ended by PID and the namespaces deleted by the Lab, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from bench import dns_front
from bench.procs import Recorder, log_tail, tree_cpu_seconds
from lab import progs
from lab.bind import NAMED, Bind
from lab.netns import Host, Lab, LabError, terminate_as_exit, wait_for
from lab.topology import two_hosts

ZONE = "bench.tunneld.test"
SERVER = "192.0.2.2"
OURS_PORT = 5353
BIND_PORT = 5354
SERVERS = ("tunneld", "bind", "front", "primary")
MODES = ("sequential", "pipelined")
LABELS = {"tunneld": "tunneld serve-dns", "bind": "BIND named", "front": "front -> BIND",
          "primary": "BIND primary"}
TLS_PORT = 853
EVENT_LABELS = {"llq": "LLQ over UDP", "push": "DNS Push over TLS"}


def _bind_version() -> str:
    try:
        out = subprocess.run([NAMED, "-v"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "BIND 9"
    return out.split(" (")[0] or "BIND 9"


def _client(lab: Lab, a: Host, rec: Recorder, args: list[str], timeout: float) -> dict[str, Any]:
    """Run lab.progs.dns_client in host a; its JSON result."""
    p = rec.spawn(lab, a, progs.argv("dns_client", *args), cwd=progs.REPO,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return progs.finish(lab, p, timeout, f"dns client {args[0]}")


def _dig_ok(lab: Lab, a: Host, port: int) -> bool:
    r = lab.run(a, ["dig", f"@{SERVER}", "-p", str(port), "+norec", "+tries=1", "+time=1", "SOA", ZONE],
                check=False, timeout=10)
    return "status: NOERROR" in r.stdout


def _summary(samples: list[dict[str, Any]], cpu: list[float]) -> dict[str, Any]:
    rates = [s["per_second"] for s in samples]
    return {
        "per_second_median": statistics.median(rates),
        "per_second_min": min(rates),
        "per_second_max": max(rates),
        "latency_median_ms": statistics.median(s["median_ms"] for s in samples),
        "latency_p90_ms": statistics.median(s["p90_ms"] for s in samples),
        "server_cpu_us_per_update": statistics.median(cpu) * 1e6,
        "failures": sum(s["failures"] for s in samples),
        "samples": samples,
    }


def run_dns(updates: int, window: int, rounds: int, watchers: int, events: int, front_watchers: int = 0,
            lag: int = 0, hold: int = 0, log: Callable[[str], None] | None = None,
            info: dict[str, Any] | None = None) -> dict[str, Any]:
    for tool in ("ip", "dig"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found (Debian: apt-get install iproute2 bind9-dnsutils)")
    if not os.access(NAMED, os.X_OK):
        raise LabError(f"{NAMED} not found (Debian: apt-get install bind9)")
    tunneld = Path(sys.prefix) / "bin" / "tunneld"
    if not tunneld.exists():
        raise LabError(f"{tunneld} not found: install the project into this venv (pip install -e .)")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    info = {} if info is None else info
    rec = Recorder()
    result: dict[str, Any] = {"updates": updates, "window": window, "rounds": rounds, "watchers": watchers,
                              "events": events, "cpu_count": os.cpu_count(), "bind_version": _bind_version(),
                              "rows": {}, "ratios": {}, "llq": {}, "push": {},
                              "front": {"events": {}, "front_watchers": front_watchers}}
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {(s, m): [] for s in SERVERS for m in MODES}
    cpu: dict[tuple[str, str], list[float]] = {(s, m): [] for s in SERVERS for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp, Lab() as lab:
        work = Path(tmp)
        info.update(lab_id=lab.id, pids=rec.pids)
        a, b = two_hosts(lab)
        info["namespaces"] = [a.netns, b.netns]
        out = subprocess.run([str(tunneld), "account", "new", ZONE], capture_output=True, text=True,
                             check=True, timeout=30).stdout
        secret = work / "secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(out.splitlines()[0] + "\n")
        stanza = out[out.index('key "'):]

        slog = work / "serve-dns.log"
        with slog.open("ab") as logf:
            ours = rec.spawn(lab, b, [str(tunneld), "serve-dns", "--zone", ZONE, "--secret-file", str(secret),
                                      "--listen", f"{SERVER}:{OURS_PORT}", "--db", str(work / "dns.sqlite"),
                                      "--default-lease", "7200", "--user", "root",
                                      "--tls-listen", f"{SERVER}:{TLS_PORT}"], stdout=logf, stderr=logf)

        def ready() -> bool:
            if ours.poll() is not None:
                raise LabError(f"serve-dns exited {ours.returncode}: {log_tail(slog)}")
            return _dig_ok(lab, a, OURS_PORT)

        wait_for(ready, timeout=15, interval=0.05, what="serve-dns to answer")
        with Bind(lab, b, ZONE, stanza, work / "bind", port=BIND_PORT, address=SERVER) as bind, \
                dns_front.front(lab, a, b, rec, work / "front", tunneld, ZONE, secret,
                                dns_front.hold_caps(hold)) as fr:
            assert bind.proc is not None
            rec.pids.append(bind.proc.pid)
            assert fr.primary.proc is not None
            pids = {"tunneld": ours.pid, "bind": bind.proc.pid, "front": fr.proc.pid,
                    "primary": fr.primary.proc.pid}
            ports = {"tunneld": OURS_PORT, "bind": BIND_PORT, "front": dns_front.FRONT_PORT,
                     "primary": dns_front.PRIMARY_PORT}
            base = [SERVER, "", ZONE, str(secret)]
            timeout = 60 + updates * 0.05

            def updates_run(server: str, mode: str, prefix: str, count: int) -> tuple[dict[str, Any], float]:
                w = 1 if mode == "sequential" else window
                argv = ["updates", *base, "--count", str(count), "--window", str(w), "--prefix", prefix]
                argv[2] = str(ports[server])
                if server == "primary":  # the front's primary directly: it takes the front key only
                    argv.append("--front-key")
                cpu0 = tree_cpu_seconds(pids[server])
                r = _client(lab, a, rec, argv, timeout)
                used = tree_cpu_seconds(pids[server]) - cpu0
                if ours.poll() is not None:
                    raise LabError(f"serve-dns exited {ours.returncode}: {log_tail(slog)}")
                fr.check()
                return r, used / count

            if rounds > 0:
                log(f"[dns] lab {lab.id}: warming up")
            for server in SERVERS if rounds > 0 else ():
                updates_run(server, "pipelined", f"warm-{server}", min(updates, 50))
            for rnd in range(rounds):
                for mode in MODES:  # ours, BIND, ours, BIND: drift in the machine's load hits both alike
                    for server in SERVERS:
                        r, per_update = updates_run(server, mode, f"r{rnd}-{server}-{mode[0]}", updates)
                        samples[(server, mode)].append(r)
                        cpu[(server, mode)].append(per_update)
                        log(f"[dns] round {rnd + 1}/{rounds} {server} {mode}: {r['per_second']:.0f}/s, "
                            f"median {r['median_ms']:.2f} ms, server CPU {per_update * 1e6:.0f} us/update, "
                            f"failures {r['failures']}")

            if watchers > 0 and events > 0:
                # LLQ, Push, Push, LLQ: each half of the updates, so drift in the machine's load hits both.
                halves: dict[str, list[dict[str, Any]]] = {"llq": [], "push": []}
                for kind in ("llq", "push", "push", "llq"):
                    count = events // 2 if not halves[kind] else events - events // 2
                    if count == 0:
                        continue
                    log(f"[dns] {watchers} {EVENT_LABELS[kind]} watchers, {count} updates")
                    command = "events" if kind == "llq" else "push-events"
                    argv = [command, *base, "--watchers", str(watchers), "--events", str(count),
                            "--name", f"watched-{kind}"]
                    argv[2] = str(OURS_PORT)
                    if kind == "push":
                        argv += ["--tls-port", str(TLS_PORT)]
                    halves[kind].append(_client(lab, a, rec, argv, 60 + count * 12))
                result["llq"] = _events_summary(halves["llq"])
                result["push"] = _events_summary(halves["push"])
            if events > 0:  # LLQ watchers on the front and on serve-dns alone, front first at each count
                for k in sorted({n for n in (watchers, front_watchers) if n > 0}):
                    row: dict[str, Any] = {}
                    for server in ("front", "tunneld"):
                        log(f"[dns] {k} LLQ watchers on {LABELS[server]}, {events} updates")
                        argv = ["events", *base, "--watchers", str(k), "--events", str(events),
                                "--name", f"watched-{server}-{k}"]
                        argv[2] = str(ports[server])
                        took = 60 + events * 12 + k * 0.05
                        row[server] = _events_summary([_client(lab, a, rec, argv, took)])
                        fr.check()
                    result["front"]["events"][str(k)] = row
            if lag > 0:
                log(f"[dns] {lag} updates through the front, each until the secondary serves it")
                result["front"]["secondary"] = dns_front.secondary_lag(lab, a, rec, fr, base, lag)
            if hold > 0:
                log(f"[dns] {hold} LLQs held at the front")
                result["front"]["memory"] = dns_front.held_memory(lab, a, rec, fr, base, hold)
        if ours.poll() is not None:
            raise LabError(f"serve-dns exited {ours.returncode}: {log_tail(slog)}")
        if "Traceback" in log_tail(slog, 100_000):
            raise LabError(f"serve-dns logged a traceback: {log_tail(slog)}")

    for server in SERVERS if rounds > 0 else ():
        for mode in MODES:
            result["rows"][f"{server}/{mode}"] = {"server": server, "mode": mode,
                                                  **_summary(samples[(server, mode)], cpu[(server, mode)])}
    for mode in MODES if rounds > 0 else ():
        theirs = result["rows"][f"bind/{mode}"]["per_second_median"]
        if theirs > 0:
            result["ratios"][mode] = result["rows"][f"tunneld/{mode}"]["per_second_median"] / theirs
    dns_front.goals(result)  # the added latencies, into result["front"]
    return result


def _events_summary(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The event latency of the runs in ``parts`` together (their samples pooled)."""
    if not parts:
        return {}
    samples = sorted(x for p in parts for x in p["samples_ms"])

    def pct(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))] if samples else 0.0

    counters: dict[str, int] = {}
    for p in parts:
        for k, v in p.get("client_counters", {}).items():
            counters[k] = counters.get(k, 0) + v
    return {"watchers": parts[0]["watchers"], "runs": len(parts),
            "updates": sum(p["updates"] for p in parts), "expected": sum(p["expected"] for p in parts),
            "received": sum(p["received"] for p in parts), "failures": sum(p["failures"] for p in parts),
            "setup_seconds": [p["setup_seconds"] for p in parts],
            "median_ms": pct(0.5), "p90_ms": pct(0.9), "max_ms": samples[-1] if samples else 0.0,
            "client_counters": counters}


def failures(r: dict[str, Any]) -> list[str]:
    """What makes the run fail: failed updates, and events that never arrived."""
    bad = [f"{name}: {row['failures']} failed update(s)"
           for name, row in r["rows"].items() if row["failures"]]
    front = r.get("front") or {}
    more = [(f"front {k} {server}", ev)
            for k, row in front.get("events", {}).items() for server, ev in row.items()]
    lag = front.get("secondary")
    if lag and (lag["failures"] or lag["served"] < lag["updates"]):
        bad.append(f"secondary: {lag['served']} of {lag['updates']} served, failures {lag['failure_kinds']}")
    for kind, ev in [*[(k, r.get(k) or {}) for k in ("llq", "push")], *more]:
        if not ev:
            continue
        if ev["failures"]:
            bad.append(f"{kind}: {ev['failures']} failed update(s)")
        if ev["received"] < ev["expected"]:
            seen = ev.get("client_counters", {})
            why = ", ".join(f"{k} {v}" for k, v in seen.items() if v)
            bad.append(f"{kind}: {ev['received']} of {ev['expected']} events received"
                       + (f" (watchers: {why})" if why else ""))
    return bad


def print_table(r: dict[str, Any], out: TextIO = sys.stdout) -> None:
    print(f"Signed DNS UPDATE over UDP (TSIG hmac-sha256, one AAAA per update), {r['updates']} updates x "
          f"{r['rounds']} interleaved rounds per mode (medians, min..max); server and client in two "
          f"namespaces on one machine, {r['cpu_count']} CPUs; {r['bind_version']}", file=out)
    head = (f"| {'server':<17} | {'mode':<14} | {'updates/s (min..max)':<22} | {'median ms':>9} | "
            f"{'p90 ms':>7} | {'server CPU us/upd':>17} | {'failed':>6} |")
    print(head, file=out)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|", file=out)
    for row in r["rows"].values():
        mode = "sequential" if row["mode"] == "sequential" else f"window {r['window']}"
        rate = f"{row['per_second_median']:.0f} ({row['per_second_min']:.0f}..{row['per_second_max']:.0f})"
        print(f"| {LABELS[row['server']]:<17} | {mode:<14} | {rate:<22} | {row['latency_median_ms']:>9.3f} | "
              f"{row['latency_p90_ms']:>7.3f} | {row['server_cpu_us_per_update']:>17.0f} | "
              f"{row['failures']:>6} |", file=out)
    if r["ratios"]:
        parts = [f"{'sequential' if m == 'sequential' else 'window ' + str(r['window'])}: {v:.2f}x"
                 for m, v in r["ratios"].items()]
        print("tunneld/BIND (median updates/s): " + ", ".join(parts), file=out)
    print("(server CPU us/upd: CPU time the server process used during the run, per update; BIND named: a "
          "BIND alone; BIND primary: the front's own primary updated directly with the front key, so that it "
          "NOTIFYs the front and the secondary as it does behind the front)", file=out)
    print(file=out)
    print(f"Update-to-event latency: {r['watchers']} watchers on one name, {r['events']} updates to it, one "
          "at a time, LLQ and Push alternated (LLQ, Push, Push, LLQ, half the updates each); LLQ watchers: "
          "TSIG-signed, one UDP socket each; Push watchers: one TLS session each with a client certificate "
          "under the account CA; send of the UPDATE (UDP) -> kernel receive timestamp of each watcher's "
          "event datagram or of the TCP segment completing its PUSH", file=out)
    head = (f"| {'server':<17} | {'watchers':<17} | {'events received/expected':<31} | {'median ms':>9} | "
            f"{'p90 ms':>7} | {'max ms':>7} |")
    print(head, file=out)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|", file=out)
    for kind in ("llq", "push"):
        ev = r.get(kind) or {}
        if ev:
            got = f"{ev['received']}/{ev['expected']}"
            print(f"| {LABELS['tunneld']:<17} | {EVENT_LABELS[kind]:<17} | {got:<31} | "
                  f"{ev['median_ms']:>9.3f} | {ev['p90_ms']:>7.3f} | {ev['max_ms']:>7.3f} |", file=out)
        else:
            print(f"| {LABELS['tunneld']:<17} | {EVENT_LABELS[kind]:<17} | {'not measured':<31} | {'-':>9} | "
                  f"{'-':>7} | {'-':>7} |", file=out)
    print(f"| {LABELS['bind']:<17} | {'-':<17} | {'no LLQ or Push (RFC 8764, 8765)':<31} | {'-':>9} | "
          f"{'-':>7} | {'-':>7} |", file=out)
    dns_front.print_front(r, out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--updates", type=int, default=500, help="UPDATEs per round and mode (default 500)")
    p.add_argument("--window", type=int, default=32, help="outstanding UPDATEs when pipelined (default 32)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds (default 3; 0: no UPDATE rows, e.g. to run the --hold row alone "
                        "with --watchers 0 --front-watchers 0 --lag 0)")
    p.add_argument("--watchers", type=int, default=100, help="LLQ watchers (default 100)")
    p.add_argument("--events", type=int, default=20, help="updates to the watched name (default 20)")
    p.add_argument("--front-watchers", type=int, default=1000,
                   help="LLQ watchers on the front and serve-dns alone, besides --watchers "
                        "(default 1000; 0: none)")
    p.add_argument("--lag", type=int, default=20,
                   help="updates through the front timed until the secondary serves them "
                        "(default 20; 0: none)")
    p.add_argument("--hold", type=int, default=10000,
                   help="LLQs held at the front while its memory is read (default 10000; 0: none)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def main(args: argparse.Namespace) -> int:
    """Entry point for `python -m bench.throughput dns`: exit 0 on success, 1 when an update failed or
    an event did not arrive (the table is still printed), 2 on bad arguments or without root."""
    if os.geteuid() != 0:
        print("bench dns: needs root (network namespaces); run it with sudo", file=sys.stderr)
        return 2
    for name in ("updates", "window"):
        if getattr(args, name) < 1:
            print(f"bench dns: --{name} must be at least 1", file=sys.stderr)
            return 2
    if args.rounds < 0:
        print("bench dns: --rounds must not be negative", file=sys.stderr)
        return 2
    if args.updates > 65535 or min(args.watchers, args.events, args.front_watchers, args.lag, args.hold) < 0:
        print("bench dns: --updates must be at most 65535, --watchers, --events, --front-watchers, --lag and "
              "--hold not negative", file=sys.stderr)
        return 2
    info: dict[str, Any] = {}
    try:
        with terminate_as_exit():
            r = run_dns(args.updates, args.window, args.rounds, args.watchers, args.events,
                        args.front_watchers, args.lag, args.hold, info=info)
    except KeyboardInterrupt:
        print("bench dns: interrupted; every namespace and process it started has been removed",
              file=sys.stderr)
        return 130
    except (LabError, subprocess.SubprocessError, OSError, ValueError) as e:
        print(f"bench dns: failed: {e}", file=sys.stderr)
        return 1
    r["lab"] = info
    if args.json:
        json.dump(r, sys.stdout, indent=2)
        print()
    else:
        print_table(r)
    bad = failures(r)
    for line in bad:
        print(f"bench dns: {line}", file=sys.stderr)
    return 1 if bad else 0
