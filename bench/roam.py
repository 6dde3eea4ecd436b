"""The handover when a laptop moves between networks: `python -m bench.roam [--runs N] [--json]`.

One roaming lab (lab.topology.roaming, lab.roam): a public desktop runs `tunneld serve-dns` for the
account and `tunneld up`; the laptop joins by DNS behind the home router (NAT, miniupnpd for PCP/NAT-PMP)
and moves between it and the café router (NAT, no mapping). Each run moves the laptop four times while
`ping -6 -i 0.05` and a TCP stream of 2 MB/s flow each way (café, home, café, home), then four times
idle: twice the desktop sends first after the move, twice the laptop does. Per move and direction:

- gap: ping; with flows, from the last reply before the move to the first after it; idle, from the move
  to the first reply of a ping started right after it;
- tcp gap: with flows, the longest time the stream's receiver got no new bytes from just before the
  move until it settled (lab.flows.Stream), and the sender's retransmission timeouts meanwhile: TCP's
  recovery (fast retransmit, or a timeout of at least 200 ms and its backoff) shows here, not in ping;
- endpoint: from the move until the desktop's status shows the laptop at the new NAT's address;
- dns: until the account's server holds the new records (at home the SRV and the A record of the home
  address; at the café those of the endpoint STUN observed, the TXT marked nat=ei);
- old mapping: after leaving home, whether miniupnpd still holds the home mapping (the laptop cannot
  reach the old gateway any more to delete it) once the move was handled.

Everything is removed by the Lab, also on failure, Ctrl-C or SIGTERM. The goal is every gap under 1 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.procs import log_tail, machine_busy_seconds, run_in_lab
from lab.flows import Stream
from lab.netns import LabError, wait_for
from lab.roam import Pinger, Roam, endpoint_host, moved, roam_lab, wan
from lab.tunnel import status

TIMEOUT = 20.0  # seconds a move may take to settle before the run fails
POLL = 0.02
FLOWING = ("cafe", "home", "cafe", "home")
TCP_RATE = 2e6  # bytes/s each way: well within the 2-core machine, so a stall is the handover's
TCP_PORTS = {"desktop": 5101, "laptop": 5102}  # per sending node
IDLE = (("cafe", "desktop"), ("home", "desktop"), ("cafe", "laptop"), ("home", "laptop"))


def _dns_holds(r: Roam, to: str, target: str) -> bool:
    return r.laptop_published_at(to) and r.laptop_srv()[0].split()[-1] == target


def _settle(r: Roam, to: str, began: float, target: str, generation: int) -> dict[str, float]:
    """Poll until the desktop shows the new endpoint, DNS holds the new records and the laptop handled the
    move; seconds from `began` to each."""
    got: dict[str, float] = {}
    checks: dict[str, Callable[[], bool]] = {
        "endpoint_s": lambda: endpoint_host(r.desktop, "laptop") == wan(to),
        "dns_s": lambda: _dns_holds(r, to, target),
        "handled_s": lambda: moved(status(r.laptop), generation),
    }

    def done() -> bool:
        for key, check in checks.items():
            if key not in got and check():
                got[key] = time.time() - began
        return len(got) == len(checks)

    try:
        wait_for(done, timeout=TIMEOUT, interval=POLL, what=f"the move to {to} to settle")
    except LabError as e:
        raise LabError(f"{e}; settled so far: {got}; laptop log:\n{log_tail(r.laptop.log)}") from None
    return got


def _old_mapping(r: Roam) -> str:
    assert r.upnp is not None
    home = r.hosts["home"].extra["lan_net"].rsplit(".", 1)[0] + "."
    return "left" if any(m.internal_addr.startswith(home) for m in r.upnp.list_mappings()) else "deleted"


def _move(r: Roam, to: str, target: str, traffic: str, pingers: dict[str, Pinger] | None,
          first: str = "", streams: dict[str, Stream] | None = None) -> dict[str, Any]:
    """One move; `target` is the laptop's SRV target (the owner of its A record)."""
    generation = int(status(r.laptop)["network"]["generation"])
    rtos = {direction: st.timeouts() for direction, st in (streams or {}).items()}
    began = r.move(to)
    done = time.time()
    row: dict[str, Any] = {"to": to, "traffic": traffic}
    if pingers is not None:
        for direction, p in pingers.items():
            row[f"gap_{direction}_s"] = p.gap(began, done, TIMEOUT)
    else:
        src, dst = (r.desktop, r.laptop) if first == "desktop" else (r.laptop, r.desktop)
        p = Pinger(r.lab, src, dst)
        try:
            row[f"gap_{src.name}_s"] = p.wait_reply_after(p.started, TIMEOUT) - began
        finally:
            p.stop()
    row.update(_settle(r, to, began, target, generation))
    if to == "cafe":
        time.sleep(1.0)  # the old mapping's delete is sent within the service's grace: give it that
        row["old_mapping"] = _old_mapping(r)
    for direction, st in (streams or {}).items():
        row[f"tcp_gap_{direction}_s"] = st.gap(began, time.time(), TIMEOUT)
        row[f"tcp_rto_{direction}"] = st.timeouts() - rtos[direction]
    return row


def run_roam(runs: int, workdir: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    with roam_lab(workdir, at="home") as r:
        wait_for(lambda: bool(r.laptop_srv()), timeout=10, what="the laptop's home records")
        target = r.laptop_srv()[0].split()[-1]
        for run in range(1, runs + 1):
            pingers = {"desktop": Pinger(r.lab, r.desktop, r.laptop),
                       "laptop": Pinger(r.lab, r.laptop, r.desktop)}
            streams = {"desktop": Stream(r.lab, r.desktop, r.laptop, TCP_PORTS["desktop"], TCP_RATE),
                       "laptop": Stream(r.lab, r.laptop, r.desktop, TCP_PORTS["laptop"], TCP_RATE)}
            for p in pingers.values():
                p.wait_reply_after(time.time(), TIMEOUT)
            for st in streams.values():
                st.wait_bytes_after(time.time(), TIMEOUT)
            for to in FLOWING:
                rows.append({"run": run, **_move(r, to, target, "flowing", pingers, streams=streams)})
            for p in pingers.values():
                p.stop()
            for st in streams.values():
                st.stop()
            for to, first in IDLE:
                rows.append({"run": run, **_move(r, to, target, f"idle, {first} first", None, first)})
        lab = {"lab_id": r.lab.id, "namespaces": [h.netns for h in r.lab.hosts],
               "pids": [p.pid for p in r.lab.procs]}
    seconds = time.monotonic() - t0
    return {"rows": rows, "seconds": round(seconds, 1), "lab": lab,
            "machine_busy_cores": round((machine_busy_seconds() - busy0) / seconds, 2)}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _tcp(row: dict[str, Any], direction: str) -> str:
    """The TCP gap in ms, with the sender's retransmission timeouts during the move if any."""
    ms, rto = _ms(row.get(f"tcp_gap_{direction}_s")), row.get(f"tcp_rto_{direction}")
    return f"{ms} ({rto} RTO)" if rto else ms


def print_table(r: dict[str, Any]) -> None:
    head = ("| run | to   | traffic              | gap desktop->laptop ms | gap laptop->desktop ms "
            "| tcp desktop->laptop ms | tcp laptop->desktop ms "
            "| desktop endpoint ms | dns ms | handled ms | old mapping |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for row in r["rows"]:
        print(f"| {row['run']:>3} | {row['to']:<4} | {row['traffic']:<20} "
              f"| {_ms(row.get('gap_desktop_s')):>22} | {_ms(row.get('gap_laptop_s')):>22} "
              f"| {_tcp(row, 'desktop'):>22} | {_tcp(row, 'laptop'):>22} "
              f"| {_ms(row['endpoint_s']):>19} | {_ms(row['dns_s']):>6} "
              f"| {_ms(row['handled_s']):>10} | {row.get('old_mapping', '-'):<11} |")
    gaps = [v for row in r["rows"] for k, v in row.items() if k.startswith("gap_")]
    tcp = [v for row in r["rows"] for k, v in row.items() if k.startswith("tcp_gap_")]
    print(f"\nworst ping gap {max(gaps) * 1000:.0f} ms, worst TCP gap {max(tcp) * 1000:.0f} ms "
          f"(goal < 1000 ms); {r['seconds']} s, the machine kept {r['machine_busy_cores']} cores busy "
          "on average")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.roam", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1, help="runs of eight moves (default 1)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench roam: needs root (network namespaces); run it with sudo", file=sys.stderr)
        return 2
    if not 1 <= a.runs <= 20:
        print("bench roam: --runs must be between 1 and 20", file=sys.stderr)
        return 2
    return run_in_lab("roam", lambda tmp: run_roam(a.runs, tmp), a.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
