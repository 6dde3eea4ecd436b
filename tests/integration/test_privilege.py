"""Least privilege, in namespaces: `tunneld up` started as root runs as the tunneld user with CAP_NET_ADMIN
alone and no-new-privs, its names writer keeps uid 0 with no capability, and the tunnel still works through
a rekey and a network change; serve-dns binds port 53 and runs as tunneld with nothing, and updates still
land; the control socket lets the group read status but not rebind, and tells anyone else how to get in."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.netns import Lab, wait_for
from lab.tunnel import DOMAIN, TUNNELD, Node, dig, peer_status, ping6, running_pair, serve_dns, status
from tests.helpers import SHORT_TIMERS
from tunneld.marked_block import read_block
from tunneld.privdrop import parse_status

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dig") or not shutil.which("setpriv"),
                       reason="needs root, dig (bind9-dnsutils) and setpriv"),
]

CAP_NET_ADMIN = 1 << 12
NOBODY = 65534
DNS = ("192.0.2.2", 53)


def _ids() -> tuple[int, int]:
    try:
        return pwd.getpwnam("tunneld").pw_uid, grp.getgrnam("tunneld").gr_gid
    except KeyError:
        pytest.skip("no tunneld user and group (tools/install.sh creates them)")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A work directory the tunneld user and the group's clients can traverse (pytest's tmp_path is
    root's alone)."""
    with tempfile.TemporaryDirectory(prefix="tunneld-priv-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def _proc(pid: int) -> dict[str, str]:
    return parse_status(Path(f"/proc/{pid}/status").read_text())


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _publishing(servers: list[subprocess.Popen[Any]]) -> Callable[[Lab, Node, Node], None]:
    """serve-dns in b (port 53, database in a directory it creates, appended to `servers`), and a
    publishing to it."""
    def before_start(lab: Lab, a: Node, b: Node) -> None:
        work = a.dir.parent
        servers.append(serve_dns(lab, b, work / "secret", work, DNS, db=work / "dns" / "dns.sqlite"))
        a.config.write_text(a.config.read_text().replace(
            "[account]\n", f'[account]\nserver = "{DNS[0]}:{DNS[1]}"\nname = "a"\n'))
    return before_start


def test_up_and_serve_dns_drop_privileges_and_still_work(open_dir: Path) -> None:
    uid, gid = _ids()
    servers: list[subprocess.Popen[Any]] = []
    with running_pair(open_dir, extra=SHORT_TIMERS, before_start=_publishing(servers)) as (lab, a, b):
        assert a.proc is not None
        daemon = _proc(a.proc.pid)
        assert daemon["Uid"].split() == [str(uid)] * 4 and daemon["Gid"].split() == [str(gid)] * 4
        assert int(daemon["CapEff"], 16) == int(daemon["CapPrm"], 16) == CAP_NET_ADMIN, daemon
        assert int(daemon["CapAmb"], 16) == int(daemon["CapInh"], 16) == 0
        assert daemon["NoNewPrivs"] == "1"
        assert "running as user tunneld with CAP_NET_ADMIN" in a.log.read_text()
        [writer] = _children(a.proc.pid)
        names = _proc(writer)
        assert names["Uid"].split() == ["0"] * 4 and int(names["CapEff"], 16) == 0
        assert int(names["CapPrm"], 16) == 0 and names["NoNewPrivs"] == "1"

        server = _proc(servers[0].pid)
        assert "running as tunneld with no capability" in (open_dir / "serve-dns.log").read_text()
        assert (open_dir / "dns").stat().st_uid == uid  # created by serve-dns, handed over
        assert server["Uid"].split() == [str(uid)] * 4 and int(server["CapEff"], 16) == 0
        assert int(server["CapPrm"], 16) == 0 and server["NoNewPrivs"] == "1"
        # An update after the drop lands: a's records, published to the server, are served.
        wait_for(lambda: status(a)["publish"]["state"] == "published", timeout=10, what="a to publish")
        assert dig(lab, b.host, DNS, "AAAA", f"a.{DOMAIN}", open_dir / "secret") == [a.ula]

        # The tunnel: traffic, a rekey, an outer address move (a network change), traffic again.
        ping6(lab, a, b)
        before = peer_status(a, "b")["handshakes"]

        def rekeyed() -> bool:  # a renews its session when it sends after rekey_after_time
            lab.run(a.host, ["ping", "-6", "-c", "1", "-W", "1", b.ula], check=False)
            return int(peer_status(a, "b")["handshakes"]) > before

        wait_for(rekeyed, timeout=10, interval=0.2, what="a rekey")
        ping6(lab, a, b)
        generation = int(status(a)["network"]["generation"])
        lab.addr(a.host, "eth0", "192.0.2.11/24")
        lab.ip(a.host, "addr", "del", "192.0.2.1/24", "dev", "eth0")
        wait_for(lambda: int(status(a)["network"]["generation"]) > generation, timeout=10,
                 what="a to handle the network change")
        assert not any("failed" in step for step in status(a)["network"]["redone"]), status(a)["network"]
        ping6(lab, a, b)
        wait_for(lambda: peer_status(b, "a")["endpoint"] == "192.0.2.11:4500", timeout=10,
                 what="b to learn a's new address")
        # The names writer wrote the hosts block for the unprivileged daemon.
        block = read_block((a.dir / "hosts").read_text(), DOMAIN) or []
        assert f"{b.ula} b.{DOMAIN} b" in block, block

        # The control socket: root:tunneld 0660; the group reads, does not rebind; others are told.
        st = os.stat(a.socket)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o660)
        as_member = ["setpriv", f"--reuid={NOBODY}", f"--regid={gid}", "--clear-groups", TUNNELD]
        r = lab.run(a.host, [*as_member, "status", "--json", "--socket", str(a.socket)], check=False)
        assert r.returncode == 0 and '"state": "up"' in r.stdout, r
        r = lab.run(a.host, [*as_member, "rebind", "--socket", str(a.socket)], check=False)
        assert r.returncode == 1 and "rebind needs root" in r.stderr and "\n" not in r.stderr.strip(), r
        outsider = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", TUNNELD]
        r = lab.run(a.host, [*outsider, "status", "--socket", str(a.socket)], check=False)
        assert r.returncode == 1 and r.stderr == (
            f"tunneld: permission denied on {a.socket}: run as root or join the group tunneld "
            f"(`usermod -aG tunneld USER`)\n"), r

        # A clean stop still removes the hosts block and the control socket (through the writer), which
        # then exits.
        assert lab.stop(a.proc) == 0
        assert read_block((a.dir / "hosts").read_text(), DOMAIN) is None
        assert not a.socket.exists()  # removed by the writer: the directory is root's
        assert not Path(f"/proc/{writer}").exists() or _proc(writer)["State"].startswith("Z")
