"""Long-lived queries end to end: our LLQ client in one namespace, `tunneld serve-dns` in another,
changes made with nsupdate (an independent client). Events arrive without polling. And an account of
100 devices, learned by the daemon's own watching service."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from lab import progs
from lab.netns import wait_for
from lab.tunnel import TUNNELD
from tests.integration.test_serve_dns import PORT, SERVER, ZONE, Served, nsupdate, start_server
from tests.integration.test_serve_dns import served as served
from tunneld.dnsserver.store import AddRR, Lease, ZoneStore
from tunneld.proto import records


class Watch:
    def __init__(self, s: Served, name: str, rdtype: str, seconds: float = 30) -> None:
        self.proc = progs.spawn(s.lab, s.a, "llq_watch", SERVER, str(PORT), ZONE, f"{name}.{ZONE}", rdtype,
                                str(s.account.secret), str(seconds), stdout=subprocess.PIPE, text=True)
        self.events: list[dict[str, Any]] = []

    def next(self, timeout: float = 10) -> dict[str, Any]:
        """The next event line (bounded: the watcher exits after its run time)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        assert line, f"watcher ended without an event (rc {self.proc.poll()})"
        assert time.monotonic() < deadline + 1, "event too late"
        ev = json.loads(line)
        self.events.append(ev)
        return ev

    def until(self, kind: str, timeout: float = 10) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ev = self.next(timeout=end - time.monotonic())
            if ev["event"] == kind:
                return ev
        raise AssertionError(f"no {kind} event in {timeout} s: {self.events}")


def test_change_is_seen_within_a_second_without_polling(served: Served) -> None:
    s = served
    w = Watch(s, "laptop", "AAAA")
    w.until("established")
    t = time.monotonic()
    assert nsupdate(s, s.account.key, f"update add laptop.{ZONE} 60 AAAA fd00::1").returncode == 0
    ev = w.until("added")
    assert time.monotonic() - t < 1.0, ev
    assert any("fd00::1" in r for r in ev["records"])
    # The host moves: the old address is removed, the new one added.
    assert nsupdate(s, s.account.key, f"update delete laptop.{ZONE} AAAA",
                    f"update add laptop.{ZONE} 60 AAAA fd00::2").returncode == 0
    kinds = {w.next()["event"], w.next()["event"]}
    assert kinds == {"added", "removed"}, w.events


def test_a_lost_event_is_retransmitted(served: Served) -> None:
    s = served
    w = Watch(s, "desktop", "AAAA")
    w.until("established")
    # Drop what the server sends over UDP to the watcher's host (nsupdate uses TCP here, -v).
    s.lab.nft(s.a, "table inet lose { chain in { type filter hook input priority 0; "
                   f"udp sport {PORT} counter drop; }}; }}")
    script = f"server {SERVER} {PORT}\nzone {ZONE}\nupdate add desktop.{ZONE} 60 AAAA fd00::3\nsend\n"
    assert s.lab.run(s.a, ["nsupdate", "-v", "-t", "5", "-k", str(s.account.key)], input=script,
                     check=False, timeout=30).returncode == 0

    def dropped() -> bool:  # the first event was sent, and lost
        out = s.lab.run(s.a, ["nft", "list", "table", "inet", "lose"]).stdout
        return "packets 0 " not in out and "counter packets" in out

    wait_for(dropped, timeout=5, what="the first event to be dropped")
    s.lab.run(s.a, ["nft", "delete", "table", "inet", "lose"])
    ev = w.until("added", timeout=10)  # the server's retransmission, +2 s after the first try
    assert any("fd00::3" in r for r in ev["records"])


def test_watchers_survive_a_server_restart(served: Served) -> None:
    s = served
    w = Watch(s, "tablet", "AAAA", seconds=40)
    w.until("established")
    assert s.lab.stop(s.proc) == 0  # SIGTERM: a clean stop
    s.proc = start_server(s.lab, s.b, s.a, s.account, s.db, s.log)  # same database
    assert nsupdate(s, s.account.key, f"update add tablet.{ZONE} 60 AAAA fd00::5").returncode == 0
    ev = w.until("added", timeout=10)  # the LLQ from before the restart still delivers
    assert any("fd00::5" in r for r in ev["records"])


def test_an_expired_lease_is_a_removal_event(served: Served) -> None:
    s = served
    assert s.lab.stop(s.proc) == 0
    # The same server with 2 s leases (the minimum is an admin's setting; 1800 s by default).
    with s.log.open("ab") as out:
        s.proc = s.lab.spawn(s.b, [TUNNELD, "serve-dns", "--zone", ZONE, "--secret-file",
                                   str(s.account.secret), "--listen", f"{SERVER}:{PORT}", "--db", str(s.db),
                                   "--min-lease", "2", "--default-lease", "2", "--user", "root"],
                             stdout=out, stderr=out)
    w = Watch(s, "phone", "AAAA")
    w.until("established", timeout=15)
    assert nsupdate(s, s.account.key, f"update add phone.{ZONE} 60 AAAA fd00::6").returncode == 0
    w.until("added")
    t = time.monotonic()
    ev = w.until("removed", timeout=10)  # nobody refreshed the lease: the server's sweep removes it
    assert any("fd00::6" in r for r in ev["records"])
    assert time.monotonic() - t < 4, "removed within about the 2 s lease"


def publish_devices(db: Path, count: int) -> None:
    """``count`` devices' records, written into the server's database (as their UPDATEs would)."""
    store = ZoneStore(str(db), ZONE + ".", f"ns.{ZONE}.", PORT, addresses=[SERVER])
    try:
        changes: list[AddRR] = []
        for i in range(count):
            host = records.HostRecords.derive(f"dev{i:03d}", ZONE, bytes([1, i]) + bytes(30), port=4500 + i,
                                              addresses=[ipaddress.ip_address(f"198.51.100.{i + 1}")])
            changes += [AddRR(rrset.name, 300, rd) for rrset in records.build(host, 300) for rd in rrset]
        assert store.apply_update(changes, Lease(7200, 7200), time.time())
    finally:
        store.close()


def test_a_watcher_learns_an_account_of_100_devices(served: Served) -> None:
    """Before: with about 10 devices fallback polling learned nothing, and from 50 the LLQ's own answer
    came truncated (no TCP, no EDNS size) and no peer was learned."""
    s = served
    assert s.lab.stop(s.proc) == 0
    publish_devices(s.db, 100)
    s.proc = start_server(s.lab, s.b, s.a, s.account, s.db, s.log)
    out = progs.run(s.lab, s.a, "watch_account", SERVER, str(PORT), ZONE, str(s.account.secret), "100", "25",
                    timeout=40)
    assert out["peers"] == 100, out
    assert out["counters"].get("truncated answer fetched over TCP", 0) >= 1, out  # the browse answer
    assert out["t"] < 25, out
