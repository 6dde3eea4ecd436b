"""The arithmetic of the benchmark's latency, small-packet and cost rows (bench/latency.py,
bench/smallpkt.py, bench/rows.py), without namespaces: ping parsing, percentiles, the bounded rate
search, CPU seconds per GB."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from bench import latency, rows, smallpkt

PING_OUT = """PING 2001:db8::2(2001:db8::2) 56 data bytes
64 bytes from 2001:db8::2: icmp_seq=1 ttl=64 time=0.046 ms
64 bytes from 2001:db8::2: icmp_seq=2 ttl=64 time=1.25 ms
64 bytes from 2001:db8::2: icmp_seq=2 ttl=64 time=9.99 ms (DUP!)
64 bytes from 2001:db8::2: icmp_seq=4 ttl=64 time=0.1 ms

--- 2001:db8::2 ping statistics ---
4 packets transmitted, 3 received, +1 duplicates, 25% packet loss, time 31ms
rtt min/avg/max/mdev = 0.046/0.465/1.250/0.556 ms
"""


def test_parse_ping_keeps_first_reply_per_sequence_in_microseconds() -> None:
    assert latency.parse_ping(PING_OUT) == {1: pytest.approx(46.0), 2: pytest.approx(1250.0),
                                            4: pytest.approx(100.0)}


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unordered
    assert latency.percentile(values, 99) == 99.0
    assert latency.percentile(values, 50) == 50.0
    assert latency.percentile(values, 100) == 100.0
    assert latency.percentile([7.0], 99) == 7.0


def test_summarize_counts_loss_and_orders_median_below_p99() -> None:
    s = latency.summarize([100.0] * 98 + [5000.0, 9000.0], sent=200)
    assert s["received"] == 100 and s["loss"] == pytest.approx(0.5)
    assert s["median_us"] == 100.0 and s["p99_us"] == 5000.0 and s["max_us"] == 9000.0
    none = latency.summarize([], sent=10)
    assert none["loss"] == 1.0 and "median_us" not in none


def _link(capacity: float, sender_max: float = 1e12) -> tuple[list[float], Any]:
    """A fake path: loses what exceeds `capacity` packets/s; the sender reaches at most `sender_max`."""
    asked: list[float] = []

    def run(pps: float) -> dict[str, Any]:
        asked.append(pps)
        sent = min(pps, sender_max)
        lost = max(0.0, sent - capacity)
        return {"asked_pps": pps, "sent_pps": sent, "received_pps": sent - lost,
                "lost_percent": 100.0 * lost / sent}

    return asked, run


def test_search_doubles_then_bisects_within_the_probe_budget() -> None:
    asked, run = _link(capacity=50_000)
    r = smallpkt.search(run, 10_000, max_probes=8)
    # doubling until the first loss (80k), then bisection between the best clean and the first lossy
    assert asked == [10_000, 20_000, 40_000, 80_000, 60_000, 50_000, 55_000, 52_500]
    assert len(r["probes"]) == 8 and not r["sender_bound"]
    assert r["pps"] == 50_000  # the clean 50k probe: lossy probes delivering as much do not count


def test_search_halves_when_the_start_is_lossy_and_stops_at_the_sender_limit() -> None:
    asked, run = _link(capacity=3_000)
    r = smallpkt.search(run, 10_000, max_probes=3)
    assert asked == [10_000, 5_000, 2_500] and r["pps"] == 2_500
    asked, run = _link(capacity=1e9, sender_max=30_000)
    r = smallpkt.search(run, 10_000, max_probes=8)
    assert asked == [10_000, 20_000, 40_000] and r["sender_bound"] and r["pps"] == 30_000


def test_search_reports_zero_when_every_probe_loses() -> None:
    _asked, run = _link(capacity=0)
    assert smallpkt.search(run, 1000, max_probes=2)["pps"] == 0.0


def test_cost_rows_are_cpu_seconds_per_gb_per_side_and_skip_veth() -> None:
    def sample(a: float, b: float, secs: float, nbytes: int) -> dict[str, Any]:
        return {"cpu": {"a": a, "b": b}, "seconds": secs, "received_bytes": nbytes}

    tcp = [
        {"mode": "veth", "streams": 1, "cpu_cores_median": {}, "samples": [
            {"cpu": {}, "seconds": 1.0, "received_bytes": 10**9}]},
        {"mode": "tunneld", "streams": 1, "cpu_cores_median": {"a": 0.9, "b": 0.5}, "samples": [
            sample(0.9, 0.5, 10.0, 2 * 10**9), sample(0.8, 0.4, 10.0, 4 * 10**9),
            sample(1.0, 0.6, 10.0, 5 * 10**9)]},
    ]
    (c,) = rows.cost_rows(tcp)
    assert c["mode"] == "tunneld" and c["streams"] == 1
    assert c["sender_cpu_s_per_gb"] == pytest.approx(2.0)  # medians of 4.5, 2.0, 2.0
    assert c["receiver_cpu_s_per_gb"] == pytest.approx(1.2)  # medians of 2.5, 1.0, 1.2


def test_parse_rows() -> None:
    assert rows.parse_rows("latency, small,latency") == ["latency", "small"]
    with pytest.raises(argparse.ArgumentTypeError):
        rows.parse_rows("latency,speed")
    with pytest.raises(argparse.ArgumentTypeError):
        rows.parse_rows(" , ")
