"""serve-dns presenting a public CA's certificate (`--tls-cert/--tls-key`), and the devices that trust it.

A test "public" CA stands for the system's trust store (its certificate is the SSL_CERT_FILE of the daemons
and of kdig); serve-dns --tls presents a leaf from it naming the account domain. kdig trusting that CA alone
gets the SOA over TLS; two devices joined with `--tls --tls-public-ca` publish and learn each other by DNS
Push (their client certificates still under the account CA); a device joined with `--tls` alone, the same
SSL_CERT_FILE in its environment, trusts the account CA only and cannot connect: its publisher's TLS fails
and its watcher falls back to LLQ, saying why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.netns import Lab, wait_for
from lab.topology import star
from lab.tunnel import DOMAIN, Node, joined, serve_dns, status, write_secret
from tests.unit.test_tls_public_ca import issue_public_leaf, make_public_ca

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dig"),
                                reason="needs root and dig (bind9-dnsutils)")

DOT_PORT = 853  # serve-dns --tls: port 853 of the --listen address


@pytest.fixture
def store() -> Iterator[Path]:
    """A directory for the test CA that the daemons can read once they run as the tunneld user (pytest's
    tmp_path is root's alone; the real store, /etc/ssl/certs, is readable by everyone)."""
    with tempfile.TemporaryDirectory(prefix="tpubca-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def knows(n: Node, other: Node) -> bool:
    return any(p["ula"] == other.ula for p in status(n)["peers"])


def test_devices_trusting_the_system_store_use_a_public_ca_certificate(tmp_path: Path, store: Path) -> None:
    ca = make_public_ca()
    public_ca = store / "public-ca.pem"
    public_ca.write_bytes(ca[0])
    public_ca.chmod(0o644)
    chain, key = issue_public_leaf(ca, [DOMAIN, f"ns.{DOMAIN}"])
    (tmp_path / "fullchain.pem").write_bytes(chain)
    (tmp_path / "privkey.pem").write_bytes(key)
    (store / "no-certs").mkdir(mode=0o755)
    # The system store, as far as these daemons know: the test CA alone.
    env = {"SSL_CERT_FILE": str(public_ca), "SSL_CERT_DIR": str(store / "no-certs")}
    with Lab() as lab:
        hub, laptop_h, desktop_h, tablet_h = star(lab, ("laptop", "desktop", "tablet"))
        secret = tmp_path / "secret"
        write_secret(secret)
        dns_at = (hub.addr4, 5353)
        serve_dns(lab, Node(hub, tmp_path / "dns", hub.addr4), secret, tmp_path, dns_at, tls=True,
                  extra=["--tls-cert", str(tmp_path / "fullchain.pem"),
                         "--tls-key", str(tmp_path / "privkey.pem")])

        if shutil.which("kdig"):  # an independent client trusting the public CA alone
            r = lab.run(laptop_h, ["kdig", f"@{hub.addr4}", "-p", str(DOT_PORT), "+tls",
                                   f"+tls-ca={public_ca}", f"+tls-hostname={DOMAIN}", "+norec", "+retry=0",
                                   "+time=3", "SOA", DOMAIN], check=False, timeout=20)
            _, _, answer = r.stdout.partition(";; ANSWER SECTION:\n")
            answer = answer.split("\n\n")[0]
            assert r.returncode == 0 and f"{DOMAIN}." in answer and "SOA" in answer, r.stdout + r.stderr

        laptop = joined(lab, laptop_h, "laptop", secret, dns_at, tmp_path, tls=True,
                        join_args=["--tls-public-ca"], env=env)
        desktop = joined(lab, desktop_h, "desktop", secret, dns_at, tmp_path, tls=True,
                         join_args=["--tls-public-ca"], env=env)
        assert "tls_public_ca = true" in laptop.config.read_text()
        wait_for(lambda: knows(laptop, desktop) and knows(desktop, laptop), timeout=20,
                 what="the two devices trusting the public CA to learn each other")
        for n in (laptop, desktop):
            st = status(n)
            assert st["watch"]["transport"] == "push", st["watch"]
            assert st["publish"]["state"] == "published", st["publish"]

        # The account CA alone (the default): the public certificate is refused, whatever the environment.
        tablet = joined(lab, tablet_h, "tablet", secret, dns_at, tmp_path, tls=True, env=env)
        assert tablet.log is not None

        def refused() -> bool:
            return (status(tablet)["watch"].get("push") == "unavailable"
                    and "CERTIFICATE_VERIFY_FAILED" in tablet.log.read_text())

        wait_for(refused, timeout=20, what="the tablet's TLS to fail and its watcher to fall back to LLQ")
        st = status(tablet)
        assert st["watch"]["transport"] == "llq" and st["publish"]["state"] != "published", st
        assert not knows(laptop, tablet)  # it published nothing
