"""Round-trip time through a tunnel: ping at 100 per second, idle and under a bulk TCP flow.

`ping -i 0.01 -c N` runs in host a towards b's address inside the tunnel (b's 2001:db8::2 on plain
veth); its per-reply "time=" lines are parsed here and the median, p99 and loss computed here. Under
load, one iperf3 TCP flow runs a -> b, the same way as the echo requests, which queue behind its data
(the replies travel back with its ACKs): a change that wins throughput by queueing shows here.
"""

from __future__ import annotations

import math
import re
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.e2e import IPERF_PORT, Setup, _alive, _tx_bytes, iperf_server
from bench.procs import Recorder
from lab.netns import Host, Lab, LabError, wait_for

INTERVAL = 0.01  # seconds between echo requests: 100 per second (root may go below ping's 0.2 s floor)
REPLY_WAIT = 1  # ping -W: seconds to wait for the last replies
LOAD_START_BYTES = 10_000_000  # the bulk flow counts as running once this much has left host a
_REPLY = re.compile(r"icmp_seq=(\d+)\b.*?\btime=([0-9.]+) ms")


def parse_ping(text: str) -> dict[int, float]:
    """icmp_seq -> round trip in µs, from ping's reply lines; a duplicate reply keeps the first time."""
    rtts: dict[int, float] = {}
    for line in text.splitlines():
        m = _REPLY.search(line)
        if m and "DUP!" not in line:
            rtts.setdefault(int(m.group(1)), float(m.group(2)) * 1000.0)
    return rtts


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100.0 * len(ordered)) - 1)]


def summarize(rtts: Sequence[float], sent: int) -> dict[str, Any]:
    """Median, p99 and max round trip in µs, and the share of requests without a reply."""
    got = len(rtts)
    out: dict[str, Any] = {"sent": sent, "received": got, "loss": 1.0 - got / sent if sent else 1.0}
    if got:
        out.update(median_us=statistics.median(rtts), p99_us=percentile(rtts, 99), max_us=max(rtts))
    return out


def ping_addr(setup: Setup, b: Host) -> str:
    """The address to ping: inside the tunnel, or b's IPv6 address on plain veth."""
    return setup.server_addr if ":" in setup.server_addr else b.addr6


def ping(lab: Lab, a: Host, addr: str, count: int) -> dict[str, Any]:
    """`count` echo requests at INTERVAL from a to addr, summarized."""
    argv = ["ping", "-6" if ":" in addr else "-4", "-n", "-i", str(INTERVAL), "-W", str(REPLY_WAIT),
            "-c", str(count), addr]
    r = lab.run(a, argv, timeout=count * INTERVAL + REPLY_WAIT + 30, check=False)
    if r.returncode not in (0, 1):  # 1: some requests got no reply; 2: an error
        raise LabError(f"ping exited with {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}")
    return summarize(list(parse_ping(r.stdout).values()), count)


def under_load(lab: Lab, a: Host, b: Host, setup: Setup, rec: Recorder, work: Path,
               count: int) -> dict[str, Any]:
    """ping as above while one iperf3 TCP flow runs a -> b; also reports the flow's rate meanwhile."""
    slog = work / "iperf3-load-server.log"
    server = iperf_server(lab, b, setup, rec, slog)
    try:
        ifname = setup.tunnel_if or a.ifname
        tx0 = _tx_bytes(lab, a, ifname)
        client = rec.spawn(lab, a, ["iperf3", "-c", setup.server_addr, "-p", str(IPERF_PORT),
                                    "-t", str(math.ceil(count * INTERVAL) + 60)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: _alive(client, "bulk iperf3 client")
                     and _tx_bytes(lab, a, ifname) - tx0 > LOAD_START_BYTES,
                     timeout=15, what="the bulk TCP flow to start")
            tx1, t1 = _tx_bytes(lab, a, ifname), time.monotonic()
            out = ping(lab, a, ping_addr(setup, b), count)
            tx2, t2 = _tx_bytes(lab, a, ifname), time.monotonic()
            _alive(client, "bulk iperf3 client")  # the flow must have lasted the whole ping
        finally:
            lab.stop(client)
    finally:
        lab.stop(server)
    out["load_gbps"] = (tx2 - tx1) * 8 / (t2 - t1) / 1e9
    return out


def measure(lab: Lab, a: Host, b: Host, setup: Setup, rec: Recorder, work: Path,
            count: int) -> dict[str, Any]:
    """The idle and the loaded round trip of one mode."""
    return {"idle": ping(lab, a, ping_addr(setup, b), count),
            "load": under_load(lab, a, b, setup, rec, work, count)}
