"""SSH host keys in the account zone: OpenSSH public key lines, SSHFP and host-key TXT records.

A device publishes each of its SSH host keys twice under ``NAME.DOMAIN``: as an SSHFP record (RFC 4255,
SHA-256 fingerprints of RFC 6594) for standard tools (``ssh -o VerifyHostKeyDNS``), and as a TXT record
carrying the public key itself (``ssh=ALGORITHM BASE64``), which a known-hosts file needs. A peer accepts a
TXT key only when an SSHFP record of the same RRset owner has its fingerprint. Sans-I/O and pure; every
parser is bounded and raises only :class:`~tunneld.proto.errors.ParseError`. docs/protocol.md ("DNS
records") specifies the TXT form and its bounds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SSHFP
import dns.rdtypes.ANY.TXT
import dns.rrset

from tunneld.proto import records
from tunneld.proto.errors import ParseError

__all__ = [
    "ALGORITHMS",
    "FP_SHA256",
    "MAX_BLOB",
    "MAX_KEYS",
    "MAX_LINE",
    "TXT_PREFIX",
    "HostKey",
    "build",
    "known_hosts_lines",
    "names_to_watch",
    "parse",
    "read_public_key",
]

ALGORITHMS: Final = {"ssh-rsa": 1, "ecdsa-sha2-nistp256": 3, "ssh-ed25519": 4}
"""OpenSSH key type -> SSHFP algorithm number: RSA 1 (RFC 4255 §3.1.1), ECDSA 3 (RFC 6594 §3),
Ed25519 4 (RFC 7479 §2). DSA (2) is not accepted: OpenSSH no longer uses it."""
FP_SHA256: Final = 2
"""SSHFP fingerprint type SHA-256 (RFC 6594 §3): the only one we write or trust (SHA-1 is type 1)."""
MAX_LINE: Final = 4096
"""The longest public key line read (an RSA 8192-bit key line is about 1.4 kB, plus a comment)."""
MAX_BLOB: Final = 1100
"""The longest key blob accepted (RSA up to 8192 bits: 4 + 7 + 4 + 3 + 4 + 1025 octets)."""
MAX_KEYS: Final = 8
"""Host keys published or accepted per device; more TXT keys are refused (a device has 1 to 3)."""
TXT_PREFIX: Final = b"ssh="
"""A host-key TXT record's first string begins with this; other TXT records at ``NAME.DOMAIN`` are ignored."""
_TXT_STRING: Final = 255  # RFC 1035 §3.3.14: a character-string holds at most 255 octets
_MAX_TXT_STRINGS: Final = 8  # 8 * 255 octets hold ssh= + the longest algorithm name + base64(MAX_BLOB)
_ED25519_LEN: Final = 32
_P256_POINT_LEN: Final = 65  # uncompressed point, SEC 1 §2.3.3

_IN: Final = dns.rdataclass.IN
_SSHFP: Final = dns.rdatatype.SSHFP
_TXT: Final = dns.rdatatype.TXT


@dataclass(frozen=True)
class HostKey:
    """One SSH host public key: its OpenSSH type name and its wire blob (RFC 4253 §6.6), checked."""

    algorithm: str
    blob: bytes

    @property
    def sshfp_algorithm(self) -> int:
        return ALGORITHMS[self.algorithm]

    @property
    def fingerprint(self) -> bytes:
        """The SHA-256 of the blob: the SSHFP fingerprint (type 2) of this key."""
        return hashlib.sha256(self.blob).digest()

    @property
    def fingerprint_text(self) -> str:
        """The fingerprint as ``ssh-keygen -l`` shows it: ``SHA256:`` + unpadded base64."""
        return "SHA256:" + base64.b64encode(self.fingerprint).decode("ascii").rstrip("=")

    @property
    def line(self) -> str:
        """``ALGORITHM BASE64``: the key as a known-hosts line carries it (no comment)."""
        return f"{self.algorithm} {base64.b64encode(self.blob).decode('ascii')}"


def _ssh_string(blob: bytes, at: int) -> tuple[bytes, int]:
    if at + 4 > len(blob):
        raise ParseError("hostkey bad blob: truncated")
    (length,) = struct.unpack_from("!I", blob, at)
    end = at + 4 + length
    if end > len(blob):
        raise ParseError("hostkey bad blob: truncated")
    return blob[at + 4:end], end


def _check_blob(algorithm: str, blob: bytes) -> HostKey:
    """The key, if ``blob`` is a well-formed key of ``algorithm`` (the blob names its own algorithm)."""
    if algorithm not in ALGORITHMS:
        raise ParseError(f"hostkey unsupported algorithm: {algorithm[:32]!r}")
    if len(blob) > MAX_BLOB:
        raise ParseError(f"hostkey bad blob: {len(blob)} bytes")
    name, at = _ssh_string(blob, 0)
    if name != algorithm.encode("ascii"):
        raise ParseError("hostkey algorithm mismatch: the blob names another algorithm")
    fields = []
    while at < len(blob):
        value, at = _ssh_string(blob, at)
        fields.append(value)
    if algorithm == "ssh-ed25519":
        ok = len(fields) == 1 and len(fields[0]) == _ED25519_LEN
    elif algorithm == "ecdsa-sha2-nistp256":
        ok = (len(fields) == 2 and fields[0] == b"nistp256" and len(fields[1]) == _P256_POINT_LEN
              and fields[1][0] == 4)
    else:  # ssh-rsa: mpint e, mpint n
        ok = len(fields) == 2 and all(fields) and len(fields[1]) >= 128
    if not ok:
        raise ParseError(f"hostkey bad blob: not a {algorithm} key")
    return HostKey(algorithm, blob)


def _decode(algorithm: str, encoded: bytes) -> HostKey:
    if len(encoded) > (MAX_BLOB + 2) // 3 * 4:
        raise ParseError(f"hostkey bad base64: {len(encoded)} characters")
    try:
        blob = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError("hostkey bad base64: not base64") from None
    if base64.b64encode(blob) != encoded:
        raise ParseError("hostkey bad base64: not canonical")  # one key, one spelling
    return _check_blob(algorithm, blob)


def read_public_key(line: str) -> HostKey:
    """An OpenSSH public key line (``ssh-ed25519 AAAA... comment``) -> HostKey; ParseError if it is not one
    of :data:`ALGORITHMS`, longer than :data:`MAX_LINE`, or its blob does not match its type name."""
    if len(line) > MAX_LINE:
        raise ParseError(f"hostkey line too long: {len(line)} characters")
    parts = line.split()
    if len(parts) < 2 or not line.isascii():
        raise ParseError("hostkey bad line: expected 'ALGORITHM BASE64 [COMMENT]'")
    return _decode(parts[0], parts[1].encode("ascii"))


# -- records -------------------------------------------------------------------------------------------


def _rd_sshfp(key: HostKey) -> dns.rdata.Rdata:
    return dns.rdtypes.ANY.SSHFP.SSHFP(  # type: ignore[no-untyped-call]
        _IN, _SSHFP, key.sshfp_algorithm, FP_SHA256, key.fingerprint)


def _txt_strings(key: HostKey) -> tuple[bytes, ...]:
    text = TXT_PREFIX + key.line.encode("ascii")
    return tuple(text[i:i + _TXT_STRING] for i in range(0, len(text), _TXT_STRING))


def build(domain: str, name: str, keys: Sequence[HostKey], ttl: int) -> list[dns.rrset.RRset]:
    """The SSHFP and TXT RRsets of ``keys`` under ``NAME.DOMAIN`` (none without keys); ValueError for more
    than :data:`MAX_KEYS` keys (peers would refuse them)."""
    unique = list(dict.fromkeys(keys))
    if len(unique) > MAX_KEYS:
        raise ValueError(f"at most {MAX_KEYS} host keys can be published, got {len(unique)}")
    if not unique:
        return []
    owner = records.host_name(domain, name)
    txt = [dns.rdtypes.ANY.TXT.TXT(_IN, _TXT, _txt_strings(k)) for k in unique]
    return [dns.rrset.from_rdata_list(owner, ttl, [_rd_sshfp(k) for k in unique]),
            dns.rrset.from_rdata_list(owner, ttl, txt)]


def names_to_watch(domain: str, name: str) -> list[tuple[dns.name.Name, dns.rdatatype.RdataType]]:
    """The questions that give a device's host keys: SSHFP and TXT at ``NAME.DOMAIN``."""
    owner = records.host_name(domain, name)
    return [(owner, _SSHFP), (owner, _TXT)]


def _txt_key(rdata: dns.rdtypes.ANY.TXT.TXT) -> HostKey | None:
    """The key a host-key TXT carries; None for another TXT; ParseError for a bad host-key TXT."""
    strings = rdata.strings
    if not strings or not strings[0].startswith(TXT_PREFIX):
        return None
    if len(strings) > _MAX_TXT_STRINGS:
        raise ParseError(f"hostkey txt too long: {len(strings)} strings")
    text = b"".join(strings)[len(TXT_PREFIX):]
    algorithm, sep, encoded = text.partition(b" ")
    if not sep or not algorithm.isascii():
        raise ParseError("hostkey bad txt: expected 'ssh=ALGORITHM BASE64'")
    return _decode(algorithm.decode("ascii"), encoded)


def parse(domain: str, name: str,
          rrsets: Iterable[dns.rrset.RRset]) -> tuple[tuple[HostKey, ...], list[str]]:
    """The host keys of device ``name`` among ``rrsets``, and why others were refused.

    A host-key TXT at ``NAME.DOMAIN`` is accepted when its key is well formed (canonical base64, the blob
    naming the same algorithm) and an SSHFP record there has its algorithm number, fingerprint type 2 and
    SHA-256 fingerprint. Each refusal is a ParseError message (``<fixed reason>: <detail>``). At most
    :data:`MAX_KEYS` TXT keys are read; the keys come back sorted by their known-hosts line.
    """
    owner = records.host_name(domain, name)
    prints: set[tuple[int, bytes]] = set()
    texts: list[dns.rdtypes.ANY.TXT.TXT] = []
    for rrset in rrsets:
        if rrset.rdclass != _IN or rrset.name != owner:
            continue
        for rdata in rrset:
            if isinstance(rdata, dns.rdtypes.ANY.SSHFP.SSHFP) and rdata.fp_type == FP_SHA256:
                prints.add((rdata.algorithm, bytes(rdata.fingerprint)))
            elif isinstance(rdata, dns.rdtypes.ANY.TXT.TXT) and rdata not in texts:
                texts.append(rdata)
    keys: dict[str, HostKey] = {}
    refused: list[str] = []
    for rdata in texts:
        try:
            key = _txt_key(rdata)
            if key is None:
                continue
            if len(keys) >= MAX_KEYS:
                raise ParseError(f"hostkey too many: more than {MAX_KEYS} keys at {owner}")
            if (key.sshfp_algorithm, key.fingerprint) not in prints:
                raise ParseError(f"hostkey fingerprint mismatch: no SSHFP at {owner} "
                                 f"for {key.fingerprint_text}")
        except ParseError as e:
            refused.append(str(e))
            continue
        keys[key.line] = key
    return tuple(keys[line] for line in sorted(keys)), refused


def known_hosts_lines(domain: str, name: str, ula: ipaddress.IPv6Address,
                      keys: Iterable[HostKey]) -> list[str]:
    """One known-hosts line per key: ``NAME.DOMAIN,NAME,ULA ALGORITHM BASE64`` (names in lower case, the
    form ssh compares; ``name`` and ``domain`` were checked by :mod:`tunneld.proto.records`)."""
    host = records.host_name(domain, name).to_text(omit_final_dot=True).lower()
    short = records.check_name(name).lower()
    return [f"{host},{short},{ula} {key.line}" for key in keys]
