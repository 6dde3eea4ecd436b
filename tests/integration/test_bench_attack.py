"""The attack benchmark (`python -m bench.attack`): one quick run of one attack prints a JSON row with the
device's success rate and latency during the attack and its baseline, the server's CPU, the reflection
ratios, and leaves no namespace or process behind."""

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
TIMEOUT = 120  # the lab takes a few seconds, the baselines and the attack about 10 s

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dig"),
                       reason="needs root and dig (bind9-dnsutils)"),
]


def test_quick_run_reports_the_attack_and_cleans_up() -> None:
    out, _err = run_bench([sys.executable, "-m", "bench.attack", "--json", "--seconds", "1",
                           "--only", "reflection 20"], ROOT, TIMEOUT)
    r = json.loads(out)
    [row] = r["rows"]
    assert row["attack"] == "reflection 20"
    for run in (row["legit"], row["baseline"]):
        assert run["n"] > 0 and 0 <= run["ok"] <= run["n"], run
        assert 0 <= run["p50_ms"] <= run["p95_ms"], run
    assert row["baseline"]["success"] == 1.0, row["baseline"]  # no attack: every operation succeeds
    assert set(row["ratios"]) == {"browse PTR", "ANY", "ANY apex"}
    assert all(v > 0 for v in row["ratios"].values()), row["ratios"]  # every query was answered
    assert row["server_cpu_s"] > 0 and row["window_s"] > 0, row
    lab = r["lab"]
    assert lab["namespaces"] and all(list_namespaces(i) == [] for i in lab["lab_ids"])
    alive = still_running(lab["pids"])
    assert not alive, f"processes left behind: {alive}"

