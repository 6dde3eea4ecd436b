"""The namespace lab itself: topologies carry traffic, and everything is removed even on failure."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest

from lab.netns import Lab, LabError, list_namespaces, wait_for
from lab.topology import behind_nat, two_hosts

pytestmark = pytest.mark.skipif(
    not (shutil.which("ip") and shutil.which("nft")) or __import__("os").geteuid() != 0,
    reason="needs root, iproute2 and nftables (CI runs as root)",
)

UDP_ECHO_ONCE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
print("ready", flush=True)
s.settimeout(10)
data, src = s.recvfrom(100)
print(f"{src[0]}:{src[1]} {data.decode()}", flush=True)
s.sendto(b"echo:" + data, src)
"""

UDP_CLIENT = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.bind(("0.0.0.0", 40000))
s.sendto(b"hello", ("203.0.113.2", 9999))
print(s.recvfrom(100)[0].decode())
"""


def test_two_hosts_ping_both_families() -> None:
    with Lab() as lab:
        a, b = two_hosts(lab)
        lab.run(a, ["ping", "-c1", "-W2", b.addr4])
        lab.run(b, ["ping", "-6", "-c1", "-W2", a.addr6])
        names = [h.netns for h in (a, b)]
        assert set(names) <= set(list_namespaces(lab.id))
    assert list_namespaces(lab.id) == []


def test_nat_translates_and_blocks_unsolicited() -> None:
    with Lab() as lab:
        host, router, peer = behind_nat(lab)
        server = lab.spawn(peer, [sys.executable, "-c", UDP_ECHO_ONCE], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        out = lab.run(host, [sys.executable, "-c", UDP_CLIENT]).stdout.strip()
        assert out == "echo:hello"
        seen = server.stdout.readline().strip()
        assert seen == f"{router.addr4}:40000 hello", "the peer must see the router's address"
        assert server.wait(timeout=5) == 0
        # No route back: the public peer cannot reach the private host directly.
        r = lab.run(peer, ["ping", "-c1", "-W1", host.addr4], check=False)
        assert r.returncode != 0


def test_cleanup_on_exception_kills_processes_and_namespaces() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab(stop_timeout=0.5) as lab:
        a, _ = two_hosts(lab)
        # A process that ignores SIGTERM: teardown must escalate to SIGKILL by PID (after 0.5 s, not 5).
        p = lab.spawn(a, [sys.executable, "-c",
                          "import signal,time,sys; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                          "print('up', flush=True); time.sleep(600)"],
                      stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        raise RuntimeError("boom")
    assert p.returncode == -signal.SIGKILL
    assert list_namespaces(lab.id) == []


def test_wait_for_is_bounded() -> None:
    with pytest.raises(LabError, match="timed out"):
        wait_for(lambda: False, timeout=0.1, what="nothing")
