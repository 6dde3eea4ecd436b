"""SSH host keys through the account zone: the desktop publishes its sshd's host key (SSHFP + TXT) through
`tunneld serve-dns`, the laptop's daemon writes it into the namespace's own /etc/ssh/ssh_known_hosts, and
plain `ssh -o StrictHostKeyChecking=yes` to the desktop's ULA and name succeeds with no known_hosts prepared
by the test; a rotated host key replaces the old one, a device that leaves leaves the block, and the block
goes when the laptop's daemon stops.

The laptop's /etc/ssh is /etc/netns/NETNS/ssh, which `ip netns exec` bind-mounts over it: the machine's
own /etc/ssh is never written (the lab refuses a config that would)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.netns import Host, Lab, wait_for
from lab.sshd import SSHD, Sshd, start_sshd
from lab.topology import two_hosts
from lab.tunnel import DOMAIN, Node, joined, serve_dns, ssh_toml, start, write_secret

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path(SSHD).exists() or not shutil.which("dig"),
                                reason="needs root, sshd and dig")

DNS = ("192.0.2.2", 5353)
KNOWN = "ssh_known_hosts"


def _ssh_table(host_keys: str, known_hosts: str) -> str:
    return f'[ssh]\nhost_keys = "{host_keys}"\nknown_hosts = "{known_hosts}"\n\n'


def _host_key(sshd: Sshd) -> str:
    return " ".join((sshd.dir / "host_ed25519.pub").read_text().split()[:2])


def _ssh(lab: Lab, src: Host, sshd: Sshd, address: str, alias: str | None = None) -> int:
    alias_opt = ["-o", f"HostKeyAlias={alias}"] if alias else []
    r = lab.run(src, ["ssh", "-6", "-i", str(sshd.client_key), "-o", "BatchMode=yes",
                      "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=/dev/null",
                      "-o", "ConnectTimeout=10", *alias_opt, f"root@{address}", "true"],
                check=False, timeout=30)
    return r.returncode


@pytest.fixture
def netns_ssh() -> Iterator[list[Path]]:
    made: list[Path] = []
    try:
        yield made
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def test_ssh_verified_by_the_account_zone_and_rotation(tmp_path: Path, netns_ssh: list[Path]) -> None:
    with Lab() as lab:
        ha, hb = two_hosts(lab)
        lab.ip(ha, "route", "add", "default", "via", hb.addr4)
        lab.ip(hb, "route", "add", "default", "via", ha.addr4)
        etc = Path("/etc/netns") / ha.netns
        netns_ssh.append(etc)
        (etc / "ssh").mkdir(parents=True)
        (etc / "ssh" / KNOWN).write_text("# the user's own line\n")
        secret = tmp_path / "secret"
        write_secret(secret)
        serve_dns(lab, Node(hb, tmp_path / "dns", hb.addr4), secret, tmp_path, DNS)

        sshd = start_sshd(lab, hb, [], tmp_path / "sshd")
        desktop = joined(lab, hb, "desktop", secret, DNS, tmp_path, run=False)
        desktop.config.write_text(desktop.config.read_text().replace(
            ssh_toml(desktop.dir), _ssh_table(str(sshd.dir / "host_*.pub"), str(desktop.dir / KNOWN))))
        start(lab, desktop)
        laptop = joined(lab, ha, "laptop", secret, DNS, tmp_path, run=False)
        laptop.config.write_text(laptop.config.read_text().replace(
            ssh_toml(laptop.dir), _ssh_table("", f"/etc/ssh/{KNOWN}")))
        start(lab, laptop)

        known = etc / "ssh" / KNOWN
        name = f"desktop.{DOMAIN}"
        wait_for(lambda: _host_key(sshd) in known.read_text(), timeout=20,
                 what="the desktop's host key in the laptop's known-hosts block")
        assert f"{name},desktop,{desktop.ula} {_host_key(sshd)}\n" in known.read_text()
        assert known.read_text().startswith("# the user's own line\n")
        assert _ssh(lab, ha, sshd, desktop.ula) == 0
        assert _ssh(lab, ha, sshd, desktop.ula, alias=name) == 0
        assert _ssh(lab, ha, sshd, desktop.ula, alias="desktop") == 0

        # Rotation: a new host key (start_sshd makes fresh keys), the desktop's daemon restarted.
        old = _host_key(sshd)
        sshd.close()
        sshd = start_sshd(lab, hb, [], tmp_path / "sshd")
        assert _host_key(sshd) != old
        assert _ssh(lab, ha, sshd, desktop.ula) != 0  # strict: the known key is the old one
        assert desktop.proc is not None
        lab.stop(desktop.proc)
        start(lab, desktop)
        wait_for(lambda: _host_key(sshd) in known.read_text() and old not in known.read_text(), timeout=20,
                 what="the rotated host key to replace the old one")
        assert _ssh(lab, ha, sshd, desktop.ula) == 0

        # The desktop leaves (its records withdrawn): its key leaves the laptop's block.
        lab.stop(desktop.proc)
        wait_for(lambda: "desktop" not in known.read_text(), timeout=20,
                 what="the departed desktop's key to leave the block")
        assert "# BEGIN tunneld" not in known.read_text()  # an empty block is no block

        # The laptop's daemon stops: its block goes, the user's line stays.
        assert laptop.proc is not None
        lab.stop(laptop.proc)
        assert known.read_text() == "# the user's own line\n"
        sshd.close()
