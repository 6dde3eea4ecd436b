"""The NAT journey lab: two devices behind two NATs that speak no port mapping, set up as a user would
(`tunneld join`; the account's `serve-dns` answering STUN on its DNS port and a second port; coturn
started with the `static-auth-secret=` line of `tunneld account new`), with sshd in both. Used by
tests/integration/test_nat_journey.py and bench/relay.py.

Topology: lab.topology.two_nats (server 203.0.113.2 and .3; site a behind 198.51.100.2, b behind .18).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.coturn import Coturn
from lab.netns import Lab, LabError, wait_for
from lab.sshd import Sshd, start_sshd
from lab.topology import TwoNats, block_direct, two_nats
from lab.tunnel import DOMAIN, TUNNELD, Node, joined, peer_status, start, write_private

DNS = ("203.0.113.2", 5353)
STUN_PORT = 3479  # serve-dns answers STUN on its DNS port and here: two STUN servers
RELAY = ("203.0.113.3", 3478)
# Short timers: a dead path is noticed within keepalive + rekey timeout after data was sent.
TIMERS = "\n[timers]\nkeepalive_timeout = 3\nrekey_timeout = 2\n"


@dataclass
class Journey:
    lab: Lab
    net: TwoNats
    a: Node
    b: Node
    sshd_a: Sshd | None
    sshd_b: Sshd | None
    coturn: Coturn | None


def account(tmp: Path) -> tuple[Path, str]:
    """`tunneld account new`: the secret file, and the relay's static-auth-secret."""
    out = subprocess.run([TUNNELD, "account", "new", DOMAIN], check=True, capture_output=True, text=True,
                         timeout=30).stdout.splitlines()
    secret = tmp / "secret"
    write_private(secret, out[0] + "\n")
    [static] = [line.split("=", 1)[1] for line in out if line.startswith("static-auth-secret=")]
    return secret, static


@contextmanager
def journey(tmp: Path, kind: str, relay: bool, blocked: bool = False, sshd: bool = True) -> Iterator[Journey]:
    """The lab with both NATs of `kind`, coturn if `relay`, the direct path between the sites blocked if
    `blocked`, both daemons up (and sshd in both hosts if `sshd`). On failure the daemons' logs are
    printed (pytest shows them)."""
    with Lab() as lab:
        net = two_nats(lab, kind, kind)
        if blocked:
            block_direct(lab, net)
        secret, static = account(tmp)
        log = tmp / "serve-dns.log"
        with log.open("ab") as out:
            server = lab.spawn(net.server, [
                TUNNELD, "serve-dns", "--zone", DOMAIN, "--secret-file", str(secret), "--listen",
                f"{DNS[0]}:{DNS[1]}", "--db", str(tmp / "dns.sqlite"), "--stun", str(STUN_PORT),
                "--user", "root"], stdout=out, stderr=out)
        wait_for(lambda: server.poll() is None and f"STUN on UDP port {STUN_PORT}" in log.read_text(),
                 timeout=15, interval=0.05, what="serve-dns to listen")
        coturn = Coturn(lab, net.server, static, tmp / "coturn", listen=RELAY[0], port=RELAY[1]) if relay \
            else None
        if coturn is not None:
            coturn.start()
        extra = (f'\n[nat]\nstun = ["{DNS[0]}:{DNS[1]}", "{DNS[0]}:{STUN_PORT}"]\n'
                 + (f'\n[relay]\nserver = "{RELAY[0]}:{RELAY[1]}"\n' if relay else "") + TIMERS)
        nodes = []
        for name, site in (("a", net.a), ("b", net.b)):
            n = joined(lab, site.host, name, secret, DNS, tmp, run=False)
            n.config.write_text(n.config.read_text() + extra)
            nodes.append(n)
        a, b = nodes
        try:
            for n in nodes:
                start(lab, n)
            if not sshd:
                yield Journey(lab, net, a, b, None, None, coturn)
                return
            with start_sshd(lab, a.host, [a.ula], tmp / "sshd-a") as sa, \
                    start_sshd(lab, b.host, [b.ula], tmp / "sshd-b") as sb:
                yield Journey(lab, net, a, b, sa, sb, coturn)
        except BaseException:
            for n in nodes:
                if n.log.exists():
                    print(f"--- {n.name}\n{n.log.read_text()[-4000:]}")
            raise
        finally:
            if coturn is not None:
                coturn.stop()
            lab.stop(server)


def path_of(n: Node, peer: str) -> dict[str, Any]:
    try:
        return peer_status(n, peer)
    except KeyError:
        return {}


def wait_path(j: Journey, path: str, timeout: float) -> None:
    """Both sides name `path` for each other, and an authenticated packet went each way on it."""
    def there() -> bool:
        pa, pb = path_of(j.a, "b"), path_of(j.b, "a")
        return pa.get("path") == pb.get("path") == path and pa.get("rx_bytes", 0) > 0 and \
            pb.get("rx_bytes", 0) > 0
    try:
        wait_for(there, timeout=timeout, interval=0.1, what=f"both paths {path}")
    except LabError:
        raise LabError(f"paths: a->b {path_of(j.a, 'b')}\nb->a {path_of(j.b, 'a')}") from None


def ping_peer(j: Journey, src: Node, dst: Node, timeout: float = 15) -> None:
    """ICMPv6 echo through the tunnel until one answer (the first packets may start the handshake)."""
    end = time.monotonic() + timeout
    while True:
        r = j.lab.run(src.host, ["ping", "-6", "-c", "1", "-W", "1", dst.ula], check=False)
        if r.returncode == 0:
            return
        if time.monotonic() > end:
            raise LabError(f"no echo reply {src.name} -> {dst.name}: {path_of(src, dst.name)}")


