"""A device that joined with `--tls` publishes its records over DNS over TLS (RFC 7858) to `serve-dns
--tls`: the records land, no DNS UPDATE crosses the wire in clear (tcpdump on the device's link, read by
tshark), and its name appears in no packet to or from the TLS port. The watcher's long-lived queries still
go over UDP (issue 17: DNS Push over TLS is what replaces them), so the capture is checked for UPDATEs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.capture import capture
from lab.netns import Lab, wait_for
from lab.topology import two_hosts
from lab.tunnel import DOMAIN, Node, dig, joined, serve_dns, write_secret

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "dig", "tcpdump", "tshark")),
    reason="needs root, iproute2, dig, tcpdump and tshark",
)

NAME = "quietlaptop"


def test_a_tls_device_publishes_without_an_update_in_clear(tmp_path: Path) -> None:
    with Lab() as lab:
        ha, hb = two_hosts(lab)
        lab.ip(ha, "route", "add", "default", "via", hb.addr4)  # a public address to publish
        secret = tmp_path / "secret"
        write_secret(secret)
        dns_at = (hb.addr4, 53)
        serve_dns(lab, Node(hb, tmp_path / "dns", hb.addr4), secret, tmp_path, dns_at, tls=True)
        pcap = tmp_path / "a.pcap"
        with capture(lab, ha, pcap, bpf=f"host {hb.addr4}"):
            joined(lab, ha, NAME, secret, dns_at, tmp_path, tls=True)
            wait_for(lambda: bool(dig(lab, ha, dns_at, "AAAA", f"{NAME}.{DOMAIN}", secret)), timeout=20,
                     what="the AAAA record published over TLS")
            # tcpdump writes each packet as it comes (-U): the TLS exchange is in the file before we stop it
            wait_for(lambda: bool(_tls_payload(pcap)[0]), timeout=10, what="the TLS packets in the capture")
        r = subprocess.run(["tshark", "-n", "-r", str(pcap), "-T", "fields", "-e", "tcp.dstport",
                            "-e", "udp.dstport", "-e", "dns.flags.opcode", "-d", "tcp.port==853,tls"],
                           capture_output=True, text=True, timeout=60, check=True)
        rows = [line.split("\t") for line in r.stdout.splitlines()]
        assert any(row[0] == "853" for row in rows), "nothing went to the TLS port"
        assert not any(row[2] == "5" for row in rows), "a DNS UPDATE (opcode 5) crossed in clear"
        payload, text = _tls_payload(pcap)
        assert payload and NAME.encode() not in payload and NAME.encode().hex() not in text


def _tls_payload(pcap: Path) -> tuple[bytes, str]:
    """The TCP payload bytes to and from port 853 in the capture so far, and tshark's text of them."""
    r = subprocess.run(["tshark", "-n", "-r", str(pcap), "-Y", "tcp.port == 853", "-T", "fields",
                        "-e", "tcp.payload"], capture_output=True, text=True, timeout=60, check=False)
    return bytes.fromhex("".join(r.stdout.split())), r.stdout
