"""The front's rows of `python -m bench.throughput dns`: serve-dns --primary before a BIND primary.

In the same lab as bench.dns (two_hosts): host b runs a BIND primary (lab.bind.BindPrimary, configured
with what `tunneld account primary-config` prints) on 192.0.2.2:5355 and the front (`serve-dns --primary
192.0.2.2:5355 --primary-key FRONT_KEY`) on 192.0.2.2:5356; host a, beside the client, runs a BIND
secondary (BindSecondary, from `secondary-config`) on 192.0.2.1:53, notified by the primary as the zone's
NS. bench.dns alternates the front's update rows with serve-dns alone and BIND directly; this module adds:

- lag: the time from the reply to an UPDATE through the front until the secondary answers the new record
  (lab.progs.dns_front_client secondary: it polls the secondary every 2 ms);
- memory: the front's RSS before and with N LLQs held (dns_front_client hold, from several client source
  addresses, since the LLQ server caps what one address holds).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from bench.procs import Recorder, log_tail
from lab import progs
from lab.bind import BindPrimary, BindSecondary
from lab.netns import Host, Lab, LabError, wait_for

PRIMARY_PORT = 5355
FRONT_PORT = 5356
SECONDARY_PORT = 53  # the primary notifies the zone's NS records at port 53
HOLD_ROOM = 2500
"""The front's LLQ table for a hold row of N is N + HOLD_ROOM (--llq-max, and --llq-max-per-key alike, as
every LLQ of the run is signed with the one account key): room for the event rows' watchers, should a
cancel be lost, and for half-open setups a client started again. An address may hold a quarter of it."""
HOLD_SOURCES = "192.0.2.{n}"  # extra client addresses for held LLQs, from .101 on


@dataclass
class Front:
    proc: subprocess.Popen[Any]
    log: Path
    primary: BindPrimary
    secondary: BindSecondary

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise LabError(f"the front exited {self.proc.returncode}: {log_tail(self.log)}")


def _tunneld(tunneld: Path, *args: str) -> str:
    return subprocess.run([str(tunneld), *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


@contextlib.contextmanager
def front(lab: Lab, a: Host, b: Host, rec: Recorder, work: Path, tunneld: Path, zone: str,
          secret: Path, extra: tuple[str, ...] = ()) -> Iterator[Front]:
    """The primary, the front before it (with ``extra`` serve-dns arguments) and the secondary, up and in
    sync; stopped on exit."""
    server = b.addr4
    primary_conf = _tunneld(tunneld, "account", "primary-config", zone, "--secret-file", str(secret),
                            "--front", f"{server}:{FRONT_PORT}",
                            "--zone-file", str(work / "primary" / "zone"))
    secondary_conf = _tunneld(tunneld, "account", "secondary-config", zone, "--secret-file", str(secret),
                              "--primary", f"{server}:{PRIMARY_PORT}",
                              "--zone-file", str(work / "secondary" / "zone"))
    primary = BindPrimary(lab, b, zone, primary_conf, work / "primary", port=PRIMARY_PORT, address=server,
                          nameservers=(a.addr4,))
    with primary:
        assert primary.proc is not None
        rec.pids.append(primary.proc.pid)
        log = work / "front.log"
        with log.open("ab") as logf:
            proc = rec.spawn(lab, b, [str(tunneld), "serve-dns", "--zone", zone, "--secret-file", str(secret),
                                      "--listen", f"{server}:{FRONT_PORT}",
                                      "--db", str(work / "front.sqlite"),
                                      "--default-lease", "7200", "--user", "root", "--verbose",
                                      "--primary", f"{server}:{PRIMARY_PORT}",
                                      "--primary-key", str(primary.keys[primary.front_key]),
                                      *extra],
                             stdout=logf, stderr=logf)
        f = None
        try:
            def transferred() -> bool:
                if proc.poll() is not None:
                    raise LabError(f"the front exited {proc.returncode}: {log_tail(log)}")
                return "from the primary," in log.read_text(errors="replace")

            wait_for(transferred, timeout=20, interval=0.05, what="the front's first transfer")
            secondary = BindSecondary(lab, a, zone, secondary_conf, work / "secondary", primary,
                                      port=SECONDARY_PORT, address=a.addr4)
            with secondary:
                assert secondary.proc is not None
                rec.pids.append(secondary.proc.pid)
                f = Front(proc, log, primary, secondary)
                yield f
                f.check()
        finally:
            lab.stop(proc)
        if "Traceback" in log_tail(log, 100_000):
            raise LabError(f"the front logged a traceback: {log_tail(log)}")


def secondary_lag(lab: Lab, a: Host, rec: Recorder, f: Front, base: list[str], count: int) -> dict[str, Any]:
    """`count` updates through the front, each followed by polling the secondary for the new record."""
    argv = progs.argv("dns_front_client", "secondary", base[0], str(FRONT_PORT), *base[2:],
                      "--secondary", f"{f.secondary.address}:{f.secondary.port}", "--count", str(count))
    p = rec.spawn(lab, a, argv, cwd=progs.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = progs.finish(lab, p, 60 + count * 12, "dns front client secondary")
    f.check()
    return r


def rss_kib(pid: int) -> int:
    """A process's resident set (VmRSS, KiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LabError(f"no VmRSS for pid {pid}")


def hold_caps(llqs: int) -> tuple[str, ...]:
    """The front's serve-dns arguments for a hold row of `llqs` (none for 0: its defaults)."""
    if llqs <= 0:
        return ()
    table = llqs + HOLD_ROOM
    return ("--llq-max", str(table), "--llq-max-per-key", str(table))


def held_memory(lab: Lab, a: Host, rec: Recorder, f: Front, base: list[str], llqs: int) -> dict[str, Any]:
    """The front's RSS before, and with `llqs` LLQs established from enough client addresses (the front
    started with :func:`hold_caps`)."""
    n_sources = -(-llqs // ((llqs + HOLD_ROOM) // 4)) + 1
    sources = [HOLD_SOURCES.format(n=101 + i) for i in range(n_sources)]
    for s in sources:
        lab.addr(a, a.ifname, f"{s}/24")
    before = rss_kib(f.proc.pid)
    argv = progs.argv("dns_front_client", "hold", base[0], str(FRONT_PORT), *base[2:], "--llqs", str(llqs),
                      "--sources", ",".join(sources))
    p = rec.spawn(lab, a, argv, cwd=progs.REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    lines = progs.Lines(p)
    try:
        held = lines.until(lambda o: "established" in o, timeout=60 + llqs * 0.05)
    except (TimeoutError, EOFError) as e:
        lab.stop(p)
        raise LabError(f"held LLQs: {e}") from None
    during = rss_kib(f.proc.pid)
    assert p.stdin is not None
    p.stdin.write("done\n")
    p.stdin.flush()
    closed = lines.until(lambda o: "closed" in o, timeout=60 + llqs / 100 * 2)  # paced: dns_client.cancel_all
    if p.wait(timeout=30) != 0:
        raise LabError(f"dns front client hold exited {p.returncode}")
    f.check()
    per = (during - before) * 1024 / held["established"] if held["established"] else 0.0
    return {"llqs": llqs, "established": held["established"], "refused": held.get("refused", {}),
            "sources": len(sources), "setup_seconds": held["setup_seconds"], "rss_before_kib": before,
            "rss_held_kib": during, "bytes_per_llq": per, "closed": closed["closed"],
            "cancelled": closed.get("cancelled", 0),
            "setup_restarts": held.get("setup_restarts", 0),
            "client_counters": held.get("client_counters", {})}


def goals(r: dict[str, Any]) -> list[str]:
    """The issue's goals against what was measured: added ms per update, added ms to an event."""
    out = []
    rows = r.get("rows", {})
    if "front/sequential" in rows and "primary/sequential" in rows:  # the same BIND, with and without it
        front, primary = rows["front/sequential"], rows["primary/sequential"]
        added = front["latency_median_ms"] - primary["latency_median_ms"]
        r.setdefault("front", {})["added_update_ms"] = added
        out.append(f"the front adds {added:.2f} ms per update to its primary updated directly (sequential "
                   f"medians; goal under 2 ms: {'met' if added < 2 else 'NOT met'})")
    if "front/sequential" in rows and "bind/sequential" in rows:
        alone = rows["front/sequential"]["latency_median_ms"] - rows["bind/sequential"]["latency_median_ms"]
        r.setdefault("front", {})["added_update_ms_vs_bind_alone"] = alone
        out.append(f"{alone:.2f} ms more than a BIND alone (no secondary, no NOTIFYs)")
    events = r.get("front", {}).get("events", {})
    big = max((int(k) for k in events), default=0)
    if big:
        e = events[str(big)]
        if e.get("front") and e.get("tunneld"):
            added = e["front"]["median_ms"] - e["tunneld"]["median_ms"]
            r["front"]["added_event_ms"] = {"watchers": big, "ms": added}
            out.append(f"the front adds {added:.2f} ms to an event at {big} watchers to serve-dns alone "
                       f"(medians; goal under 100 ms: {'met' if added < 100 else 'NOT met'}); at "
                       f"{big} watchers the front's median is {e['front']['median_ms']:.2f} ms")
    return out


def print_front(r: dict[str, Any], out: TextIO) -> None:
    fr = r.get("front") or {}
    events = fr.get("events") or {}
    if events:
        print(file=out)
        print("Update-to-event latency, LLQ over UDP, the front (serve-dns --primary, before the BIND "
              "primary) and serve-dns alone, alternated per watcher count (front, alone); same measure as "
              "above",
              file=out)
        head = (f"| {'server':<22} | {'watchers':>8} | {'events received/expected':<24} | {'median ms':>9} | "
                f"{'p90 ms':>7} | {'max ms':>7} |")
        print(head, file=out)
        print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|", file=out)
        for k in sorted(events, key=int):
            for server, label in (("front", "front -> BIND primary"), ("tunneld", "tunneld serve-dns")):
                ev = events[k].get(server)
                if ev:
                    got = f"{ev['received']}/{ev['expected']}"
                    print(f"| {label:<22} | {int(k):>8} | {got:<24} | {ev['median_ms']:>9.3f} | "
                          f"{ev['p90_ms']:>7.3f} | {ev['max_ms']:>7.3f} |", file=out)
    lag = fr.get("secondary")
    if lag:
        print(file=out)
        print(f"UPDATE through the front -> a BIND secondary serves the record (NOTIFY, IXFR): from the "
              f"UPDATE's reply to the secondary's first answer with it (polled every 2 ms), {lag['updates']} "
              f"updates: served {lag['served']}/{lag['updates']}, median {lag['median_ms']:.1f} ms, p90 "
              f"{lag['p90_ms']:.1f} ms, max {lag['max_ms']:.1f} ms", file=out)
    mem = fr.get("memory")
    if mem:
        refused = ", ".join(f"{n} {why}" for why, n in mem["refused"].items())
        print(file=out)
        print(f"The front's memory with LLQs held: {mem['established']} of {mem['llqs']} LLQs established "
              f"from {mem['sources']} client addresses in {mem['setup_seconds']:.1f} s"
              + (f" (not established: {refused})" if refused else "")
              + f"; RSS {mem['rss_before_kib'] / 1024:.1f} MiB before, "
              f"{mem['rss_held_kib'] / 1024:.1f} MiB held, "
              f"{mem['bytes_per_llq']:.0f} bytes per LLQ; {mem.get('cancelled', 0)} cancels answered",
              file=out)
    lines = goals(r)
    if lines:
        print(file=out)
        print("Goals (issue: the front adds under 2 ms per update, under 100 ms to an event at 1,000 "
              "watchers): " + "; ".join(lines), file=out)
