"""Port mapping by UPnP IGD against a real server: miniupnpd with NAT-PMP and PCP disabled (UPnP only).

Topology (lab/topology.py behind_nat): host 192.168.77.2 — router lan0 192.168.77.1 / wan0 203.0.113.1
(masquerade, miniupnpd on lan0) — peer 203.0.113.2, which has no route back to 192.168.77.0/24: only the
NAT or a mapping carries traffic between them. Nothing answers PCP or NAT-PMP, so the mapper falls back to
UPnP (SSDP, the description, GetExternalIPAddress, AddPortMapping) after its 3 s wait.

Checked: `tunneld up` maps its port by UPnP (status names "upnp", miniupnpd's DNAT rule is there), an
inbound datagram from the public side reaches tunneld through it, a clean shutdown deletes it; `tunneld
portmap probe` names "upnp", maps and deletes its test mapping.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.netns import Host, Lab, LabError, wait_for
from lab.topology import behind_nat
from lab.tunnel import DOMAIN, TUNNELD, Node, names_toml, start, status, write_secret
from lab.upnp import MINIUPNPD, Mapping, MiniUPnPd

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                       reason="needs root and iproute2 (network namespaces); CI runs as root"),
]

HOST_ADDR = "192.168.77.2"
GATEWAY = "192.168.77.1"
PUBLIC = "203.0.113.1"
PORT = 4500  # >= 1024: miniupnpd's allow rule (docs/lab.md)
PROBE_MAPPING = re.compile(r"created (\S+):(\d+) lifetime (\d+) s, deleted")
SEND_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5555))
s.sendto(b"\\xff", (sys.argv[2], int(sys.argv[3])))
"""


@dataclass
class UpnpLab:
    lab: Lab
    host: Host
    peer: Host
    upnp: MiniUPnPd
    dir: Path
    secret: Path


@pytest.fixture
def igd(tmp_path: Path) -> Iterator[UpnpLab]:
    if not os.access(MINIUPNPD, os.X_OK):
        pytest.fail(f"{MINIUPNPD} is missing: tools/install.sh installs Debian miniupnpd-nftables")
    secret = tmp_path / "secret"
    write_secret(secret)
    with Lab() as lab:
        host, router, peer = behind_nat(lab)
        with MiniUPnPd(lab, host, router, peer, upnp_only=True) as upnp:
            upnp.start()
            yield UpnpLab(lab, host, peer, upnp, tmp_path, secret)


def node(igd: UpnpLab) -> Node:
    n = Node(igd.host, igd.dir / "host", HOST_ADDR, port=PORT)
    n.dir.mkdir(parents=True, exist_ok=True)
    n.config.write_text(f'[interface]\nname = "btmm0"\nlisten_port = {PORT}\nmtu = 1400\n'
                        f'state_dir = "{n.dir / "state"}"\ncontrol_socket = "{n.socket}"\n\n'
                        + names_toml(n.dir) +
                        f'[account]\ndomain = "{DOMAIN}"\nsecret_file = "{igd.secret}"\n')
    return n


def portmap(n: Node) -> dict[str, Any]:
    return dict(status(n).get("portmap") or {})


def test_daemon_maps_by_upnp_carries_inbound_and_deletes_on_shutdown(igd: UpnpLab) -> None:
    lab = igd.lab
    assert lab.run(igd.peer, ["ip", "route", "get", HOST_ADDR], check=False).returncode != 0
    h = node(igd)
    start(lab, h)
    try:
        wait_for(lambda: bool(portmap(h).get("endpoint")), timeout=15, interval=0.05,
                 what="tunneld to map its port by UPnP")
    except LabError as e:
        raise AssertionError(f"{e}\nportmap: {portmap(h)}\n--- tunneld log:\n{h.log.read_text()[-3000:]}\n"
                             f"--- miniupnpd log:\n{igd.upnp.log_text()[-3000:]}") from None
    pm = portmap(h)
    ext = int(pm["external_port"])
    assert (pm["state"], pm["protocol"], pm["gateway"]) == ("mapping", "upnp", GATEWAY), pm
    assert (pm["external_address"], pm["endpoint"]) == (PUBLIC, f"{PUBLIC}:{ext}"), pm
    assert 0 < pm["lifetime_left"] <= 7200, pm
    assert igd.upnp.list_mappings() == [Mapping("udp", ext, HOST_ADDR, PORT)]

    text = lab.run(h.host, [TUNNELD, "status", "--config", str(h.config)]).stdout
    assert "nat: mapping (upnp): UPnP: UDP port 4500 mapped" in text, text

    before = status(h)["counters"]["rx_keepalive"]
    lab.run(igd.peer, [sys.executable, "-c", SEND_UDP, igd.peer.addr4, PUBLIC, str(ext)])
    wait_for(lambda: status(h)["counters"]["rx_keepalive"] >= before + 1, timeout=5,
             what="the keepalive to arrive through the UPnP mapping")

    assert h.proc is not None
    t0 = time.monotonic()
    assert lab.stop(h.proc, sig=signal.SIGTERM, timeout=10) == 0, h.log.read_text()[-3000:]
    assert time.monotonic() - t0 < 5
    wait_for(lambda: igd.upnp.list_mappings() == [], timeout=3, what="miniupnpd to drop the mapping")


def test_probe_maps_by_upnp_and_deletes(igd: UpnpLab) -> None:
    h = node(igd)
    t0 = time.monotonic()
    r = igd.lab.run(igd.host, [TUNNELD, "portmap", "probe", "--config", str(h.config)], timeout=30,
                    check=False)
    took = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout, r.stderr, igd.upnp.log_text()[-3000:])
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    assert (lines["gateway"], lines["protocol"], lines["external"]) == (GATEWAY, "upnp", PUBLIC), r.stdout
    m = PROBE_MAPPING.fullmatch(lines["mapping"])
    assert m and m.group(1) == PUBLIC and int(m.group(3)) == 120, r.stdout
    assert igd.upnp.list_mappings() == [], "the probe left its test mapping behind"
    assert took < 10, f"probe took {took:.1f} s"
