"""The front's change feed against a real BIND 9 primary: a change made directly on the primary reaches an
LLQ watcher of the front, by NOTIFY and IXFR, and, with the NOTIFY dropped, by the next serial check.

Topology (lab/topology.py two_hosts): b 192.0.2.2 runs the primary (lab/bind.py BindPrimary, configured
with exactly what `tunneld account primary-config --front 192.0.2.1:5353` prints: also-notify to the
front, signed with the account's front key); a 192.0.2.1 runs `serve-dns --primary 192.0.2.2:53
--primary-key FILE --primary-check 6` and an LLQ watcher (lab/progs/llq_watch.py) of one name at the
front. The changes are made with nsupdate signed with the front key, straight at the primary: the front
sees them only through its feed. Then an nftables rule in a drops UDP from the primary to the front's
port (its NOTIFY) and the next change must still arrive within the check interval and a margin. Last, a
device's update through the front gives one event, not a second one when it comes back from the primary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lab import progs
from lab.bind import DIG, NAMED, NSUPDATE, BindPrimary, nsupdate
from lab.netns import Host, Lab, LabError, wait_for
from lab.topology import two_hosts
from lab.tunnel import DOMAIN, TUNNELD
from tests.helpers import exit_on_signal

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"),
                       reason="needs root, iproute2 and nftables (network namespaces); CI runs as root"),
]

FRONT_PORT = 5353
CHECK = 6.0  # --primary-check: long enough that an event within 2 s of a change came by NOTIFY
FRONT = f"front.{DOMAIN}."
NAME = f"direct.{DOMAIN}"


@dataclass
class Feedlab:
    lab: Lab
    a: Host
    b: Host
    primary: BindPrimary
    secret: Path
    account_key: Path  # the account's key stanza: a device's nsupdate through the front
    proc: subprocess.Popen[Any]
    log: Path
    events: list[dict[str, Any]] = field(default_factory=list)

    def change(self, *commands: str) -> None:
        """One UPDATE straight at the primary, signed with the front key (not through the front)."""
        r = nsupdate(self.lab, self.a, self.b.addr4, 53, self.primary.keys[FRONT], DOMAIN, list(commands))
        assert r.returncode == 0, (r.stdout, r.stderr, self.diagnose())

    def diagnose(self) -> str:
        return (f"--- serve-dns log:\n{self.log.read_text(errors='replace')[-3000:]}\n--- named log:\n"
                f"{self.primary.log_text()[-2000:]}\n--- events: {self.events}")


@pytest.fixture
def feedlab(tmp_path: Path) -> Iterator[Feedlab]:
    for tool in (NAMED, DIG, NSUPDATE):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is missing: tools/install.sh installs Debian bind9 and bind9-dnsutils")
    out = subprocess.run([TUNNELD, "account", "new", DOMAIN], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    secret = tmp_path / "secret"
    secret.write_text(out.splitlines()[0] + "\n")
    secret.chmod(0o600)
    account_key = tmp_path / "account.key"
    account_key.write_text(out[out.index('key "'):])
    account_key.chmod(0o600)
    with Lab() as lab:
        a, b = two_hosts(lab)
        conf = subprocess.run([TUNNELD, "account", "primary-config", DOMAIN, "--secret-file", str(secret),
                               "--front", f"{a.addr4}:{FRONT_PORT}",
                               "--zone-file", str(tmp_path / "primary" / f"{DOMAIN}.zone")],
                              capture_output=True, text=True, check=True, timeout=60).stdout
        with BindPrimary(lab, b, DOMAIN, conf, tmp_path / "primary") as primary:
            log = tmp_path / "serve-dns.log"
            with log.open("ab") as logf:
                argv = [TUNNELD, "serve-dns", "--zone", DOMAIN, "--secret-file", str(secret),
                        "--listen", f"{a.addr4}:{FRONT_PORT}", "--db", str(tmp_path / "front.db"),
                        "--user", "root", "--verbose", "--default-lease", "3600",  # nsupdate sends none
                        "--primary", f"{b.addr4}:53",
                        "--primary-key", str(primary.keys[FRONT]), "--primary-check", str(CHECK)]
                proc = lab.spawn(a, argv, stdout=logf, stderr=logf)
            fl = Feedlab(lab, a, b, primary, secret, account_key, proc, log)
            try:
                wait_for(lambda: "from the primary," in log.read_text(errors="replace"), timeout=20,
                         interval=0.05, what="the front's first transfer from the primary")
            except LabError as e:
                raise AssertionError(f"{e}\n{fl.diagnose()}") from None
            yield fl
            exit_on_signal(proc, signal.SIGTERM, log, "serve-dns")


def next_event(fl: Feedlab, watcher: subprocess.Popen[str], kind: str, within: float) -> float:
    """Seconds until the watcher prints an event of ``kind`` (bounded by the watcher's own run time)."""
    assert watcher.stdout is not None
    start = time.monotonic()
    while True:
        line = watcher.stdout.readline()
        assert line, f"the watcher ended without a {kind} event (rc {watcher.poll()})\n{fl.diagnose()}"
        fl.events.append(json.loads(line))
        took = time.monotonic() - start
        assert took < within, f"{kind} after {took:.1f} s, not within {within} s\n{fl.diagnose()}"
        if fl.events[-1]["event"] == kind:
            return took


def test_a_change_on_the_primary_reaches_a_watcher_by_notify_and_by_the_check(feedlab: Feedlab) -> None:
    fl = feedlab
    watcher = progs.spawn(fl.lab, fl.a, "llq_watch", fl.a.addr4, str(FRONT_PORT), DOMAIN, NAME, "AAAA",
                          str(fl.secret), "40", stdout=subprocess.PIPE, text=True)
    next_event(fl, watcher, "established", within=10)

    # 1. NOTIFY, then IXFR: the event comes well before the next serial check could have found it.
    fl.change(f"update add {NAME}. 60 AAAA fd00::1")
    assert next_event(fl, watcher, "added", within=2.5) < 2.5
    assert any("fd00::1" in r for r in fl.events[-1]["records"]), fl.events

    # 2. The primary's NOTIFYs to the front dropped: the serial check catches the change up.
    fl.lab.nft(fl.a, "table inet tfeed { chain in { type filter hook input priority 0; "
                     f"ip saddr {fl.b.addr4} udp dport {FRONT_PORT} counter drop; }}; }}")
    fl.change(f"update delete {NAME}. AAAA fd00::1", f"update add {NAME}. 60 AAAA fd00::2")
    assert next_event(fl, watcher, "added", within=CHECK + 3) < CHECK + 3  # the removal may come first
    assert any("fd00::2" in r for r in fl.events[-1]["records"]), fl.events
    rules = fl.lab.run(fl.a, ["nft", "list", "table", "inet", "tfeed"]).stdout
    assert re.search(r"counter packets [1-9]", rules), rules  # the NOTIFY was sent, and dropped

    # 3. A device's update through the front: one event, from the front's own commit; the same change
    # coming back from the primary (NOTIFY again, IXFR) changes nothing in the replica: no second event.
    fl.lab.run(fl.a, ["nft", "delete", "table", "inet", "tfeed"])
    r = nsupdate(fl.lab, fl.a, fl.a.addr4, FRONT_PORT, fl.account_key, DOMAIN,
                 [f"update add {NAME}. 60 AAAA fd00::3"])
    assert r.returncode == 0, (r.stdout, r.stderr, fl.diagnose())
    assert next_event(fl, watcher, "added", within=2.5) < 2.5
    assert any("fd00::3" in r for r in fl.events[-1]["records"]), fl.events
    # (serial 2 is the front's claim of the zone's leases at its start, 3 and 4 the changes above)
    wait_for(lambda: "serial 5 from the primary, 0 change(s)" in fl.log.read_text(errors="replace"),
             timeout=3, interval=0.05, what="the front's own update to come back through the feed")
    time.sleep(0.5)  # an event would follow that transfer within milliseconds: none may come
    watcher.terminate()
    out, _ = watcher.communicate(timeout=10)
    rest = [json.loads(line) for line in out.splitlines()]
    assert [ev for ev in rest if ev["event"] in ("added", "removed")] == [], rest

    exit_on_signal(fl.proc, signal.SIGTERM, fl.log, "serve-dns")
    text = fl.log.read_text(errors="replace")
    counters = next((line for line in text.splitlines() if "change feed:" in line), "")
    # Serials 3 and 5 were fetched at their NOTIFY, by IXFR with no serial check; 4 (NOTIFY dropped) after
    # the serial check.
    assert re.search(r"\bnotify [2-9]", counters), text[-3000:]
    assert "transfer: IXFR (notified) 2" in counters and "transfer: IXFR 1" in counters, text[-3000:]
