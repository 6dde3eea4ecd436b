"""The handover benchmark (`python -m bench.roam`): one quick run prints a row per move with a gap for
the direction(s) measured (with flows, a TCP gap and its retransmission timeouts each way too), the
times until the desktop shows the new endpoint and DNS holds the new records, the old mapping's fate
after leaving home, and leaves no namespace or process behind."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from bench.procs import still_running
from lab.netns import list_namespaces
from lab.upnp import MINIUPNPD
from tests.helpers import run_bench

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # the lab takes about 6 s to build, the eight moves about 8 s

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dig") or not os.access(MINIUPNPD, os.X_OK),
                       reason="needs root, dig (bind9-dnsutils) and miniupnpd (miniupnpd-nftables)"),
]


def test_quick_run_reports_every_move_and_cleans_up() -> None:
    out, _err = run_bench([sys.executable, "-m", "bench.roam", "--runs", "1", "--json"], ROOT, TIMEOUT)
    r = json.loads(out)
    rows = r["rows"]
    assert [(row["to"], row["traffic"]) for row in rows] == [
        ("cafe", "flowing"), ("home", "flowing"), ("cafe", "flowing"), ("home", "flowing"),
        ("cafe", "idle, desktop first"), ("home", "idle, desktop first"),
        ("cafe", "idle, laptop first"), ("home", "idle, laptop first")]
    for row in rows:
        gaps = [v for k, v in row.items() if k.startswith("gap_")]
        assert len(gaps) == (2 if row["traffic"] == "flowing" else 1), row
        tcp = [v for k, v in row.items() if k.startswith("tcp_gap_")]
        assert len(tcp) == (2 if row["traffic"] == "flowing" else 0), row
        rtos = [v for k, v in row.items() if k.startswith("tcp_rto_")]
        assert len(rtos) == len(tcp) and all(isinstance(v, int) and v >= 0 for v in rtos), row
        assert all(0 < v < 20 for v in [*gaps, *tcp, row["endpoint_s"], row["dns_s"], row["handled_s"]]), row
        assert (row.get("old_mapping") in ("left", "deleted")) == (row["to"] == "cafe"), row
    lab = r["lab"]
    assert lab["namespaces"] and list_namespaces(lab["lab_id"]) == []
    alive = still_running(lab["pids"])
    assert not alive, f"processes left behind: {alive}"

