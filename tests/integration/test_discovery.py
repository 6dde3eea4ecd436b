"""The full path of the DNS issue: two hosts with no static peers find each other through our own
rendezvous server (`tunneld serve-dns`) — each publishes its records by signed UPDATE and learns the
other's by long-lived query — then run ssh between their ULAs.

Each test runs with both transports of `[account] transport`: "udp", and "tls" (`serve-dns --tls`,
`join --tls`: the publisher, and the discovery of the UPDATE server and of the relay, over DNS over TLS).
With "tls" the zone names a TURN relay (`_turn._udp` SRV) and the laptop's link is captured: it finds its
UPDATE server and its relay and publishes only over the TLS port, and no message it sends in clear names it.
The watcher's long-lived queries still go over UDP (DNS Push replaces them)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.capture import capture, udp_payloads
from lab.netns import Host, Lab, wait_for
from lab.topology import two_hosts
from lab.tunnel import (
    DOMAIN,
    TUNNELD,
    Node,
    dig_key,
    joined,
    ping6,
    serve_dns,
    ssh,
    start_sshd,
    status,
    write_secret,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dig"),
                                reason="needs root and dig (bind9-dnsutils)")

DNS = ("192.0.2.2", 5353)
TRANSPORTS = ["udp", "tls"]
CAPTURE_TOOLS = ("tcpdump", "tshark")
RELAY_PORT = 3478  # nothing listens there: the relay is only found, and direct paths need none

# A signed UPDATE with a lease (RFC 9664 option 2: serve-dns refuses additions without one) naming a relay.
_ADD_RELAY = """
import struct, sys
import dns.edns, dns.query, dns.tsigkeyring, dns.update
zone, key, server, port, relay, relay_port = sys.argv[1:7]
algorithm, name, secret = key.split(":")
upd = dns.update.UpdateMessage(zone + ".", keyring=dns.tsigkeyring.from_text({name: (algorithm, secret)}),
                               keyname=name, keyalgorithm=algorithm)
upd.use_edns(0, options=[dns.edns.GenericOption(2, struct.pack("!I", 7200))])
upd.add("_turn._udp", 60, "SRV", f"0 0 {relay_port} turn")
upd.add("turn", 60, "A", relay)
print(dns.query.udp(upd, server, port=int(port), timeout=5).rcode())
"""


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    if request.param == "tls" and not all(shutil.which(t) for t in CAPTURE_TOOLS):
        pytest.skip("the TLS variant captures the device's link: needs tcpdump and tshark")
    return str(request.param)


@dataclass
class Discovered:
    lab: Lab
    laptop: Node
    desktop: Node
    transport: str
    pcap: Path | None  # with "tls": the laptop's traffic to the server's DNS ports, captured from the start


@pytest.fixture
def discovered(tmp_path: Path, transport: str) -> Iterator[Discovered]:
    tls = transport == "tls"
    with Lab() as lab:
        ha, hb = two_hosts(lab)
        # Each host's address is public (no NAT): with a default route, it publishes that address.
        lab.ip(ha, "route", "add", "default", "via", hb.addr4)
        lab.ip(hb, "route", "add", "default", "via", ha.addr4)
        secret = tmp_path / "secret"
        write_secret(secret)
        serve_dns(lab, Node(hb, tmp_path / "dns", hb.addr4), secret, tmp_path, DNS, tls=tls)
        if tls:  # a relay to find (over TLS); the udp variant keeps the zone without one, as before
            r = lab.run(hb, [sys.executable, "-c", _ADD_RELAY, DOMAIN, dig_key(secret), *map(str, DNS),
                             hb.addr4, str(RELAY_PORT)], check=False, timeout=30)
            assert r.stdout.strip() == "0", r.stdout + r.stderr
        pcap = tmp_path / "laptop.pcap" if tls else None
        with (capture(lab, ha, pcap, bpf=f"host {hb.addr4} and (port 53 or port {DNS[1]} or port 853)")
              if pcap is not None else contextlib.nullcontext()):
            nodes = []
            for h, name in ((ha, "laptop"), (hb, "desktop")):
                n = joined(lab, h, name, secret, DNS, tmp_path, tls=tls)
                nodes.append(n)
            yield Discovered(lab, nodes[0], nodes[1], transport, pcap)


def test_hosts_find_each_other_and_ssh(discovered: Discovered, tmp_path: Path) -> None:
    lab, laptop, desktop = discovered.lab, discovered.laptop, discovered.desktop

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
        if discovered.transport == "tls":  # its _dns-update-tls._tcp SRV names the TLS port
            assert st["publish"]["server"] == f"{DNS[0]}:853", st["publish"]
            assert st["nat"]["relay_server"] == f"{DNS[0]}:{RELAY_PORT}", st["nat"]  # _turn._udp, over TLS
            # the watcher learned the other by DNS Push over TLS, as a member (no LLQ fallback)
            assert st["watch"]["transport"] == "push", st["watch"]
            assert st["watch"]["push_server"] == f"{DNS[0]}:853", st["watch"]
            assert f"dns watch: watching by DNS Push over TLS via {DNS[0]}:853" in shown, shown
    if discovered.pcap is not None:
        _nothing_in_clear(discovered.pcap, laptop.host, laptop.name)
    ping6(lab, laptop, desktop)
    key, known = start_sshd(lab, desktop, tmp_path / "ssh")
    r = ssh(lab, laptop, desktop, key, known, "echo found via dns from $SSH_CLIENT")
    assert f"found via dns from {laptop.ula} " in r.stdout, r.stdout


def test_host_behind_nat_and_public_host_find_each_other(tmp_path: Path, transport: str) -> None:
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
        tls = transport == "tls"
        serve_dns(lab, Node(peer, tmp_path / "dns", peer.addr4), secret, tmp_path, dns_at, tls=tls)
        with MiniUPnPd(lab, host, router, peer) as upnp:
            upnp.start()
            nodes = []
            for h, name in ((host, "laptop"), (peer, "server")):
                n = joined(lab, h, name, secret, dns_at, tmp_path, tls=tls)
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


def _nothing_in_clear(pcap: Path, device: Host, name: str) -> None:
    """The device's whole signalling went over TLS: TCP connections to port 853 (the publisher's, its
    lookups of its servers and relay, and the watcher's DNS Push session), its name in none of their bytes;
    and of what it sent to the DNS ports in clear, nothing is DNS at all (only STUN, which the DNS port
    also answers) and nothing names it."""
    own = name.encode()

    def tshark(*args: str) -> list[str]:
        r = subprocess.run(["tshark", "-n", "-r", str(pcap), *args], capture_output=True, text=True,
                           timeout=60, check=True)
        return r.stdout.split()

    # tcpdump writes each packet as it comes (-U): what was sent before now is in the file
    syn = f"ip.src == {device.addr4} && tcp.dstport == 853 && tcp.flags.syn == 1 && tcp.flags.ack == 0"
    wait_for(lambda: len(tshark("-Y", syn, "-T", "fields", "-e", "tcp.stream")) >= 4, timeout=10,
             what="four TLS connections from the device (publisher, lookups, the Push session)")
    tls_bytes = bytes.fromhex("".join(tshark("-Y", "tcp.port == 853", "-T", "fields", "-e", "tcp.payload")))
    assert tls_bytes and own not in tls_bytes
    clear = f"ip.src == {device.addr4} && (tcp.dstport == 53 || tcp.dstport == {DNS[1]})"
    tcp_clear = bytes.fromhex("".join(tshark("-Y", clear, "-T", "fields", "-e", "tcp.payload")))
    assert not tcp_clear, "DNS over plain TCP from the device"
    for port in (53, DNS[1]):
        for payload in udp_payloads(pcap, src=device.addr4, dport=port):
            assert payload[4:8] == b"\x21\x12\xa4\x42", f"not STUN, in clear: {payload!r}"  # magic cookie
            assert own not in payload, f"the device's name crossed in clear: {payload!r}"
