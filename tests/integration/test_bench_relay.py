"""The relay benchmark (`python -m bench.relay`): one run prints a row through coturn and a row on the
direct path the peers upgrade to, each with a round trip and a throughput, and leaves no namespace or
process behind."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from bench.procs import still_running
from lab.netns import list_namespaces
from tests.helpers import run_bench

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 150  # the lab about 8 s, two rows of 4 s each, the upgrade up to 30 s

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("turnserver") or not shutil.which("iperf3"),
                       reason="needs root, coturn and iperf3"),
]


def test_one_run_measures_the_relay_beside_the_direct_path_and_cleans_up() -> None:
    out, _err = run_bench([sys.executable, "-m", "bench.relay", "--json"], ROOT, TIMEOUT)
    r = json.loads(out)
    relay, direct = r["rows"]
    assert (relay["path"], direct["path"]) == ("relay", "direct")
    assert relay["via"].startswith("203.0.113.3:") and direct["via"].startswith("198.51.100.")
    for row in (relay, direct):
        assert 0 < row["rtt_min_ms"] <= row["rtt_avg_ms"] <= row["rtt_max_ms"] < 1000, row
        assert row["mbit_s"] > 1, row
    assert 0 < r["upgrade_s"] <= 30
    lab = r["lab"]
    assert lab["namespaces"] and list_namespaces(lab["lab_id"]) == []
    alive = still_running(lab["pids"])
    assert not alive, f"processes left behind: {alive}"
