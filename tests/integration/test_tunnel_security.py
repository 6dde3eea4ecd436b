"""Attacks on a working tunnel a <-> b between two real hosts (network namespaces, `tunneld up` in each).

Every test starts from a pair that has already exchanged a ping (one pair for the module: each attack
counts from what it found), attacks b, checks that b counted the attack with the counter that names it
(tunneld status: per-peer `dropped_spoofed`, `replayed`, `dropped_inbound`; `counters.rx_malformed`,
`rx_unknown_spi`, `rx_keepalive`, `rx_handshake`, `handshake_drops` by reason), that nothing of the
data-plane attacks reached b's TUN, and ends with a ping a -> b that still works. The attacker's tools
are lab/progs/attack.py, run inside a namespace.

The intruder daemons (a third tunneld) run in a third namespace c, linked to b only: a second tunneld of
the same account cannot run in a's namespace, because both would route the account's /48 to their own
TUN and the kernel refuses the second route (EEXIST).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import progs
from lab.capture import capture, is_esp, udp_payloads
from lab.flows import Blast
from lab.netns import Lab, wait_for
from lab.tunnel import (
    DOMAIN,
    TUNNELD,
    Node,
    names_toml,
    peer_status,
    ping6,
    running_pair,
    start,
    status,
    write_secret,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tcpdump"),
                                reason="needs root, iproute2 and tcpdump (CI runs as root)")

Pair = tuple[Lab, Node, Node]


@contextlib.contextmanager
def working_pair(tmp_path: Path, b_extra: Callable[[Lab, Node, Node], str] | None = None) -> Iterator[Pair]:
    """a <-> b up and pinged; at the end, b must still serve a. `b_extra(lab, a, b)` may add TOML to b's
    config (more peers) before the daemons start."""
    def add_to_b(lab: Lab, a: Node, b: Node) -> None:
        if b_extra is not None:
            b.config.write_text(b.config.read_text() + b_extra(lab, a, b))

    with running_pair(tmp_path, before_start=add_to_b) as (lab, a, b):
        ping6(lab, a, b)
        yield lab, a, b
        # Every attack leaves b serving a.
        ping6(lab, a, b, count=3)
        assert b.proc is not None and b.proc.poll() is None, "b's daemon died"


@pytest.fixture(scope="module")
def shared_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with working_pair(tmp_path_factory.mktemp("pair")) as p:
        yield p


@pytest.fixture
def pair(shared_pair: Pair) -> Iterator[Pair]:
    """The module's working pair (every attack counts from the counters it found), and after each test
    b must still serve a."""
    lab, a, b = shared_pair
    yield shared_pair
    ping6(lab, a, b, count=3)
    assert b.proc is not None and b.proc.poll() is None, "b's daemon died"


# -- helpers ----------------------------------------------------------------------------------------------

def tun_rx_packets(lab: Lab, n: Node, ifname: str = "btmm0") -> int:
    """Packets the daemon wrote into its TUN (the kernel counts them as received on the device)."""
    info = json.loads(lab.ip(n.host, "-j", "-s", "link", "show", ifname))
    return int(info[0]["stats64"]["rx"]["packets"])


def counters(n: Node) -> dict[str, Any]:
    return dict(status(n)["counters"])


def hs_drops(n: Node) -> dict[str, int]:
    return dict(counters(n)["handshake_drops"])


def captured_esp(lab: Lab, a: Node, b: Node, pcap: Path, pings: int = 5) -> list[bytes]:
    """ESP payloads a sent to b while a pinged b `pings` times, captured on b's eth0."""
    with capture(lab, b.host, pcap):
        lab.run(a.host, ["ping", "-6", "-c", str(pings), "-i", "0.05", "-W2", b.ula])
        wait_for(lambda: pcap.exists() and sum(map(is_esp, udp_payloads(pcap, a.host.addr4, 4500))) >= pings,
                 timeout=10, what="the echo requests in the capture")
    return [p for p in udp_payloads(pcap, a.host.addr4, 4500) if is_esp(p)]


def wait_count(delta: Callable[[], int], n: int, what: str) -> None:
    wait_for(lambda: delta() >= n, timeout=10, what=what)


def write_hex(path: Path, payloads: list[bytes]) -> Path:
    path.write_text("".join(p.hex() + "\n" for p in payloads))
    return path


def node_toml(n: Node, secret: Path, ifname: str = "btmm0", peers: tuple[tuple[str, Node], ...] = ()) -> str:
    """A config in lab/tunnel.py's format, with a TUN name of our choice (the intruder's is btmm1)."""
    s = (f'[interface]\nname = "{ifname}"\nlisten_port = {n.port}\nmtu = 1400\n'
         f'state_dir = "{n.dir / "state"}"\ncontrol_socket = "{n.socket}"\n\n'
         + names_toml(n.dir) +
         f'[account]\ndomain = "{DOMAIN}"\nsecret_file = "{secret}"\n')
    for name, other in peers:
        s += f'\n[[peer]]\nname = "{name}"\npublic_key = "{other.public_key}"\n'
        if other.endpoint_host:
            s += f'endpoint = "{other.endpoint_host}:{other.port}"\n'
    return s


def intruder(lab: Lab, b: Node, workdir: Path, secret: Path) -> Node:
    """A third tunneld, x, in namespace c (linked to b only: c 198.51.100.3, b 198.51.100.2, RFC 5737),
    TUN btmm1, port 4501, its own state and control socket, the account's domain and `secret`, with b as
    its peer. Its identity is created; it is not started."""
    c = lab.host("c")
    lab.veth(c, "eth0", b.host, "eth1")
    lab.addr(c, "eth0", "198.51.100.3/24")
    lab.addr(b.host, "eth1", "198.51.100.2/24")
    c.addr4, c.ifname = "198.51.100.3", "eth0"
    x = Node(c, workdir, c.addr4, port=4501)
    x.dir.mkdir(parents=True, exist_ok=True)
    x.config.write_text(node_toml(x, secret, "btmm1"))
    out = lab.run(c, [TUNNELD, "identity", "--config", str(x.config)]).stdout.split()
    x.public_key, x.ula = out[1], out[3]
    b_via_c = Node(b.host, b.dir, "198.51.100.2", public_key=b.public_key, ula=b.ula)
    x.config.write_text(node_toml(x, secret, "btmm1", peers=(("b", b_via_c),)))
    return x


def poke(lab: Lab, src: Node, dst_ula: str) -> None:
    """One ping that only has to make the source's daemon start a handshake; its answer is not needed."""
    lab.run(src.host, ["ping", "-6", "-c1", "-W1", dst_ula], check=False)


# -- the tests ----------------------------------------------------------------------------------------------

def test_spoofed_inner_source_is_dropped(pair: Pair) -> None:
    lab, a, b = pair
    account = ipaddress.IPv6Network(f"{a.ula}/48", strict=False)
    spoofed = [str(account.network_address + 0xBAD1),  # another device of the same account
               b.ula,  # b's own address, reflected
               "2001:db8::1"]  # not a ULA at all
    per_source = 5
    before = peer_status(b, "a")["dropped_spoofed"]
    rx_before = tun_rx_packets(lab, b)
    for src in spoofed:
        # Straight into a's TUN: a's daemon reads it like any packet the kernel routed to it and, having
        # no business policing its own host, seals it to b with a's keys. b must check the inner source.
        progs.run(lab, a.host, "attack", "inject", "btmm0", src, b.ula, "--count", str(per_source))
    expected = before + per_source * len(spoofed)
    wait_for(lambda: peer_status(b, "a")["dropped_spoofed"] >= expected, timeout=10,
             what="b to drop the spoofed packets")
    assert peer_status(b, "a")["dropped_spoofed"] == expected
    assert tun_rx_packets(lab, b) == rx_before, "a spoofed packet reached b's TUN"
    ping6(lab, a, b, count=3)
    assert peer_status(b, "a")["dropped_spoofed"] == expected, "genuine packets counted as spoofed"
    assert tun_rx_packets(lab, b) >= rx_before + 3


def test_replayed_datagrams_are_dropped(pair: Pair, tmp_path: Path) -> None:
    lab, a, b = pair
    esp = captured_esp(lab, a, b, tmp_path / "a2b.pcap")
    assert len(esp) >= 5
    pb = peer_status(b, "a")
    before, endpoint = pb["replayed"], pb["endpoint"]
    rx_before = tun_rx_packets(lab, b)
    # From a's namespace, another port (a's daemon holds 4500): an attacker on a's path.
    report = progs.run(lab, a.host, "attack", "udp", b.host.addr4, "4500",
                       str(write_hex(tmp_path / "esp.hex", esp)), "--repeat", "2")
    assert report["sent"] == 2 * len(esp)
    wait_for(lambda: peer_status(b, "a")["replayed"] >= before + 2 * len(esp), timeout=10,
             what="b to count the replays")
    assert tun_rx_packets(lab, b) == rx_before, "a replayed packet reached b's TUN"
    assert peer_status(b, "a")["endpoint"] == endpoint, "a replay moved b's endpoint for a"


def test_garbage_datagrams_are_counted_and_dropped(pair: Pair, tmp_path: Path) -> None:
    lab, a, b = pair
    esp = captured_esp(lab, a, b, tmp_path / "a2b.pcap", pings=2)
    live_spi = esp[0][:4]  # an SPI b accepts: garbage on it must fail authentication, nothing else
    rnd = random.Random(4500)

    def junk(n: int) -> bytes:
        return bytes(rnd.getrandbits(8) for _ in range(n))

    def nonzero_spi() -> bytes:
        while True:
            spi = junk(4)
            if spi != b"\0\0\0\0" and spi != live_spi:
                return spi

    keepalive = [b"\xff"]
    malformed = [b"", b"\0" * 4, b"\x00", b"\xfe", b"\xff\xff", b"\xff\xff\xff\xff"]
    malformed += [b"\x01" + junk(n - 1) for n in range(2, 9)]  # too short for ESP, not a marker
    control = [b"\0" * n for n in range(5, 9)]  # the marker and 1..4 zero bytes
    control += [b"\0\0\0\0" + bytes([t]) + junk(n) for t in (0, 1, 2, 3, 4, 255) for n in (0, 3, 40, 200)]
    control += [b"\0\0\0\0" + bytes([t]) + b"\0\0\0" + junk(size - 4)  # right lengths, no valid mac1
                for t, size in ((1, 148), (2, 92), (3, 64))]
    unknown_spi = [nonzero_spi() + junk(n) for n in (5, 12, 32, 36, 60, 100, 333, 1000, 1400)]
    unknown_spi += [nonzero_spi() + junk(rnd.randrange(5, 1400)) for _ in range(30)]
    bad_icv = [live_spi + junk(n) for n in (5, 12, 31, 32, 40, 64, 101, 500, 1396)]
    bad_icv += [live_spi + b"\0\0\0\0" + junk(60)]  # sequence number 0
    bad_icv += [live_spi + junk(rnd.randrange(5, 1400)) for _ in range(20)]

    c0, p0 = counters(b), peer_status(b, "a")
    drops0 = sum(c0["handshake_drops"].values())
    rx_before = tun_rx_packets(lab, b)
    groups: list[tuple[str, list[bytes], Any]] = [
        ("keepalive", keepalive, lambda: counters(b)["rx_keepalive"] - c0["rx_keepalive"]),
        ("malformed", malformed, lambda: counters(b)["rx_malformed"] - c0["rx_malformed"]),
        ("control", control, lambda: sum(counters(b)["handshake_drops"].values()) - drops0),
        ("unknown-spi", unknown_spi, lambda: counters(b)["rx_unknown_spi"] - c0["rx_unknown_spi"]),
        ("bad-icv", bad_icv, lambda: peer_status(b, "a")["dropped_inbound"] - p0["dropped_inbound"]),
    ]
    for name, payloads, delta in groups:
        # One group at a time, each waited for, so no socket buffer can overflow and the counts are exact.
        progs.run(lab, a.host, "attack", "udp", b.host.addr4, "4500",
                  str(write_hex(tmp_path / f"{name}.hex", payloads)))
        wait_count(delta, len(payloads), f"b to count the {name} datagrams")
        assert delta() == len(payloads), name

    c1 = counters(b)
    assert c1["rx_handshake"] - c0["rx_handshake"] == len(control)
    total = len(keepalive) + len(malformed) + len(control) + len(unknown_spi) + len(bad_icv)
    assert c1["rx_datagrams"] - c0["rx_datagrams"] >= total
    assert tun_rx_packets(lab, b) == rx_before, "garbage reached b's TUN"
    pb = peer_status(b, "a")
    assert pb["endpoint"] == p0["endpoint"] and pb["handshakes"] == p0["handshakes"]
    assert b.proc is not None and b.proc.poll() is None


def test_handshake_from_unknown_key_is_refused(pair: Pair, tmp_path: Path) -> None:
    lab, a, b = pair
    # The account's own secret: only b's peer list keeps x out.
    x = intruder(lab, b, tmp_path / "x", a.dir.parent / "secret")
    start(lab, x)
    before = hs_drops(b).get("unknown-peer", 0)
    poke(lab, x, b.ula)
    wait_for(lambda: hs_drops(b).get("unknown-peer", 0) > before, timeout=10,
             what="b to refuse the unknown key")
    assert [p["name"] for p in status(b)["peers"]] == ["a"]
    px = peer_status(x, "b")
    assert px["handshakes"] == 0 and px["last_handshake"] is None and px["session_age"] is None
    assert px["rx_bytes"] == 0
    assert status(x)["counters"]["rx_handshake"] == 0, "b answered an unknown key"
    assert x.proc is not None
    lab.stop(x.proc)  # its retries would reach b during the other tests on this pair


@contextlib.contextmanager
def wrong_psk_setup(tmp_path: Path) -> Iterator[tuple[Lab, Node, Node, Node]]:
    """a <-> b working, and x in namespace c: b lists x's key, but x has another account secret."""
    made: list[Node] = []

    def b_lists_x(lab: Lab, a: Node, b: Node) -> str:
        other_secret = tmp_path / "other-secret"
        write_secret(other_secret)  # same domain, another account secret: another PSK
        made.append(intruder(lab, b, tmp_path / "x", other_secret))
        return f'\n[[peer]]\nname = "x"\npublic_key = "{made[0].public_key}"\n'

    with working_pair(tmp_path, b_lists_x) as (lab, a, b):
        x = made[0]
        start(lab, x)
        yield lab, a, b, x


def test_handshake_with_wrong_psk_never_completes(tmp_path: Path) -> None:
    with wrong_psk_setup(tmp_path) as (lab, a, b, x):
        before = hs_drops(b).get("bad-mac1", 0)
        poke(lab, x, b.ula)
        # mac1 is keyed by the account PSK too: b drops x's initiation before any Noise work and does
        # not answer, so x never holds keys and b never gets key confirmation.
        wait_for(lambda: hs_drops(b).get("bad-mac1", 0) > before, timeout=10,
                 what="b to drop x's initiation at mac1")
        assert status(x)["counters"]["rx_handshake"] == 0, "b answered another account's device"
        px = peer_status(x, "b")
        assert px["handshakes"] == 0 and px["last_handshake"] is None and px["session_age"] is None
        assert px["tx_bytes"] == 0 and px["rx_bytes"] == 0
        pbx = peer_status(b, "x")
        assert pbx["handshakes"] == 0 and pbx["last_handshake"] is None, pbx  # not reported as one
        assert pbx["tx_bytes"] == 0 and pbx["tx_packets"] == 0, "b sent data without key confirmation"
        assert pbx["rx_bytes"] == 0 and pbx["session_age"] is None
        ping6(lab, a, b, count=3)  # a <-> b unaffected
        assert peer_status(b, "x")["tx_bytes"] == 0


def test_forged_datagrams_during_traffic_do_not_move_endpoint(pair: Pair, tmp_path: Path) -> None:
    lab, a, b = pair
    esp = captured_esp(lab, a, b, tmp_path / "a2b.pcap", pings=3)
    lab.addr(a.host, "eth0", "192.0.2.99/24")  # the attacker's address, on a's link
    hexfile = write_hex(tmp_path / "esp.hex", esp)
    blast = Blast(lab, a, b, seconds=3)
    wait_for(lambda: peer_status(b, "a")["rx_bytes"] > 5_000_000, timeout=10, what="the stream to flow")
    report = progs.run(lab, a.host, "attack", "udp", b.host.addr4, "4500", str(hexfile),
                       "--src", "192.0.2.99", "--sport", "40000", "--repeat", "2000", "--drain", "0.5")
    sent, got = blast.result()
    assert sent["sha256"] == got["sha256"]
    assert report["received"] == 0, f"b sent {report['received']} datagrams to the attacker"
