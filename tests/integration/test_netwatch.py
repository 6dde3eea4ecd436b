"""The network watch over real netlink, in a namespace: a laptop with two uplinks (home and café)
moves between them, and each move is reported once, with what changed."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from lab import progs
from lab.netns import Host, Lab, is_root

pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root (network namespaces)")]

HOME = ("eth0", "192.168.1.20/24", "192.168.1.1")
CAFE = ("eth1", "10.0.0.7/24", "10.0.0.1")


def _arrive(lab: Lab, h: Host, uplink: tuple[str, str, str]) -> None:
    ifname, cidr, gateway = uplink
    lab.ip(h, "link", "set", ifname, "up")
    lab.addr(h, ifname, cidr)
    lab.ip(h, "route", "add", "default", "via", gateway)


def _leave(lab: Lab, h: Host, uplink: tuple[str, str, str]) -> None:
    ifname = uplink[0]
    lab.ip(h, "addr", "flush", "dev", ifname)  # what a network manager does on disconnect
    lab.ip(h, "link", "set", ifname, "down")


@pytest.fixture
def laptop() -> Iterator[tuple[Lab, Host]]:
    with Lab() as lab:
        laptop, home, cafe = lab.host("laptop"), lab.host("home"), lab.host("cafe")
        lab.veth(laptop, "eth0", home, "lan0")
        lab.veth(laptop, "eth1", cafe, "lan0")
        lab.addr(home, "lan0", "192.168.1.1/24")
        lab.addr(cafe, "lan0", "10.0.0.1/24")
        lab.ip(laptop, "link", "add", "tun9", "type", "veth", "peer", "name", "tun9p")  # the tunnel stand-in
        lab.ip(laptop, "link", "set", "tun9", "up")
        _arrive(lab, laptop, HOME)
        lab.ip(laptop, "link", "set", "eth1", "down")
        yield lab, laptop


def test_each_move_is_one_change_naming_what_moved(laptop: tuple[Lab, Host]) -> None:
    lab, h = laptop
    w = progs.Lines(progs.spawn(lab, h, "netwatch", "60", "tun9", stdout=subprocess.PIPE, text=True))
    ready = w.until(lambda e: e["event"] == "ready", timeout=10)
    assert ready["snapshot"]["gateway4"] == "192.168.1.1"
    assert ready["snapshot"]["address4"] == "192.168.1.20"

    _leave(lab, h, HOME)
    _arrive(lab, h, CAFE)
    ev = w.until(lambda e: e["event"] == "changed", timeout=5)
    # One burst may be seen as one change, or (if the kernel was slower than the quiet time) as a
    # "no network" step first; either way the last word is the café, and nothing more follows.
    while ev["new"]["gateway4"] != "10.0.0.1":
        ev = w.until(lambda e: e["event"] == "changed", timeout=5)
    assert ev["new"]["address4"] == "10.0.0.7"
    assert {"gateway", "primary-address", "addresses"} <= set(ev["changed"])
    assert w.quiet(1.0) == []
    first = ev["generation"]

    _leave(lab, h, CAFE)
    _arrive(lab, h, HOME)
    ev = w.until(lambda e: e["event"] == "changed" and e["new"]["gateway4"] == "192.168.1.1", timeout=5)
    assert ev["new"]["address4"] == "192.168.1.20" and ev["generation"] > first
    assert "10.0.0.7" in ev["vanished"] or ev["generation"] > first + 1


def test_events_that_change_nothing_that_matters_are_not_reported(laptop: tuple[Lab, Host]) -> None:
    lab, h = laptop
    w = progs.Lines(progs.spawn(lab, h, "netwatch", "60", "tun9", stdout=subprocess.PIPE, text=True))
    w.until(lambda e: e["event"] == "ready", timeout=10)
    lab.addr(h, "tun9", "fd00:1::1/64")  # the tunnel's own address: excluded
    lab.ip(h, "route", "add", "fd00:1::/48", "dev", "tun9")
    lab.addr(h, "eth0", "fe80::99/64")  # link-local: not a global address
    assert w.quiet(1.5) == []
    lab.addr(h, "eth0", "192.168.1.21/24")  # a second global address is a change of addresses only
    ev = w.until(lambda e: e["event"] == "changed", timeout=5)
    assert ev["changed"] == ["addresses"] and ev["vanished"] == []
