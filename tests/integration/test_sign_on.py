"""Issue 14 end to end: three devices joined through serve-dns, each with its namespace's own /etc/hosts and
/etc/ssh/ssh_known_hosts (``ip netns exec`` bind-mounts /etc/netns/NETNS/hosts and /etc/netns/NETNS/ssh
there; each holds a line of the user's). From the laptop, plain ``ssh -o StrictHostKeyChecking=yes`` and
``scp`` reach the desktop BY NAME with no known_hosts prepared by the test: the name comes from the hosts
block, the host key from the known-hosts block, both learned from the account zone. Then the phone stops and
leaves both of the laptop's blocks, and the user's lines survive. The machine's own files are never written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from lab.netns import Host, Lab, wait_for
from lab.sshd import SSHD, Sshd, start_sshd
from lab.topology import STAR_HUB, star
from lab.tunnel import DOMAIN, TUNNELD, Node, joined, names_toml, serve_dns, start, write_secret
from tunneld.marked_block import read_block

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(SSHD).exists() or not shutil.which("dig") or not shutil.which("getent"),
    reason="needs root, sshd, dig and getent")

HUB = STAR_HUB
DNS = (HUB, 5353)
NAMES = ("desktop", "laptop", "phone")
USER_HOSTS = "127.0.0.1 localhost\n10.20.30.40 users-own-printer\n"
USER_KNOWN = "# the user's own line\nprinter.example ssh-ed25519 " \
             "AAAAC3NzaC1lZDI1NTE5AAAAIGRLtUGgOxQOmHsmDO2z9ulCgnNyJlGbBlfYvOaGyUu2\n"
SIZE = 50 * 1024 * 1024


def _etc(h: Host) -> Path:
    return Path("/etc/netns") / h.netns


def _config(host_keys: str) -> str:
    """[names] and [ssh] in the namespace's own /etc (only ever the bind-mounted /etc/netns files)."""
    return ('[names]\nhosts_file = "/etc/hosts"\n\n'
            f'[ssh]\nhost_keys = "{host_keys}"\nknown_hosts = "/etc/ssh/ssh_known_hosts"\n\n')


def _hosts_block(n: Node) -> list[str]:
    return read_block((_etc(n.host) / "hosts").read_text(), DOMAIN) or []


def _known_block(n: Node) -> list[str]:
    return read_block((_etc(n.host) / "ssh" / "ssh_known_hosts").read_text(), DOMAIN) or []


def _key(pub: Path) -> str:
    return " ".join(pub.read_text().split()[:2])


def _ssh_opts(sshd: Sshd) -> list[str]:
    # UserKnownHostsFile=/dev/null: only the global file (the daemon's block) can vouch for the host.
    return ["-i", str(sshd.client_key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10"]


def _ssh(lab: Lab, src: Host, sshd: Sshd, name: str, command: str) -> subprocess.CompletedProcess[str]:
    return lab.run(src, ["ssh", *_ssh_opts(sshd), f"root@{name}", command], check=False, timeout=30)


def test_sign_on_by_name(tmp_path: Path) -> None:
    created: list[Path] = []
    try:
        with Lab() as lab:
            hub, *hosts = star(lab, NAMES)
            for h in hosts:  # before any process starts there: ip netns exec bind-mounts only what exists
                (_etc(h) / "ssh").mkdir(parents=True, exist_ok=False)
                created.append(_etc(h))
                (_etc(h) / "hosts").write_text(USER_HOSTS)
                (_etc(h) / "ssh" / "ssh_known_hosts").write_text(USER_KNOWN)
            secret = tmp_path / "secret"
            write_secret(secret)
            serve_dns(lab, Node(hub, tmp_path / "dns", HUB), secret, tmp_path, DNS)

            # sshd's config and keys stay in its own directory (the namespace's /etc/ssh is the bind mount).
            sshd = start_sshd(lab, hosts[0], [], tmp_path / "sshd")
            phone_keys = tmp_path / "phone-keys"
            phone_keys.mkdir()
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(phone_keys / "ssh_host_ed25519_key")], check=True, timeout=30,
                           capture_output=True)
            host_keys = {"desktop": str(sshd.dir / "host_*.pub"), "laptop": "",
                         "phone": str(phone_keys / "ssh_host_*_key.pub")}
            nodes: dict[str, Node] = {}
            for h, name in zip(hosts, NAMES, strict=True):
                n = joined(lab, h, name, secret, DNS, tmp_path, run=False)
                text = n.config.read_text()
                assert names_toml(n.dir) in text
                n.config.write_text(text.replace(names_toml(n.dir), _config(host_keys[name])))
                start(lab, n)
                nodes[name] = n
            desktop, laptop, phone = (nodes[name] for name in NAMES)
            every = [f"{n.ula} {name}.{DOMAIN} {name}" for name, n in nodes.items()]
            desktop_key = _key(sshd.dir / "host_ed25519.pub")
            phone_key = _key(phone_keys / "ssh_host_ed25519_key.pub")
            keys = [f"desktop.{DOMAIN},desktop,{desktop.ula} {desktop_key}",
                    f"phone.{DOMAIN},phone,{phone.ula} {phone_key}"]

            def learned() -> bool:
                return _hosts_block(laptop) == every and _known_block(laptop) == keys

            try:
                wait_for(learned, timeout=20, what="the laptop's hosts and known-hosts blocks")
            except Exception as e:
                raise AssertionError(f"hosts {_hosts_block(laptop)}, known {_known_block(laptop)}") from e

            # `tunneld hosts` on the laptop shows the desktop's key as `ssh-keygen -l` prints it.
            fingerprint = subprocess.run(["ssh-keygen", "-lf", str(sshd.dir / "host_ed25519.pub")],
                                         check=True, capture_output=True, text=True).stdout.split()[1]
            answer = lab.run(laptop.host, [TUNNELD, "hosts", "--config", str(laptop.config)]).stdout
            assert fingerprint in answer and all(line in answer for line in every), answer

            # ssh by name, short and full, strict, with nothing prepared by the test.
            for name in ("desktop", f"desktop.{DOMAIN}"):
                r = _ssh(lab, laptop.host, sshd, name, "true")
                assert r.returncode == 0, f"ssh {name}: {r.stderr}"
            assert _ssh(lab, laptop.host, sshd, "phone", "true").returncode != 0  # no sshd there

            # scp of 50 MB by name; the desktop's SHA-256 of what arrived matches.
            data = os.urandom(SIZE)
            src, dst = tmp_path / "payload", tmp_path / "received"
            src.write_bytes(data)
            r = lab.run(laptop.host, ["scp", *_ssh_opts(sshd), str(src), f"root@desktop:{dst}"],
                        check=False, timeout=60)
            assert r.returncode == 0, f"scp: {r.stderr}"
            r = _ssh(lab, laptop.host, sshd, "desktop", f"sha256sum {dst}")
            assert r.returncode == 0 and r.stdout.split()[0] == hashlib.sha256(data).hexdigest(), r

            # The phone stops: it leaves both of the laptop's blocks; the desktop stays.
            assert phone.proc is not None
            assert lab.stop(phone.proc) == 0
            wait_for(lambda: _hosts_block(laptop) == [line for line in every if " phone." not in line]
                     and _known_block(laptop) == keys[:1], timeout=20,
                     what="the phone to leave the laptop's hosts and known-hosts blocks")
            assert _ssh(lab, laptop.host, sshd, "desktop", "true").returncode == 0

            # The laptop's daemon crashes: both files keep the user's lines and the last blocks.
            assert laptop.proc is not None
            assert lab.stop(laptop.proc, sig=signal.SIGKILL) == -signal.SIGKILL
            assert _known_block(laptop) == keys[:1] and len(_hosts_block(laptop)) == len(every) - 1

            for n in nodes.values():  # every user line survives every rewrite
                assert (_etc(n.host) / "hosts").read_text().startswith(USER_HOSTS)
                assert (_etc(n.host) / "ssh" / "ssh_known_hosts").read_text().startswith(USER_KNOWN)
            sshd.close()
    finally:
        for directory in created:
            shutil.rmtree(directory, ignore_errors=True)
    # This machine's own files were never the ones written.
    assert "tunneld" not in Path("/etc/hosts").read_text()
    machine_known = Path("/etc/ssh/ssh_known_hosts")
    assert not machine_known.exists() or "tunneld" not in machine_known.read_text()
