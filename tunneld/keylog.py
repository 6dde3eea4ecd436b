"""Key log for packet captures: one Wireshark `esp_sa` UAT line per security association.

Like SSLKEYLOGFILE for TLS, this lets a user decrypt their own captures (`tshark -o
'uat:esp_sa:<line>'`, or the file copied to Wireshark's esp_sa UAT). It writes key material to a
file on purpose, so it is off unless `--keylog FILE` or TUNNELD_KEYLOG names one. The file is created
0600 and appended to; an existing one is refused if group or others have any access to it, if it is a
symbolic link (O_NOFOLLOW: the path cannot be pointed elsewhere) or not a regular file, or if it is
another user's: keys must not land where others can read them.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from tunneld.crypto.esp import SecurityAssociation

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


class KeyLogError(Exception):
    """The key log cannot be opened safely: one line naming the file and the fix."""


def open_keylog(path: Path) -> int:
    """A descriptor for appending to ``path``, created 0600; KeyLogError if that is not safe."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NOCTTY | os.O_NONBLOCK, 0o600)
    except ValueError:  # a NUL in the path
        raise KeyLogError(f"key log {str(path)!r} is not a path (a NUL byte); give a file name") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            why = "is a symbolic link; give the file's own path"
        elif e.errno == errno.ENOENT:
            why = f"is in a directory that does not exist; create {path.parent} (mode 0700) first"
        elif e.errno == errno.EISDIR:
            why = "is a directory; give a file name"
        elif e.errno == errno.ENXIO:
            why = "is not a regular file; give a file name"
        else:
            why = f"cannot be opened ({e.strerror}); give a file you can write"
        raise KeyLogError(f"key log {path} {why}") from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise KeyLogError(f"key log {path} is not a regular file; give a file name")
        if st.st_uid != os.geteuid():
            raise KeyLogError(f"key log {path} is owned by uid {st.st_uid}, not by this user; give a file "
                              f"of your own")
        if mode & 0o077:
            raise KeyLogError(f"key log {path} has mode {mode:04o}, which lets group or others read the "
                              f"keys; run `chmod 600 {path}` (or remove it) first")
    except BaseException:
        os.close(fd)
        raise
    return fd


class KeyLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = os.fdopen(open_keylog(path), "a", encoding="ascii")

    def log(self, sa: SecurityAssociation, keymat: bytes, ipv6: bool) -> None:
        # Both address families: the outer family can change when the peer roams.
        self._f.write(esp_sa_line(sa, keymat, ipv6))
        self._f.write(esp_sa_line(sa, keymat, not ipv6))
        self._f.flush()

    def close(self) -> None:
        self._f.close()
