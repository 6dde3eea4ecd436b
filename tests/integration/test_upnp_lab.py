"""The lab's real NAT-PMP/PCP server: miniupnpd on the router of `behind_nat`, driven by natpmpc.

These check the lab itself (lab/upnp.py, lab/progs/stun.py) against an independent client, so the
NAT-traversal tests can trust it: the public address, a mapping that really carries inbound traffic,
a router reboot that forgets its mappings, and the multicast announcements.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from lab.netns import Host, Lab
from lab.progs.stun import binding_response
from lab.topology import behind_nat
from lab.upnp import MINIUPNPD, Mapping, MiniUPnPd

_ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces); CI runs as root")


def needs_root(f: Any) -> Any:
    return pytest.mark.root(_ROOT_ONLY(f))


MAPPED = re.compile(r"Mapped public port (\d+) protocol UDP to local port (\d+) liftime (\d+)")

UDP_RECV_ONCE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
s.settimeout(5)
data, src = s.recvfrom(100)
print(f"{src[0]}:{src[1]} {data.decode()}", flush=True)
"""

# Multicast to 224.0.0.1 (all hosts) needs no socket membership: the kernel joins that group on every
# multicast-capable interface. An explicit IP_ADD_MEMBERSHIP with INADDR_ANY as the interface picks
# the interface by route lookup and fails with ENODEV in a namespace without a default route, so we
# join by interface index (struct ip_mreqn), which works either way. Binding the group address (not
# 0.0.0.0) delivers only datagrams sent to the group.
ANNOUNCE_LISTENER = """
import json, socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("224.0.0.1", 5350))
mreqn = struct.pack("4s4si", socket.inet_aton("224.0.0.1"), socket.inet_aton("0.0.0.0"),
                    socket.if_nametoindex(sys.argv[1]))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
print("ready", flush=True)
deadline = time.monotonic() + 5
seen = set()
while time.monotonic() < deadline and seen != {"natpmp", "pcp"}:
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        data, src = s.recvfrom(1500)
    except TimeoutError:
        break
    kind = "natpmp" if data[:2] == b"\\x00\\x80" else "pcp" if data[:1] == b"\\x02" else "other"
    seen.add(kind)
    print(json.dumps({"src": f"{src[0]}:{src[1]}", "kind": kind, "hex": data.hex()}), flush=True)
"""


def _readline(p: subprocess.Popen[Any], timeout: float) -> str:
    """One line of a child's stdout, waiting at most `timeout` seconds."""
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    assert ready, "no line from the child in time"
    return str(p.stdout.readline()).strip()


@pytest.fixture
def upnp() -> Iterator[tuple[Lab, Host, Host, Host, MiniUPnPd]]:
    for tool in (MINIUPNPD, shutil.which("natpmpc") or "/usr/bin/natpmpc"):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is missing: tools/install.sh installs Debian miniupnpd-nftables and natpmpc")
    with Lab() as lab:
        host, router, peer = behind_nat(lab)
        with MiniUPnPd(lab, host, router, peer) as server:
            server.start()
            yield lab, host, router, peer, server


def _map_udp(server: MiniUPnPd, internal: int, lifetime: int, public: int | None = None) -> tuple[int, int]:
    public_arg = str(internal if public is None else public)
    out = server.natpmpc("-a", public_arg, str(internal), "udp", str(lifetime))
    m = MAPPED.search(out)
    assert m, out
    assert int(m.group(2)) == internal
    return int(m.group(1)), int(m.group(3))


def test_stun_response_is_rfc5389() -> None:
    txid = bytes(range(12))
    req = struct.pack("!HHI", 1, 8, 0x2112A442) + txid + struct.pack("!HHI", 3, 4, 6)  # CHANGE-REQUEST
    resp = binding_response(req, ("203.0.113.1", 40000))
    assert resp is not None
    mtype, length, cookie = struct.unpack("!HHI", resp[:8])
    assert (mtype, length, cookie, resp[8:20]) == (0x0101, 12, 0x2112A442, txid)
    atype, alen, _, fam, xport = struct.unpack("!HHBBH", resp[20:28])
    addr = bytes(a ^ b for a, b in zip(resp[28:32], struct.pack("!I", 0x2112A442), strict=True))
    assert (atype, alen, fam, xport ^ 0x2112, socket.inet_ntoa(addr)) == (0x20, 8, 1, 40000, "203.0.113.1")
    assert binding_response(b"\x01\x01" + req[2:], ("203.0.113.1", 1)) is None  # not a request
    assert binding_response(req[:12], ("203.0.113.1", 1)) is None  # truncated


@needs_root
def test_natpmpc_gets_public_address(upnp: tuple[Lab, Host, Host, Host, MiniUPnPd]) -> None:
    _lab, _host, router, _peer, server = upnp
    out = server.natpmpc()
    assert f"Public IP address : {router.addr4}" in out, out
    answer = server.external_address()
    assert answer is not None and (answer.result, answer.address) == (0, router.addr4)
    assert "Port forwarding is now enabled" in server.log_text()  # the STUN workaround took effect


@needs_root
def test_mapping_carries_inbound_udp_and_is_deleted(upnp: tuple[Lab, Host, Host, Host, MiniUPnPd]) -> None:
    lab, host, router, peer, server = upnp
    # The peer has no route to the private network: only the mapping can carry the datagram.
    assert lab.run(peer, ["ip", "route", "get", host.addr4], check=False).returncode != 0

    public, lifetime = _map_udp(server, 4500, 3600)
    assert lifetime == 3600
    assert server.list_mappings() == [Mapping("udp", public, host.addr4, 4500)]

    listener = lab.spawn(host, [sys.executable, "-c", UDP_RECV_ONCE, host.addr4, "4500"],
                         stdout=subprocess.PIPE, text=True)
    assert _readline(listener, 10) == "ready"
    lab.run(peer, [sys.executable, "-c", "import socket, sys; s = socket.socket(socket.AF_INET, "
                   "socket.SOCK_DGRAM); s.bind((sys.argv[1], 5555)); s.sendto(b'inbound', (sys.argv[2], "
                   "int(sys.argv[3])))", peer.addr4, router.addr4, str(public)])
    assert _readline(listener, 10) == f"{peer.addr4}:5555 inbound"  # DNAT only: the source is kept
    assert listener.wait(timeout=5) == 0

    _, lifetime = _map_udp(server, 4500, 0, public=public)  # lifetime 0 = delete (RFC 6886 3.4)
    assert lifetime == 0
    assert server.list_mappings() == []


@needs_root
def test_restart_keeps_or_forgets_leases(upnp: tuple[Lab, Host, Host, Host, MiniUPnPd]) -> None:
    _lab, host, router, _peer, server = upnp
    public, _ = _map_udp(server, 4600, 3600)
    mapping = Mapping("udp", public, host.addr4, 4600)
    assert server.list_mappings() == [mapping]

    # A reboot that keeps the lease file: miniupnpd re-installs the mapping from it.
    server.restart(delete_leases=False)
    assert server.list_mappings() == [mapping]

    # A reboot that forgets: answering again, epoch restarted, no mappings.
    server.restart(delete_leases=True)
    answer = server.external_address()
    assert answer is not None and (answer.result, answer.address) == (0, router.addr4)
    assert answer.epoch < 5
    assert server.list_mappings() == []
    assert "--- start 3 ---" in server.log_text()


@needs_root
def test_sigusr1_announces_on_multicast(upnp: tuple[Lab, Host, Host, Host, MiniUPnPd]) -> None:
    lab, host, router, _peer, server = upnp
    listener = lab.spawn(host, [sys.executable, "-c", ANNOUNCE_LISTENER, host.ifname],
                         stdout=subprocess.PIPE, text=True)
    assert _readline(listener, 10) == "ready"
    server.sigusr1()
    out, _ = listener.communicate(timeout=10)
    packets = [json.loads(line) for line in out.splitlines()]
    natpmp = [bytes.fromhex(p["hex"]) for p in packets if p["kind"] == "natpmp"]
    pcp = [bytes.fromhex(p["hex"]) for p in packets if p["kind"] == "pcp"]
    assert natpmp, f"no NAT-PMP announcement: {packets}\n{server.log_text()}"
    ver, op, result, _epoch = struct.unpack("!BBHI", natpmp[0][:8])
    assert (ver, op, result, socket.inet_ntoa(natpmp[0][8:12])) == (0, 128, 0, router.addr4)
    assert pcp and pcp[0][:2] == b"\x02\x80", f"no PCP ANNOUNCE: {packets}"  # version 2, ANNOUNCE response
    assert {p["src"] for p in packets} == {f"{server.gateway}:5351"}
