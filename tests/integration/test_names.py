"""Names: three devices joined through serve-dns each keep the account's block in their namespace's own
/etc/hosts (ip netns exec bind-mounts /etc/netns/NETNS/hosts there), so `getent hosts desktop` works; a
device that stops leaves the others' blocks; the user's own line survives every rewrite and a SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from lab.netns import Host, Lab, wait_for
from lab.topology import STAR_HUB, star
from lab.tunnel import DOMAIN, TUNNELD, Node, joined, names_toml, serve_dns, ssh_toml, start, write_secret
from tunneld.marked_block import read_block

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dig") or not shutil.which("getent"),
                                reason="needs root, dig (bind9-dnsutils) and getent")

HUB = STAR_HUB
DNS = (HUB, 5353)
USER_LINE = "10.20.30.40 users-own-printer\n"
NAMES = ("desktop", "laptop", "phone")


def _hosts_file(h: Host) -> Path:
    return Path("/etc/netns") / h.netns / "hosts"


def _block(n: Node) -> list[str]:
    return read_block(_hosts_file(n.host).read_text(), DOMAIN) or []


def test_names_in_every_namespace_hosts_file(tmp_path: Path) -> None:
    created: list[Path] = []
    try:
        with Lab() as lab:
            hub, *hosts = star(lab, NAMES)
            for h in hosts:  # before any daemon runs: ip netns exec bind-mounts it only if it exists
                _hosts_file(h).parent.mkdir(parents=True, exist_ok=False)
                created.append(_hosts_file(h).parent)
                _hosts_file(h).write_text("127.0.0.1 localhost\n" + USER_LINE)
            secret = tmp_path / "secret"
            write_secret(secret)
            serve_dns(lab, Node(hub, tmp_path / "dns", HUB), secret, tmp_path, DNS)
            nodes: dict[str, Node] = {}
            for h, name in zip(hosts, NAMES, strict=True):
                n = joined(lab, h, name, secret, DNS, tmp_path, run=False)
                text = n.config.read_text()
                assert names_toml(n.dir) in text
                n.config.write_text(text.replace(names_toml(n.dir), '[names]\nhosts_file = "/etc/hosts"\n'
                                                 + ssh_toml(n.dir)))
                start(lab, n)
                nodes[name] = n
            desktop, laptop, phone = (nodes[name] for name in NAMES)
            every = [f"{n.ula} {name}.{DOMAIN} {name}" for name, n in nodes.items()]  # sorted by name

            try:
                wait_for(lambda: all(_block(n) == every for n in nodes.values()), timeout=20,
                         what="each device's hosts block to list all three")
            except Exception as e:
                seen = {name: _hosts_file(n.host).read_text() for name, n in nodes.items()}
                raise AssertionError(f"wanted {every}, the files hold {seen}") from e
            for name in ("desktop", f"desktop.{DOMAIN}"):
                got = lab.run(laptop.host, ["getent", "hosts", name]).stdout.split()
                assert got[0] == desktop.ula and f"desktop.{DOMAIN}" in got, got
            answer = lab.run(laptop.host, [TUNNELD, "hosts", "--config", str(laptop.config)]).stdout
            assert all(line in answer for line in every), answer

            # The phone stops cleanly: its own block goes, and the others drop it.
            assert phone.proc is not None
            assert lab.stop(phone.proc) == 0
            assert read_block(_hosts_file(phone.host).read_text(), DOMAIN) is None
            assert USER_LINE in _hosts_file(phone.host).read_text()
            rest = [line for line in every if " phone." not in line]
            wait_for(lambda: _block(desktop) == rest and _block(laptop) == rest, timeout=20,
                     what="the phone to leave the others' blocks")
            r = lab.run(laptop.host, ["getent", "hosts", "desktop"])
            assert r.stdout.split()[0] == desktop.ula

            # A crash: the block stays, and so does every line of the user.
            assert laptop.proc is not None
            assert lab.stop(laptop.proc, sig=signal.SIGKILL) == -signal.SIGKILL
            text = _hosts_file(laptop.host).read_text()
            assert text.startswith("127.0.0.1 localhost\n" + USER_LINE), text
            assert read_block(text, DOMAIN) == rest
            for n in nodes.values():
                assert USER_LINE in _hosts_file(n.host).read_text()
    finally:
        for directory in created:
            shutil.rmtree(directory, ignore_errors=True)
    # This machine's own /etc/hosts was never the one written.
    assert "tunneld" not in Path("/etc/hosts").read_text()
