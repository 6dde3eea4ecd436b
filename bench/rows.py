"""More rows for `python -m bench.throughput e2e --rows ...`: latency, small packets, cost per byte.

Each mode's lab (bench/e2e.py) first runs its TCP rows, if asked, then the rows here in the same lab:
- latency: ping round trip at 100/s, idle and under a bulk TCP flow a -> b (bench/latency.py);
- small: the highest UDP rate of 64- and 1200-byte datagrams under 0.1 % loss (bench/smallpkt.py);
- cost: daemon CPU seconds per GB, sender side (host a) and receiver side (host b), from the TCP
  rows' CPU columns and the bytes iperf3 delivered; it needs the TCP rows, so it runs them.
`--quick` shortens everything for tests; its numbers are rough.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, TextIO

from bench import e2e, latency, smallpkt
from bench.procs import Recorder
from lab.netns import Host, Lab, LabError

ROWS = ("tcp", "latency", "small", "cost")
SIZES = (64, 1200)


parse_rows = e2e.comma_subset(ROWS, "row")
"""argparse type for --rows: a comma-separated subset of ROWS."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=parse_rows, default=["tcp"],
                   help=f"comma-separated subset of {','.join(ROWS)} (default tcp)")
    p.add_argument("--quick", action="store_true",
                   help="short latency and small-packet rows (1 s of pings, 2 probes of 1 s): for tests")


def settings(quick: bool) -> dict[str, Any]:
    """How long each new row measures."""
    if quick:
        return {"pings": 100, "start_pps": 5000.0, "max_probes": 2, "probe_seconds": 1}
    return {"pings": 500, "start_pps": 20000.0, "max_probes": 8, "probe_seconds": 2}


def cost_rows(tcp_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Daemon CPU seconds per GB (1e9 bytes) iperf3 delivered, per side, medians over the runs."""
    out = []
    for row in tcp_rows:
        if set(row["cpu_cores_median"]) != {"a", "b"}:
            continue  # no daemons (plain veth)
        per: dict[str, list[float]] = {"a": [], "b": []}
        for s in row["samples"]:
            gb = s["received_bytes"] / 1e9
            if gb > 0:
                for side in per:
                    per[side].append(s["cpu"][side] * s["seconds"] / gb)
        if per["a"]:
            out.append({"mode": row["mode"], "streams": row["streams"],
                        "sender_cpu_s_per_gb": statistics.median(per["a"]),
                        "receiver_cpu_s_per_gb": statistics.median(per["b"])})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The TCP rows (if asked, or needed for cost) and the new rows of every mode, in one run."""
    want, cfg = set(args.rows), settings(args.quick)
    extra_rows: dict[str, dict[str, Any]] = {}

    def extra(mode: str, lab: Lab, a: Host, b: Host, setup: e2e.Setup, rec: Recorder, work: Path) -> None:
        got: dict[str, Any] = extra_rows.setdefault(mode, {})
        for name in ("latency", "small"):
            if name not in want:
                continue
            print(f"[{mode}] {name} rows", file=sys.stderr, flush=True)
            try:
                if name == "latency":
                    got[name] = latency.measure(lab, a, b, setup, rec, work, cfg["pings"])
                else:
                    got[name] = smallpkt.measure(lab, a, b, setup, rec, work, SIZES, cfg["start_pps"],
                                                 cfg["max_probes"], cfg["probe_seconds"])
            except LabError as e:  # reported, and the other rows go on
                got[name] = {"error": str(e)}

    streams = args.streams if want & {"tcp", "cost"} else []
    r = e2e.run_e2e(args.modes, streams, args.duration, args.runs,
                    Path(args.tunneld) if args.tunneld else None,
                    profile_dir=Path(args.profile) if args.profile else None, extra=extra)
    r["row_kinds"], r["settings"], r["extra"] = sorted(want), cfg, extra_rows
    if "cost" in want:
        r["cost"] = cost_rows(r["rows"])
    return r


# -- output ---------------------------------------------------------------------------------------

def _missing(mode: str, got: dict[str, Any]) -> str:
    why = (str(got.get("error") or "no result").splitlines() or ["failed"])[0]
    return f"| {mode:<15} | NOT MEASURED: {why} |"


def _us(d: dict[str, Any], key: str) -> str:
    return f"{d[key]:.0f}" if key in d else "-"


def print_tables(r: dict[str, Any], out: TextIO = sys.stdout) -> None:
    kinds, cfg = r["row_kinds"], r["settings"]
    if "tcp" in kinds or "cost" in kinds:
        e2e.print_table(r, out)
    modes = [m for m in r["modes"] if m in r["extra"]]
    if "latency" in kinds:
        print(f"\nRound trip a -> b, ping every {latency.INTERVAL * 1000:g} ms, {cfg['pings']} pings; "
              "load = one iperf3 TCP flow a -> b (the same way as the requests)", file=out)
        print("| mode            | idle median µs | idle p99 µs | idle loss | load median µs | load p99 µs "
              "| load loss | load Gb/s |", file=out)
        print("|-----------------|---------------:|------------:|----------:|---------------:|------------:"
              "|----------:|----------:|", file=out)
        for m in modes:
            lat = r["extra"][m].get("latency", {})
            if "error" in lat or not lat:
                print(_missing(m, lat), file=out)
                continue
            i, ld = lat["idle"], lat["load"]
            print(f"| {m:<15} | {_us(i, 'median_us'):>14} | {_us(i, 'p99_us'):>11} | {i['loss']:>8.1%} | "
                  f"{_us(ld, 'median_us'):>14} | {_us(ld, 'p99_us'):>11} | {ld['loss']:>8.1%} | "
                  f"{ld['load_gbps']:>9.2f} |", file=out)
    if "small" in kinds:
        print(f"\nHighest UDP rate a -> b under {smallpkt.LOSS_LIMIT:g} % loss (at most {cfg['max_probes']} "
              f"probes of {cfg['probe_seconds']} s per size; * = the iperf3 sender was the limit)", file=out)
        print("| mode            | size | packets/s | Mb/s payload | probes |", file=out)
        print("|-----------------|-----:|----------:|-------------:|-------:|", file=out)
        for m in modes:
            small = r["extra"][m].get("small", {})
            if "error" in small or not small:
                print(_missing(m, small), file=out)
                continue
            for size, s in small.items():
                star = "*" if s["sender_bound"] else " "
                print(f"| {m:<15} | {size:>4} | {s['pps']:>8.0f}{star} | {s['mbps']:>12.1f} | "
                      f"{len(s['probes']):>6} |", file=out)
    if "cost" in kinds:
        print("\nCost per byte: daemon CPU seconds per GB delivered (medians over the TCP runs)", file=out)
        print("| mode            | streams | sender (a) s/GB | receiver (b) s/GB |", file=out)
        print("|-----------------|--------:|----------------:|------------------:|", file=out)
        for c in r["cost"]:
            print(f"| {c['mode']:<15} | {c['streams']:>7} | {c['sender_cpu_s_per_gb']:>15.2f} | "
                  f"{c['receiver_cpu_s_per_gb']:>17.2f} |", file=out)


def main(args: argparse.Namespace) -> int:
    """`python -m bench.throughput e2e --rows ...`: exit 0 when every mode and row was measured,
    1 when one failed (the others are still reported), 2 when not run as root."""
    return e2e.drive(args, lambda: run(args), print_tables, _failures)


def _failures(r: dict[str, Any]) -> dict[str, str]:
    failed = dict(r["errors"])
    for mode, got in r["extra"].items():
        failed.update({f"{mode} {name}": row["error"] for name, row in got.items() if "error" in row})
    return failed
