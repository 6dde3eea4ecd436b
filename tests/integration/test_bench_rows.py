"""The benchmark's latency, small-packet and cost rows (`python -m bench.throughput e2e --rows ...
--quick`) through plain veth and tunneld: sane numbers, and no namespace or process left behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import rows, smallpkt
from lab.netns import list_namespaces
from tests.helpers import TUNNELD_EXE, bench_marks, run_bench
from tests.integration.test_bench_e2e import _procs

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("ip", "ss", "ping", "iperf3")
TUNNELD = TUNNELD_EXE

pytestmark = bench_marks(TOOLS, "iproute2 iputils-ping iperf3")

TIMEOUT = 90  # two labs, two 1-second TCP runs, 4 x 1 s of pings, 8 probes of 1 s: about 20 s


def test_quick_rows_veth_and_tunneld_are_sane_and_clean_up() -> None:
    names = ("tunneld", "iperf3", "ping")
    before, ns_before = _procs(names), set(list_namespaces())
    argv = [sys.executable, "-m", "bench.throughput", "e2e", "--rows", "latency,small,cost", "--quick",
            "--duration", "1", "--runs", "1", "--streams", "1", "--modes", "veth,tunneld", "--json"]
    out, err = run_bench(argv, ROOT, TIMEOUT)
    r = json.loads(out)
    assert r["errors"] == {}, err[-2000:]
    cfg = rows.settings(quick=True)

    assert set(r["extra"]) == {"veth", "tunneld"}
    for mode, got in r["extra"].items():
        for kind in ("idle", "load"):
            lat = got["latency"][kind]
            assert lat["sent"] == cfg["pings"]
            assert lat["loss"] <= 0.05, (mode, kind, lat)  # a loaded tunnel may drop a few, not many
            assert 0 < lat["median_us"] <= lat["p99_us"] <= lat["max_us"] < 1_000_000, (mode, kind, lat)
        assert got["latency"]["load"]["load_gbps"] > 0.01, "the bulk flow must have run during the pings"
        assert set(got["small"]) == {"64", "1200"}
        for size, s in got["small"].items():
            assert 1 <= len(s["probes"]) <= cfg["max_probes"]
            assert s["pps"] > 0, (mode, size, s)
            assert s["mbps"] == pytest.approx(s["pps"] * int(size) * 8 / 1e6)
            best = [p for p in s["probes"] if p["received_pps"] == s["pps"]]
            assert any(p["lost_percent"] < smallpkt.LOSS_LIMIT for p in best)

    # Cost: only tunneld has daemons; CPU seconds per GB are positive and bounded (1000 s/GB = 1 MB/s).
    (cost,) = r["cost"]
    assert cost["mode"] == "tunneld" and cost["streams"] == 1
    assert 0 < cost["sender_cpu_s_per_gb"] < 1000 and 0 < cost["receiver_cpu_s_per_gb"] < 1000

    remaining = set(list_namespaces())
    for lab in r["labs"]:
        assert lab["namespaces"] and not set(lab["namespaces"]) & remaining
    assert set(list_namespaces()) <= ns_before, "namespaces left behind"
    left = {pid: cmd for pid, cmd in _procs(names).items() if pid not in before}
    assert not left, f"processes left behind: {left}"
