"""The roaming lab in use: a public desktop running the account's DNS server and `tunneld up`, a laptop
that joins by DNS behind the home NAT (miniupnpd) or the café NAT (none), and a timestamped ping that
measures how long traffic stops when the laptop moves (lab.topology.roaming / move).

Shared by tests/integration/test_roaming.py and bench/roam.py.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.netns import Host, Lab, LabError, wait_for
from lab.topology import ROAMING_WAN, move, roaming, set_udp_timeout
from lab.tunnel import DOMAIN, Node, dig, joined, peer_status, serve_dns, status, write_secret
from lab.upnp import MiniUPnPd

DNS_PORT = 5353


@dataclass
class Roam:
    lab: Lab
    hosts: dict[str, Host]
    desktop: Node
    laptop: Node
    secret: Path
    dns_at: tuple[str, int]
    workdir: Path
    upnp: MiniUPnPd | None = None
    tls: bool = False  # the account's signalling over TLS (serve-dns --tls, join --tls): DNS Push watches

    @property
    def at(self) -> str:
        return self.hosts["laptop"].extra["at"]

    def move(self, to: str) -> float:
        """Move the laptop; returns the wall time the move began."""
        t0 = time.time()
        move(self.lab, self.hosts["laptop"], to)
        return t0

    def join(self, host: Host, name: str) -> Node:
        return joined(self.lab, host, name, self.secret, self.dns_at, self.workdir, tls=self.tls)

    def dig(self, qtype: str, name: str) -> list[str]:
        return dig(self.lab, self.hosts["desktop"], self.dns_at, qtype, name, self.secret)

    def laptop_srv(self) -> list[str]:
        """The laptop's endpoint records as the server holds them (SRV; empty without an endpoint)."""
        return self.dig("SRV", f"_autotunnel._udp.{self.laptop.name}.{DOMAIN}")

    def laptop_txt(self) -> list[str]:
        return self.dig("TXT", f"_autotunnel._udp.{self.laptop.name}.{DOMAIN}")

    def laptop_published_at(self, where: str) -> bool:
        """Whether the account's server holds the laptop's records for `where`: at home the endpoint the
        home router maps (no nat mark in the TXT), at the café the one STUN observed through the café NAT
        (TXT "nat=ei"); either way the SRV and its target's A record of that network's address."""
        srv, txt = self.laptop_srv(), self.laptop_txt()
        if not srv or not txt:
            return False
        marked = '"nat=ei"' in txt[0]
        return marked == (where == "cafe") and self.dig("A", srv[0].split()[-1]) == [wan(where)]


def knows(n: Node, other: Node) -> bool:
    return any(p["ula"] == other.ula for p in status(n)["peers"])


def moved(st: dict[str, Any], generation: int) -> bool:
    """A status shows a network generation newer than `generation`, with everything redone (the LLQs
    are renewed last)."""
    net = st["network"]
    return int(net["generation"]) > generation and "LLQs renewed" in net["redone"]


def endpoint_host(n: Node, peer: str) -> str | None:
    """The address part of n's endpoint for `peer` (None if it has none)."""
    ep = peer_status(n, peer).get("endpoint")
    return None if ep is None else str(ep).rpartition(":")[0].strip("[]").removeprefix("::ffff:")


def wan(where: str) -> str:
    """The public address the laptop's traffic leaves from at `where` ("home" or "cafe")."""
    return ROAMING_WAN[where]


@contextlib.contextmanager
def roam_lab(workdir: Path, at: str = "home", upnp: bool = True,
             udp_timeout: int | None = None, verbose: bool = False, tls: bool = False) -> Iterator[Roam]:
    """The roaming lab with serve-dns and `tunneld up` on the desktop, miniupnpd on the home router (if
    `upnp`), and the laptop joined at `at`; returns once each knows the other from DNS. `udp_timeout`
    sets both routers' conntrack UDP timeouts (seconds) before anything flows; `verbose` runs both daemons
    with debug logging; `tls`: the account's signalling over TLS (serve-dns --tls, join --tls)."""
    with Lab() as lab, contextlib.ExitStack() as stack:
        hosts = roaming(lab, at="home")
        if udp_timeout is not None:
            for router in ("home", "cafe"):
                set_udp_timeout(lab, hosts[router], udp_timeout)
        secret = workdir / "secret"
        workdir.mkdir(parents=True, exist_ok=True)
        write_secret(secret)
        desktop_h = hosts["desktop"]
        dns_at = (desktop_h.addr4, DNS_PORT)
        serve_dns(lab, Node(desktop_h, workdir / "dns", desktop_h.addr4), secret, workdir, dns_at, tls=tls)
        mini = None
        if upnp:
            mini = stack.enter_context(MiniUPnPd(lab, hosts["laptop"], hosts["home"], desktop_h,
                                                 lan_net=hosts["home"].extra["lan_net"]))
            mini.start()  # probes from the laptop: it must be at home
        if at != "home":
            move(lab, hosts["laptop"], at)
        args = ("--verbose",) if verbose else ()
        desktop = joined(lab, desktop_h, "desktop", secret, dns_at, workdir, args=args, tls=tls)
        laptop = joined(lab, hosts["laptop"], "laptop", secret, dns_at, workdir, args=args, tls=tls)
        r = Roam(lab, hosts, desktop, laptop, secret, dns_at, workdir, mini, tls)
        wait_for(lambda: knows(laptop, desktop) and knows(desktop, laptop), timeout=20,
                 what="the laptop and the desktop to learn each other through DNS")
        yield r
        for n in (laptop, desktop):  # before miniupnpd: a delete it answers needs no retries
            if n.proc is not None:
                lab.stop(n.proc)


_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")


class Pinger:
    """`ping -6 -D` every `interval` s from one node to another's ULA, in the background; keeps the
    wall-clock times of the replies, to measure how long they stop."""

    def __init__(self, lab: Lab, src: Node, dst: Node, interval: float = 0.05) -> None:
        self.lab, self.src, self.dst = lab, src, dst
        self.replies: list[float] = []
        self.proc = lab.spawn(src.host, ["ping", "-6", "-D", "-n", "-i", str(interval), "-W", "1", dst.ula],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.started = time.time()
        self._lock = threading.Lock()
        stdout = self.proc.stdout
        assert stdout is not None

        def read() -> None:
            for line in stdout:
                m = _REPLY.match(line)
                if m:
                    with self._lock:
                        self.replies.append(float(m.group(1)))

        threading.Thread(target=read, daemon=True).start()

    def replies_after(self, t: float) -> list[float]:
        with self._lock:
            return [r for r in self.replies if r > t]

    def wait_reply_after(self, t: float, timeout: float) -> float:
        """The time of the first reply after wall time t (waiting at most `timeout` s)."""
        def got() -> bool:
            if self.proc.poll() is not None:
                raise LabError(f"ping {self.src.name} -> {self.dst.name} exited ({self.proc.returncode})")
            return bool(self.replies_after(t))
        wait_for(got, timeout=timeout, interval=0.02,
                 what=f"a ping reply {self.src.name} -> {self.dst.name} after t={t:.2f}")
        return self.replies_after(t)[0]

    def gap(self, began: float, done: float, timeout: float) -> float:
        """Seconds without replies across a move that began at `began` and was done at `done`: from the
        last reply before it began (or `began`) to the first reply after it was done."""
        first = self.wait_reply_after(done, timeout)
        with self._lock:
            before = [r for r in self.replies if r <= began]
        return first - (before[-1] if before else began)

    def stop(self) -> None:
        self.lab.stop(self.proc)


def first_reply(lab: Lab, src: Node, dst: Node, since: float, timeout: float) -> float:
    """Start pinging from src to dst now; seconds from `since` to the first reply."""
    p = Pinger(lab, src, dst)
    try:
        return p.wait_reply_after(p.started, timeout) - since
    finally:
        p.stop()



def udp_bindings(lab: Lab, router: Host, port: int) -> list[dict[str, str]]:
    """The router's conntrack entries (its NAT bindings) for UDP from an inside port `port`: each with
    `timeout` (seconds left) and the original direction's src, dst, sport, dport."""
    out = lab.run(router, ["cat", "/proc/net/nf_conntrack"]).stdout
    found = []
    for line in out.splitlines():
        f = line.split()
        if len(f) < 5 or f[2] != "udp":
            continue
        entry = {"timeout": f[4]}
        for kv in f[5:]:
            k, _, v = kv.partition("=")
            if k in ("src", "dst", "sport", "dport") and k not in entry:
                entry[k] = v
        if entry.get("sport") == str(port):
            found.append(entry)
    return found
