"""Metrics, readiness and logs of real daemons in lab namespaces: a pair of `tunneld up` with `[metrics]
listen`, one of them started with NOTIFY_SOCKET (the test plays systemd) and --verbose, the other with
--debug-libs too; and `serve-dns --metrics` after an update. Scraped from inside the namespaces with
urllib, parsed with prometheus-client's parser."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.netns import Host, Lab, wait_for
from lab.topology import two_hosts
from lab.tunnel import TUNNELD, Node, joined, ping6, running_pair, serve_dns, start, status, write_secret
from tests.integration.test_serve_dns import LISTEN, PORT, SERVER, ZONE, new_account

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsupdate"),
                       reason="needs root, iproute2 and nsupdate (bind9-dnsutils)"),
]

METRICS_PORT = 9586
SCRAPE = ("import sys, urllib.request\n"
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n")

STAMPED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) tunneld")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(lab: Lab, h: Host, port: int = METRICS_PORT) -> Samples:
    text = lab.run(h, [sys.executable, "-c", SCRAPE, f"http://127.0.0.1:{port}/metrics"]).stdout
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def notifications(sock: socket.socket, until: str, timeout: float = 15) -> list[str]:
    """The messages the daemon sent to our notify socket, up to the first that contains ``until``."""
    got: list[str] = []
    sock.settimeout(timeout)
    while not any(until in m for m in got):
        got.append(sock.recv(4096).decode())  # socket.timeout (OSError) fails the test
    return got


def test_metrics_move_under_traffic_and_systemd_hears_ready_status_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        extra = f'\n[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n'
        with running_pair(tmp_path, extra=extra, b_env={"NOTIFY_SOCKET": str(path)},
                          a_args=("--verbose", "--debug-libs"), b_args=("--verbose",)) as (lab, a, b):
            ready = notifications(manager, "READY=1")
            assert ready[-1].startswith("READY=1\nSTATUS=up, ") and "of 1 peers with a session" in ready[-1]
            peer = (("peer", a.name),)
            before = scrape(lab, b.host)
            assert before["tunneld_up", ()] == 1 and before["tunneld_peers", ()] == 1
            ping6(lab, a, b, count=20)
            after = scrape(lab, b.host)
            for name in ("tunneld_peer_rx_bytes_total", "tunneld_peer_tx_bytes_total",
                         "tunneld_peer_rx_packets_total", "tunneld_peer_tx_packets_total"):
                assert after[name, peer] >= before[name, peer] + 20, (name, before, after)
            handshakes = "tunneld_peer_handshakes_total"
            assert after[handshakes, peer] >= 1 and after[handshakes, peer] > before[handshakes, peer]
            assert 0 <= after["tunneld_peer_last_handshake_age_seconds", peer] < 30
            assert after["tunneld_peer_session", peer] == 1
            assert after["tunneld_peer_path", (("path", "direct"), ("peer", a.name))] == 1
            assert after["tunneld_publish_state", (("state", "disabled"),)] == 1  # no DNS server here
            a_side = scrape(lab, a.host)  # the other daemon, in its own namespace, on the same port
            assert a_side["tunneld_peer_tx_packets_total", (("peer", b.name),)] >= 20
            # systemd's view: the peer count in a STATUS line, STOPPING on SIGTERM
            notifications(manager, "STATUS=up, 1 of 1 peers with a session")
            assert b.proc is not None
            lab.stop(b.proc)
            assert b.proc.returncode == 0
            assert "STOPPING=1" in notifications(manager, "STOPPING=1", timeout=1)[-1]
    # --verbose is our debug output only; --debug-libs (given to a) adds pyroute2's netlink dumps
    lines = b.log.read_text().splitlines()
    assert any(" INFO tunneld: up: " in line for line in lines)
    assert not any("pyroute2" in line for line in lines), [x for x in lines if "pyroute2" in x][:3]
    assert all(STAMPED.match(line) for line in lines), [x for x in lines if not STAMPED.match(x)][:3]
    assert " DEBUG pyroute2" in a.log.read_text()


def test_ready_comes_after_the_first_publication(tmp_path: Path) -> None:
    """With an account DNS server, READY=1 waits for the publisher's first answer: when systemd hears it,
    `tunneld status` already says published."""
    path = tmp_path / "notify"
    dns_at = ("192.0.2.2", 5353)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager, Lab() as lab:
        manager.bind(str(path))
        ha, hb = two_hosts(lab)
        lab.ip(ha, "route", "add", "default", "via", hb.addr4)  # a public address: records to publish
        secret = tmp_path / "secret"
        write_secret(secret)
        serve_dns(lab, Node(hb, tmp_path / "dns", hb.addr4), secret, tmp_path, dns_at)
        laptop = joined(lab, ha, "laptop", secret, dns_at, tmp_path, run=False)
        start(lab, laptop, env={"NOTIFY_SOCKET": str(path)})
        ready = notifications(manager, "READY=1")
        assert ready[-1] == "READY=1\nSTATUS=up, 0 of 0 peers with a session"
        publish = status(laptop)["publish"]
        assert publish["state"] == "published" and publish["published"], publish


def test_serve_dns_metrics_after_an_update(tmp_path: Path) -> None:
    account = new_account(tmp_path / "account")
    log = tmp_path / "serve-dns.log"
    with Lab() as lab:
        a, b = two_hosts(lab)
        with log.open("ab") as out:
            proc = lab.spawn(b, [TUNNELD, "serve-dns", "--zone", ZONE, "--secret-file", str(account.secret),
                                 "--listen", LISTEN, "--db", str(tmp_path / "dns.sqlite"),
                                 "--default-lease", "7200", "--metrics", f"127.0.0.1:{METRICS_PORT}",
                                 "--user", "root"],
                             stdout=out, stderr=out)

        def answers() -> bool:
            assert proc.poll() is None, log.read_text()[-2000:]
            r = lab.run(a, ["dig", f"@{SERVER}", "-p", str(PORT), "+tries=1", "+time=1", "SOA", ZONE],
                        check=False)
            return "status: NOERROR" in r.stdout

        wait_for(answers, timeout=15, interval=0.05, what="serve-dns to answer")
        script = (f"server {SERVER} {PORT}\nzone {ZONE}\nupdate add m.{ZONE} 60 AAAA 2001:db8::9\nsend\n"
                  f"update add n.{ZONE} 60 AAAA 2001:db8::a\nsend\n")
        r = lab.run(a, ["nsupdate", "-t", "5", "-k", str(account.key)], input=script, check=False)
        assert r.returncode == 0, r.stderr
        unsigned = f"server {SERVER} {PORT}\nzone {ZONE}\nupdate add o.{ZONE} 60 AAAA 2001:db8::b\nsend\n"
        lab.run(a, ["nsupdate", "-t", "5"], input=unsigned, check=False)  # refused: not signed
        m = scrape(lab, b)
        assert m["tunneld_dns_updates_total", (("result", "NOERROR"),)] == 2
        assert m["tunneld_dns_updates_total", (("result", "REFUSED"),)] == 1
        assert m["tunneld_dns_queries_total", (("result", "NOERROR"),)] >= 1  # the SOA probes
        assert m["tunneld_dns_llqs", ()] == 0
        lab.stop(proc)
        assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()[-2000:]


def test_a_metrics_port_in_use_fails_serve_dns_with_one_line(tmp_path: Path) -> None:
    account = new_account(tmp_path / "account")
    with Lab() as lab:
        _, b = two_hosts(lab)
        holder = lab.spawn(b, [sys.executable, "-c", "import socket, time\ns = socket.socket()\n"
                               f"s.bind(('127.0.0.1', {METRICS_PORT}))\ns.listen()\nprint('ok', flush=True)\n"
                               "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline() == "ok\n"
        r = lab.run(b, [TUNNELD, "serve-dns", "--zone", ZONE, "--secret-file", str(account.secret),
                        "--listen", LISTEN, "--db", str(tmp_path / "dns.sqlite"),
                        "--metrics", f"127.0.0.1:{METRICS_PORT}", "--user", "root"], check=False, timeout=20)
        assert r.returncode == 1, r.stderr
        assert r.stderr.count("\n") == 1 and f"cannot serve metrics on 127.0.0.1:{METRICS_PORT}" in r.stderr
