"""The two-NAT lab (lab.topology.two_nats) behaves as its NAT kinds promise.

Measured with real sockets in the private hosts (lab/progs/punch.py) against the lab's STUN responder
on the public server: the mapping one socket gets toward several destinations per NAT kind, plain UDP
hole punching between the two sites, the block-direct switch, and sshd in a private host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import progs
from lab.netns import Host, Lab, list_namespaces, wait_for
from lab.progs import Lines
from lab.sshd import start_sshd
from lab.topology import NAT_KINDS, Site, TwoNats, block_direct, two_nats

pytestmark = pytest.mark.skipif(
    not (shutil.which("ip") and shutil.which("nft")) or os.geteuid() != 0,
    reason="needs root, iproute2 and nftables (CI runs as root)",
)

STUN_PORTS = (3478, 3479)
FAILS_AFTER = 1.5  # seconds of punching (a datagram every 20 ms each way) that show no path opens


def start_stun(lab: Lab, net: TwoNats) -> None:
    """lab/progs/stun.py on both ports of the server's first address and the first port of its second."""
    s1, s2 = net.server_addrs
    for addr, port in ((s1, STUN_PORTS[0]), (s1, STUN_PORTS[1]), (s2, STUN_PORTS[0])):
        p = progs.spawn(lab, net.server, "stun", addr, str(port), stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        assert p.stdout.readline().startswith("stun listening"), f"STUN on {addr}:{port}"


@pytest.fixture
def nats(request: pytest.FixtureRequest) -> Iterator[tuple[Lab, TwoNats]]:
    """A fresh two_nats lab with the STUN servers up; the NAT kinds from `indirect` parametrization."""
    kind_a, kind_b = request.param
    with Lab() as lab:
        net = two_nats(lab, kind_a, kind_b)
        start_stun(lab, net)
        yield lab, net
    assert list_namespaces(lab.id) == []


@pytest.fixture(scope="module")
def masq() -> Iterator[tuple[Lab, TwoNats]]:
    """Two masquerading NATs, shared by the tests that need them (each uses its own ports)."""
    with Lab() as lab:
        net = two_nats(lab)
        start_stun(lab, net)
        yield lab, net


def destinations(net: TwoNats) -> list[str]:
    """Three STUN servers (two ports of one address, one of the other), then the first again."""
    (s1, s2), (p1, p2) = net.server_addrs, STUN_PORTS
    return [f"{s1}:{p1}", f"{s1}:{p2}", f"{s2}:{p1}", f"{s1}:{p1}"]


def wan_drops(lab: Lab, router: Host) -> int:
    """How many unsolicited datagrams the router's WAN input filter has dropped."""
    out = lab.run(router, ["nft", "list", "chain", "ip", "filter", "input"]).stdout
    return sum(int(n) for n in re.findall(r"counter packets (\d+) bytes \d+ drop", out))


def punch(lab: Lab, net: TwoNats, port: int, seconds: float,
          a_first: bool = False) -> tuple[list[str], list[dict[str, Any]]]:
    """Plain UDP hole punching between the sites' hosts, each from a socket bound to `port`: both learn
    their observed endpoint from the STUN server, are told the other's, and send to it at once. With
    `a_first`, b starts only once b's router has dropped a's first datagram (a's arrive early).
    Returns (the observed endpoints [a, b], the two programs' reports [a, b])."""
    server = f"{net.server_addrs[0]}:{STUN_PORTS[0]}"
    procs = [progs.spawn(lab, site.host, "punch", "punch", str(port), server, str(seconds),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for site in (net.a, net.b)]
    lines = [Lines(p) for p in procs]
    observed = [str(line.next(10)["observed"]) for line in lines]
    dropped = wan_drops(lab, net.b.router) if a_first else 0
    for i, p in enumerate(procs):
        assert p.stdin is not None
        p.stdin.write(observed[1 - i] + "\n")
        p.stdin.close()
        if a_first and i == 0:
            wait_for(lambda: wan_drops(lab, net.b.router) > dropped, timeout=5,
                     what="a's first datagram to reach b's router")
    reports = [line.next(seconds + 10) for line in lines]
    for p in procs:
        assert p.wait(timeout=5) == 0
        lab.stop(p)
    return observed, reports


def opened(observed: list[str], reports: list[dict[str, Any]]) -> bool:
    """Both sides heard the other from its observed endpoint, and heard that the other heard them."""
    return all(r["acked"] and r["from"] == observed[1 - i] for i, r in enumerate(reports))


def test_masquerade_keeps_one_mapping_for_every_destination(masq: tuple[Lab, TwoNats]) -> None:
    lab, net = masq
    r = progs.run(lab, net.a.host, "punch", "mapping", "4400", *destinations(net))
    assert r["mapped"] == [f"{net.a.public}:4400"] * 4, r  # the source port kept, whatever the destination


@pytest.mark.parametrize("nats", [("random", "fully-random")], indirect=True, ids=["random+fully-random"])
def test_random_nats_map_per_destination(nats: tuple[Lab, TwoNats]) -> None:
    lab, net = nats
    for site in (net.a, net.b):
        mapped = progs.run(lab, site.host, "punch", "mapping", "4400", *destinations(net))["mapped"]
        assert all(m.startswith(f"{site.public}:") for m in mapped), (site.kind, mapped)
        assert len(set(mapped[:3])) == 3, (site.kind, mapped)  # a new mapping per destination...
        assert mapped[3] == mapped[0], (site.kind, mapped)  # ...kept for as long as it is used


def test_two_masquerade_nats_hole_punch_even_when_one_side_is_early(masq: tuple[Lab, TwoNats]) -> None:
    lab, net = masq
    observed, reports = punch(lab, net, 4500, seconds=5, a_first=True)
    assert observed == [f"{net.a.public}:4500", f"{net.b.public}:4500"]
    assert opened(observed, reports), (observed, reports)


def test_public_host_and_masquerade_nat_hole_punch() -> None:
    with Lab() as lab:
        net = two_nats(lab, "none", "masquerade")
        start_stun(lab, net)
        assert net.a.host.addr4 == net.a.public  # a is public: no NAT at all
        observed, reports = punch(lab, net, 4500, seconds=5, a_first=True)
        assert observed == [f"{net.a.public}:4500", f"{net.b.public}:4500"]
        assert opened(observed, reports), (observed, reports)


@pytest.mark.parametrize("nats", [("fully-random", "fully-random"), ("masquerade", "random")],
                         indirect=True, ids=["fully-random+fully-random", "masquerade+random"])
def test_no_hole_punch_when_a_nat_maps_per_destination(nats: tuple[Lab, TwoNats]) -> None:
    lab, net = nats
    observed, reports = punch(lab, net, 4500, seconds=FAILS_AFTER)
    # Each side sent 75 datagrams to the endpoint the STUN server saw for the other, and none arrived.
    assert [r["heard"] for r in reports] == [0, 0], (observed, reports)


def test_block_direct_blocks_and_unblocks(masq: tuple[Lab, TwoNats]) -> None:
    lab, net = masq
    block_direct(lab, net)
    block_direct(lab, net)  # idempotent
    try:
        observed, reports = punch(lab, net, 4600, seconds=FAILS_AFTER)
        assert observed == [f"{net.a.public}:4600", f"{net.b.public}:4600"]  # the server still answers
        assert [r["heard"] for r in reports] == [0, 0], reports
        counters = lab.run(net.inet, ["nft", "list", "table", "ip", "blockdirect"]).stdout
        assert int(re.findall(r"counter packets (\d+)", counters)[0]) >= 2, counters
    finally:
        block_direct(lab, net, blocked=False)
    block_direct(lab, net, blocked=False)  # idempotent
    observed, reports = punch(lab, net, 4600, seconds=5)
    assert opened(observed, reports), (observed, reports)


def test_sshd_in_a_private_host(masq: tuple[Lab, TwoNats], tmp_path: Path) -> None:
    lab, net = masq
    site: Site = net.a
    with start_sshd(lab, site.host, [site.host.addr4], tmp_path / "ssh") as sshd:
        r = sshd.ssh(site.router, site.host.addr4, "echo $SSH_CONNECTION")
        client, _, server, port = r.stdout.split()
        assert (client, server, port) == (site.router.extra["lan4"], site.host.addr4, "22"), r.stdout
    assert sshd.proc.poll() is not None  # ended by close()


def test_unknown_nat_kind_builds_nothing() -> None:
    with Lab() as lab:
        with pytest.raises(ValueError, match="unknown NAT kind"):
            two_nats(lab, "masquerade", "symmetric")
        assert lab.hosts == []
    assert "symmetric" not in NAT_KINDS
