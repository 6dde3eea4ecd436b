"""The names writer: line checks, bounded framing, paths fixed at start, and the forked process itself
(uid kept, no capability, no-new-privs, exits when the daemon's end closes)."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from tunneld import blockwriter, privdrop
from tunneld.blockwriter import HOSTS, KNOWN_HOSTS, BlockWriter, check_line, handle
from tunneld.identity import ula_for
from tunneld.marked_block import read_block

DOMAIN = "home.example.net"
KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


@pytest.mark.parametrize(("kind", "line"), [
    (HOSTS, "fd00::a laptop.home.example.net laptop"),
    (HOSTS, "192.0.2.1 a-b.example"),
    (KNOWN_HOSTS, f"laptop.home.example.net,laptop,fd00::a ssh-ed25519 {KEY}"),
    (KNOWN_HOSTS, f"laptop ecdsa-sha2-nistp256 {KEY}"),
])
def test_good_lines_pass(kind: str, line: str) -> None:
    assert check_line(kind, line) == line


@pytest.mark.parametrize(("kind", "line"), [
    (HOSTS, "fd00::a"),
    (HOSTS, "not-an-address laptop"),
    (HOSTS, "fd00::a bad_name"),
    (HOSTS, "fd00::a -x"),
    (HOSTS, "fd00::a a..b"),
    (HOSTS, "fd00::a  laptop"),
    (HOSTS, 5),
    (KNOWN_HOSTS, "laptop ssh-ed25519"),
    (KNOWN_HOSTS, f"laptop ssh-ed25519 {KEY} comment"),
    (KNOWN_HOSTS, f"lap*top ssh-ed25519 {KEY}"),
    (KNOWN_HOSTS, f"@cert-authority ssh-ed25519 {KEY}"),
    (KNOWN_HOSTS, f"laptop SSH-ED25519 {KEY}"),
    (KNOWN_HOSTS, "laptop ssh-ed25519 not!base64"),
    ("passwd", "root:x:0:0::/root:/bin/sh"),
])
def test_bad_lines_are_refused(kind: str, line: object) -> None:
    with pytest.raises(ValueError):
        check_line(kind, line)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Path, str, list[str]]] = []

    def __call__(self, path: Path, domain: str, lines: Sequence[str]) -> bool:
        self.calls.append((path, domain, list(lines)))
        return True


def test_handle_writes_only_the_fixed_path_and_checks_every_line(tmp_path: Path) -> None:
    rec = Recorder()
    paths = {HOSTS: tmp_path / "hosts", blockwriter.CONTROL_SOCKET: tmp_path / "c.sock"}
    ok = handle({"file": HOSTS, "domain": DOMAIN, "lines": ["fd00::a a.home.example.net"]}, paths, rec)
    assert ok == {"ok": True, "changed": True}
    assert rec.calls == [(tmp_path / "hosts", DOMAIN, ["fd00::a a.home.example.net"])]
    for bad in ({"file": KNOWN_HOSTS, "domain": DOMAIN, "lines": []},  # not given at start
                {"file": HOSTS, "domain": DOMAIN, "lines": ["fd00::a a", "x\n127.0.0.1 evil"]},
                {"file": HOSTS, "domain": DOMAIN, "lines": ["fd00::a a"] * (blockwriter.MAX_LINES + 1)},
                {"file": HOSTS, "path": "/etc/passwd", "lines": []},
                {"file": blockwriter.CONTROL_SOCKET, "domain": DOMAIN, "lines": []},  # not a block's file
                ["hosts"]):
        assert "error" in handle(bad, paths, rec), bad
    assert len(rec.calls) == 1



ULA = str(ula_for(DOMAIN, bytes(32)))  # an address of the account's /48


@pytest.mark.parametrize(("kind", "line", "good"), [
    (HOSTS, f"{ULA} laptop.{DOMAIN} laptop", True),
    (HOSTS, f"{ULA} LAPTOP.HOME.EXAMPLE.NET", True),  # names compare in any case
    (HOSTS, f"fd00::a laptop.{DOMAIN}", False),  # another ULA
    (HOSTS, "192.0.2.1 laptop", False),
    (HOSTS, f"{ULA} github.com", False),  # another site's name
    (HOSTS, f"{ULA} evil{DOMAIN}", False),  # a suffix that is not a label boundary
    (KNOWN_HOSTS, f"laptop.{DOMAIN},laptop,{ULA} ssh-ed25519 {KEY}", True),
    (KNOWN_HOSTS, f"github.com ssh-ed25519 {KEY}", False),
    (KNOWN_HOSTS, f"laptop,192.0.2.1 ssh-ed25519 {KEY}", False),
])
def test_with_the_account_only_its_names_and_addresses_pass(kind: str, line: str, good: bool) -> None:
    """What a daemon taken over could otherwise do: pin another site's name or SSH key for every user."""
    check_line(kind, line)  # well-formed either way
    if good:
        assert check_line(kind, line, DOMAIN) == line
    else:
        with pytest.raises(ValueError):
            check_line(kind, line, DOMAIN)


def test_a_writer_for_one_account_refuses_another_domain(tmp_path: Path) -> None:
    rec = Recorder()
    paths = {HOSTS: tmp_path / "hosts"}
    line = f"{ULA} a.{DOMAIN}"
    assert handle({"file": HOSTS, "domain": DOMAIN + ".", "lines": [line]}, paths, rec, DOMAIN)["ok"]
    other = handle({"file": HOSTS, "domain": "example.org", "lines": []}, paths, rec, DOMAIN)
    assert "blocks of home.example.net only" in other["error"]
    assert "not an address of the account" in handle(
        {"file": HOSTS, "domain": DOMAIN, "lines": ["fd00::a a"]}, paths, rec, DOMAIN)["error"]
    assert len(rec.calls) == 1

def test_serve_stops_on_an_oversized_frame_and_at_the_end(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("!I", blockwriter.MAX_REQUEST + 1))
        blockwriter.serve(b, {HOSTS: tmp_path / "hosts"})  # returns: nothing is read past the bound
    a, b = socket.socketpair()
    with b:
        a.close()
        blockwriter.serve(b, {HOSTS: tmp_path / "hosts"})
    assert not (tmp_path / "hosts").exists()


def _status(pid: int) -> dict[str, str]:
    return privdrop.parse_status(Path(f"/proc/{pid}/status").read_text())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the writer drops its capabilities)")
def test_the_forked_writer_keeps_uid_0_without_capabilities(tmp_path: Path) -> None:
    hosts, known = tmp_path / "hosts", tmp_path / "known"
    hosts.write_text("127.0.0.1 localhost\n")
    w = BlockWriter.start({HOSTS: hosts, KNOWN_HOSTS: known})
    try:
        line = "fd00::a laptop.home.example.net laptop"
        assert w.writer(HOSTS)(hosts, DOMAIN, [line]) is True
        assert w.write(HOSTS, DOMAIN, [line]) is False  # unchanged: no write
        assert read_block(hosts.read_text(), DOMAIN) == [line]
        assert hosts.read_text().startswith("127.0.0.1 localhost\n")
        assert w.write(KNOWN_HOSTS, DOMAIN, [f"laptop ssh-ed25519 {KEY}"]) is True
        with pytest.raises(ValueError, match="not ADDRESS NAME"):
            w.write(HOSTS, DOMAIN, ["evil"])
        with pytest.raises(ValueError, match="writes"):
            w.writer(HOSTS)(tmp_path / "other", DOMAIN, [line])
        st = _status(w.pid)
        assert st["Uid"].split() == ["0"] * 4 and int(st["CapEff"], 16) == int(st["CapPrm"], 16) == 0
        assert st["NoNewPrivs"] == "1"
        beyond_stdio = [fd for fd in os.listdir(f"/proc/{w.pid}/fd") if int(fd) > 2]
        assert len(beyond_stdio) == 1, beyond_stdio  # its end of the pair, nothing else
        assert w.write(HOSTS, DOMAIN, []) is True
        assert read_block(hosts.read_text(), DOMAIN) is None
    finally:
        w.close()
    assert not Path(f"/proc/{w.pid}").exists()
    with pytest.raises(OSError):
        w.write(HOSTS, DOMAIN, [])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the writer drops its capabilities)")
def test_the_writer_removes_the_registered_control_socket_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        st = os.stat(path)
        w = BlockWriter.start({blockwriter.CONTROL_SOCKET: path})
        w.control_socket_bound((st.st_dev, st.st_ino))
        w.close()
    assert not path.exists()
    # A socket bound since (another daemon's, a new inode) is left alone.
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        st = os.stat(path)
        w = BlockWriter.start({blockwriter.CONTROL_SOCKET: path})
        w.control_socket_bound((st.st_dev, st.st_ino + 1))
        w.close()
    assert path.exists()
    w = BlockWriter.start({HOSTS: tmp_path / "hosts"})  # no control socket given at fork: none to register
    try:
        with pytest.raises(OSError, match="did not take"):
            w.control_socket_bound((st.st_dev, st.st_ino))
    finally:
        w.close()
    assert path.exists()
