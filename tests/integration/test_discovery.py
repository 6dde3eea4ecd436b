"""The full path of the DNS issue: two hosts with no static peers find each other through our own
rendezvous server (`tunneld serve-dns`) — each publishes its records by signed UPDATE and learns the
other's by long-lived query — then run ssh between their ULAs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.netns import Lab, wait_for
from lab.topology import two_hosts
from lab.tunnel import TUNNELD, Node, joined, ping6, serve_dns, ssh, start_sshd, status, write_secret

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dig"),
                                reason="needs root and dig (bind9-dnsutils)")

DNS = ("192.0.2.2", 5353)


@pytest.fixture
def discovered(tmp_path: Path) -> Iterator[tuple[Lab, Node, Node]]:
    with Lab() as lab:
        ha, hb = two_hosts(lab)
        # Each host's address is public (no NAT): with a default route, it publishes that address.
        lab.ip(ha, "route", "add", "default", "via", hb.addr4)
        lab.ip(hb, "route", "add", "default", "via", ha.addr4)
        secret = tmp_path / "secret"
        write_secret(secret)
        serve_dns(lab, Node(hb, tmp_path / "dns", hb.addr4), secret, tmp_path, DNS)
        nodes = []
        for h, name in ((ha, "laptop"), (hb, "desktop")):
            n = joined(lab, h, name, secret, DNS, tmp_path)
            nodes.append(n)
        yield lab, nodes[0], nodes[1]


def test_hosts_find_each_other_and_ssh(discovered: tuple[Lab, Node, Node], tmp_path: Path) -> None:
    lab, laptop, desktop = discovered

    def knows(n: Node, other: Node) -> bool:
        return any(p["ula"] == other.ula for p in status(n)["peers"])

    wait_for(lambda: knows(laptop, desktop) and knows(desktop, laptop), timeout=15,
             what="each host to learn the other from DNS")
    for n in (laptop, desktop):
        st = status(n)
        assert st["publish"]["published"], st["publish"]
        assert [p["source"] for p in st["peers"]] == ["dns"]
        shown = lab.run(n.host, [TUNNELD, "status", "--config", str(n.config)]).stdout
        assert "(from dns)" in shown and "dns watch: watching" in shown and "dns publish:" in shown, shown
    ping6(lab, laptop, desktop)
    key, known = start_sshd(lab, desktop, tmp_path / "ssh")
    r = ssh(lab, laptop, desktop, key, known, "echo found via dns from $SSH_CLIENT")
    assert f"found via dns from {laptop.ula} " in r.stdout, r.stdout


def test_host_behind_nat_and_public_host_find_each_other(tmp_path: Path) -> None:
    """One host behind a home router (miniupnpd, nftables NAT), one public: the NATed host maps its port
    by PCP, publishes the router's public address and the granted port, and the two find each other
    through serve-dns on the public side; the public host reaches the NATed one only through the
    mapping (it has no route to the private network)."""
    from lab.topology import behind_nat
    from lab.upnp import MiniUPnPd

    with Lab() as lab:
        host, router, peer = behind_nat(lab)
        lab.ip(peer, "route", "add", "default", "via", router.addr4)  # public, with a default route
        secret = tmp_path / "secret"
        write_secret(secret)
        dns_at = (peer.addr4, 5353)
        serve_dns(lab, Node(peer, tmp_path / "dns", peer.addr4), secret, tmp_path, dns_at)
        with MiniUPnPd(lab, host, router, peer) as upnp:
            upnp.start()
            nodes = []
            for h, name in ((host, "laptop"), (peer, "server")):
                n = joined(lab, h, name, secret, dns_at, tmp_path)
                nodes.append(n)
            laptop, server = nodes

            def knows(n: Node, other: Node) -> bool:
                return any(p["ula"] == other.ula for p in status(n)["peers"])

            wait_for(lambda: knows(laptop, server) and knows(server, laptop), timeout=20,
                     what="both hosts to learn each other through DNS")
            mapped = status(laptop)["portmap"]
            assert mapped["state"] == "mapping" and mapped["external_address"] == router.addr4, mapped
            assert status(laptop)["public_endpoint"] == mapped["endpoint"]
            ping6(lab, server, laptop)  # in through the mapping
            ping6(lab, laptop, server)
            key, known = start_sshd(lab, laptop, tmp_path / "ssh")
            r = ssh(lab, server, laptop, key, known, "echo behind the nat")
            assert "behind the nat" in r.stdout
