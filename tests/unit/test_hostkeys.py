"""SSH host keys as records: reading public key lines, SSHFP/TXT building, strict parsing and verification."""

from __future__ import annotations

import base64
import ipaddress
import random
import shutil
import subprocess
import time
from pathlib import Path

import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SSHFP
import dns.rdtypes.ANY.TXT
import dns.rrset
import pytest

from tunneld.proto import hostkeys
from tunneld.proto.errors import ParseError

DOMAIN = "home.example.net"
ED25519 = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl host")


def _blob(*fields: bytes) -> bytes:
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def _line(algorithm: str, blob: bytes) -> str:
    return f"{algorithm} {base64.b64encode(blob).decode()}"


ECDSA_BLOB = _blob(b"ecdsa-sha2-nistp256", b"nistp256", b"\x04" + bytes(range(64)))
RSA_BLOB = _blob(b"ssh-rsa", b"\x01\x00\x01", b"\x00" + bytes(range(256)))


def test_read_the_three_key_types() -> None:
    key = hostkeys.read_public_key(ED25519)
    assert key.algorithm == "ssh-ed25519" and key.sshfp_algorithm == 4 and len(key.blob) == 51
    assert key.line == ED25519.rsplit(" ", 1)[0]
    assert hostkeys.read_public_key(_line("ecdsa-sha2-nistp256", ECDSA_BLOB)).sshfp_algorithm == 3
    assert hostkeys.read_public_key(_line("ssh-rsa", RSA_BLOB) + " c").sshfp_algorithm == 1


@pytest.mark.parametrize("line", [
    "", "ssh-ed25519", "ssh-dss AAAAB3NzaC1kc3M=", "ssh-ed25519 !!!!",
    "ssh-ed25519 " + "A" * 5000,
    _line("ssh-rsa", _blob(b"ssh-ed25519", bytes(32))),  # the blob names another algorithm
    _line("ssh-ed25519", _blob(b"ssh-ed25519", bytes(31))),
    _line("ssh-ed25519", _blob(b"ssh-ed25519", bytes(32)) + b"x"),
    _line("ecdsa-sha2-nistp256", _blob(b"ecdsa-sha2-nistp256", b"nistp384", b"\x04" + bytes(64))),
    _line("ecdsa-sha2-nistp256", ECDSA_BLOB)[:-2] + "B=",  # padding bits set: not canonical base64
])
def test_bad_lines_are_refused(line: str) -> None:
    with pytest.raises(ParseError):
        hostkeys.read_public_key(line)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_sshfp_matches_ssh_keygen(tmp_path: Path, kind: str) -> None:
    """Known answer: our SSHFP rdata is what `ssh-keygen -r` prints for the same key (type 2 lines)."""
    path = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True, timeout=60)
    key = hostkeys.read_public_key(path.with_suffix(".pub").read_text())
    out = subprocess.run(["ssh-keygen", "-r", "desk", "-f", str(path.with_suffix(".pub"))], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    theirs = [line.split()[3:] for line in out.splitlines() if line.split()[4] == "2"]
    sshfp = hostkeys.build(DOMAIN, "desk", [key], 60)[0]
    ours = [rd.to_text().split() for rd in sshfp]
    assert ours == [[a, t, fp.lower()] for a, t, fp in theirs]


def test_build_and_parse_round_trip() -> None:
    keys = [hostkeys.read_public_key(ED25519), hostkeys.read_public_key(_line("ssh-rsa", RSA_BLOB))]
    rrsets = hostkeys.build(DOMAIN, "Desk", keys, 60)
    assert [r.rdtype for r in rrsets] == [dns.rdatatype.SSHFP, dns.rdatatype.TXT]
    assert str(rrsets[0].name) == "Desk.home.example.net."
    txt = {rd.to_text() for rd in rrsets[1]}
    assert f'"ssh={ED25519.rsplit(" ", 1)[0]}"' in txt
    assert all(len(s) <= 255 for rd in rrsets[1] for s in rd.strings)  # the RSA key spans strings
    parsed, refused = hostkeys.parse(DOMAIN, "desk", rrsets)
    assert refused == [] and sorted(parsed, key=lambda k: k.line) == sorted(keys, key=lambda k: k.line)
    assert hostkeys.build(DOMAIN, "desk", [], 60) == []


def _txt(owner: str, *strings: bytes) -> dns.rrset.RRset:
    rd = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)
    return dns.rrset.from_rdata(owner, 60, rd)


def test_txt_without_its_sshfp_is_refused() -> None:
    good = hostkeys.read_public_key(ED25519)
    other = hostkeys.read_public_key(_line("ecdsa-sha2-nistp256", ECDSA_BLOB))
    sshfp = hostkeys.build(DOMAIN, "desk", [good], 60)[0]
    owner = "desk.home.example.net."
    rrsets = [sshfp, _txt(owner, b"ssh=" + good.line.encode()), _txt(owner, b"ssh=" + other.line.encode()),
              _txt(owner, b"ssh=ssh-ed25519 %%%"), _txt(owner, b"unrelated")]
    keys, refused = hostkeys.parse(DOMAIN, "desk", rrsets)
    assert keys == (good,)
    assert sorted(r.split(":")[0] for r in refused) == ["hostkey bad base64", "hostkey fingerprint mismatch"]


def test_sha1_sshfp_and_other_owners_do_not_vouch() -> None:
    key = hostkeys.read_public_key(ED25519)
    sha1 = dns.rdtypes.ANY.SSHFP.SSHFP(dns.rdataclass.IN, dns.rdatatype.SSHFP, 4, 1,  # type: ignore[no-untyped-call]
                                       key.fingerprint[:20])
    owner = "desk.home.example.net."
    elsewhere = hostkeys.build(DOMAIN, "laptop", [key], 60)
    keys, refused = hostkeys.parse(DOMAIN, "desk", [dns.rrset.from_rdata(owner, 60, sha1), *elsewhere,
                                                    _txt(owner, b"ssh=" + key.line.encode())])
    assert keys == () and len(refused) == 1 and refused[0].startswith("hostkey fingerprint mismatch")


def test_too_many_keys() -> None:
    blobs = [_blob(b"ssh-ed25519", bytes([i]) * 32) for i in range(hostkeys.MAX_KEYS + 1)]
    keys = [hostkeys.read_public_key(_line("ssh-ed25519", b)) for b in blobs]
    with pytest.raises(ValueError):
        hostkeys.build(DOMAIN, "desk", keys, 60)
    owner = "desk.home.example.net."
    rrsets = [*hostkeys.build(DOMAIN, "desk", keys[:-1], 60), *hostkeys.build(DOMAIN, "desk", keys[-1:], 60)]
    accepted, refused = hostkeys.parse(DOMAIN, "desk", rrsets)
    assert len(accepted) == hostkeys.MAX_KEYS and refused[0].startswith("hostkey too many")
    assert str(rrsets[0].name) == owner


def test_known_hosts_lines() -> None:
    key = hostkeys.read_public_key(ED25519)
    ula = ipaddress.IPv6Address("fd00::1")
    assert hostkeys.known_hosts_lines(DOMAIN, "Desk", ula, [key]) == [
        f"desk.home.example.net,desk,fd00::1 {key.line}"]


def test_names_to_watch() -> None:
    assert [(str(n), t) for n, t in hostkeys.names_to_watch(DOMAIN, "desk")] == [
        ("desk.home.example.net.", dns.rdatatype.SSHFP), ("desk.home.example.net.", dns.rdatatype.TXT)]


def test_fuzz_txt_parser() -> None:
    """10k mutated host-key TXT records: only ParseError refusals, never another exception (< 10 s)."""
    rng = random.Random(14)
    key = hostkeys.read_public_key(ED25519)
    sshfp = hostkeys.build(DOMAIN, "desk", [key], 60)[0]
    seed = b"ssh=" + key.line.encode()
    start = time.monotonic()
    for _ in range(10_000):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                del data[min(pos, len(data) - 1)]
            elif op == 1:
                data.insert(pos, rng.randrange(256))
            elif data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
        strings = [bytes(data[i:i + 255]) for i in range(0, max(len(data), 1), 255)]
        keys, refused = hostkeys.parse(DOMAIN, "desk", [sshfp, _txt("desk.home.example.net.", *strings)])
        assert keys in ((), (key,)) and len(refused) <= 1
    assert time.monotonic() - start < 10
