"""Small-packet rate: the highest UDP rate of SIZE-byte datagrams a -> b with under 0.1 % loss.

Each probe is one `iperf3 -u -l SIZE -b RATE -t T` run through the mode's tunnel. The search is
bounded: it doubles the rate from a start until a probe loses 0.1 % or more (or the iperf3 sender
cannot reach the asked rate: then that is the ceiling), then bisects between the best clean rate and
the first lossy one, within a fixed number of probes. The rate reported is what arrived (packets
sent minus lost, per second) at the best clean probe, in packets/s and in Mb/s of UDP payload.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.e2e import IPERF_PORT, Setup, iperf_server
from bench.procs import Recorder, log_tail
from lab.netns import Host, Lab, LabError

LOSS_LIMIT = 0.1  # percent: a probe losing this much or more is over the rate
SENDER_SHORT = 0.9  # a probe whose sender reached under this share of the asked rate is sender-bound
STOP_RATIO = 1.05  # bisection ends once the lossy rate is within 5 % of the clean one


def probe(lab: Lab, a: Host, b: Host, setup: Setup, rec: Recorder, work: Path, size: int, pps: float,
          seconds: int) -> dict[str, Any]:
    """One iperf3 UDP run of `size`-byte datagrams asked at `pps` packets/s for `seconds`."""
    slog = work / "iperf3-udp-server.log"
    server = iperf_server(lab, b, setup, rec, slog)
    try:
        r = lab.run(a, ["iperf3", "-u", "-c", setup.server_addr, "-p", str(IPERF_PORT), "-l", str(size),
                        "-b", str(int(pps * size * 8)), "-t", str(seconds), "-J"],
                    timeout=seconds + 30, check=False)
    finally:
        lab.stop(server)
    try:
        end = json.loads(r.stdout)["end"]
        sent, got = end["sum_sent"], end["sum_received"]
    except (json.JSONDecodeError, KeyError):
        raise LabError(f"iperf3 -u (exit {r.returncode}) gave no result: {(r.stderr or r.stdout)[-500:]}; "
                       f"server: {log_tail(slog, 500)}") from None
    packets, lost = int(got["packets"]), int(got["lost_packets"])
    lost_pct = 100.0 * lost / packets if packets else 100.0
    return {"asked_pps": pps, "sent_pps": int(sent["packets"]) / float(sent["seconds"]),
            "received_pps": (packets - lost) / float(got["seconds"]), "lost_percent": lost_pct}


def search(run: Callable[[float], dict[str, Any]], start_pps: float, max_probes: int) -> dict[str, Any]:
    """Doubling then bisection over `run(pps)`, at most `max_probes` calls; the best clean probe."""
    probes: list[dict[str, Any]] = []
    clean: float | None = None  # highest asked rate without loss
    lossy: float | None = None  # lowest asked rate with loss (or beyond the sender)
    rate, sender_bound = start_pps, False
    while len(probes) < max_probes:
        p = run(rate)
        probes.append(p)
        ok = p["lost_percent"] < LOSS_LIMIT
        short = p["sent_pps"] < SENDER_SHORT * rate
        if ok and short:
            sender_bound = True  # the sender is the limit: asking more will not tell us more
            break
        if ok:
            clean = rate
        else:
            lossy = rate
        if lossy is None:
            rate *= 2
        elif clean is None:
            rate /= 2
        elif lossy / clean <= STOP_RATIO:
            break
        else:
            rate = (clean + lossy) / 2
    best = max((p for p in probes if p["lost_percent"] < LOSS_LIMIT), key=lambda p: p["received_pps"],
               default=None)
    return {"pps": best["received_pps"] if best else 0.0, "sender_bound": sender_bound,
            "probes": probes}


def measure(lab: Lab, a: Host, b: Host, setup: Setup, rec: Recorder, work: Path, sizes: tuple[int, ...],
            start_pps: float, max_probes: int, seconds: int) -> dict[str, Any]:
    """The search for each datagram size; rate in packets/s and in Mb/s of UDP payload."""
    out: dict[str, Any] = {}
    for size in sizes:
        def run(pps: float, size: int = size) -> dict[str, Any]:
            return probe(lab, a, b, setup, rec, work, size, pps, seconds)

        r = search(run, start_pps, max_probes)
        r["mbps"] = r["pps"] * size * 8 / 1e6
        out[str(size)] = r
    return out
