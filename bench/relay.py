"""Throughput and round trip through the TURN relay beside the direct path: `python -m bench.relay [--json]`.

One NAT journey lab (lab.journey): two devices behind two masquerading NATs, the account's serve-dns,
coturn. The direct path between the two sites starts blocked, so the peers go through coturn; the relay
row is measured; then the direct path is let through, the peers upgrade to it (a direct probe finds it
within one upgrade interval) and the direct row is measured in the same run. Per row: the round trip
(`ping -6`, 20 probes 50 ms apart: min/avg/max) and the TCP throughput a -> b (`iperf3`, 3 s, one
stream), through the tunnel in both cases: the relay adds a hop and ChannelData framing (4 bytes, or a
Send indication's 36 until the channel is bound), the ESP stays end to end.

Everything is removed by the Lab, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import log_tail, run_in_lab
from lab.journey import Journey, journey, path_of, ping_peer, wait_path
from lab.netns import LabError, wait_for
from lab.topology import block_direct

IPERF_PORT = 5201
IPERF_SECONDS = 3
PINGS = 20
UPGRADE_TIMEOUT = 30.0  # seconds for the peers to find the direct path once it is let through


def _rtt(j: Journey) -> dict[str, float]:
    out = j.lab.run(j.a.host, ["ping", "-6", "-q", "-c", str(PINGS), "-i", "0.05", "-W", "2", j.b.ula],
                    check=False, timeout=30).stdout
    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", out)
    if m is None:
        raise LabError(f"ping through the tunnel failed: {out.strip()[-300:]}")
    return {"rtt_min_ms": float(m[1]), "rtt_avg_ms": float(m[2]), "rtt_max_ms": float(m[3])}


def _throughput(j: Journey, work: Path) -> float:
    """Mbit/s received by b in one iperf3 run a -> b over the tunnel."""
    log = work / "iperf3-server.log"
    with log.open("ab") as out:
        server = j.lab.spawn(j.b.host, ["iperf3", "-s", "-1", "-B", j.b.ula, "-p", str(IPERF_PORT)],
                             stdout=out, stderr=out)

    def listening() -> bool:
        if server.poll() is not None:
            raise LabError(f"iperf3 server exited: {log_tail(log)}")
        out = j.lab.run(j.b.host, ["ss", "-ltnH", f"sport = :{IPERF_PORT}"], check=False).stdout
        return bool(out.strip())

    wait_for(listening, timeout=10, what="iperf3 server to listen")
    r = j.lab.run(j.a.host, ["iperf3", "-c", j.b.ula, "-p", str(IPERF_PORT), "-t", str(IPERF_SECONDS), "-J"],
                  check=False, timeout=IPERF_SECONDS + 30)
    j.lab.stop(server)
    try:
        bps = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
    except (ValueError, KeyError) as e:
        raise LabError(f"iperf3 gave no result ({e}): {r.stdout[-300:]} {r.stderr[-300:]}") from None
    return round(float(bps) / 1e6, 1)


def _row(j: Journey, path: str, work: Path) -> dict[str, Any]:
    pa = path_of(j.a, "b")
    row: dict[str, Any] = {"path": path, "via": pa.get("relay") if path == "relay" else pa.get("endpoint")}
    row.update(_rtt(j))
    row["mbit_s"] = _throughput(j, work)
    if path_of(j.a, "b").get("path") != path:
        raise LabError(f"the path changed during the {path} measurement: {path_of(j.a, 'b')}")
    return row


def run_relay(work: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    with journey(work, "masquerade", relay=True, blocked=True, sshd=False) as j:
        ping_peer(j, j.a, j.b, timeout=20)
        wait_path(j, "relay", timeout=15)
        rows = [_row(j, "relay", work)]
        block_direct(j.lab, j.net, blocked=False)
        began = time.monotonic()
        wait_path(j, "direct", timeout=UPGRADE_TIMEOUT)
        upgrade_s = round(time.monotonic() - began, 1)
        rows.append(_row(j, "direct", work))
        lab = {"lab_id": j.lab.id, "namespaces": [h.netns for h in j.lab.hosts],
               "pids": [p.pid for p in j.lab.procs]}
    return {"rows": rows, "upgrade_s": upgrade_s, "seconds": round(time.monotonic() - t0, 1), "lab": lab}


def print_table(r: dict[str, Any]) -> None:
    head = "| path   | via                    | rtt min/avg/max ms   | TCP a->b Mbit/s |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for row in r["rows"]:
        rtt = f"{row['rtt_min_ms']:.2f}/{row['rtt_avg_ms']:.2f}/{row['rtt_max_ms']:.2f}"
        print(f"| {row['path']:<6} | {row['via'] or '-':<22} | {rtt:<20} | {row['mbit_s']:>15.1f} |")
    print(f"\nupgraded from relay to direct in {r['upgrade_s']} s; {r['seconds']} s in all")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench relay: needs root (network namespaces); run it with sudo", file=sys.stderr)
        return 2
    return run_in_lab("relay", run_relay, a.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
