"""Port mapping (NAT-PMP/PCP) by `tunneld up` against a real server: miniupnpd on the lab's NAT router.

Topology (lab/topology.py behind_nat): host 192.168.77.2 — router lan0 192.168.77.1 / wan0 203.0.113.1
(masquerade, miniupnpd on lan0) — peer 203.0.113.2, which has no route back to 192.168.77.0/24: only
the NAT (or a mapping) can carry traffic between them. The daemon's outer port is 4500 (internal ports
below 1024 make miniupnpd spin, see docs/lab.md).

What is checked: the daemon gets the public address and a mapping (PCP), miniupnpd has installed it and
an independent client (natpmpc) gets the same mapping back; an inbound datagram from the public side
reaches tunneld through it; a tunnel whose peer can reach the host only through the mapping; a router
reboot that forgets its mappings is noticed and the mapping re-created within 5 s; a clean shutdown
deletes the mapping; `tunneld portmap probe` succeeds and cleans up, or fails in bounded time; and the
states without a mapping (disabled, no-gateway, public).

The natpmpc cross-check: NAT-PMP cannot list mappings, so natpmpc asks miniupnpd for a mapping of the
same internal port 4500 with suggested public port 0 ("any"). miniupnpd finds the daemon's existing
redirect to 192.168.77.2:4500 and answers with its external port ("already redirected ..., replacing"),
so natpmpc reports exactly the daemon's external port and miniupnpd still holds one mapping. The
replacement makes the mapping natpmpc's (its rule label becomes "NAT-PMP 4500 udp"): miniupnpd then
refuses the daemon's PCP delete ("Unauthorized to remove PCP mapping"), so that test does not check
shutdown; the shutdown tests use a mapping only the daemon touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.netns import Host, Lab, LabError, wait_for
from lab.topology import behind_nat
from lab.tunnel import DOMAIN, TUNNELD, Node, names_toml, peer_status, ping6, start, status, write_secret
from lab.upnp import MINIUPNPD, Mapping, MiniUPnPd

NATPMPC = shutil.which("natpmpc") or "/usr/bin/natpmpc"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                       reason="needs root and iproute2 (network namespaces); CI runs as root"),
]

HOST_ADDR = "192.168.77.2"
GATEWAY = "192.168.77.1"
PUBLIC = "203.0.113.1"
PORT = 4500  # the daemon's listen port: >= 1024 (miniupnpd's allow rule; see docs/lab.md)
RESTORE_LIMIT = 5.0  # seconds from the rebooted router answering to the mapping being back

CONTRACT_KEYS = {"state", "protocol", "gateway", "internal_port", "external_address", "external_port",
                 "lifetime_left", "result", "double_nat", "endpoint"}

MAPPED = re.compile(r"Mapped public port (\d+) protocol UDP to local port (\d+) liftime (\d+)")
PROBE_MAPPING = re.compile(r"created (\S+):(\d+) lifetime (\d+) s, deleted")

SEND_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.sendto(bytes.fromhex(sys.argv[5]), (sys.argv[3], int(sys.argv[4])))
"""


@dataclass
class NatLab:
    lab: Lab
    host: Host
    router: Host
    peer: Host
    upnp: MiniUPnPd
    dir: Path
    secret: Path


@pytest.fixture
def nat(tmp_path: Path) -> Iterator[NatLab]:
    for tool in (MINIUPNPD, NATPMPC):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is missing: tools/install.sh installs Debian miniupnpd-nftables and natpmpc")
    secret = tmp_path / "secret"
    write_secret(secret)
    with Lab() as lab:
        host, router, peer = behind_nat(lab)
        with MiniUPnPd(lab, host, router, peer) as upnp:
            upnp.start()
            yield NatLab(lab, host, router, peer, upnp, tmp_path, secret)


# -- configs and daemons ------------------------------------------------------------------------------


def _interface(n: Node, secret: Path) -> str:
    return (f'[interface]\nname = "btmm0"\nlisten_port = {n.port}\nmtu = 1400\n'
            f'state_dir = "{n.dir / "state"}"\ncontrol_socket = "{n.socket}"\n\n'
            + names_toml(n.dir) +
            f'[account]\ndomain = "{DOMAIN}"\nsecret_file = "{secret}"\n')


def node(nat: NatLab, h: Host) -> Node:
    """A node with its identity created (by `tunneld identity`) and a config without peers."""
    n = Node(h, nat.dir / h.name, h.addr4, port=PORT)
    n.dir.mkdir(parents=True, exist_ok=True)
    n.config.write_text(_interface(n, nat.secret))
    out = nat.lab.run(h, [TUNNELD, "identity", "--config", str(n.config)]).stdout.split()
    n.public_key, n.ula = out[1], out[3]
    return n


def configure(nat: NatLab, n: Node, extra: str = "") -> None:
    """Rewrite n's config: interface and account, then `extra` ([portmap], [[peer]] tables)."""
    n.config.write_text(_interface(n, nat.secret) + extra)


def peer_table(other: Node, endpoint: str | None = None) -> str:
    s = f'\n[[peer]]\nname = "{other.name}"\npublic_key = "{other.public_key}"\n'
    return s + (f'endpoint = "{endpoint}"\n' if endpoint else "")


def log_tail(n: Node) -> str:
    try:
        return n.log.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


def portmap(n: Node) -> dict[str, Any]:
    return dict(status(n).get("portmap") or {})


def wait_mapped(nat: NatLab, n: Node, timeout: float = 20) -> dict[str, Any]:
    """Wait until the daemon reports state "mapping" with an endpoint; its portmap status."""
    def mapped() -> bool:
        pm = portmap(n)
        return pm.get("state") == "mapping" and bool(pm.get("endpoint"))
    try:
        wait_for(mapped, timeout=timeout, interval=0.05, what=f"tunneld in {n.host.name} to map its port")
    except LabError as e:
        raise AssertionError(f"{e}\nportmap: {portmap(n)}\n--- tunneld log:\n{log_tail(n)}\n"
                             f"--- miniupnpd log:\n{nat.upnp.log_text()[-3000:]}") from None
    return portmap(n)


def wait_state(n: Node, state: str, timeout: float = 5) -> dict[str, Any]:
    try:
        wait_for(lambda: portmap(n).get("state") == state, timeout=timeout, interval=0.05,
                 what=f"portmap state {state!r} in {n.host.name}")
    except LabError as e:
        raise AssertionError(f"{e}\nportmap: {portmap(n)}\n--- tunneld log:\n{log_tail(n)}") from None
    return portmap(n)


def our_mapping(pm: dict[str, Any]) -> Mapping:
    return Mapping("udp", int(pm["external_port"]), HOST_ADDR, PORT)


def send_udp(nat: NatLab, payload: bytes, dst: str, dport: int, sport: int = 5555) -> None:
    nat.lab.run(nat.peer, [sys.executable, "-c", SEND_UDP, nat.peer.addr4, str(sport), dst, str(dport),
                           payload.hex()])


def probe(nat: NatLab, *args: str, timeout: float = 40) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    r = nat.lab.run(nat.host, [TUNNELD, "portmap", "probe", *args], timeout=timeout, check=False)
    return r, time.monotonic() - t0


# -- tests --------------------------------------------------------------------------------------------


def test_daemon_maps_its_port_and_natpmpc_sees_it(nat: NatLab) -> None:
    h = node(nat, nat.host)  # no [portmap] table and no peers: mapping is on by default
    start(nat.lab, h)
    pm = wait_mapped(nat, h)
    ext = int(pm["external_port"])
    assert pm["protocol"] == "pcp", pm  # miniupnpd speaks PCP: no fall-back to NAT-PMP
    assert pm["gateway"] == GATEWAY, pm  # the kernel's default gateway
    assert pm["internal_port"] == PORT, pm
    assert pm["external_address"] == PUBLIC, pm
    assert 1024 <= ext <= 65535, pm
    assert pm["endpoint"] == f"{PUBLIC}:{ext}", pm
    assert pm["double_nat"] is False, pm
    assert isinstance(pm["lifetime_left"], float | int) and 0 < pm["lifetime_left"] <= 7200, pm
    assert isinstance(pm["result"], str) and pm["result"], pm
    assert pm.keys() >= CONTRACT_KEYS, pm

    assert nat.upnp.list_mappings() == [our_mapping(pm)]

    # The command line shows the same object.
    r = nat.lab.run(h.host, [TUNNELD, "status", "--json", "--config", str(h.config)])
    cli = json.loads(r.stdout)["portmap"]
    assert (cli["state"], cli["endpoint"], cli["protocol"]) == ("mapping", pm["endpoint"], "pcp"), cli

    # Independent client: natpmpc asks for internal port 4500 with any public port and gets ours.
    out = nat.upnp.natpmpc("-a", "0", str(PORT), "udp", "7200")
    assert f"Public IP address : {PUBLIC}" in out, out
    m = MAPPED.search(out)
    assert m, out
    assert (int(m.group(1)), int(m.group(2))) == (ext, PORT), out
    assert nat.upnp.list_mappings() == [our_mapping(pm)]  # the same mapping, not a second one
    assert portmap(h)["endpoint"] == pm["endpoint"]


def test_inbound_datagram_reaches_tunneld_through_the_mapping(nat: NatLab) -> None:
    lab, peer = nat.lab, nat.peer
    # Without the mapping nothing from the peer can reach the host: it has no route back.
    assert lab.run(peer, ["ip", "route", "get", HOST_ADDR], check=False).returncode != 0
    h = node(nat, nat.host)
    configure(nat, h, f'\n[portmap]\nenabled = true\ngateway = "{GATEWAY}"\nlifetime = 3600\n')
    start(lab, h)
    pm = wait_mapped(nat, h)
    assert pm["gateway"] == GATEWAY and 0 < pm["lifetime_left"] <= 3600, pm
    ext = int(pm["external_port"])
    before = status(h)["counters"]

    send_udp(nat, b"\xff", PUBLIC, ext)  # a NAT keepalive (RFC 3948)
    wait_for(lambda: status(h)["counters"]["rx_keepalive"] >= before["rx_keepalive"] + 1, timeout=5,
             what="the keepalive to arrive through the mapping")
    send_udp(nat, b"\x01\x02", PUBLIC, ext, sport=5556)  # neither ESP, control nor keepalive
    wait_for(lambda: status(h)["counters"]["rx_malformed"] >= before["rx_malformed"] + 1, timeout=5,
             what="the malformed datagram to arrive through the mapping")
    after = status(h)["counters"]
    assert after["rx_datagrams"] == before["rx_datagrams"] + 2, (before, after)


def test_tunnel_to_a_host_reachable_only_through_the_mapping(nat: NatLab) -> None:
    lab = nat.lab
    h, p = node(nat, nat.host), node(nat, nat.peer)
    # The host knows the peer's key but no endpoint: the first packet must come from the peer.
    configure(nat, h, f'\n[portmap]\ngateway = "{GATEWAY}"\n' + peer_table(p))
    start(lab, h)
    ext = int(wait_mapped(nat, h)["external_port"])
    mapped_endpoint = f"{PUBLIC}:{ext}"
    configure(nat, p, "\n[portmap]\nenabled = false\n" + peer_table(h, mapped_endpoint))
    start(lab, p)
    wait_state(p, "disabled")

    try:
        ping6(lab, p, h)  # the handshake initiation goes in through the mapping
        ping6(lab, h, p)
        ping6(lab, p, h, count=10)
    except LabError as e:
        raise AssertionError(f"{e}\n--- host log:\n{log_tail(h)}\n--- peer log:\n{log_tail(p)}") from None
    assert peer_status(p, h.name)["endpoint"] == mapped_endpoint
    assert peer_status(h, p.name)["endpoint"] == f"{nat.peer.addr4}:{PORT}"
    assert peer_status(h, p.name)["last_handshake"] is not None
    assert nat.upnp.list_mappings() == [Mapping("udp", ext, HOST_ADDR, PORT)]


def test_router_reboot_mapping_recreated_within_5s(nat: NatLab) -> None:
    h = node(nat, nat.host)
    start(nat.lab, h)
    pm = wait_mapped(nat, h)
    mapping = our_mapping(pm)
    assert nat.upnp.list_mappings() == [mapping]

    timings: list[tuple[float, float]] = []
    for i in range(2):
        # Each reboot comes 4 s after the last mapping: past the first request's retransmission timer
        # (PCP IRT 3 s + 10 %), whose wake-up must not be what re-creates the mapping, and far enough
        # for the gateway's epoch to show the reboot (PCP §8.5 allows 2 s of slack).
        time.sleep(4)
        t0 = time.monotonic()
        nat.upnp.restart(delete_leases=True)  # a reboot that forgets every mapping
        t_back = time.monotonic()  # miniupnpd answers again (its PCP ANNOUNCE went out at start)
        try:
            wait_for(lambda: mapping in nat.upnp.list_mappings(), timeout=15, interval=0.01,
                     what="the daemon to re-create its mapping")
        except LabError as e:
            raise AssertionError(f"reboot {i + 1}: {e}\nearlier: {timings}\nportmap: {portmap(h)}\n"
                                 f"--- tunneld log:\n{log_tail(h)}\n"
                                 f"--- miniupnpd log:\n{nat.upnp.log_text()[-3000:]}") from None
        t_mapped = time.monotonic()
        timings.append((t_back - t0, t_mapped - t_back))
        print(f"reboot {i + 1}: router down+up {t_back - t0:.3f} s, mapping restored "
              f"{t_mapped - t_back:.3f} s after the router answered ({t_mapped - t0:.3f} s after the stop)")
        assert t_mapped - t_back <= RESTORE_LIMIT, (timings, portmap(h), log_tail(h))
        pm2 = wait_mapped(nat, h, timeout=5)
        assert pm2["endpoint"] == pm["endpoint"], pm2  # the same port was suggested and granted
        assert nat.upnp.list_mappings() == [mapping]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_shutdown_deletes_the_mapping(nat: NatLab, sig: signal.Signals) -> None:
    h = node(nat, nat.host)
    start(nat.lab, h)
    pm = wait_mapped(nat, h)
    assert nat.upnp.list_mappings() == [our_mapping(pm)]
    assert h.proc is not None
    t0 = time.monotonic()
    rc = nat.lab.stop(h.proc, sig=sig, timeout=10)
    stopped = time.monotonic() - t0
    assert rc == 0, log_tail(h)
    wait_for(lambda: nat.upnp.list_mappings() == [], timeout=3, what="miniupnpd to drop the mapping")
    print(f"{sig.name}: daemon exited after {stopped:.3f} s, mapping gone")
    assert stopped < 5, f"shutdown took {stopped:.1f} s"


def test_probe_creates_and_deletes_a_mapping(nat: NatLab) -> None:
    h = node(nat, nat.host)
    for args in (["--config", str(h.config)], ["--gateway", GATEWAY, "--config", str(h.config)]):
        r, took = probe(nat, *args)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        pairs = [line.split(" ", 1) for line in r.stdout.strip().splitlines()]
        assert [k for k, _ in pairs] == ["gateway", "protocol", "external", "mapping"], r.stdout
        lines = dict(pairs)
        assert lines.get("gateway") == GATEWAY, r.stdout
        assert lines.get("protocol") == "pcp", r.stdout
        assert lines.get("external") == PUBLIC, r.stdout
        m = PROBE_MAPPING.fullmatch(lines.get("mapping", ""))
        assert m, r.stdout
        assert m.group(1) == PUBLIC and 0 < int(m.group(2)) < 65536 and int(m.group(3)) > 0, r.stdout
        assert nat.upnp.list_mappings() == [], "the probe left its test mapping behind"
        print(f"probe {' '.join(args[:2])}: {took:.3f} s")


def test_probe_without_a_server_fails_in_bounded_time(nat: NatLab) -> None:
    h = node(nat, nat.host)
    nat.upnp.stop()  # the router is up, nothing answers on port 5351
    r, took = probe(nat, "--config", str(h.config))
    print(f"probe without server: exit {r.returncode} after {took:.3f} s; stdout {r.stdout!r}; "
          f"stderr {r.stderr.strip()!r}")
    assert r.returncode == 1, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0], r.stderr
    assert took < 16, f"probe took {took:.1f} s"


def test_states_without_a_mapping(nat: NatLab) -> None:
    """disabled, no-gateway (no IPv4 default route) and public (the default route's source is public)."""
    lab = nat.lab
    h, p = node(nat, nat.host), node(nat, nat.peer)
    configure(nat, h, "\n[portmap]\nenabled = false\n")
    start(lab, h)
    pm = wait_state(h, "disabled")
    assert (pm["protocol"], pm["endpoint"], pm["external_port"]) == (None, None, None), pm
    assert pm.keys() >= CONTRACT_KEYS, pm

    start(lab, p)  # the peer has no default route at all
    pm = wait_state(p, "no-gateway")
    assert (pm["protocol"], pm["gateway"], pm["external_port"]) == (None, None, None), pm
    assert pm["endpoint"] is None, pm
    assert p.proc is not None
    assert lab.stop(p.proc) == 0

    lab.ip(nat.peer, "route", "add", "default", "via", nat.router.addr4)  # primary 203.0.113.2: public
    start(lab, p)
    pm = wait_state(p, "public")
    assert (pm["protocol"], pm["external_port"]) == (None, None), pm
    assert pm["endpoint"] in (None, f"{nat.peer.addr4}:{PORT}"), pm  # if any, its own address
    assert isinstance(pm["result"], str) and pm["result"], pm
    assert nat.upnp.list_mappings() == []  # the public host asked nobody for a mapping
