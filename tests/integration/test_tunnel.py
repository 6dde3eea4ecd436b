"""The tunnel between two real hosts (network namespaces), each running `tunneld up`."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.flows import Blast
from lab.netns import Lab, wait_for
from lab.tunnel import Node, control, peer_status, ping6, running_pair, ssh, start_sshd, status

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                reason="needs root and iproute2 (CI runs as root)")


@contextlib.contextmanager
def checked_pair(workdir: Path, offload: bool) -> Iterator[tuple[Lab, Node, Node]]:
    with running_pair(workdir, offload=offload) as p:
        assert status(p[1])["offload"] is offload, status(p[1])["offload_error"]
        yield p


@pytest.fixture(params=[False, True], ids=["plain", "offload"])
def pair(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Lab, Node, Node]]:
    """Both ways the data path can run: plain TUN packets, and TUN segmentation offload (IFF_VNET_HDR)."""
    with checked_pair(tmp_path, request.param) as p:
        yield p


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "offload"])
def shared_pair(tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> Iterator[tuple[Lab, Node, Node]]:
    """`pair`, shared by the tests that change nothing in it (no rebind, no address move)."""
    with checked_pair(tmp_path_factory.mktemp("pair"), request.param) as p:
        yield p


def test_ping6_both_ways(shared_pair: tuple[Lab, Node, Node]) -> None:
    lab, a, b = shared_pair
    ping6(lab, a, b)
    ping6(lab, b, a)
    ping6(lab, a, b, count=20)
    pa, pb = peer_status(a, "b"), peer_status(b, "a")
    assert pa["ula"] == b.ula and pb["ula"] == a.ula
    assert pa["endpoint"] == f"{b.host.addr4}:4500"
    assert pa["last_handshake"] is not None and pb["last_handshake"] is not None
    assert pa["rx_bytes"] > 0 and pa["tx_bytes"] > 0
    st = status(a)
    assert st["interface"] == "btmm0" and st["ula"] == a.ula and st["listen_port"] == 4500


@pytest.mark.parametrize("shared_pair", [False], ids=["plain"], indirect=True)
def test_200mb_transfer_is_intact(shared_pair: tuple[Lab, Node, Node]) -> None:
    """The plain data path only: with offload, test_offload_traffic's 1 GB transfers show this and more."""
    lab, a, b = shared_pair
    assert not status(a)["offload"]
    ping6(lab, a, b)
    sent, got = Blast(lab, a, b, nbytes=200 * 1024 * 1024).result(timeout=120)
    assert sent["bytes"] == got["bytes"] == 200 * 1024 * 1024
    assert sent["sha256"] == got["sha256"]


def test_ssh_to_peer_ula_runs_a_command(shared_pair: tuple[Lab, Node, Node], tmp_path: Path) -> None:
    lab, a, b = shared_pair
    key, known = start_sshd(lab, b, tmp_path / "ssh")
    r = ssh(lab, a, b, key, known, "cat /proc/sys/kernel/hostname; echo via-$SSH_CONNECTION")
    assert f"via-{a.ula} " in r.stdout, r.stdout  # sshd saw the client's ULA: it came through the tunnel


def test_stream_survives_rebind(pair: tuple[Lab, Node, Node]) -> None:
    lab, a, b = pair
    ping6(lab, a, b)
    blast = Blast(lab, a, b, seconds=4)
    wait_for(lambda: peer_status(b, "a")["rx_bytes"] > 20_000_000, timeout=20, what="the stream to flow")
    before = status(a)["peers"][0]["handshakes"]
    reply = control(a, {"cmd": "rebind", "port": 4600})
    assert reply["listen_port"] == 4600
    wait_for(lambda: peer_status(b, "a")["endpoint"] == f"{a.host.addr4}:4600", timeout=10,
             what="b to learn a's new port from an authenticated packet")
    sent, got = blast.result()
    assert sent["sha256"] == got["sha256"] and sent["bytes"] == got["bytes"] > 0
    assert status(a)["peers"][0]["handshakes"] == before, "rebind must not need a new handshake"


def test_stream_survives_outer_address_move(pair: tuple[Lab, Node, Node]) -> None:
    lab, a, b = pair
    ping6(lab, a, b)
    blast = Blast(lab, a, b, seconds=4)
    wait_for(lambda: peer_status(b, "a")["rx_bytes"] > 20_000_000, timeout=20, what="the stream to flow")
    lab.addr(a.host, "eth0", "192.0.2.11/24")
    lab.ip(a.host, "addr", "del", "192.0.2.1/24", "dev", "eth0")
    wait_for(lambda: peer_status(b, "a")["endpoint"] == "192.0.2.11:4500", timeout=10,
             what="b to learn a's new address")
    sent, got = blast.result()
    assert sent["sha256"] == got["sha256"] and sent["bytes"] == got["bytes"] > 0
