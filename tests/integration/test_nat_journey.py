"""The journey of issue 13, with real peers only: two devices behind two NATs that speak no port mapping,
set up as a user would (`tunneld join`, the account's `serve-dns` answering STUN too, coturn started with
the `static-auth-secret=` line of `tunneld account new`), reach each other and ssh both ways.

- two plain masquerading NATs (endpoint-independent): hole punching, path `direct`; `tunneld ping`;
- two `masquerade fully-random` NATs (a mapping per destination): through coturn, path `relay`;
- two masquerading NATs with the direct path blocked: through coturn; then the relay dies and the direct
  path is let through: the peers switch to it, and an ssh session running all along survives.

Topology: lab.topology.two_nats (server 203.0.113.2 and .3; site a behind 198.51.100.2, b behind .18).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lab.journey import RELAY, Journey, journey, path_of, ping_peer, wait_path
from lab.topology import block_direct
from lab.tunnel import TUNNELD

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft")
                       or not shutil.which("turnserver") or not shutil.which("sshd"),
                       reason="needs root, iproute2, nftables, coturn and sshd (network namespaces)"),
]

def ssh_both_ways(j: Journey) -> None:
    assert j.sshd_a is not None and j.sshd_b is not None
    assert j.sshd_b.ssh(j.a.host, j.b.ula, "echo from-a").stdout.strip() == "from-a"
    assert j.sshd_a.ssh(j.b.host, j.a.ula, "echo from-b").stdout.strip() == "from-b"


def test_two_masquerading_nats_connect_directly_and_ssh_both_ways(tmp_path: Path) -> None:
    with journey(tmp_path, "masquerade", relay=False) as j:
        ping_peer(j, j.a, j.b)
        wait_path(j, "direct", timeout=10)
        ssh_both_ways(j)
        pa = path_of(j.a, "b")
        # b's endpoint is its NAT's public address, as STUN saw it and the DNS published it (nat=ei).
        assert pa["endpoint"].split(":")[0] == j.net.b.public and pa["nat"] == "ei", pa
        st = j.lab.run(j.a.host, [TUNNELD, "status", "--config", str(j.a.config)]).stdout
        assert f"path: direct {pa['endpoint']}" in st, st
        out = j.lab.run(j.a.host, [TUNNELD, "ping", "b", "--config", str(j.a.config), "-c", "2", "-i", "0.2"])
        lines = out.stdout.splitlines()
        assert lines[0].startswith(f"pong from b ({j.b.ula}), direct {pa['endpoint']}, in "), out.stdout
        assert lines[-1].startswith("2/2 replies"), out.stdout
        bad = j.lab.run(j.a.host, [TUNNELD, "ping", "nobody", "--config", str(j.a.config)], check=False)
        assert bad.returncode == 1 and "no peer 'nobody'" in bad.stderr


def test_two_per_destination_nats_connect_through_coturn_and_ssh_both_ways(tmp_path: Path) -> None:
    with journey(tmp_path, "fully-random", relay=True) as j:
        ping_peer(j, j.a, j.b)
        wait_path(j, "relay", timeout=10)
        ssh_both_ways(j)
        pa, pb = path_of(j.a, "b"), path_of(j.b, "a")
        relays = {pa["relay"], pb["relay"]}
        assert all(r.startswith(RELAY[0] + ":") for r in relays), (pa, pb)
        assert pa["nat"] == pb["nat"] == "pd"
        nat = j.lab.run(j.a.host, [TUNNELD, "status", "--config", str(j.a.config), "--json"]).stdout
        assert '"relay_state": "allocated"' in nat and '"kind": "per-destination"' in nat, nat


def test_when_the_relay_dies_the_peers_switch_to_a_direct_path_and_ssh_survives(tmp_path: Path) -> None:
    with journey(tmp_path, "masquerade", relay=True, blocked=True) as j:
        ping_peer(j, j.a, j.b, timeout=20)
        wait_path(j, "relay", timeout=10)
        ssh_both_ways(j)
        # One ssh session, printing a line every 0.2 s for 12 s, across the switch.
        sb = j.sshd_b
        assert sb is not None
        cmd = ["ssh", "-6", "-i", str(sb.client_key), "-o", f"UserKnownHostsFile={sb.known_hosts}",
               "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
               f"root@{j.b.ula}", "for i in $(seq 1 60); do echo line $i; sleep 0.2; done"]
        session = j.lab.spawn(j.a.host, cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # the session is up and streaming through the relay
        block_direct(j.lab, j.net, blocked=False)
        assert j.coturn is not None
        j.coturn.stop()  # the relay dies
        wait_path(j, "direct", timeout=20)
        out, err = session.communicate(timeout=40)
        assert session.returncode == 0, err
        assert out.splitlines() == [f"line {i}" for i in range(1, 61)]
        ssh_both_ways(j)
