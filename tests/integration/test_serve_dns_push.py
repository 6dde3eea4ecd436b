"""`tunneld serve-dns --tls-listen`: DNS Push Notifications (RFC 8765) on the TLS listener, end to end.

The server runs in lab host b; a DSO client written here (stdlib ssl, the repository's dso_wire and
framing) runs in host a. A member (a client certificate under the account CA) subscribes to a device name
and gets the change a signed UPDATE over UDP makes, before the answer to a query sent after the UPDATE's
reply arrives (within one round trip; the wire may reorder TCP and UDP, so up to one round trip more),
and nothing for a name it did not subscribe to; the lease's expiry
pushes the removal. A client without a certificate is refused a device name and may subscribe to the
zone's SOA and NS; a certificate under another account's CA is refused at the handshake; stopping
serve-dns ends the session (the client sees the end of the stream).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lab.netns import Host, Lab, wait_for
from lab.topology import two_hosts
from lab.tunnel import TUNNELD
from tests.integration.test_serve_dns import PORT, SERVER, ZONE, Account, new_account, pytestmark  # noqa: F401
from tests.integration.test_serve_dns_tls import TLS_PORT, ca_pem, dig_tls
from tunneld.accountca import account_ca, issue_client, new_serial
from tunneld.config import load_account_secret

LEASE = 3  # seconds: --min-lease lets the UPDATE's lease be this short, so its expiry comes within the test

_CLIENT = r"""
import json, select, socket, ssl, struct, sys, time
import dns.edns, dns.message, dns.name, dns.query, dns.rcode, dns.tsigkeyring, dns.update
from tunneld.proto import dso_wire as d
from tunneld.proto.dnsframe import FrameBuffer, frame

mode, zone, server, port, tls_port, ca, cert, secret, lease = sys.argv[1:10]
port, tls_port, lease = int(port), int(tls_port), int(lease)
keyring = dns.tsigkeyring.from_text({zone + ".": ("hmac-sha256", secret)})
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_verify_locations(ca)
if cert != "-":
    ctx.load_cert_chain(cert)
out = {}
try:
    raw = socket.create_connection((server, tls_port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="ns." + zone)
except (ssl.SSLError, OSError) as e:
    print(json.dumps({"handshake": "failed", "error": str(e)}))
    sys.exit(0)
frames = FrameBuffer()

def recv(timeout=5.0):
    deadline = time.monotonic() + timeout
    while (m := frames.next()) is None:
        if not s.pending() and not select.select([s], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return "timeout"
        try:
            data = s.recv(65536)
        except (ssl.SSLError, OSError) as e:
            return "closed: " + type(e).__name__
        if not data:
            return None
        frames.feed(data)
    return m

def readable(within=0.0):
    return frames.buffered > 0 or s.pending() > 0 or bool(select.select([s], [], [], within)[0])

def dso(msg):
    s.sendall(frame(d.encode(msg)))

def subscribe(name, rtype, msg_id):
    dso(d.DsoMessage(msg_id, (d.Subscribe(dns.name.from_text(name), rtype),)))
    return d.decode(recv()).rcode

def push_records(wire):
    m = d.decode(wire)
    assert isinstance(m.primary, d.Push), m
    return [(r.name.to_text(), r.ttl, r.rdata.to_text() if r.rdata is not None else None)
            for r in m.primary.records]

def update(owner, address):
    upd = dns.update.UpdateMessage(zone + ".", keyring=keyring, keyname=zone + ".",
                                   keyalgorithm="hmac-sha256")
    upd.add(owner + "." + zone + ".", 60, "A", address)
    upd.use_edns(0, options=[dns.edns.GenericOption(2, struct.pack("!I", lease))])
    return dns.query.udp(upd, server, port=port, timeout=5).rcode()

def ping():
    return dns.query.udp(dns.message.make_query(zone + ".", "SOA"), server, port=port, timeout=5).rcode()

if mode == "member":
    dso(d.DsoMessage(1, (d.Keepalive(15000, 60000),)))
    ka = d.decode(recv())
    out["keepalive"] = [ka.tlvs[0].inactivity_timeout, ka.tlvs[0].keepalive_interval]
    out["subscribe"] = subscribe("bob." + zone + ".", 1, 2)
    out["update unsubscribed"] = update("carol", "192.0.2.66")  # nobody watches carol
    out["update"] = update("bob", "192.0.2.77")
    t0 = time.monotonic()
    out["ping"] = ping()  # one round trip after the UPDATE's reply
    rtt = time.monotonic() - t0
    out["readable at ping answer"] = readable()
    out["readable within a round trip more"] = readable(rtt)
    push = recv()
    out["push after"] = time.monotonic() - t0
    out["first push"] = push_records(push)  # carol's change came before it, and sent nothing
    q = dns.message.make_query("bob." + zone + ".", "A")
    q.use_tsig(keyring, keyname=zone + ".", algorithm="hmac-sha256")
    s.sendall(frame(q.to_wire()))  # an ordinary signed query on the session
    r = dns.message.from_wire(recv(), keyring=keyring, request_mac=q.mac)
    out["query"] = [rr.to_text() for rrset in r.answer for rr in rrset]
    removal = recv(timeout=lease + 15)
    out["removal after"] = time.monotonic() - t0
    out["removal"] = push_records(removal)
elif mode == "public":
    s.sendall(frame(dns.message.make_query(zone + ".", "SOA").to_wire()))
    out["query"] = dns.message.from_wire(recv()).rcode()
    out["device"] = subscribe("bob." + zone + ".", 1, 1)
    out["soa"] = subscribe(zone + ".", 6, 2)
    out["soa push"] = push_records(recv())
    out["ns"] = subscribe(zone + ".", 2, 3)
elif mode == "wait":
    out["subscribe"] = subscribe("bob." + zone + ".", 1, 1)
    print(json.dumps(out), flush=True)
    out = {"end": recv(timeout=30)}
else:
    s.sendall(frame(dns.message.make_query(zone + ".", "SOA").to_wire()))
    out["answer"] = recv()
    out["answer"] = out["answer"] if out["answer"] is None or isinstance(out["answer"], str) else "answered"
print(json.dumps(out), flush=True)
"""


@dataclass
class PushServed:
    lab: Lab
    a: Host
    account: Account
    ca: Path
    cert: Path
    secret: str
    proc: subprocess.Popen[Any]
    log: Path


def client_certificate(secret_file: Path, device: str, dest: Path) -> Path:
    """A client certificate for ``device`` under the account CA of ``secret_file``, with its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    cert = issue_client(account_ca(load_account_secret(secret_file), ZONE), device, key.public_key(),
                        now - 3600, now + 86400, new_serial(os.urandom))
    dest.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return dest


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PushServed]:
    tmp = tmp_path_factory.mktemp("push")
    with Lab() as lab:
        a, b = two_hosts(lab)
        account = new_account(tmp / "account")
        ca = ca_pem(account, tmp / "ca.pem")
        log = tmp / "serve-dns.log"
        with log.open("ab") as out:
            proc = lab.spawn(b, [TUNNELD, "serve-dns", "--zone", ZONE, "--secret-file", str(account.secret),
                                 "--listen", f"{SERVER}:{PORT}", "--tls-listen", f"{SERVER}:{TLS_PORT}",
                                 "--db", str(tmp / "dns.sqlite"), "--min-lease", "1", "--user", "root"],
                             stdout=out, stderr=out)

        def ready() -> bool:
            assert proc.poll() is None, f"serve-dns exited {proc.returncode}: {log.read_text()[-2000:]}"
            return "status: NOERROR" in dig_tls(lab, a, ca, "SOA", ZONE).stdout

        wait_for(ready, timeout=15, interval=0.1, what="serve-dns to answer over TLS")
        secret = account.key.read_text().split('secret "')[1].split('"')[0]
        cert = client_certificate(account.secret, "laptop", tmp / "laptop.pem")
        yield PushServed(lab, a, account, ca, cert, secret, proc, log)
        assert "Traceback" not in log.read_text(), log.read_text()[-2000:]


def argv(s: PushServed, mode: str, cert: Path | None) -> list[str]:
    return [sys.executable, "-c", _CLIENT, mode, ZONE, SERVER, str(PORT), str(TLS_PORT), str(s.ca),
            str(cert) if cert is not None else "-", s.secret, str(LEASE)]


def client(s: PushServed, mode: str, cert: Path | None) -> dict[str, Any]:
    r = s.lab.run(s.a, argv(s, mode, cert), check=False, timeout=40)
    assert r.returncode == 0, r.stdout + r.stderr
    result: dict[str, Any] = json.loads(r.stdout.splitlines()[-1])
    return result


def test_a_member_gets_the_change_within_one_round_trip_and_the_lease_expiry(served: PushServed) -> None:
    r = client(served, "member", served.cert)
    bob = f"bob.{ZONE}."
    assert r["keepalive"] == [15_000, 60_000] and r["subscribe"] == 0
    assert r["update unsubscribed"] == 0 and r["update"] == 0 and r["ping"] == 0
    # The PUSH leaves the server before the ping's answer; TCP and UDP segments may still be delivered in
    # either order (two CPUs' backlogs), so allow what one more round trip would take.
    assert r["readable within a round trip more"], r
    assert r["first push"] == [[bob, 60, "192.0.2.77"]], r  # nothing for carol, whose change came first
    assert r["query"] == ["192.0.2.77"]
    assert r["removal"] == [[bob, 0xFFFFFFFF, "192.0.2.77"]], r
    assert LEASE - 1 <= r["removal after"] <= LEASE + 15, r


def test_without_a_certificate_only_the_zones_public_names(served: PushServed) -> None:
    r = client(served, "public", None)
    assert r["query"] == 0  # dig +tls, kdig, openssl s_client: no certificate, still answered
    assert r["device"] == 5  # REFUSED
    assert r["soa"] == 0 and r["soa push"][0][0] == f"{ZONE}." and r["ns"] == 0


def test_clients_without_a_certificate_connect_and_are_answered(served: PushServed) -> None:
    """The server asks for a client certificate but does not require one: dig +tls and openssl s_client,
    which send none, complete the handshake and (dig) get their answer."""
    r = dig_tls(served.lab, served.a, served.ca, "SOA", ZONE)
    assert "status: NOERROR" in r.stdout and "(TLS)" in r.stdout, r.stdout
    if shutil.which("openssl") is not None:
        r = served.lab.run(served.a, ["openssl", "s_client", "-connect", f"{SERVER}:{TLS_PORT}",
                                      "-CAfile", str(served.ca), "-servername", f"ns.{ZONE}"],
                           input="", check=False, timeout=20)
        assert "Verify return code: 0 (ok)" in r.stdout and "TLSv1.3" in r.stdout, r.stdout + r.stderr


def test_a_certificate_under_another_account_is_refused(served: PushServed, tmp_path: Path) -> None:
    other = new_account(tmp_path / "other")
    cert = client_certificate(other.secret, "intruder", tmp_path / "intruder.pem")
    r = client(served, "other", cert)
    # TLS 1.3 reports the server's refusal of a client certificate at the handshake or on the first read
    assert r.get("handshake") == "failed" or r.get("answer") != "answered", r


def test_stopping_serve_dns_ends_the_session(served: PushServed) -> None:
    """Last in this module: it stops the server."""
    p = served.lab.spawn(served.a, argv(served, "wait", served.cert), stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    first = json.loads(p.stdout.readline())
    assert first["subscribe"] == 0
    served.proc.terminate()
    served.proc.wait(timeout=15)
    last = json.loads(p.stdout.readline())
    assert last["end"] is None or str(last["end"]).startswith("closed"), last  # not a timeout
    assert p.wait(timeout=10) == 0
    p.stdout.close()
