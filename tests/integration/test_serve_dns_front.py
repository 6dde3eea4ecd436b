"""`tunneld serve-dns --primary` in front of a real BIND 9 primary (front mode).

Topology (lab/topology.py two_hosts): b 192.0.2.2 runs named (lab/bind.py) on port 5300, granting
updates of the zone to the front key alone (a stanza written here, in the form `tunneld account new`
prints; the account key is known to BIND only for signed queries), and serve-dns on 5353 with
``--primary 192.0.2.2:5300 --primary-key FILE``; a 192.0.2.1 runs `tunneld up` publishing through the front.

Checked with dig (signed with the account key) at BIND: the device's records appear there, with the
lease granted by the front; a record added by nsupdate (no lease option: --default-lease 3) is deleted
from BIND by the front once its lease ends; the device's withdrawal at SIGTERM reaches BIND. Bad
--primary/--primary-key arguments are one line and exit 2.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.bind import DIG, NAMED, Bind
from lab.netns import Host, Lab, LabError, wait_for
from lab.topology import two_hosts
from lab.tunnel import DOMAIN, TUNNELD, Node, account_node, start, status
from tests.helpers import exit_on_signal
from tunneld.cli import tsig_stanza

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsupdate"),
                       reason="needs root, iproute2 and BIND (network namespaces); CI runs as root"),
]

BIND_PORT = 5300
FRONT_PORT = 5353
NAME = "laptop"
PORT = 4500


@dataclass
class FrontLab:
    lab: Lab
    a: Host
    b: Host
    bind: Bind
    dir: Path
    secret: Path
    account_key: Path  # the account's key stanza (nsupdate -k, dig -k)
    front_key: Path
    proc: subprocess.Popen[Any]
    log: Path


def _private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@pytest.fixture
def frontlab(tmp_path: Path) -> Iterator[FrontLab]:
    for tool in (NAMED, DIG):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is missing: tools/install.sh installs Debian bind9 and bind9-dnsutils")
    with Lab() as lab:
        a, b = two_hosts(lab)
        lab.ip(a, "route", "add", "default", "via", b.addr4)  # a's own address is then its public one
        out = lab.run(a, [TUNNELD, "account", "new", DOMAIN]).stdout
        secret = _private(tmp_path / "secret", out.splitlines()[0] + "\n")
        account_stanza = out[out.index('key "'):]
        account_key = _private(tmp_path / "account.key", account_stanza)
        front_stanza = tsig_stanza(f"front.{DOMAIN}", os.urandom(32))
        front_key = _private(tmp_path / "front.key", front_stanza)
        # The first key statement is the one update-policy grants (lab.bind): the front's.
        with Bind(lab, b, DOMAIN, front_stanza + account_stanza, tmp_path / "bind", port=BIND_PORT) as bind:
            log = tmp_path / "serve-dns.log"
            with log.open("ab") as logf:
                proc = lab.spawn(b, [TUNNELD, "serve-dns", "--zone", DOMAIN, "--secret-file", str(secret),
                                     "--listen", f"{b.addr4}:{FRONT_PORT}",
                                     "--db", str(tmp_path / "front.db"),
                                     "--min-lease", "1", "--default-lease", "3", "--user", "root",
                                     "--primary", f"{b.addr4}:{BIND_PORT}", "--primary-key", str(front_key)],
                                 stdout=logf, stderr=logf)
            fl = FrontLab(lab, a, b, bind, tmp_path, secret, account_key, front_key, proc, log)
            wait_for(lambda: _front_answers(fl), timeout=15, interval=0.05, what="serve-dns to answer")
            yield fl
            for p in [p for p in lab.procs if p not in (bind.proc, proc)]:
                lab.stop(p)  # the devices first, while the front and BIND answer their withdrawals
            exit_on_signal(proc, signal.SIGTERM, log, "serve-dns")


def _front_answers(fl: FrontLab) -> bool:
    assert fl.proc.poll() is None, f"serve-dns exited {fl.proc.returncode}: {fl.log.read_text()[-2000:]}"
    r = fl.lab.run(fl.a, [DIG, f"@{fl.b.addr4}", "-p", str(FRONT_PORT), "+tries=1", "+time=1", DOMAIN, "SOA"],
                   check=False, timeout=10)
    return "status: NOERROR" in r.stdout


def at_bind(fl: FrontLab, name: str, rdtype: str) -> list[str]:
    """The records BIND answers for ``name`` ``rdtype``, asked with a query signed with the account key."""
    r = fl.lab.run(fl.a, [DIG, f"@{fl.b.addr4}", "-p", str(BIND_PORT), "+norec", "+tries=1", "+time=2",
                          "+short", "-k", str(fl.account_key), name, rdtype], timeout=20)
    return sorted(r.stdout.split("\n")[:-1]) if r.stdout else []


def node(fl: FrontLab) -> Node:
    return account_node(fl.lab, fl.a, fl.dir / "a", NAME, fl.secret, (fl.b.addr4, FRONT_PORT), PORT)


def _diagnose(fl: FrontLab, n: Node | None = None) -> str:
    device = n.log.read_text(errors="replace")[-2000:] if n is not None and n.log.is_file() else ""
    return (f"--- serve-dns log:\n{fl.log.read_text(errors='replace')[-2000:]}\n--- named log:\n"
            f"{fl.bind.log_text()[-2000:]}\n--- tunneld log:\n{device}")


def test_a_device_publishes_through_the_front_into_bind(frontlab: FrontLab) -> None:
    fl = frontlab
    n = node(fl)
    start(fl.lab, n)
    try:
        wait_for(lambda: status(n)["publish"]["state"] == "published", timeout=15, interval=0.05,
                 what="the records to be published through the front")
    except LabError as e:
        raise AssertionError(f"{e}\n{status(n)['publish']}\n{_diagnose(fl, n)}") from None
    st = status(n)["publish"]
    assert st["rcode"] == "NOERROR" and st["server_ignores_lease"] is False, st  # the front keeps leases
    assert st["lease_granted"] == 5400, st
    assert at_bind(fl, f"{NAME}.{DOMAIN}", "AAAA") == [n.ula], _diagnose(fl, n)
    service = f"_autotunnel._udp.{NAME}.{DOMAIN}"
    assert at_bind(fl, service, "TXT") == [f'"v=1" "pk={n.public_key}"']

    # A record with a 3 s lease (nsupdate sends no lease option: --default-lease): the front deletes it
    # from BIND when the lease ends.
    script = (f"server {fl.b.addr4} {FRONT_PORT}\nzone {DOMAIN}\n"
              f"update add short.{DOMAIN} 60 A 192.0.2.99\nsend\n")
    r = fl.lab.run(fl.a, ["nsupdate", "-t", "5", "-k", str(fl.account_key)], input=script, check=False,
                   timeout=30)
    assert r.returncode == 0, (r.stdout, r.stderr, _diagnose(fl))
    assert at_bind(fl, f"short.{DOMAIN}", "A") == ["192.0.2.99"]
    try:
        wait_for(lambda: at_bind(fl, f"short.{DOMAIN}", "A") == [], timeout=15, interval=0.2,
                 what="the expired record to be deleted from BIND")
    except LabError as e:
        raise AssertionError(f"{e}\n{_diagnose(fl)}") from None
    assert at_bind(fl, f"{NAME}.{DOMAIN}", "AAAA") == [n.ula]  # the device's lease runs on

    # The device's withdrawal at SIGTERM goes through the front too.
    assert n.proc is not None and fl.lab.stop(n.proc, timeout=10) == 0
    wait_for(lambda: at_bind(fl, f"{NAME}.{DOMAIN}", "AAAA") == [], timeout=5, interval=0.1,
             what="the withdrawal to reach BIND")


def test_bad_primary_arguments_are_one_line_exit_2(frontlab: FrontLab) -> None:
    fl = frontlab
    base = [TUNNELD, "serve-dns", "--zone", DOMAIN, "--secret-file", str(fl.secret), "--listen",
            f"{fl.b.addr4}:5354", "--db", str(fl.dir / "other.db"), "--user", "root"]
    bad = fl.dir / "bad.key"
    bad.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    for extra, words in ((["--primary", f"{fl.b.addr4}:{BIND_PORT}"], "without --primary-key"),
                         (["--primary", "bind.example:53", "--primary-key", str(fl.front_key)],
                          "bad --primary"),
                         (["--primary", f"{fl.b.addr4}:{BIND_PORT}", "--primary-key", str(bad)],
                          "not one key statement")):
        r = fl.lab.run(fl.b, [*base, *extra], check=False, timeout=30)
        assert r.returncode == 2 and r.stdout == "", (extra, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and words in r.stderr, (extra, r.stderr)
