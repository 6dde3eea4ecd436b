"""The shipped units under a real systemd (PID 1 of namespaces of its own, lab.systemd): `systemctl start`
returns only once the daemon said READY=1; the daemon runs as the tunneld user with CAP_NET_ADMIN alone,
no-new-privs and the unit's seccomp filter; the account secret arrives as a credential; the /etc/hosts block
is written through the unit's ReadWritePaths; nothing is logged at warning or above on a normal start; a stop
removes the block. tunneld-dns.service runs serve-dns as a transient user with no capability left once
port 53 is bound, and answers, over DNS over TLS too. Only ExecStart's path is changed (to this checkout's
tunneld)."""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.netns import wait_for
from lab.systemd import SYSTEMD, Booted, booted
from tunneld.crypto.noise import generate_keypair
from tunneld.marked_block import read_block
from tunneld.privdrop import parse_status

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not SYSTEMD.exists() or not shutil.which("nsenter")
                       or not shutil.which("dig"), reason="needs root, systemd, nsenter and dig"),
]

ROOT = Path(__file__).resolve().parents[2]
TUNNELD = Path(sys.executable).parent / "tunneld"
DOMAIN = "units.example.net"
CAP_NET_ADMIN = 1 << 12


def unit(name: str) -> str:
    text = (ROOT / "dist" / "systemd" / name).read_text()
    assert text.count("/usr/bin/tunneld ") == 1, name
    return text.replace("/usr/bin/tunneld ", f"{TUNNELD} ")


def process(b: Booted, unit_name: str) -> dict[str, str]:
    """/proc/PID/status of the unit's main process (its PID as the contained systemd sees it)."""
    pid = b.show(unit_name, "MainPID")
    return parse_status(b.run(["cat", f"/proc/{pid}/status"]).stdout)


@pytest.mark.skipif(ROOT.is_relative_to("/tmp") or ROOT.is_relative_to("/var/tmp"),
                    reason="the units' PrivateTmp= hides a checkout under /tmp from the services they start")
def test_both_units_start_drop_their_rights_and_stop_cleanly(tmp_path: Path) -> None:
    """The journey of README's 'Install as a service', under systemd: start, status, stop."""
    try:
        pwd.getpwnam("tunneld")
    except KeyError:
        pytest.skip("no tunneld user (tools/install.sh creates it)")
    made = subprocess.run([str(TUNNELD), "account", "new", DOMAIN], capture_output=True, check=True,
                          timeout=30)
    secret_line = made.stdout.splitlines()[0] + b"\n"  # line 1, as the README tells a user to keep it
    (tmp_path / "secret").write_bytes(secret_line)
    (tmp_path / "secret").chmod(0o600)
    ca_pem = subprocess.run([str(TUNNELD), "account", "ca", DOMAIN, "--secret-file",
                             str(tmp_path / "secret")], capture_output=True, check=True, timeout=30).stdout
    _, peer_key = generate_keypair()
    config = (f'[account]\ndomain = "{DOMAIN}"\nname = "box"\nsecret_file = "/etc/tunneld/secret"\n\n'
              f'[[peer]]\nname = "desk"\npublic_key = "{base64.b64encode(peer_key).decode()}"\n')
    files = {
        "tunneld/tunneld.toml": (config.encode(), 0o644),
        "tunneld/secret": (secret_line, 0o600),
        "tunneld/dns.env": (f"TUNNELD_ZONE={DOMAIN}\nTUNNELD_DNS_LISTEN=127.0.0.1:53\n"
                            "TUNNELD_DNS_ARGS=--tls\n".encode(), 0o644),
        "tunneld/account-ca.pem": (ca_pem, 0o644),
        "hosts": (b"127.0.0.1 localhost\n# a line of the admin's\n", 0o644),
    }
    units = {n: unit(n) for n in ("tunneld.service", "tunneld-dns.service")}
    with booted(tmp_path / "sd", files, units, keep=(ROOT, Path(sys.prefix))) as b:
        # Type=notify: start returns once READY=1 came (or fails the unit); no sleep needed after it.
        b.run(["systemctl", "start", "tunneld.service", "tunneld-dns.service"], timeout=60)
        assert b.show("tunneld.service", "ActiveState") == "active"
        assert b.show("tunneld.service", "StatusText") == "up, 0 of 1 peers with a session"
        st = process(b, "tunneld.service")
        tunneld = pwd.getpwnam("tunneld")
        assert st["Uid"].split() == [str(tunneld.pw_uid)] * 4, st["Uid"]
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == CAP_NET_ADMIN, st
        assert int(st["CapAmb"], 16) == 0 and st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st
        hosts = b.run(["cat", "/etc/hosts"]).stdout
        assert "# a line of the admin's" in hosts
        names = {line.split()[1] for line in read_block(hosts, DOMAIN) or []}
        assert names == {f"box.{DOMAIN}", f"desk.{DOMAIN}"}, hosts
        warnings = b.run(["journalctl", "-u", "tunneld.service", "-p", "warning", "-o", "cat", "--no-pager"])
        assert warnings.stdout.strip() in ("", "-- No entries --"), warnings.stdout

        assert b.show("tunneld-dns.service", "ActiveState") == "active"
        dns = process(b, "tunneld-dns.service")
        assert dns["Uid"].split()[0] not in ("0", str(tunneld.pw_uid)), dns["Uid"]  # DynamicUser
        assert int(dns["CapEff"], 16) == int(dns["CapPrm"], 16) == int(dns["CapAmb"], 16) == 0, dns
        assert dns["NoNewPrivs"] == "1" and dns["Seccomp"] == "2", dns

        def answers() -> bool:
            r = b.run(["dig", "+short", "+time=1", "+tries=1", "@127.0.0.1", "SOA", DOMAIN], check=False)
            return r.stdout.startswith(f"ns.{DOMAIN}. ")

        wait_for(answers, 10, interval=0.2, what="tunneld-dns to answer SOA")
        # DNS over TLS on port 853 under the unit's sandbox (the leaf's key goes through a memfd), verified
        # against the account CA by the zone's name.
        tls = b.run(["dig", "+short", "+time=2", "+tries=1", "+tls", "+tls-ca=/etc/tunneld/account-ca.pem",
                     f"+tls-hostname={DOMAIN}", "-p", "853", "@127.0.0.1", "SOA", DOMAIN], check=False)
        assert tls.stdout.startswith(f"ns.{DOMAIN}. "), (tls.stdout, tls.stderr)

        b.run(["systemctl", "stop", "tunneld.service"], timeout=30)
        assert b.show("tunneld.service", "ActiveState") == "inactive"
        assert b.show("tunneld.service", "Result") == "success"
        hosts = b.run(["cat", "/etc/hosts"]).stdout
        assert read_block(hosts, DOMAIN) is None and "# a line of the admin's" in hosts
