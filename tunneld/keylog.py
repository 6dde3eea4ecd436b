"""Key log for packet captures: one Wireshark `esp_sa` UAT line per security association.

Like SSLKEYLOGFILE for TLS, this lets a user decrypt their own captures (`tshark -o
'uat:esp_sa:<line>'`, or the file copied to Wireshark's esp_sa UAT). It writes key material to a
file on purpose, so it is off unless `--keylog FILE` or TUNNELD_KEYLOG names one; the file is
created 0600 and lines are appended.
"""

from __future__ import annotations

import os
from pathlib import Path

from crypto.esp import SecurityAssociation

# Wireshark's names for the ESP encryption algorithms (epan/dissectors/packet-ipsec.c).
_WIRESHARK_ALGO = {
    "aes-128-gcm": "AES-GCM with 16 octet ICV [RFC4106]",
    "aes-256-gcm": "AES-GCM with 16 octet ICV [RFC4106]",
    "chacha20-poly1305": "ChaCha20 with Poly1305 [RFC7634]",
}


def esp_sa_line(sa: SecurityAssociation, keymat: bytes, ipv6: bool) -> str:
    """Protocol, source, destination, SPI, algorithm, key, authentication, authentication key."""
    family = "IPv6" if ipv6 else "IPv4"
    return (f'"{family}","*","*","0x{sa.spi:08x}","{_WIRESHARK_ALGO[sa.suite.name]}",'
            f'"0x{keymat.hex()}","NULL",""\n')


class KeyLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._f = os.fdopen(fd, "a", encoding="ascii")

    def log(self, sa: SecurityAssociation, keymat: bytes, ipv6: bool) -> None:
        # Both address families: the outer family can change when the peer roams.
        self._f.write(esp_sa_line(sa, keymat, ipv6))
        self._f.write(esp_sa_line(sa, keymat, not ipv6))
        self._f.flush()

    def close(self) -> None:
        self._f.close()
