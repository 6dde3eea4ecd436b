"""The DNS benchmark (`python -m bench.throughput dns`): one quick run against `tunneld serve-dns`, BIND,
and the front (serve-dns --primary before a BIND primary, with a BIND secondary) reports positive update
rates and event latencies, the secondary's lag and the front's memory with LLQs held; every update and
event succeeded, and it leaves no namespace or process behind."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from bench.dns import print_table
from lab.bind import NAMED
from lab.netns import list_namespaces
from tests.helpers import run_bench

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the benchmark builds network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None or shutil.which("dig") is None
                       or not os.access(NAMED, os.X_OK),
                       reason="needs iproute2, dig and named (Debian: iproute2 bind9-dnsutils bind9)"),
]

TIMEOUT = 150  # one lab, three named start-ups and a few hundred updates take about 25 s


def test_quick_run_reports_rates_and_latencies_and_cleans_up() -> None:
    argv = [sys.executable, "-m", "bench.throughput", "dns", "--updates", "40", "--window", "8",
            "--rounds", "2", "--watchers", "10", "--events", "3", "--front-watchers", "20", "--lag", "3",
            "--hold", "300", "--json"]
    out, _err = run_bench(argv, ROOT, TIMEOUT)
    r = json.loads(out)

    assert set(r["rows"]) == {"tunneld/sequential", "tunneld/pipelined", "bind/sequential", "bind/pipelined",
                              "front/sequential", "front/pipelined", "primary/sequential",
                              "primary/pipelined"}
    for name, row in r["rows"].items():
        assert row["failures"] == 0, name
        assert len(row["samples"]) == 2, name
        assert row["per_second_median"] > 0, name
        assert row["latency_median_ms"] > 0, name
        for s in row["samples"]:
            assert s["updates"] == 40 and s["failures"] == 0, (name, s)
    assert set(r["ratios"]) == {"sequential", "pipelined"}
    for kind in ("llq", "push"):  # LLQ over UDP and DNS Push over TLS, alternated in the same run
        ev = r[kind]
        assert ev["runs"] == 2 and ev["expected"] == 30 and ev["received"] == 30, (kind, ev)
        assert ev["failures"] == 0, (kind, ev)
        assert 0 < ev["median_ms"] <= ev["p90_ms"] <= ev["max_ms"] < 10_000, (kind, ev)

    # The front: LLQ events at both watcher counts, on the front and on serve-dns alone, all received.
    front = r["front"]
    assert set(front["events"]) == {"10", "20"}, front["events"]
    for k, row in front["events"].items():
        assert set(row) == {"front", "tunneld"}, (k, row)
        for server, ev in row.items():
            assert ev["expected"] == int(k) * 3 and ev["received"] == ev["expected"], (k, server, ev)
            assert ev["failures"] == 0, (k, server, ev)
            assert 0 < ev["median_ms"] <= ev["p90_ms"] <= ev["max_ms"] < 10_000, (k, server, ev)
    # Every update through the front was served by the secondary, after a measured lag.
    lag = front["secondary"]
    assert lag["updates"] == 3 and lag["served"] == 3 and lag["failures"] == 0, lag
    assert 0 < lag["median_ms"] <= lag["max_ms"] < 10_000, lag
    # The front's memory was read with every LLQ established, from more than one client address.
    mem = front["memory"]
    assert mem["established"] == mem["llqs"] == 300 and mem["closed"] == 300, mem
    assert mem["sources"] >= 2 and mem["rss_held_kib"] > 0 and mem["rss_before_kib"] > 0, mem
    # The added latencies against the goals were computed.
    assert isinstance(front["added_update_ms"], float)
    assert isinstance(front["added_update_ms_vs_bind_alone"], float)
    assert front["added_event_ms"]["watchers"] == 20

    # The table is printed from the same result.
    buf = io.StringIO()
    print_table(r, buf)
    assert "BIND named" in buf.getvalue() and "no LLQ or Push" in buf.getvalue()
    assert "DNS Push over TLS" in buf.getvalue()
    for words in ("front -> BIND", "BIND primary", "BIND secondary serves the record",
                  "memory with LLQs held", "Goals"):
        assert words in buf.getvalue(), words

    # Nothing is left: the lab's namespaces and every process it started (server, BIND, clients).
    lab = r["lab"]
    assert lab["namespaces"] and not set(lab["namespaces"]) & set(list_namespaces())
    assert list_namespaces(lab["lab_id"]) == []
    assert len(lab["pids"]) >= 2
    for pid in lab["pids"]:
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists():
            cmd = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            assert not any(w in cmd for w in ("serve-dns", "named", "lab.progs.dns_client",
                                              "lab.progs.dns_front_client")), \
                f"pid {pid} is still running: {cmd}"
