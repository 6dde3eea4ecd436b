"""`tunneld serve-dns --tls-listen`: DNS over TLS (RFC 7858), checked with independent clients.

BIND's dig and Knot's kdig (+tls, +tls-ca) query through the TLS listener trusting only the account CA that
`tunneld account ca` prints, kdig also signed and for the TLS service SRV records; dnspython's own TLS
client sends a TSIG-signed UPDATE (Debian 12's knsupdate, Knot 3.2, has no TLS). A client that trusts
another account's CA, or insists on TLS 1.2, gets no answer. The server runs in lab host b, the clients in
host a, so nothing leaves the lab's namespaces.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.rcode
import pytest

from lab.netns import Host, Lab, wait_for
from lab.topology import two_hosts
from lab.tunnel import TUNNELD
from tests.integration.test_serve_dns import PORT, SERVER, ZONE, Account, new_account, pytestmark  # noqa: F401

TLS_PORT = 8853
SERVER_NAME = f"ns.{ZONE}"
needs_kdig = pytest.mark.skipif(shutil.which("kdig") is None, reason="needs kdig (Debian knot-dnsutils)")


@dataclass
class TlsServed:
    lab: Lab
    a: Host
    account: Account
    ca: Path
    log: Path


def ca_pem(account: Account, dest: Path) -> Path:
    out = subprocess.run([TUNNELD, "account", "ca", ZONE, "--secret-file", str(account.secret)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    dest.write_text(out)
    return dest


def dig_tls(lab: Lab, h: Host, ca: Path, *query: str) -> subprocess.CompletedProcess[str]:
    return lab.run(h, ["dig", f"@{SERVER}", "-p", str(TLS_PORT), "+tls", f"+tls-ca={ca}",
                       f"+tls-hostname={SERVER_NAME}", "+norec", "+tries=1", "+time=3", *query],
                   check=False, timeout=20)


def kdig_tls(lab: Lab, h: Host, ca: Path, *query: str) -> subprocess.CompletedProcess[str]:
    """Knot's kdig over TLS (RFC 7858's out-of-band profile): trusting only `ca`, the name checked."""
    return lab.run(h, ["kdig", f"@{SERVER}", "-p", str(TLS_PORT), "+tls", f"+tls-ca={ca}",
                       f"+tls-hostname={ZONE}", "+norec", "+retry=0", "+time=3", *query],
                   check=False, timeout=20)


def _kdig_answers(r: subprocess.CompletedProcess[str]) -> list[str]:
    """The rdata of kdig's answer section lines (`NAME TTL IN TYPE RDATA`)."""
    if ";; ANSWER SECTION:" not in r.stdout:
        return []
    section = r.stdout.split(";; ANSWER SECTION:")[1].split("\n\n")[0]
    return [" ".join(line.split()[4:]) for line in section.strip().splitlines() if line.strip()]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[TlsServed]:
    with Lab() as lab:
        a, b = two_hosts(lab)
        account = new_account(tmp_path / "account")
        ca = ca_pem(account, tmp_path / "ca.pem")
        log = tmp_path / "serve-dns.log"
        with log.open("ab") as out:
            proc = lab.spawn(b, [TUNNELD, "serve-dns", "--zone", ZONE, "--secret-file", str(account.secret),
                                 "--listen", f"{SERVER}:{PORT}", "--tls-listen", f"{SERVER}:{TLS_PORT}",
                                 "--db", str(tmp_path / "dns.sqlite"), "--default-lease", "7200",
                                 "--user", "root"], stdout=out, stderr=out)

        def ready() -> bool:
            assert proc.poll() is None, f"serve-dns exited {proc.returncode}: {log.read_text()[-2000:]}"
            return "status: NOERROR" in dig_tls(lab, a, ca, "SOA", ZONE).stdout

        wait_for(ready, timeout=15, interval=0.1, what="serve-dns to answer over TLS")
        yield TlsServed(lab, a, account, ca, log)
        assert "Traceback" not in log.read_text(), log.read_text()[-2000:]


def test_dig_queries_over_tls_trusting_only_the_account_ca(served: TlsServed) -> None:
    r = dig_tls(served.lab, served.a, served.ca, "SOA", ZONE)
    assert "status: NOERROR" in r.stdout and " aa" in r.stdout.split("flags:")[1].split(";")[0]
    assert "(TLS)" in r.stdout  # dig says which transport answered


def test_a_client_trusting_another_account_is_refused(served: TlsServed, tmp_path: Path) -> None:
    other = ca_pem(new_account(tmp_path / "other"), tmp_path / "other-ca.pem")
    r = dig_tls(served.lab, served.a, other, "SOA", ZONE)
    assert "status: NOERROR" not in r.stdout


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl(1)")
def test_tls_1_2_is_refused(served: TlsServed) -> None:
    r = served.lab.run(served.a, ["openssl", "s_client", "-connect", f"{SERVER}:{TLS_PORT}", "-tls1_2",
                                  "-CAfile", str(served.ca), "-servername", SERVER_NAME],
                       input="", check=False, timeout=20)
    assert r.returncode != 0 and "Cipher is (NONE)" in r.stdout  # no session: the handshake failed


_UPDATE = """
import ssl, sys
import dns.query, dns.tsigkeyring, dns.update
zone, secret, server, port, name, ca = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
keyring = dns.tsigkeyring.from_text({zone + ".": ("hmac-sha256", secret)})
upd = dns.update.UpdateMessage(zone + ".", keyring=keyring, keyname=zone + ".", keyalgorithm="hmac-sha256")
upd.add("tls-test." + zone + ".", 300, "TXT", '"over tls"')
print(dns.query.tls(upd, server, port=int(port), ssl_context=ctx, server_hostname=name, timeout=10).rcode())
"""


def test_a_signed_update_over_tls_lands(served: TlsServed) -> None:
    """dnspython's TLS client (an implementation other than ours) sends a TSIG-signed UPDATE; dig over
    TLS then sees the record."""
    secret = served.account.key.read_text().split('secret "')[1].split('"')[0]
    r = served.lab.run(served.a, [sys.executable, "-c", _UPDATE, ZONE, secret, SERVER, str(TLS_PORT),
                                  SERVER_NAME, str(served.ca)], check=False, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == str(int(dns.rcode.NOERROR)), r.stdout + r.stderr
    r = dig_tls(served.lab, served.a, served.ca, "-k", str(served.account.key), "TXT", f"tls-test.{ZONE}")
    assert '"over tls"' in r.stdout, r.stdout


@needs_kdig
def test_kdig_finds_the_tls_services_over_tls(served: TlsServed) -> None:
    """kdig (another implementation than dig's) reads the zone over TLS, trusting only the account CA and
    checking the zone's name, and the three TLS service SRV records name the TLS port."""
    r = kdig_tls(served.lab, served.a, served.ca, "SOA", ZONE)
    assert "status: NOERROR" in r.stdout and ";; TLS session (TLS1.3)" in r.stdout, r.stdout + r.stderr
    for service in ("_dns-update-tls._tcp", "_dns-query-tls._tcp", "_dns-push-tls._tcp", "_dns-llq-tls._tcp"):
        r = kdig_tls(served.lab, served.a, served.ca, "SRV", f"{service}.{ZONE}")
        assert _kdig_answers(r) == [f"0 0 {TLS_PORT} {SERVER_NAME}."], r.stdout
    r = kdig_tls(served.lab, served.a, served.ca, "SRV", f"_dns-update._udp.{ZONE}")
    assert _kdig_answers(r) == [f"0 0 {PORT} {SERVER_NAME}."], r.stdout


@needs_kdig
def test_kdig_trusting_another_account_is_refused(served: TlsServed, tmp_path: Path) -> None:
    other = ca_pem(new_account(tmp_path / "other"), tmp_path / "other-ca.pem")
    r = kdig_tls(served.lab, served.a, other, "SOA", ZONE)
    assert r.returncode != 0 and "status: NOERROR" not in r.stdout, r.stdout
    assert "certificate" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr  # refused for the certificate


@needs_kdig
def test_kdig_signed_query_sees_an_update_over_tls(served: TlsServed) -> None:
    """An UPDATE over TLS (dnspython), then a TSIG-signed kdig query over TLS: the device record is shown
    to the account's key only."""
    secret = served.account.key.read_text().split('secret "')[1].split('"')[0]
    r = served.lab.run(served.a, [sys.executable, "-c", _UPDATE, ZONE, secret, SERVER, str(TLS_PORT),
                                  SERVER_NAME, str(served.ca)], check=False, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == str(int(dns.rcode.NOERROR)), r.stdout + r.stderr
    key = f"hmac-sha256:{ZONE}.:{secret}"
    r = kdig_tls(served.lab, served.a, served.ca, "-y", key, "TXT", f"tls-test.{ZONE}")
    assert _kdig_answers(r) == ['"over tls"'] and "NOERROR" in r.stdout, r.stdout + r.stderr
    r = kdig_tls(served.lab, served.a, served.ca, "TXT", f"tls-test.{ZONE}")  # unsigned: not shown
    assert _kdig_answers(r) == [] and "NXDOMAIN" in r.stdout, r.stdout
