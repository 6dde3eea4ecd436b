"""What an offload tunnel puts on the wire: a capture of the outer ESP traffic of TCP streams through a
tunnel with TUN segmentation offload on both ends (`[interface] offload = true`), decrypted by tshark
with the key log, shows standard inner packets: IPv6 only, each within the tunnel MTU, and every TCP
segment with a correct checksum (the daemons split the kernel's superpackets into segments and compute
their checksums themselves, so this is an independent check of that code on real traffic).

tshark 4.0 reports `tcp.checksum.status` (with `-o tcp.check_checksum:TRUE`) as a number in `-T fields`
output: 0 Bad, 1 Good, 2 Unverified (what every packet gets when checking is off), as
test_tshark_checksum_status_values shows on two hand-built packets; the capture test requires 1 on every
inner TCP segment, so it fails if the check did not run at all.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.capture import capture, is_esp, udp_payloads
from lab.flows import Blast
from lab.netns import Lab, wait_for
from lab.progs.attack import checksum
from lab.tunnel import Node, peer_status, ping6, running_pair, status

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tcpdump")
        or not shutil.which("tshark"),
        reason="needs root, iproute2, tcpdump and tshark (CI runs as root)"),
]

MTU = 1400  # lab/tunnel.py writes `mtu = 1400` into both configs
NBYTES = 4 * 1024 * 1024  # each way
CSUM_BAD, CSUM_GOOD, CSUM_UNVERIFIED = "0", "1", "2"  # tcp.checksum.status in tshark 4.0 -T fields


def tshark(pcap: Path, uat_lines: list[str], display_filter: str, *fields: str) -> list[list[str]]:
    """tshark's fields for the packets of `pcap` matching the filter, ESP decrypted with the key log's SAs
    and TCP checksums verified."""
    argv = ["tshark", "-n", "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE",
            "-o", "tcp.check_checksum:TRUE"]
    for line in uat_lines:
        argv += ["-o", f"uat:esp_sa:{line}"]
    argv += ["-Y", display_filter, "-T", "fields", "-E", "occurrence=f"]  # the first: the inner header
    for f in fields:
        argv += ["-e", f]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return [line.split("\t") for line in r.stdout.splitlines() if line.strip()]


def _tcp6(payload: bytes, corrupt: bool) -> bytes:
    src, dst = ipaddress.IPv6Address("fd00::1").packed, ipaddress.IPv6Address("fd00::2").packed
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 1, 5 << 4, 0x18, 65535, 0, 0) + payload
    csum = checksum(src + dst + struct.pack("!I3xB", len(tcp), 6) + tcp) ^ (0x5555 if corrupt else 0)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    return struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + src + dst + tcp


def test_tshark_checksum_status_values(tmp_path: Path) -> None:
    """Calibration: the values the capture test relies on, from a good and a corrupted segment."""
    pcap = tmp_path / "checksums.pcap"
    raw = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)  # LINKTYPE_RAW: bare IP packets
    for corrupt in (False, True):
        pkt = _tcp6(b"tunneld", corrupt)
        raw += struct.pack("<IIII", 0, 0, len(pkt), len(pkt)) + pkt
    pcap.write_bytes(raw)
    assert tshark(pcap, [], "tcp", "tcp.checksum.status") == [[CSUM_GOOD], [CSUM_BAD]]
    r = subprocess.run(["tshark", "-n", "-r", str(pcap), "-o", "tcp.check_checksum:FALSE", "-T", "fields",
                        "-e", "tcp.checksum.status"], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.split() == [CSUM_UNVERIFIED, CSUM_UNVERIFIED]


@pytest.fixture
def keylogged_offload_pair(tmp_path: Path) -> Iterator[tuple[Lab, Node, Node, Path]]:
    keys = tmp_path / "a.keys"
    with running_pair(tmp_path, offload=True, a_args=("--keylog", str(keys))) as (lab, a, b):
        # The daemons send the outer datagrams with UDP GSO, and a veth passes such a batch on whole, so
        # tcpdump would see one IPv4/UDP "datagram" of many ESP packets end to end, which tshark cannot
        # take apart. At most one segment per GSO packet makes the kernel segment before the veth (and
        # its tap): the capture then has one ESP packet per datagram, as on a real wire. The inner
        # traffic (the TUN, this test's subject) is unaffected.
        for h in (a.host, b.host):
            lab.ip(h, "link", "set", "dev", h.ifname, "gso_max_segs", "1")
        for n in (a, b):
            st = status(n)
            assert st["offload"] is True, f"offload is off in {n.host.name}: {st['offload_error']}"
        yield lab, a, b, keys


def test_offload_capture_decrypts_to_valid_segments(
        keylogged_offload_pair: tuple[Lab, Node, Node, Path], tmp_path: Path) -> None:
    lab, a, b, keys = keylogged_offload_pair
    pcap = tmp_path / "b-eth0.pcap"
    with capture(lab, b.host, pcap):
        ping6(lab, a, b)  # the handshake
        # A stream each way, so both daemons' segmentation is on the wire (data one way, ACKs the other).
        blasts = [Blast(lab, a, b, port=5001, nbytes=NBYTES), Blast(lab, b, a, port=5002, nbytes=NBYTES)]
        for blast in blasts:
            sent, got = blast.result(timeout=60)
            assert sent["bytes"] == got["bytes"] == NBYTES and sent["sha256"] == got["sha256"]
        # Every ESP packet either side sent is in the capture before tcpdump is stopped (it reads the
        # kernel's ring a block at a time, so the last ones may take a moment).
        for n, peer in ((a, "b"), (b, "a")):
            tx = peer_status(n, peer)["tx_packets"]
            wait_for(lambda n=n, tx=tx: sum(map(is_esp, udp_payloads(pcap, n.host.addr4, 4500))) >= tx,
                     timeout=10, what=f"{n.host.name}'s {tx} ESP packets in the capture")

    uat = keys.read_text().splitlines()
    assert uat, "the key log is empty"
    rows = tshark(pcap, uat, "esp", "frame.protocols", "ipv6.plen", "tcp.len", "tcp.checksum.status",
                  "ipv6.src", "ipv6.dst")
    assert len(rows) > 2 * NBYTES // MTU, f"only {len(rows)} ESP packets"

    segments = {(a.ula, b.ula): 0, (b.ula, a.ula): 0}
    for protocols, plen, tcp_len, csum, src, dst in rows:
        layers = protocols.split(":")
        inner = layers[layers.index("esp") + 1:]
        # Decrypted (else nothing follows "esp"), and IPv6 inside: tunneld carries no inner IPv4.
        assert inner[:1] == ["ipv6"], protocols
        assert "ip" not in inner, protocols
        assert int(plen) + 40 <= MTU, f"inner packet of {int(plen) + 40} bytes > MTU {MTU}: {protocols}"
        if "tcp" in inner:
            assert csum == CSUM_GOOD, f"TCP checksum status {csum!r} (0 bad, 2 unverified): {src} -> {dst}"
            if int(tcp_len) > 0:
                segments[(src, dst)] += 1
    # All of both streams' data is in the capture (the wait above), in segments that carry at most
    # MTU - 40 (IPv6) - 20 (TCP without options) bytes each: at least that many segments a way.
    for (src, dst), count in segments.items():
        assert count >= NBYTES // (MTU - 40 - 20), f"{count} data segments {src} -> {dst}"
