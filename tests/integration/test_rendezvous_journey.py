"""The account zone past one machine, end to end: BIND primary, BIND secondary, and `tunneld serve-dns
--primary` as the front, with real devices (docs/rendezvous.md).

Topology (lab/topology.py star): hub 192.0.2.1; primary 192.0.2.2 and secondary 192.0.2.3 run named on
port 53 with exactly the statements `tunneld account primary-config` / `secondary-config` print (the
secondary is the zone's NS, so the primary NOTIFYs it); the front 192.0.2.4 runs serve-dns in front mode
on port 5353 (--primary-check 2); laptop and desktop are devices set up by `tunneld join` with the front
as their server.

1. The devices publish through the front and learn each other from it (DNS Push over TLS), while the
   secondary serves their records to a query signed with the account key and REFUSES it unsigned; an
   UPDATE with a 3 s Update Lease option through the front expires, and the record leaves the secondary.
2. The front is stopped (SIGTERM) and started again on the same database in the middle of a stream of
   signed UPDATEs, each retried by its client on SERVFAIL or timeout: every name ends on the primary
   exactly once, and the front's replica answers each of them. A short lease set before the restart
   survives it: the restarted front deletes its record, from the primary and so the secondary, at its end.
3. A PowerDNS primary (gsqlite3; lab/pdns.py) behind the front instead (hosts pdns, front, device): a
   device's update through the front lands there, and an LLQ watcher of the front hears, by the NOTIFY and
   a transfer PowerDNS answers with the whole zone, of a change made on PowerDNS directly.
4. One front per zone: a second front for the zone exits 2 with one line naming the owner and the fix;
   with --take-over it starts and adopts the record it finds without a lease, and the first front, told
   by NOTIFY, stops forwarding (its device gets SERVFAIL, counted).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab import progs
from lab.bind import DIG, NAMED, NSUPDATE, BindPrimary, BindSecondary, nsupdate
from lab.netns import Host, Lab, LabError, wait_for
from lab.pdns import PdnsPrimary
from lab.pdns import available as pdns_available
from lab.topology import star
from lab.tunnel import DOMAIN, TUNNELD, Node, dig_key, joined, serve_dns, status, write_private
from tests.helpers import exit_on_signal
from tunneld.cli import front_key

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                       reason="needs root and iproute2 (network namespaces); CI runs as root"),
]

FRONT_PORT = 5353
CHECK = 2  # --primary-check
FRONT = f"front.{DOMAIN}."
ACCOUNT = f"{DOMAIN}."

# A DNS client in a lab host (dnspython), as a device's own code would be: `update SERVER PORT KEY LEASE
# PAUSE NAME...` sends one UPDATE per name (add NAME 60 A 192.0.2.200, with an RFC 9664 Update Lease
# option of LEASE seconds), one at a time, retrying each on SERVFAIL, timeout or a refused connection (up
# to 60 tries, 1 s each), and prints {"name", "rcode", "tries"} per name; before the PAUSE-th name (from
# 0; -1: never) it prints {"paused": PAUSE} and waits for a line on its stdin (the test's cue).
# `once SERVER PORT KEY LEASE NAME` sends one such UPDATE, without retries, and prints {"rcode"}.
# `query SERVER PORT KEY NAME...` prints {"name", "rcode", "answers"} per name for signed A queries.
# KEY is dig's -y form, hmac-sha256:NAME:B64.
CLIENT = r"""
import json, struct, sys
import dns.edns, dns.exception, dns.message, dns.name, dns.query, dns.rcode, dns.tsigkeyring, dns.update
mode, server, port, key, *rest = sys.argv[1:]
alg, kname, secret = key.split(":")
ring = dns.tsigkeyring.from_text({kname: secret})
port = int(port)
if mode == "update":
    lease, pause, names = int(rest[0]), int(rest[1]), rest[2:]
    for i, name in enumerate(names):
        if i == pause:
            print(json.dumps({"paused": i}), flush=True)
            sys.stdin.readline()
        tries, rcode = 0, None
        while tries < 60:
            tries += 1
            u = dns.update.UpdateMessage("%ZONE%", keyring=ring, keyname=kname, keyalgorithm=alg)
            u.add(dns.name.from_text(name), 60, "A", "192.0.2.200")
            u.use_edns(0, options=[dns.edns.GenericOption(2, struct.pack("!I", lease))])
            try:
                r = dns.query.udp(u, server, port=port, timeout=1.0)
            except (dns.exception.Timeout, OSError):
                continue
            rcode = dns.rcode.to_text(r.rcode())
            if rcode != "SERVFAIL":
                break
        print(json.dumps({"name": name, "rcode": rcode, "tries": tries}), flush=True)
elif mode == "once":
    u = dns.update.UpdateMessage("%ZONE%", keyring=ring, keyname=kname, keyalgorithm=alg)
    u.add(dns.name.from_text(rest[1]), 60, "A", "192.0.2.201")
    u.use_edns(0, options=[dns.edns.GenericOption(2, struct.pack("!I", int(rest[0])))])
    r = dns.query.udp(u, server, port=port, timeout=5.0)
    print(json.dumps({"rcode": dns.rcode.to_text(r.rcode())}), flush=True)
else:
    for name in rest:
        q = dns.message.make_query(name, "A")
        q.use_tsig(ring, keyname=kname, algorithm=alg)
        r = dns.query.udp(q, server, port=port, timeout=2.0)
        answers = sorted(rd.to_text() for rrset in r.answer for rd in rrset)
        print(json.dumps({"name": name, "rcode": dns.rcode.to_text(r.rcode()), "answers": answers}),
              flush=True)
""".replace("%ZONE%", DOMAIN)


@dataclass
class Journey:
    lab: Lab
    dir: Path
    secret: Path
    front_host: Host
    front_node: Node
    front_at: tuple[str, int]
    front_args: list[str]
    primary: BindPrimary
    secondary: BindSecondary
    laptop_h: Host
    desktop_h: Host
    front: subprocess.Popen[Any]

    @property
    def log(self) -> Path:
        return self.dir / "serve-dns.log"

    def start_front(self, tls: bool = True) -> None:
        self.front = serve_dns(self.lab, self.front_node, self.secret, self.dir, self.front_at, tls=tls,
                               extra=self.front_args)

    def client(self, host: Host, *args: str, **popen: Any) -> subprocess.Popen[str]:
        return self.lab.spawn(host, [sys.executable, "-c", CLIENT, *args], text=True, **popen)

    def diagnose(self) -> str:
        return (f"--- serve-dns log:\n{self.log.read_text(errors='replace')[-3000:]}\n--- primary log:\n"
                f"{self.primary.log_text()[-1500:]}\n--- secondary log:\n{self.secondary.log_text()[-1500:]}")


def tunneld(*args: str) -> str:
    return subprocess.run([TUNNELD, *args], capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture
def journey(tmp_path: Path) -> Iterator[Journey]:
    for tool in (NAMED, DIG, NSUPDATE):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is missing: tools/install.sh installs Debian bind9 and bind9-dnsutils")
    out = tunneld("account", "new", DOMAIN)
    secret = tmp_path / "secret"
    write_private(secret, out.splitlines()[0] + "\n")
    with Lab() as lab:
        _hub, p, s, f, laptop_h, desktop_h = star(lab, ("primary", "secondary", "front", "laptop", "desktop"))
        primary_conf = tunneld("account", "primary-config", DOMAIN, "--secret-file", str(secret),
                               "--front", f"{f.addr4}:{FRONT_PORT}",
                               "--zone-file", str(tmp_path / "primary" / f"{DOMAIN}.zone"))
        secondary_conf = tunneld("account", "secondary-config", DOMAIN, "--secret-file", str(secret),
                                 "--primary", p.addr4,
                                 "--zone-file", str(tmp_path / "secondary" / f"{DOMAIN}.zone"))
        with BindPrimary(lab, p, DOMAIN, primary_conf, tmp_path / "primary",
                         nameservers=(s.addr4,)) as primary, \
             BindSecondary(lab, s, DOMAIN, secondary_conf, tmp_path / "secondary", primary) as secondary:
            front_args = ["--primary", f"{p.addr4}:53", "--primary-key", str(primary.keys[FRONT]),
                          "--primary-check", str(CHECK), "--min-lease", "1", "--verbose"]
            front_node, front_at = Node(f, tmp_path / "front", f.addr4), (f.addr4, FRONT_PORT)
            proc = serve_dns(lab, front_node, secret, tmp_path, front_at, tls=True, extra=front_args)
            j = Journey(lab, tmp_path, secret, f, front_node, front_at, front_args, primary, secondary,
                        laptop_h, desktop_h, proc)
            yield j
            for proc in [proc for proc in lab.procs if proc not in (primary.proc, secondary.proc, j.front)]:
                lab.stop(proc)  # the devices first, while the front and BIND take their withdrawals
            exit_on_signal(j.front, signal.SIGTERM, j.log, "serve-dns")


def knows(n: Node, other: Node) -> bool:
    return any(p["ula"] == other.ula for p in status(n)["peers"])


def at_secondary(j: Journey, name: str, rdtype: str, signed: bool = True) -> tuple[str, list[str]]:
    return j.secondary.query(name, rdtype, ACCOUNT if signed else None)


def test_devices_meet_through_the_front_while_the_secondary_serves_signed_queries(journey: Journey) -> None:
    j = journey
    laptop = joined(j.lab, j.laptop_h, "laptop", j.secret, j.front_at, j.dir, tls=True)
    desktop = joined(j.lab, j.desktop_h, "desktop", j.secret, j.front_at, j.dir, tls=True)
    try:
        wait_for(lambda: knows(laptop, desktop) and knows(desktop, laptop), timeout=20, interval=0.1,
                 what="the two devices to learn each other from the front")
    except LabError as e:
        raise AssertionError(f"{e}\n{status(laptop)}\n{j.diagnose()}") from None
    for n in (laptop, desktop):
        assert status(n)["watch"]["transport"] == "push", status(n)["watch"]

    # Their records reach the secondary (primary NOTIFY, IXFR); only a query signed with the account key
    # is answered there.
    for n in (laptop, desktop):
        def served(n: Node = n) -> bool:
            return at_secondary(j, f"{n.name}.{DOMAIN}", "AAAA") == ("NOERROR", [n.ula])
        wait_for(served, timeout=5, interval=0.1, what=f"{n.name}'s address on the secondary")
        rcode, answers = at_secondary(j, f"{n.name}.{DOMAIN}", "AAAA", signed=False)
        assert (rcode, answers) == ("REFUSED", []), (rcode, answers)

    # An UPDATE with a 3 s lease, through the front: on the secondary, then gone from it when it expires.
    name = f"short.{DOMAIN}"
    r = j.lab.run(j.laptop_h, [sys.executable, "-c", CLIENT, "update", *map(str, j.front_at),
                               dig_key(j.secret), "3", "-1", name], timeout=90)
    assert json.loads(r.stdout)["rcode"] == "NOERROR", (r.stdout, j.diagnose())
    added = time.monotonic()
    try:
        wait_for(lambda: at_secondary(j, name, "A") == ("NOERROR", ["192.0.2.200"]), timeout=5, interval=0.1,
                 what="the leased record on the secondary")
    except LabError as e:
        raise AssertionError(f"{e}\n{at_secondary(j, name, 'A')} {j.primary.query(name, 'A', FRONT)}\n"
                             f"{r.stdout}\n{j.diagnose()}") from None
    try:
        wait_for(lambda: at_secondary(j, name, "A")[0] == "NXDOMAIN", timeout=15, interval=0.2,
                 what="the expired record to leave the secondary")
    except LabError as e:
        raise AssertionError(f"{e}\n{j.diagnose()}") from None
    assert time.monotonic() - added >= 2.5  # not gone before its lease ended
    assert at_secondary(j, f"laptop.{DOMAIN}", "AAAA") == ("NOERROR", [laptop.ula])  # its lease runs on


N = 40
BRIEF = 10  # seconds: a lease set before the restart that ends after it


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_the_front_restarted_during_updates_loses_and_duplicates_nothing(journey: Journey,
                                                                         stop: signal.Signals) -> None:
    """Stopped, or killed (its commits are not synced, only the intents: a kill loses none of them)."""
    j = journey
    tag = "s" if stop == signal.SIGTERM else "k"
    names = [f"{tag}{i}.{DOMAIN}" for i in range(N)]
    client = j.client(j.laptop_h, "update", *map(str, j.front_at), dig_key(j.secret), "3600", str(N // 4),
                      *names, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    results = []
    for _ in range(N // 4):  # bounded by the client's own tries
        line = client.stdout.readline()
        assert line, f"the client ended early (rc {client.poll()})\n{j.diagnose()}"
        results.append(json.loads(line))
    assert json.loads(client.stdout.readline()) == {"paused": N // 4}
    # A short lease, set before the restart: the restarted front must delete its record when it ends.
    brief = f"brief-{tag}.{DOMAIN}"
    r = j.lab.run(j.laptop_h, [sys.executable, "-c", CLIENT, "update", *map(str, j.front_at),
                               dig_key(j.secret), str(BRIEF), "-1", brief], timeout=90)
    assert json.loads(r.stdout)["rcode"] == "NOERROR", (r.stdout, j.diagnose())
    leased = time.monotonic()
    j.front.send_signal(stop)
    client.stdin.write("go\n")  # the stream goes on while the front stops, is down, and starts again
    client.stdin.flush()
    assert j.front.wait(timeout=10) == (0 if stop == signal.SIGTERM else -signal.SIGKILL), j.diagnose()
    mark = j.log.stat().st_size
    j.start_front()
    assert time.monotonic() - leased < BRIEF - 1, "the restart took longer than the short lease"
    out, _ = client.communicate(timeout=120)
    results += [json.loads(line) for line in out.splitlines()]
    assert [r["name"] for r in results] == names
    assert all(r["rcode"] == "NOERROR" for r in results), (results, j.diagnose())
    assert any(r["tries"] > 1 for r in results), results  # the restart was inside the stream

    # On the primary: each name exactly once (no loss, no duplicate record).
    axfr = j.primary.transfer(FRONT)
    assert axfr is not None
    owners = [line.split()[0] for line in axfr if line.split()[3] == "A" and line.startswith(tag)]
    assert sorted(owners) == sorted(f"{n}." for n in names), axfr

    # The front's replica agrees: each name answered, once, to a query signed with the account key.
    def replica_agrees() -> bool:
        r = j.lab.run(j.laptop_h, [sys.executable, "-c", CLIENT, "query", *map(str, j.front_at),
                                   dig_key(j.secret), *names], timeout=60)
        got = [json.loads(line) for line in r.stdout.splitlines()]
        return all(g["rcode"] == "NOERROR" and g["answers"] == ["192.0.2.200"] for g in got) and len(got) == N
    wait_for(replica_agrees, timeout=CHECK + 5, interval=0.5, what="the front's replica to hold every name")

    # The lease set before the restart survived it: the restarted front deletes the record at its end,
    # on the primary and so on the secondary, and not before.
    def brief_gone() -> bool:
        return j.primary.query(brief, "A", FRONT)[1] == [] and at_secondary(j, brief, "A")[0] == "NXDOMAIN"
    try:
        wait_for(brief_gone, timeout=BRIEF + 10, interval=0.2, what="the short lease's record to be deleted")
    except LabError as e:
        raise AssertionError(f"{e}\n{j.diagnose()}") from None
    assert time.monotonic() - leased >= BRIEF - 1  # not before its lease ended
    after = j.log.read_bytes()[mark:].decode(errors="replace")
    assert f"lease expired: {brief}. type 1" in after, after[-3000:]


PDNS_CHECK = 6  # long enough that an event within 2.5 s of a change came by NOTIFY


@pytest.mark.skipif(not pdns_available(), reason="PowerDNS with the sqlite3 backend is not installed")
def test_a_powerdns_primary_behind_the_front(tmp_path: Path) -> None:
    for tool in (DIG, NSUPDATE):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is missing: tools/install.sh installs Debian bind9-dnsutils")
    out = tunneld("account", "new", DOMAIN)
    secret = tmp_path / "secret"
    write_private(secret, out.splitlines()[0] + "\n")
    fkey = front_key(base64.b64decode(out.splitlines()[0]), DOMAIN)
    with Lab() as lab:
        _hub, p, f, d = star(lab, ("pdns", "front", "device"))
        notify_to = [(ipaddress.ip_address(f.addr4), FRONT_PORT)]
        with PdnsPrimary(lab, p, DOMAIN, fkey, notify_to, tmp_path / "pdns") as pdns:
            front_at = (f.addr4, FRONT_PORT)
            log = tmp_path / "serve-dns.log"
            front = serve_dns(lab, Node(f, tmp_path / "front", f.addr4), secret, tmp_path, front_at,
                              extra=["--primary", f"{p.addr4}:53", "--primary-key", str(pdns.keys[FRONT]),
                                     "--primary-check", str(PDNS_CHECK), "--verbose"])

            def diagnose() -> str:
                return (f"--- serve-dns log:\n{log.read_text(errors='replace')[-3000:]}\n--- pdns log:\n"
                        f"{pdns.log_text()[-2000:]}")

            # A device's records, through the front, on PowerDNS (which answers any query: it is hidden).
            laptop = joined(lab, d, "laptop", secret, front_at, tmp_path)
            try:
                wait_for(lambda: pdns.query(f"laptop.{DOMAIN}", "AAAA") == ("NOERROR", [laptop.ula]),
                         timeout=15, interval=0.1, what="the device's address on PowerDNS")
            except LabError as e:
                raise AssertionError(f"{e}\n{status(laptop)['publish']}\n{diagnose()}") from None
            assert laptop.proc is not None
            lab.stop(laptop.proc)  # its withdrawal goes through the front too
            wait_for(lambda: pdns.query(f"laptop.{DOMAIN}", "AAAA")[1] == [], timeout=5, interval=0.1,
                     what="the device's withdrawal on PowerDNS")

            # A change made on PowerDNS directly reaches an LLQ watcher of the front.
            name = f"direct.{DOMAIN}"
            watcher = progs.spawn(lab, d, "llq_watch", f.addr4, str(FRONT_PORT), DOMAIN, name, "AAAA",
                                  str(secret), "20", stdout=subprocess.PIPE, text=True)
            assert watcher.stdout is not None
            first = json.loads(watcher.stdout.readline() or "{}")  # bounded by the watcher's own run time
            assert first.get("event") == "established", (first, diagnose())
            r = nsupdate(lab, d, p.addr4, 53, pdns.keys[FRONT], DOMAIN,
                         [f"update add {name}. 60 AAAA fd00::7"])
            assert r.returncode == 0, (r.stdout, r.stderr, diagnose())
            changed = time.monotonic()
            event = json.loads(watcher.stdout.readline() or "{}")
            took = time.monotonic() - changed
            assert event.get("event") == "added" and any("fd00::7" in x for x in event["records"]), \
                (event, diagnose())
            assert took < 2.5, f"{took:.1f} s: not by NOTIFY\n{diagnose()}"
            watcher.terminate()
            watcher.communicate(timeout=10)
            exit_on_signal(front, signal.SIGTERM, log, "serve-dns")
            counters = next((x for x in log.read_text().splitlines() if "change feed:" in x), "")
            assert "notify" in counters and "transfer: IXFR" in counters, log.read_text()[-3000:]


SECOND_PORT = 5354


def test_a_second_front_is_refused_and_one_taking_over_stops_the_first(journey: Journey) -> None:
    """One front per zone (docs/protocol.md, "One front per zone"): a second front for the zone exits 2
    with one line naming the owner and the fix; with --take-over it starts, adopts the record it finds
    without a lease, and the first front, told by the primary's NOTIFY, stops forwarding: its device gets
    SERVFAIL, counted."""
    j = journey

    def once(at: tuple[str, int], name: str) -> str:
        r = j.lab.run(j.laptop_h, [sys.executable, "-c", CLIENT, "once", *map(str, at), dig_key(j.secret),
                                   "3600", name], timeout=30)
        return str(json.loads(r.stdout)["rcode"])

    assert once(j.front_at, f"before.{DOMAIN}") == "NOERROR"
    second = j.dir / "second"
    second.mkdir()
    argv = [TUNNELD, "serve-dns", "--zone", DOMAIN, "--secret-file", str(j.secret), "--listen",
            f"{j.front_at[0]}:{SECOND_PORT}", "--db", str(second / "dns.sqlite"), "--user", "root",
            *j.front_args]
    r = j.lab.run(j.front_host, argv, check=False, timeout=30)
    lines = [x for x in r.stderr.splitlines() if x.startswith("tunneld: ")]  # (--verbose logs on stderr too)
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr, r.stdout)
    assert f"zone {DOMAIN}. has another front (front id " in lines[0], lines
    assert "stop that front" in lines[0] and "serve-dns --take-over" in lines[0], lines

    taker = serve_dns(j.lab, Node(j.front_host, second / "node", j.front_at[0]), j.secret, second,
                      (j.front_at[0], SECOND_PORT), extra=[*j.front_args, "--take-over"])
    taker_log = (second / "serve-dns.log").read_text()
    assert "1 record(s) without a lease adopted" in taker_log, taker_log[-3000:]
    try:
        wait_for(lambda: "another front took over its leases" in j.log.read_text(), timeout=5, interval=0.1,
                 what="the first front to learn of the take-over (NOTIFY)")
    except LabError as e:
        raise AssertionError(f"{e}\n{j.diagnose()}") from None
    assert once(j.front_at, f"after.{DOMAIN}") == "SERVFAIL"
    assert j.primary.query(f"after.{DOMAIN}", "A", FRONT) == ("NXDOMAIN", [])  # never forwarded
    assert once((j.front_at[0], SECOND_PORT), f"taken.{DOMAIN}") == "NOERROR"
    exit_on_signal(j.front, signal.SIGTERM, j.log, "serve-dns")
    counters = next((x for x in j.log.read_text().splitlines() if "lease owner:" in x), "")
    assert "update refused: not the lease owner 1" in counters and "claim lost 1" in counters, counters
    exit_on_signal(taker, signal.SIGTERM, second / "serve-dns.log", "serve-dns")
