"""Our host keys from the [ssh] glob, and the peers' keys in the known-hosts block (tmp files only)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import trio

from tunneld.proto import hostkeys
from tunneld.services.hostkeys import KnownHostsService, load_host_keys

DOMAIN = "home.example.net"
LINE_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl root@desk"
LINE_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGRLtUGgOxQOmHsmDO2z9ulCgnNyJlGbBlfYvOaGyUu2"
KEY_A, KEY_B = hostkeys.read_public_key(LINE_A), hostkeys.read_public_key(LINE_B)
ULA = ipaddress.IPv6Address("fd12:3456:789a::1")
USER = f"# the user's own line\nother.example {LINE_B}\n"


def test_load_host_keys_skips_bad_files_and_duplicates(tmp_path: Path) -> None:
    (tmp_path / "ssh_host_ed25519_key.pub").write_text(LINE_A + "\n")
    (tmp_path / "ssh_host_rsa_key.pub").write_text("garbage\n")
    (tmp_path / "ssh_host_zz_key.pub").write_text(LINE_A + "\n")
    (tmp_path / "ssh_host_ecdsa_key.pub").write_bytes(b"\xff\xfe")
    assert load_host_keys(str(tmp_path / "ssh_host_*_key.pub")) == [KEY_A]
    assert load_host_keys(None) == [] and load_host_keys(str(tmp_path / "none*.pub")) == []


def test_block_follows_peers_and_keeps_the_users_lines(tmp_path: Path) -> None:
    path = tmp_path / "ssh_known_hosts"
    path.write_text(USER)
    service = KnownHostsService(path, DOMAIN)
    service.learned("Desk", ULA, (KEY_A,))
    text = path.read_text()
    assert text.startswith(USER)
    assert f"desk.home.example.net,desk,{ULA} {KEY_A.line}\n" in text
    service.learned("Desk", ULA, (KEY_B,))  # a rotated key replaces the old one
    assert KEY_A.line not in path.read_text() and KEY_B.line in path.read_text()
    writes = service.writes
    service.learned("desk", ULA, (KEY_B,))
    assert service.writes == writes  # nothing changed: no write
    assert service.fingerprints() == [{"name": "desk", "algorithm": "ssh-ed25519",
                                       "fingerprint": KEY_B.fingerprint_text}]
    service.gone("DESK")
    assert path.read_text() == USER and service.fingerprints() == []


def test_run_removes_the_block_when_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "ssh_known_hosts"
    path.write_text(USER)

    async def main() -> None:
        service = KnownHostsService(path, DOMAIN)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            service.learned("desk", ULA, (KEY_A,))
            assert KEY_A.line in path.read_text()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert path.read_text() == USER


def test_an_unwritable_file_is_logged_not_raised(tmp_path: Path) -> None:
    service = KnownHostsService(tmp_path / "missing-dir" / "known", DOMAIN)
    service.learned("desk", ULA, (KEY_A,))
    assert service.writes == 0 and service.status()["lines"]


def test_host_records_carry_our_host_keys() -> None:
    from tunneld.services.publisher import host_records

    rrsets = host_records("desk", DOMAIN, bytes(range(32)), "192.0.2.7:4500", host_keys=[KEY_A, KEY_B])
    keys, refused = hostkeys.parse(DOMAIN, "desk", rrsets)
    assert refused == [] and set(keys) == {KEY_A, KEY_B}
    assert hostkeys.parse(DOMAIN, "desk", host_records("desk", DOMAIN, bytes(range(32)), None)) == ((), [])
