"""A legitimate device during attacks on the rendezvous server and the tunnel port: `python -m bench.attack`.

DNS attacks run in one lab (`dns_lab`): `tunneld serve-dns` in host srv (192.0.2.1 towards the device,
198.51.100.1 towards the attacker, port 5353), a device of the account in host dev (lab.progs.legit:
signed queries, signed UPDATEs, LLQ setups) and an attacker in host att with eight addresses
(198.51.100.2-9) and many source ports (lab.attacks, lab.progs.flood). Each attack gets a fresh server
process (the previous one is killed by PID: a bomb's backlog would outlive it). The device's baseline,
with no attack, is measured in the same run. Handshake floods run on a `tunneld up` pair (lab.tunnel)
with the attacker on a second link of b: ping loss and RTT over the tunnel, and how long a restarted
peer takes to handshake, with and without the flood.

Per attack: the device's success rate and p50/p95 latency during the attack, the baseline p50, the
server's CPU seconds during the attack (/proc/<pid>/stat), and notes (reflection ratios, records a
stranger reads, whether a replayed update came back). Everything is bounded and removed by the Lab, also
on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import log_tail, run_in_lab, tree_cpu_seconds
from lab import attacks, progs
from lab.netns import Host, Lab, LabError, wait_for
from lab.tunnel import DOMAIN, TUNNELD, Node, running_pair, start, write_private
from tunneld.config import load_account_secret
from tunneld.crypto.kdf import derive_psk

ZONE = DOMAIN
PORT = 5353
SERVER = "192.0.2.1"  # the server's address towards the device
SERVER_ATT = "198.51.100.1"  # ... and towards the attacker
ATTACKERS = [f"198.51.100.{i}" for i in range(2, 10)]
DNS_ATTACKS = ("pointer bomb udp", "pointer bomb tcp", "reflection 20", "reflection 50", "slow-loris",
               "llq replay", "update replay", "privacy")
TUNNEL_ATTACKS = ("handshake 5k/s", "handshake 100k/s")


@dataclass
class Timing:
    """How long each phase lasts (the test uses shorter ones)."""

    seconds: float = 4.0  # the device's measurement window, with and without an attack
    connections: int = 300  # slow-loris
    replay_ports: int = 1250  # LLQ SETUP replay


def dns_lab(lab: Lab) -> tuple[Host, Host, Host]:
    """srv with a link to dev (192.0.2.1 - 192.0.2.2) and one to att (198.51.100.1 - .2 to .9)."""
    srv, dev, att = lab.host("srv"), lab.host("dev"), lab.host("att")
    lab.veth(srv, "eth0", dev, "eth0")
    lab.veth(srv, "eth1", att, "eth0")
    lab.addr(srv, "eth0", f"{SERVER}/24")
    lab.addr(dev, "eth0", "192.0.2.2/24")
    lab.addr(srv, "eth1", f"{SERVER_ATT}/24")
    for a in ATTACKERS:
        lab.addr(att, "eth0", f"{a}/24")
    srv.addr4, dev.addr4, att.addr4 = SERVER, "192.0.2.2", ATTACKERS[0]
    return srv, dev, att


def new_secret(work: Path) -> Path:
    out = subprocess.run([TUNNELD, "account", "new", ZONE], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    secret = work / "secret"
    write_private(secret, out.splitlines()[0] + "\n")
    return secret


@dataclass
class Rig:
    """The DNS lab, the server process and the device's tools."""

    lab: Lab
    srv: Host
    dev: Host
    att: Host
    work: Path
    secret: Path
    proc: subprocess.Popen[Any] | None = None
    db: Path = field(default_factory=Path)
    pids: list[int] = field(default_factory=list)
    generation: int = 0

    @property
    def log(self) -> Path:
        return self.work / "serve-dns.log"

    def start_server(self, fresh: bool = True) -> None:
        """(Re)start serve-dns: the old process is killed by PID; a fresh database unless `fresh` is False."""
        if self.proc is not None:
            self.lab.stop(self.proc, sig=signal.SIGKILL)
        if fresh or self.db == Path():
            self.generation += 1
            self.db = self.work / f"dns-{self.generation}.sqlite"
        with self.log.open("ab") as out:
            self.proc = self.lab.spawn(self.srv, [TUNNELD, "serve-dns", "--zone", ZONE, "--secret-file",
                                                  str(self.secret), "--listen", f"0.0.0.0:{PORT}", "--db",
                                                  str(self.db), "--default-lease", "7200", "--user", "root"],
                                       stdout=out, stderr=out)
        self.pids.append(self.proc.pid)
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise LabError(f"serve-dns exited {proc.returncode}: {log_tail(self.log)}")
            r = self.lab.run(self.dev, ["dig", f"@{SERVER}", "-p", str(PORT), "+tries=1", "+time=1", "SOA",
                                        ZONE], check=False)
            return "status: NOERROR" in r.stdout

        wait_for(answers, timeout=15, interval=0.05, what="serve-dns to answer")

    def legit_args(self, cmd: str) -> list[str]:
        return [cmd, SERVER, str(PORT), ZONE, str(self.secret)]

    def legit(self, cmd: str, *args: str, timeout: float = 60) -> dict[str, Any]:
        return progs.run(self.lab, self.dev, "legit", *self.legit_args(cmd), *args, timeout=timeout)

    def spawn_legit(self, seconds: float, *args: str) -> subprocess.Popen[str]:
        p = progs.spawn(self.lab, self.dev, "legit", *self.legit_args("run"), "--seconds", str(seconds),
                        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pids.append(p.pid)
        return p

    def flood(self, *args: str) -> attacks.Flood:
        f = attacks.Flood(self.lab, self.att, *args)
        self.pids.append(f.pid)
        return f

    def payloads(self, name: str, payloads: list[bytes]) -> str:
        return attacks.write_payloads(self.work / f"{name}.hex", payloads)


def _finish(lab: Lab, p: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The report of the device's run; it is stopped by PID if it overran `timeout`."""
    return progs.finish(lab, p, timeout, "the device's run")


Cpu = tuple[float, float]  # (CPU seconds a process used, over how many seconds)


def meter(pid: int) -> Callable[[], Cpu]:
    """Start measuring a process tree's CPU time; the returned function reads (CPU s, wall s) so far."""
    cpu0, t0 = tree_cpu_seconds(pid), time.monotonic()
    return lambda: (tree_cpu_seconds(pid) - cpu0, time.monotonic() - t0)


def during(rig: Rig, seconds: float, flood_args: list[str] | None,
           legit_args: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any], Cpu]:
    """Start the flood (if any) and, once it is under way, the device's run for `seconds`; (device report,
    flood report, the server's CPU from the flood's start until both ended)."""
    assert rig.proc is not None
    cpu = meter(rig.proc.pid)
    flood = rig.flood(*flood_args) if flood_args else None
    legit = rig.spawn_legit(seconds, *legit_args)
    got = _finish(rig.lab, legit, seconds + 30)
    report = flood.result(attacks.MAX_SECONDS + 30) if flood is not None else {}
    return got, report, cpu()


def row(attack: str, legit: dict[str, Any], baseline: dict[str, Any], cpu: Cpu, notes: str,
        **extra: Any) -> dict[str, Any]:
    """One line of the table: the device during the attack, its baseline, the server's CPU."""
    return {"attack": attack, "legit": legit, "baseline": baseline, "server_cpu_s": round(cpu[0], 2),
            "window_s": round(cpu[1], 1), "notes": notes, **extra}


def _srcs() -> str:
    return ",".join(ATTACKERS)


def pointer_bomb_udp(rig: Rig, t: Timing, baseline: dict[str, Any]) -> dict[str, Any]:
    rig.start_server()
    bomb = attacks.pointer_bomb(1400)
    n = int(20 * t.seconds)
    args = ["udp", SERVER_ATT, str(PORT), rig.payloads("bomb1400", [bomb]),
            *attacks.Bounds(n, 20, t.seconds).args(), "--sources", _srcs(), "--ports", "16", "--drain", "0"]
    legit, flood, cpu = during(rig, t.seconds, args)
    return row("pointer bomb udp", legit, baseline, cpu,
               f"{flood['sent']} x {len(bomb)} B at 20/s from 16 ports", flood=flood)


def pointer_bomb_tcp(rig: Rig, t: Timing, baseline: dict[str, Any]) -> dict[str, Any]:
    rig.start_server()
    bomb = attacks.pointer_bomb(65535)
    args = ["tcp", SERVER_ATT, str(PORT), rig.payloads("bomb65k", [bomb]),
            *attacks.Bounds(3, 2, t.seconds).args(), "--sources", _srcs()]
    legit, flood, cpu = during(rig, t.seconds, args)
    return row("pointer bomb tcp", legit, baseline, cpu, f"{flood['sent']} x {len(bomb)} B over TCP",
               flood=flood)


def reflection(rig: Rig, t: Timing, baseline: dict[str, Any], devices: int) -> dict[str, Any]:
    rig.start_server()
    pub = rig.legit("publish", "--devices", str(devices), timeout=120)
    if pub["failures"]:
        raise LabError(f"publishing {devices} devices failed: {pub['failures']}")
    queries = attacks.reflection_queries(ZONE)
    ratios: dict[str, float] = {}
    floods: dict[str, Any] = {}
    cpu = (0.0, 0.0)
    legit: dict[str, Any] = {}
    for kind, wire in queries.items():
        n = int(20 * t.seconds / len(queries))
        args = ["udp", SERVER_ATT, str(PORT), rig.payloads("reflect", [wire]),
                *attacks.Bounds(n, 20, t.seconds / len(queries)).args(), "--sources", _srcs(), "--ports", "8"]
        got, flood, used = during(rig, t.seconds / len(queries), args)
        cpu = (cpu[0] + used[0], cpu[1] + used[1])
        floods[kind] = flood
        ratios[kind] = round(flood["largest_reply"] / len(wire), 1)
        legit = _merge(legit, got)
    stranger = progs.run(rig.lab, rig.att, "legit", "stranger", SERVER_ATT, str(PORT), ZONE, timeout=120)
    worst = max(ratios.values())
    notes = ", ".join(f"{k} {v}x" for k, v in ratios.items()) + \
        f"; a stranger reads {stranger['records']} records of {len(stranger['devices'])} devices"
    return row(f"reflection {devices}", legit, baseline, cpu, notes, ratios=ratios, amplification=worst,
               query_bytes={k: len(v) for k, v in queries.items()}, flood=floods, stranger=stranger)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two device runs as one (counts added; percentiles: the worse of the two)."""
    if not a:
        return b
    n, ok = a["n"] + b["n"], a["ok"] + b["ok"]
    fails = dict(a.get("failures", {}))
    for k, v in b.get("failures", {}).items():
        fails[k] = fails.get(k, 0) + v
    return {**a, "n": n, "ok": ok, "success": ok / n if n else 0.0, "p50_ms": max(a["p50_ms"], b["p50_ms"]),
            "p95_ms": max(a["p95_ms"], b["p95_ms"]), "failures": fails}


def slow_loris(rig: Rig, t: Timing, baseline_tcp: dict[str, Any]) -> dict[str, Any]:
    rig.start_server()
    args = ["slowloris", SERVER_ATT, str(PORT), "--connections", str(t.connections),
            "--hold", str(t.seconds + 3), "--sources", _srcs()]
    assert rig.proc is not None
    cpu = meter(rig.proc.pid)
    flood = rig.flood(*args)  # returns once the connections are open (at most 500/s)
    legit = _finish(rig.lab, rig.spawn_legit(t.seconds, "--tcp", "--ops", "query"), t.seconds + 30)
    report = flood.result(t.seconds + 30)
    return row("slow-loris", legit, baseline_tcp, cpu(),
               f"{report['opened']} idle connections held, {report['closed_by_server']} closed by the server;"
               " TCP queries", flood=report)


def llq_replay(rig: Rig, t: Timing, baseline: dict[str, Any]) -> dict[str, Any]:
    rig.start_server()
    setup = bytes.fromhex(rig.legit("setup", "--name", "victim")["wire"])
    args = ["udp", SERVER_ATT, str(PORT), rig.payloads("setup", [setup]),
            *attacks.Bounds(t.replay_ports, 400, 10).args(), "--sources", _srcs(),
            "--ports", str(t.replay_ports)]
    assert rig.proc is not None
    cpu = meter(rig.proc.pid)
    flood = rig.flood(*args).result(60)
    legit = _finish(rig.lab, rig.spawn_legit(t.seconds, "--ops", "llq", "--name", "newdevice"),
                    t.seconds + 30)
    return row("llq replay", legit, baseline, cpu(),
               f"one signed SETUP replayed from {t.replay_ports} ports ({flood['received']} answered); "
               "then a new device sets up LLQs", flood=flood)


def update_replay(rig: Rig, t: Timing, baseline: dict[str, Any]) -> dict[str, Any]:
    rig.start_server()
    added = rig.legit("update", "--name", "stale", "--add", "2001:db8:dead::1")
    deleted = rig.legit("update", "--name", "stale")
    if added["rcode"] != "NOERROR" or deleted["rcode"] != "NOERROR":
        raise LabError(f"the device's updates failed: {added['rcode']}, {deleted['rcode']}")
    assert rig.proc is not None
    rig.lab.stop(rig.proc, sig=signal.SIGKILL)
    rig.proc = None
    rig.start_server(fresh=False)
    args = ["udp", SERVER_ATT, str(PORT), rig.payloads("update", [bytes.fromhex(added["wire"])]),
            *attacks.Bounds(10, 10, t.seconds).args(), "--sources", _srcs(), "--ports", "10"]
    legit, flood, cpu = during(rig, t.seconds, args)
    back = rig.legit("read", "--name", "stale")["records"]
    fate = "RETURNED" if back else "stayed gone"
    return row("update replay", legit, baseline, cpu,
               f"signed UPDATE replayed after a restart: the stale AAAA {fate}",
               stale_returned=bool(back), flood=flood)


def privacy(rig: Rig, t: Timing, baseline: dict[str, Any], devices: int = 5) -> dict[str, Any]:
    """What a stranger (unsigned, from the attacker's host) reads of `devices` published devices, while
    the device reads its own."""
    rig.start_server()
    pub = rig.legit("publish", "--devices", str(devices), timeout=60)
    if pub["failures"]:
        raise LabError(f"publishing {devices} devices failed: {pub['failures']}")
    assert rig.proc is not None
    cpu = meter(rig.proc.pid)
    legit = _finish(rig.lab, rig.spawn_legit(t.seconds / 2, "--ops", "query"), t.seconds + 30)
    stranger = progs.run(rig.lab, rig.att, "legit", "stranger", SERVER_ATT, str(PORT), ZONE, timeout=60)
    own = rig.legit("read", "--name", "_autotunnel._udp", "--type", "PTR")["records"]
    sees = sum(len(r.splitlines()) for r in own)
    counts = ", ".join(f"{v} {k}" for k, v in stranger["counts"].items())
    return row("privacy", legit, baseline, cpu(),
               f"{devices} devices published; a stranger reads {stranger['records']} records ({counts}); "
               f"the device reads {sees} browse PTRs", stranger=stranger, device_sees=sees)


@dataclass
class DnsRig:
    """The DNS lab with a server running and the device's baselines (UDP operations, TCP queries)."""

    rig: Rig
    baseline: dict[str, Any]
    baseline_tcp: dict[str, Any]


@contextmanager
def dns_rig(work: Path, t: Timing, info: dict[str, Any]) -> Iterator[DnsRig]:
    with Lab() as lab:
        srv, dev, att = dns_lab(lab)
        info.setdefault("namespaces", []).extend(h.netns for h in lab.hosts)
        info.setdefault("lab_ids", []).append(lab.id)
        rig = Rig(lab, srv, dev, att, work, new_secret(work))
        info["pids"] = rig.pids
        rig.start_server()
        base = _finish(lab, rig.spawn_legit(t.seconds), t.seconds + 30)
        base_tcp = _finish(lab, rig.spawn_legit(t.seconds, "--tcp", "--ops", "query"), t.seconds + 30)
        yield DnsRig(rig, base, base_tcp)
        if "Traceback" in log_tail(rig.log, 1_000_000):
            info["server_traceback"] = log_tail(rig.log, 3000)


STEPS: dict[str, Callable[[DnsRig, Timing], dict[str, Any]]] = {
    "pointer bomb udp": lambda d, t: pointer_bomb_udp(d.rig, t, d.baseline),
    "pointer bomb tcp": lambda d, t: pointer_bomb_tcp(d.rig, t, d.baseline),
    "reflection 20": lambda d, t: reflection(d.rig, t, d.baseline, 20),
    "reflection 50": lambda d, t: reflection(d.rig, t, d.baseline, 50),
    "slow-loris": lambda d, t: slow_loris(d.rig, t, d.baseline_tcp),
    "llq replay": lambda d, t: llq_replay(d.rig, t, d.baseline),
    "update replay": lambda d, t: update_replay(d.rig, t, d.baseline),
    "privacy": lambda d, t: privacy(d.rig, t, d.baseline),
}


def run_dns(work: Path, t: Timing, only: set[str], info: dict[str, Any]) -> list[dict[str, Any]]:
    with dns_rig(work, t, info) as d:
        return [step(d, t) for name, step in STEPS.items() if name in only]


# -- the tunnel port -----------------------------------------------------------------------------------------

B_ATT = "198.51.100.1"  # b's address on the attacker's link


@contextmanager
def tunnel_rig(work: Path) -> Iterator[tuple[Lab, Node, Node, Host]]:
    """A `tunneld up` pair (a, b on one link) and an attacker on a second link of b."""
    with running_pair(work) as (lab, a, b):
        att = lab.host("att")
        lab.veth(b.host, "eth1", att, "eth0")
        lab.addr(b.host, "eth1", f"{B_ATT}/24")
        for addr in ATTACKERS:
            lab.addr(att, "eth0", f"{addr}/24")
        yield lab, a, b, att


def ping_stats(lab: Lab, a: Node, b: Node, seconds: float, interval: float = 0.01) -> dict[str, Any]:
    """ping -6 from a to b's ULA for about `seconds`: success rate and RTT percentiles."""
    count = max(1, int(seconds / interval))
    r = lab.run(a.host, ["ping", "-6", "-n", "-c", str(count), "-i", str(interval), "-W", "1", b.ula],
                check=False, timeout=seconds + 30)
    rtts = sorted(float(x.split("time=")[1].split()[0]) for x in r.stdout.splitlines() if "time=" in x)

    def pct(q: float) -> float:
        return rtts[min(len(rtts) - 1, int(q * len(rtts)))] if rtts else 0.0

    return {"n": count, "ok": len(rtts), "success": len(rtts) / count, "p50_ms": pct(0.5),
            "p95_ms": pct(0.95)}


def restart_handshake(lab: Lab, a: Node, b: Node, timeout: float = 25.0) -> float | None:
    """Restart a's daemon; seconds from its control socket answering to the first ping reply over the
    tunnel (each try waits at most 1 s), or None if none within `timeout`."""
    assert a.proc is not None
    lab.stop(a.proc)
    start(lab, a)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if lab.run(a.host, ["ping", "-6", "-c1", "-W1", b.ula], check=False).returncode == 0:
            return time.monotonic() - t0
    return None


def handshake_floods(work: Path, t: Timing, rates: list[int], info: dict[str, Any]) -> list[dict[str, Any]]:
    import base64

    rows: list[dict[str, Any]] = []
    with tunnel_rig(work) as (lab, a, b, att):
        info.setdefault("namespaces", []).extend(h.netns for h in lab.hosts)
        info.setdefault("lab_ids", []).append(lab.id)
        pids = info.setdefault("pids", [])
        ping_stats(lab, a, b, 0.5)  # the first handshake
        baseline = ping_stats(lab, a, b, t.seconds)
        base_hs = restart_handshake(lab, a, b)
        # Initiations that pass mac1 (the account PSK, as from a lost device): a stranger's are refused at
        # mac1 for one hash each, so only these exercise the load meter, cookies and per-source limits.
        secret = load_account_secret(a.dir.parent / "secret")
        pool = attacks.handshake_initiations(base64.b64decode(b.public_key), 256,
                                             psk=derive_psk(secret, DOMAIN))
        hexfile = attacks.write_payloads(work / "initiations.hex", pool)
        for rate in rates:
            assert b.proc is not None
            cpu = meter(b.proc.pid)
            duration = min(t.seconds + 12, attacks.MAX_SECONDS)
            flood = attacks.Flood(lab, att, "udp", B_ATT, "4500", hexfile,
                                  *attacks.Bounds(int(rate * duration), rate, duration).args(),
                                  "--sources", _srcs(), "--ports", "64", "--drain", "0")
            pids.append(flood.pid)
            legit = ping_stats(lab, a, b, t.seconds)
            hs = restart_handshake(lab, a, b)
            pids.extend(p.pid for p in (a.proc, b.proc) if p is not None)
            report = flood.result(duration + 30)
            used = cpu()
            achieved = report["sent"] / report["seconds"] if report["seconds"] else 0.0
            hs_text = "none within 25 s" if hs is None else f"{hs:.2f} s"
            base_text = "none" if base_hs is None else f"{base_hs:.2f} s"
            rows.append(row(f"handshake {rate // 1000}k/s", legit, baseline, used,
                            f"{achieved / 1000:.0f}k/s sent (mac1 valid); ping in the tunnel; "
                            f"restarted peer handshake {hs_text} (baseline {base_text})",
                            handshake_s=hs, baseline_handshake_s=base_hs, achieved_rate=achieved,
                            flood=report))
    return rows


# -- the table -----------------------------------------------------------------------------------------------


def print_table(r: dict[str, Any]) -> None:
    head = ("| attack | legit success | p50 ms | p95 ms | baseline p50 ms | server CPU s (in s) | notes |")
    print(head)
    print("|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        lg, bs = x["legit"], x["baseline"]
        print(f"| {x['attack']} | {lg['ok']}/{lg['n']} ({lg['success'] * 100:.0f} %) | {lg['p50_ms']:.0f} "
              f"| {lg['p95_ms']:.0f} | {bs['p50_ms']:.1f} | {x['server_cpu_s']:.2f} ({x['window_s']:.0f}) "
              f"| {x['notes']} |")
    print(f"\n{r['seconds']} s in all; legit = signed query, UPDATE and LLQ setup round-robin (slow-loris: "
          "TCP queries; handshake: ping over the tunnel)")


def run(work: Path, t: Timing, only: set[str]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    if only & set(DNS_ATTACKS):
        rows += run_dns(work / "dns", t, only, info)
    rates = [r for name, r in zip(TUNNEL_ATTACKS, (5000, 100_000), strict=True) if name in only]
    if rates:
        rows += handshake_floods(work / "tunnel", t, rates, info)
    return {"rows": rows, "seconds": round(time.monotonic() - t0, 1), "lab": info}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attack", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--seconds", type=float, default=4.0, help="measurement window per attack (default 4)")
    p.add_argument("--only", default="", help="comma-separated attacks (default: all): "
                   + ", ".join((*DNS_ATTACKS, *TUNNEL_ATTACKS)))
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench attack: needs root (network namespaces); run it with sudo", file=sys.stderr)
        return 2
    names = (*DNS_ATTACKS, *TUNNEL_ATTACKS)
    only = {s.strip() for s in a.only.split(",") if s.strip()} or set(names)
    unknown = only - set(names)
    if unknown or not 1 <= a.seconds <= 20:
        print(f"bench attack: unknown attack(s) {sorted(unknown)} or --seconds outside 1..20",
              file=sys.stderr)
        return 2
    def work(tmp: Path) -> dict[str, Any]:
        for sub in ("dns", "tunnel"):
            (tmp / sub).mkdir()
        return run(tmp, Timing(seconds=a.seconds), only)

    return run_in_lab("attack", work, a.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
