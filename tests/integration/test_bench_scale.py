"""The scale row (`python -m bench.throughput scale --quick`): tunneld (and wireguard-go, where installed)
with 100 simulated peers completes every handshake, holds their sessions through the stream, grows in
memory, and the benchmark leaves no namespace or process behind."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from bench.procs import still_running
from lab.netns import list_namespaces
from tests.helpers import TUNNELD_EXE, bench_marks, run_bench
from tests.integration.test_bench_e2e import _procs

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("ip", "ss", "ping", "iperf3")
TUNNELD = TUNNELD_EXE

pytestmark = bench_marks(TOOLS, "iproute2 iputils-ping iperf3")

TIMEOUT = 90  # about 25 s: tunneld's lab 15 s (a retry round of 5 s in it), wireguard-go's 8 s
WG = all(shutil.which(t) is not None for t in ("wireguard-go", "wg"))
MODES = ("tunneld", "wireguard-go") if WG else ("tunneld",)


def _simulators() -> set[int]:
    """PIDs of live simulated-peer processes (any run's)."""
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"bench.scale_peers" in (d / "cmdline").read_bytes():
                    found.add(int(d.name))
            except OSError:
                continue
    return found


def test_quick_scale_row_is_sane_and_cleans_up() -> None:
    names = ("tunneld", "iperf3", "wireguard-go")
    before, sims_before, ns_before = _procs(names), _simulators(), set(list_namespaces())
    out, err = run_bench([sys.executable, "-m", "bench.throughput", "scale", "--quick", "--json",
                          "--modes", ",".join(MODES)], ROOT, TIMEOUT)
    r = json.loads(out)
    n = r["settings"]["peers"]
    assert n == 100 and r["settings"]["runs"] == 1
    assert r["errors"] == {} and set(r["results"]) == set(MODES), err[-2000:]

    for mode, m in r["results"].items():
        (run,) = m["with"]
        h = run["handshakes"]
        assert (h["completed"], h["failed"]) == (n, 0), (mode, err[-2000:])
        assert 0 < h["seconds"] < r["settings"]["timeout"]
        assert h["initiations"] >= n
        assert run["sessions"] == n and run["sessions_after"] == n, mode  # the daemon's own view
        assert run["handshake_cpu_seconds"] > 0
        assert 0 <= run["idle_cores"] < 1 and 0 <= m["without"][0]["idle_cores"] < 1
        assert run["peers_done"]["keepalives"] >= n  # each session confirmed by an authenticated packet

        one = m["without"][0]["rss"]["VmRSS"]
        assert 0 < one < run["rss_configured"]["VmRSS"] < run["rss_after_handshakes"]["VmRSS"], mode
        for key in ("rss_configured", "rss_after_handshakes", "rss_after_stream"):
            assert run[key]["VmRSS"] <= run[key]["VmHWM"]

        for key in ("stream_one_peer", "stream_idle_peers"):
            assert m[key]["gbps_median"] > 0.01, (mode, m[key])
            (sample,) = m[key]["samples"]
            assert sample["received_bytes"] > 0 and sample["cpu"]["b"] > 0
        assert m["stream_ratio"] == pytest.approx(m["stream_idle_peers"]["gbps_median"]
                                                  / m["stream_one_peer"]["gbps_median"])
        assert m["daemon_log_problems"] == []
    load = r["results"]["tunneld"]["with"][0]["handshake_load"]
    assert load["worked"] >= n  # tunneld's defences report what they did

    remaining = set(list_namespaces())
    for lab in r["labs"]:
        assert len(lab["namespaces"]) == 3 and not set(lab["namespaces"]) & remaining
        assert still_running(lab["pids"]) == []
    assert set(list_namespaces()) <= ns_before, "namespaces left behind"
    left = {pid: cmd for pid, cmd in _procs(names).items() if pid not in before}
    assert not left, f"processes left behind: {left}"
    assert _simulators() <= sims_before, "simulated peers left behind"
