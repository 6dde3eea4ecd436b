"""The end-to-end benchmark (`python -m bench.throughput e2e`): one quick run through veth and
wireguard-go reports positive throughput, and leaves no namespace, process or control socket behind;
one quick tunneld run with --profile leaves a flamegraph and raw stacks per side and prints the top
frames."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lab.netns import list_namespaces
from tests.helpers import bench_marks, run_bench

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("ip", "ss", "ping", "iperf3", "wireguard-go", "wg")
PACKAGES = "iproute2 iputils-ping iperf3 wireguard-go wireguard-tools"

pytestmark = bench_marks(TOOLS, PACKAGES, tunneld=False)  # the tunneld test checks it itself

TIMEOUT = 120  # two labs, two 1-second iperf3 runs and the wireguard-go handshake take about 8 s


def _procs(names: tuple[str, ...]) -> dict[int, str]:
    """PID -> command line of every live process whose executable name is one of `names`."""
    found: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if comm in names:
            found[int(d.name)] = cmd
    return found


def test_quick_run_veth_and_wireguard_go_cleans_up() -> None:
    before = _procs(("wireguard-go", "iperf3"))
    argv = [sys.executable, "-m", "bench.throughput", "e2e", "--duration", "1", "--runs", "1",
            "--streams", "1", "--modes", "veth,wireguard-go", "--json"]
    out, _err = run_bench(argv, ROOT, TIMEOUT)
    r = json.loads(out)

    assert r["errors"] == {}
    rows = {(row["mode"], row["streams"]): row for row in r["rows"]}
    assert set(rows) == {("veth", 1), ("wireguard-go", 1)}
    for row in rows.values():
        assert row["gbps_median"] > 0
        assert len(row["samples"]) == 1
    wg = rows[("wireguard-go", 1)]
    assert set(wg["cpu_cores_median"]) == {"a", "b"}
    assert all(c > 0 for c in wg["cpu_cores_median"].values()), "wireguard-go must have used some CPU"
    assert rows[("veth", 1)]["cpu_cores_median"] == {}

    # Nothing is left: namespaces, processes (by the PIDs it reports, and by name), control sockets.
    labs = r["labs"]
    assert [lab["mode"] for lab in labs] == ["veth", "wireguard-go"]
    remaining = set(list_namespaces())
    for lab in labs:
        assert lab["namespaces"] and not set(lab["namespaces"]) & remaining
        assert list_namespaces(lab["lab_id"]) == []
        for pid in lab["pids"]:
            comm = Path(f"/proc/{pid}/comm")
            assert not (comm.exists() and comm.read_text().strip() in ("wireguard-go", "iperf3")), \
                f"pid {pid} is still running"
    wg_lab = labs[1]
    assert len(wg_lab["interfaces"]) == 2
    for ifname in wg_lab["interfaces"]:
        assert not Path(f"/var/run/wireguard/{ifname}.sock").exists()
    left = {pid: cmd for pid, cmd in _procs(("wireguard-go", "iperf3")).items() if pid not in before}
    assert not left, f"processes left behind: {left}"


PYSPY = Path(sys.prefix) / "bin" / "py-spy"
TUNNELD = Path(sys.prefix) / "bin" / "tunneld"


@pytest.mark.skipif(not PYSPY.exists(), reason=f"needs {PYSPY} (pip install py-spy)")
@pytest.mark.skipif(not TUNNELD.exists(), reason=f"needs {TUNNELD} (pip install -e .)")
def test_profile_tunneld_writes_flamegraphs_and_top_frames(tmp_path: Path) -> None:
    """`--profile DIR`: py-spy on both tunneld daemons leaves an SVG and raw stacks per side in DIR,
    the top frames are printed after the table, and nothing (namespace, daemon, iperf3, py-spy) is
    left behind."""
    names = ("tunneld", "iperf3", "py-spy")
    before, ns_before = _procs(names), set(list_namespaces())
    out_dir = tmp_path / "prof"
    argv = [sys.executable, "-m", "bench.throughput", "e2e", "--duration", "1", "--runs", "1",
            "--streams", "1", "--modes", "tunneld", "--profile", str(out_dir)]
    out, err = run_bench(argv, ROOT, TIMEOUT)
    assert "PROFILING ON" in out, "the table header must say the numbers were taken under the profiler"
    assert "| tunneld " in out and "failed" not in err, err[-2000:]

    for side in ("a", "b"):
        for ext in ("svg", "txt"):
            f = out_dir / f"tunneld-{side}-P1.{ext}"
            assert f.exists() and f.stat().st_size > 0, f"{f} missing or empty"
        assert "<svg" in (out_dir / f"tunneld-{side}-P1.svg").read_text()
        # The top list: a header naming the side, then "  NN.N%  frame (file)" lines.
        lines = out.splitlines()
        heads = [i for i, ln in enumerate(lines) if ln.startswith(f"Top of the profile: tunneld in {side} ")]
        assert len(heads) == 1, out
        frames = []
        for ln in lines[heads[0] + 1:]:
            if not ln.startswith("  ") or "%" not in ln:
                break
            frames.append(ln)
        assert 1 <= len(frames) <= 10, out
        pcts = [float(ln.split("%")[0]) for ln in frames]
        assert all(0 < x <= 100 for x in pcts) and pcts == sorted(pcts, reverse=True), frames
        # "frame (file)": mostly our .py files; a leaf in a frozen or native module names that instead.
        assert all(ln.rstrip().endswith(")") and " (" in ln for ln in frames), frames
        assert any(".py)" in ln for ln in frames), frames
    assert not [f for f in out_dir.iterdir() if f.name.startswith(".")], "py-spy logs left in DIR"

    assert set(list_namespaces()) <= ns_before, "namespaces left behind"
    left = {pid: cmd for pid, cmd in _procs(names).items() if pid not in before}
    assert not left, f"processes left behind: {left}"
