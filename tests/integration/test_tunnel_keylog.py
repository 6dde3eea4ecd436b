"""The key log (`tunneld up --keylog FILE`, or TUNNELD_KEYLOG): a capture of the tunnel decrypts in tshark
with nothing but the logged lines, and the files are private (0600)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.capture import capture, is_esp, udp_payloads
from lab.netns import Lab, wait_for
from lab.tunnel import Node, ping6, running_pair

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tcpdump") or not shutil.which("tshark"),
    reason="needs root, iproute2, tcpdump and tshark (CI runs as root)")

PINGS = 4


@pytest.fixture
def keylogged_pair(tmp_path: Path) -> Iterator[tuple[Lab, Node, Node, Path, Path]]:
    keys_a, keys_b = tmp_path / "a.keys", tmp_path / "b.keys"
    # Both ways of asking for it: the option for a, the environment for b.
    with running_pair(tmp_path, a_args=("--keylog", str(keys_a)), b_env={"TUNNELD_KEYLOG": str(keys_b)}) \
            as (lab, a, b):
        yield lab, a, b, keys_a, keys_b


def tshark_fields(pcap: Path, uat_lines: list[str], display_filter: str, *fields: str) -> list[list[str]]:
    # One `-o uat:esp_sa:...` per SA: tshark appends each to the table. tshark 4.0 cannot check the ICV
    # with extended sequence numbers (tunneld always uses them), so this checks decryption only.
    argv = ["tshark", "-n", "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE"]
    for line in uat_lines:
        argv += ["-o", f"uat:esp_sa:{line}"]
    argv += ["-Y", display_filter, "-T", "fields"]
    for f in fields:
        argv += ["-e", f]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return [line.split("\t") for line in r.stdout.splitlines() if line.strip()]


def test_capture_decrypts_with_the_keylog(keylogged_pair: tuple[Lab, Node, Node, Path, Path],
                                          tmp_path: Path) -> None:
    lab, a, b, keys_a, keys_b = keylogged_pair
    pcap = tmp_path / "b-eth0.pcap"
    with capture(lab, b.host, pcap):
        ping6(lab, a, b)  # the handshake, then the first answered echo
        lab.run(a.host, ["ping", "-6", "-c", str(PINGS), "-i", "0.05", "-W2", b.ula])
        wait_for(lambda: pcap.exists() and sum(map(is_esp, udp_payloads(pcap, a.host.addr4, 4500))) > PINGS,
                 timeout=10, what="the echo requests in the capture")

    for f in (keys_a, keys_b):
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode == 0o600, f"{f.name} has mode {mode:04o}"
    lines_a = keys_a.read_text().splitlines()
    lines_b = keys_b.read_text().splitlines()
    assert lines_a and lines_b
    assert all(line.startswith(('"IPv4",', '"IPv6",')) for line in lines_a + lines_b)

    # Without keys the inner packets are invisible...
    assert tshark_fields(pcap, [], "icmpv6", "ipv6.src") == []
    # ...with either side's log alone (each logs both directions), and with both, they appear.
    for uat in (lines_a, lines_b, lines_a + lines_b):
        requests = tshark_fields(pcap, uat, "esp && icmpv6.type == 128", "ipv6.src", "ipv6.dst")
        # The outer packets are IPv4, so ipv6.src/dst are the inner header's.
        assert [a.ula, b.ula] in requests, requests
        assert sum(r == [a.ula, b.ula] for r in requests) >= PINGS + 1
        replies = tshark_fields(pcap, uat, "esp && icmpv6.type == 129", "ipv6.src", "ipv6.dst")
        assert sum(r == [b.ula, a.ula] for r in replies) >= PINGS + 1
