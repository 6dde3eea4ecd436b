"""The account zone past one machine on real BIND 9: a primary and a secondary configured with exactly the
statements `tunneld account primary-config` and `secondary-config` print (lab/bind.py BindPrimary,
BindSecondary; docs/rendezvous.md).

Topology (lab/topology.py star): hub 192.0.2.1; primary 192.0.2.2 and secondary 192.0.2.3 each run named
on port 53 in their namespace; "front" 192.0.2.4 stands where serve-dns --primary will, and listens for
the primary's NOTIFY on port 5300. nsupdate and dig, with key files cut from the printed statements, are
the independent clients.

What is checked: an UPDATE signed with the front key lands on the primary, which NOTIFYs the front's
address (also-notify) and the secondary (its NS record), which transfers the change by IXFR; an UPDATE
signed with the account key is refused; the secondary answers only queries signed with the account key;
the primary answers only the front key; no unsigned AXFR from either, and none at all from the secondary.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.name
import dns.opcode
import dns.rdatatype
import dns.tsig
import pytest

from lab.bind import DIG, NAMED, NSUPDATE, BindPrimary, BindSecondary, key_files, nsupdate
from lab.netns import Host, Lab, wait_for
from lab.pdns import PdnsPrimary
from lab.pdns import available as pdns_available
from lab.topology import star
from lab.tunnel import DOMAIN, TUNNELD
from tunneld.cli import front_key

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                       reason="needs root and iproute2 (network namespaces); CI runs as root"),
]

FRONT_PORT = 5300  # where the front will listen for NOTIFY
FRONT = f"front.{DOMAIN}."
ACCOUNT = f"{DOMAIN}."


@dataclass
class Zone:
    lab: Lab
    front: Host
    primary: BindPrimary
    secondary: BindSecondary
    account_key: Path  # the account's key file, cut from `tunneld account new`
    front_key: Path  # the front key's file, cut from primary-config's output
    front_secret: bytes  # the front key itself


def tunneld(*args: str) -> str:
    return subprocess.run([TUNNELD, *args], capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zone]:
    for tool in (NAMED, DIG, NSUPDATE):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is missing: tools/install.sh installs Debian bind9 and bind9-dnsutils")
    work = tmp_path_factory.mktemp("tbindlab")
    out = tunneld("account", "new", DOMAIN)
    secret = work / "secret"
    secret.write_text(out.splitlines()[0] + "\n")
    secret.chmod(0o600)
    (work / "keys").mkdir()
    account = key_files(out[out.index('key "'):], work / "keys")[ACCOUNT]
    with Lab() as lab:
        _hub, p, s, front = star(lab, ("primary", "secondary", "front"))
        primary_conf = tunneld("account", "primary-config", DOMAIN, "--secret-file", str(secret),
                               "--front", f"{front.addr4}:{FRONT_PORT}",
                               "--zone-file", str(work / "primary" / f"{DOMAIN}.zone"))
        secondary_conf = tunneld("account", "secondary-config", DOMAIN, "--secret-file", str(secret),
                                 "--primary", p.addr4,
                                 "--zone-file", str(work / "secondary" / f"{DOMAIN}.zone"))
        # The secondary learns changes by NOTIFY to the zone's NS, as a user lists their secondaries.
        with BindPrimary(lab, p, DOMAIN, primary_conf, work / "primary", nameservers=(s.addr4,)) as primary, \
             BindSecondary(lab, s, DOMAIN, secondary_conf, work / "secondary", primary) as secondary:
            yield Zone(lab, front, primary, secondary, account, primary.keys[FRONT],
                       front_key(base64.b64decode(out.splitlines()[0]), DOMAIN))


def listen_once(lab: Lab, front: Host) -> subprocess.Popen[str]:
    """A one-datagram UDP listener at the front's NOTIFY address; prints the datagram's hex, then exits
    (after 10 s at most)."""
    code = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.bind(({front.addr4!r}, {FRONT_PORT})); s.settimeout(10); print('bound', flush=True); "
            "print(s.recvfrom(4096)[0].hex(), flush=True)")
    p = lab.spawn(front, ["python3", "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "bound"  # bounded by its own bind
    return p


def assert_notify(listener: subprocess.Popen[str], front_key: bytes) -> dns.message.Message:
    """The datagram the listener got is a NOTIFY for the account zone's SOA, signed with the front key."""
    out, _ = listener.communicate(timeout=15)
    keyring = {dns.name.from_text(FRONT): dns.tsig.Key(FRONT, front_key, "hmac-sha256")}
    msg = dns.message.from_wire(bytes.fromhex(out.split()[-1]), keyring=keyring)  # BadSignature if not
    assert msg.had_tsig and msg.keyname == dns.name.from_text(FRONT)
    assert msg.opcode() == dns.opcode.NOTIFY
    assert str(msg.question[0].name) == f"{DOMAIN}." and msg.question[0].rdtype == dns.rdatatype.SOA
    return msg


def test_front_update_reaches_secondary_by_notify_and_ixfr(zone: Zone) -> None:
    before = zone.primary.serial(FRONT)
    assert before is not None and zone.secondary.serial(ACCOUNT) == before
    notify = listen_once(zone.lab, zone.front)
    r = nsupdate(zone.lab, zone.front, zone.primary.address, 53, zone.front_key, DOMAIN,
                 [f"update add laptop.{DOMAIN}. 60 AAAA fd00::1",
                  f"update add laptop.{DOMAIN}. 60 TXT \"v=1\""])
    assert r.returncode == 0, r.stderr
    after = zone.primary.serial(FRONT)
    assert after is not None and after > before
    zone.secondary.wait_serial(after)
    assert zone.secondary.query(f"laptop.{DOMAIN}", "AAAA", ACCOUNT) == ("NOERROR", ["fd00::1"])
    # By NOTIFY (not its refresh timer), then IXFR: the primary served the difference, not the zone.
    assert f"notify from {zone.primary.address}#" in zone.secondary.log_text()
    ixfr = f"IXFR started: TSIG {FRONT[:-1]} (serial {before} -> {after})"
    wait_for(lambda: ixfr in zone.primary.log_text(), timeout=5, what="the primary's log of the IXFR")
    assert_notify(notify, zone.front_secret)  # also-notify: the front's address got a signed NOTIFY


def test_account_key_cannot_update_the_primary(zone: Zone) -> None:
    r = nsupdate(zone.lab, zone.front, zone.primary.address, 53, zone.account_key, DOMAIN,
                 [f"update add intruder.{DOMAIN}. 60 A 192.0.2.99"])
    assert r.returncode != 0 and ("NOTAUTH" in r.stderr or "REFUSED" in r.stderr), r.stderr
    assert zone.primary.query(f"intruder.{DOMAIN}", "A", FRONT) == ("NXDOMAIN", [])


def test_only_the_account_key_reads_the_secondary(zone: Zone) -> None:
    assert zone.secondary.query(DOMAIN, "SOA", ACCOUNT)[0] == "NOERROR"
    assert zone.secondary.query(DOMAIN, "SOA", None) == ("REFUSED", [])
    assert zone.secondary.query(DOMAIN, "SOA", FRONT) == ("REFUSED", [])


def test_only_the_front_key_reads_the_primary(zone: Zone) -> None:
    assert zone.primary.query(DOMAIN, "SOA", FRONT)[0] == "NOERROR"
    assert zone.primary.query(DOMAIN, "SOA", None) == ("REFUSED", [])


def test_transfers_need_the_front_key_and_the_primary(zone: Zone) -> None:
    records = zone.primary.transfer(FRONT)
    assert records is not None and any(" SOA " in line or "\tSOA\t" in line for line in records)
    assert zone.primary.transfer(None) is None
    assert zone.secondary.transfer(None) is None
    assert zone.secondary.transfer(FRONT) is None  # a secondary transfers to no one


@pytest.mark.skipif(not pdns_available(),
                    reason="PowerDNS (pdns-server, pdns-backend-sqlite3) is not installed")
def test_powerdns_primary_feeds_the_bind_secondary(tmp_path: Path) -> None:
    """PowerDNS (gsqlite3) as the primary, configured by the pdnsutil commands the docs give, with the BIND
    secondary from `secondary-config`: the front key updates and transfers, the account key does not."""
    out = tunneld("account", "new", DOMAIN)
    secret = tmp_path / "secret"
    secret.write_text(out.splitlines()[0] + "\n")
    secret.chmod(0o600)
    (tmp_path / "keys").mkdir()
    account = key_files(out[out.index('key "'):], tmp_path / "keys")[ACCOUNT]
    fkey = front_key(base64.b64decode(out.splitlines()[0]), DOMAIN)
    with Lab() as lab:
        _hub, p, s, front = star(lab, ("primary", "secondary", "front"))
        secondary_conf = tunneld("account", "secondary-config", DOMAIN, "--secret-file", str(secret),
                                 "--primary", p.addr4, "--zone-file", str(tmp_path / "secondary" / "zone"))
        # PowerDNS notifies ALSO-NOTIFY's addresses only: the front's and the secondary's.
        notify_to = [(ipaddress.ip_address(front.addr4), FRONT_PORT), (ipaddress.ip_address(s.addr4), 53)]
        with PdnsPrimary(lab, p, DOMAIN, fkey, notify_to, tmp_path / "pdns") as primary, \
             BindSecondary(lab, s, DOMAIN, secondary_conf, tmp_path / "secondary", primary) as secondary:
            before = primary.serial(FRONT)
            assert before is not None
            notify = listen_once(lab, front)
            r = nsupdate(lab, front, p.addr4, 53, primary.keys[FRONT], DOMAIN,
                         [f"update add laptop.{DOMAIN}. 60 AAAA fd00::2"])
            assert r.returncode == 0, r.stderr + primary.log_text()[-2000:]
            after = primary.serial(FRONT)
            assert after is not None and after > before  # SOA-EDIT-DNSUPDATE INCREASE
            secondary.wait_serial(after)
            assert secondary.query(f"laptop.{DOMAIN}", "AAAA", ACCOUNT) == ("NOERROR", ["fd00::2"])
            assert f"notify from {p.addr4}#" in secondary.log_text()
            assert_notify(notify, fkey)  # ALSO-NOTIFY: the front got one too, signed with the front key

            r = nsupdate(lab, front, p.addr4, 53, account, DOMAIN,
                         [f"update add intruder.{DOMAIN}. 60 A 192.0.2.99"])
            assert r.returncode != 0, r.stdout
            assert primary.query(f"intruder.{DOMAIN}", "A", FRONT)[1] == []
            assert primary.transfer(None) is None
            records = primary.transfer(FRONT)
            assert records is not None and any("fd00::2" in line for line in records)
