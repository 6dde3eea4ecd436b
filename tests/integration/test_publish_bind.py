"""Publishing our records by `tunneld up` to a real DNS UPDATE server: BIND 9 in a lab namespace.

Topology (lab/topology.py two_hosts): a 192.0.2.1 runs tunneld, with a default route via b so that its own
address counts as public (the port mapper's "public" state gives the public endpoint 192.0.2.1:4500);
b 192.0.2.2 runs named (lab/bind.py) on port 5353 with the account's TSIG key from `tunneld account new`
and `update-policy { grant KEY zonesub ANY; }`.

What is checked, with dig as the independent client: the records appear (AAAA with the ULA, SRV with
port 4500 and target AutoTunnel-<IID>, the target's A, the TXT v=1 pk=...); `tunneld status` shows them
published with NOERROR and notes that BIND ignored the lease option; SIGTERM withdraws them within a few
seconds; a daemon holding the wrong account secret gets BADSIG (or NOTAUTH) and publishes nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.bind import DIG, NAMED, Bind
from lab.netns import Host, Lab, LabError, wait_for
from lab.topology import two_hosts
from lab.tunnel import DOMAIN, TUNNELD, Node, account_node, control, start, status, write_secret
from tunneld.identity import iid_label

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                       reason="needs root and iproute2 (network namespaces); CI runs as root"),
]

DNS_PORT = 5353
NAME = "laptop"
OTHER_PTR = f"_autotunnel._udp.desktop.{DOMAIN}."  # another device, already published
PORT = 4500


@dataclass
class BindLab:
    lab: Lab
    a: Host
    b: Host
    bind: Bind
    dir: Path
    secret: Path
    algorithm: str = "hmac-sha256"


@pytest.fixture(params=["hmac-sha256", "hmac-md5"])
def bindlab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BindLab]:
    """BIND with the account key, as hmac-sha256 (the default) or hmac-md5 (an old server's only choice:
    the same key bytes, the algorithm set on both sides)."""
    for tool in (NAMED, DIG):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is missing: tools/install.sh installs Debian bind9 and bind9-dnsutils")
    with Lab() as lab:
        a, b = two_hosts(lab)
        lab.ip(a, "route", "add", "default", "via", b.addr4)  # a's own address is then its public one
        out = lab.run(a, [TUNNELD, "account", "new", DOMAIN]).stdout
        secret = tmp_path / "secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(out.splitlines()[0] + "\n")
        stanza = out[out.index("key \""):].replace("hmac-sha256", request.param)
        # Another device of the account is already discoverable: our publish must leave its PTR alone.
        other = f"_autotunnel._udp IN PTR {OTHER_PTR}\n"
        with Bind(lab, b, DOMAIN, stanza, tmp_path / "bind", port=DNS_PORT, extra_zone=other) as bind:
            yield BindLab(lab, a, b, bind, tmp_path, secret, request.param)
            # The daemons first, while BIND still answers their withdrawals: stopped after it, each
            # would wait out its shutdown grace for a server that is gone.
            for p in [p for p in lab.procs if p is not bind.proc]:
                lab.stop(p)


def node(bl: BindLab, secret: Path) -> Node:
    return account_node(bl.lab, bl.a, bl.dir / "a", NAME, secret, (bl.b.addr4, DNS_PORT), PORT,
                        f'tsig_algorithm = "{bl.algorithm}"\n')


def publish(n: Node) -> dict[str, Any]:
    return dict(status(n)["publish"])


def log_tail(n: Node) -> str:
    try:
        return n.log.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


def wait_publish(bl: BindLab, n: Node, pred: Any, what: str, timeout: float = 15) -> dict[str, Any]:
    try:
        wait_for(lambda: pred(publish(n)), timeout=timeout, interval=0.05, what=what)
    except LabError as e:
        raise AssertionError(f"{e}\npublish: {publish(n)}\n--- tunneld log:\n{log_tail(n)}\n"
                             f"--- named log:\n{bl.bind.log_text()[-3000:]}") from None
    return publish(n)


def names(n: Node) -> dict[str, tuple[str, str]]:
    import base64

    target = f"{iid_label(base64.b64decode(n.public_key))}.{DOMAIN}"
    service = f"_autotunnel._udp.{NAME}.{DOMAIN}"
    return {"aaaa": (f"{NAME}.{DOMAIN}", "AAAA"), "srv": (service, "SRV"), "txt": (service, "TXT"),
            "a": (target, "A"), "target": (target, "")}


def test_publish_and_withdraw_on_sigterm(bindlab: BindLab) -> None:
    bl = bindlab
    n = node(bl, bl.secret)
    start(bl.lab, n)
    assert status(n)["public_endpoint"] == f"{bl.a.addr4}:{PORT}"
    st = wait_publish(bl, n, lambda p: p["state"] == "published", "the records to be published")
    assert st["published"] is True and st["rcode"] == "NOERROR", st
    assert st["server"] == f"{bl.b.addr4}:{DNS_PORT}", st
    assert st["server_ignores_lease"] is True and st["lease_granted"] is None, st  # BIND ignores it
    assert "ignores the lease" in st["message"], st
    assert st["lease"] == 5400 and 0 < st["lease_left"] <= 5400, st
    assert any(" SRV " in r for r in st["records"]), st

    nm = names(n)
    dig = bl.bind.dig
    assert dig(*nm["aaaa"]) == [n.ula]
    target = nm["target"][0]
    assert dig(*nm["srv"]) == [f"0 0 {PORT} {target}."]
    assert dig(*nm["a"]) == [bl.a.addr4]
    assert dig(*nm["txt"]) == [f'"v=1" "pk={n.public_key}"']
    # The browse PTR to us sits beside another device's, which our publish must not have deleted.
    ptrs = dig(f"_autotunnel._udp.{DOMAIN}", "PTR")
    assert f"_autotunnel._udp.{NAME}.{DOMAIN}." in ptrs and OTHER_PTR in ptrs, ptrs

    assert n.proc is not None
    assert bl.lab.stop(n.proc, timeout=10) == 0, log_tail(n)

    def gone() -> bool:
        return all(bl.bind.dig_full(*nm[k])[1] == [] for k in ("aaaa", "srv", "txt", "a"))
    wait_for(gone, timeout=3, interval=0.05, what="the records to be withdrawn")
    for k in ("aaaa", "srv", "txt", "a"):
        rcode, answers = bl.bind.dig_full(*nm[k])
        assert rcode in ("NXDOMAIN", "NOERROR") and answers == [], (k, rcode, answers)
    assert "withdrew our records" in log_tail(n), log_tail(n)
    assert dig(f"_autotunnel._udp.{DOMAIN}", "PTR") == [OTHER_PTR]  # only our PTR went


def test_rebind_republishes_the_new_port(bindlab: BindLab) -> None:
    bl = bindlab
    n = node(bl, bl.secret)
    start(bl.lab, n)
    wait_publish(bl, n, lambda p: p["state"] == "published", "the records to be published")
    nm = names(n)
    target = nm["target"][0]
    assert bl.bind.dig(*nm["srv"]) == [f"0 0 {PORT} {target}."]
    assert control(n, {"cmd": "rebind", "port": PORT + 1}).get("ok") is True
    assert status(n)["public_endpoint"] == f"{bl.a.addr4}:{PORT + 1}"
    try:
        wait_for(lambda: bl.bind.dig(*nm["srv"]) == [f"0 0 {PORT + 1} {target}."], timeout=5, interval=0.05,
                 what="the new port to be published")
    except LabError as e:
        raise AssertionError(f"{e}\npublish: {publish(n)}\n--- tunneld log:\n{log_tail(n)}") from None
    st = wait_publish(bl, n, lambda p: p["state"] == "published", "the republication to be confirmed")
    assert any(f" {PORT + 1} " in r for r in st["records"]), st
    assert bl.bind.dig(*nm["aaaa"]) == [n.ula] and bl.bind.dig(*nm["a"]) == [bl.a.addr4]


def test_wrong_secret_is_refused(bindlab: BindLab) -> None:
    bl = bindlab
    wrong = bl.dir / "wrong-secret"
    write_secret(wrong)
    n = node(bl, wrong)
    start(bl.lab, n)
    st = wait_publish(bl, n, lambda p: p["rcode"] in ("BADSIG", "NOTAUTH"), "the server to refuse the key")
    assert st["state"] == "failed" and st["published"] is False, st
    assert "BADSIG" in st["message"] or "NOTAUTH" in st["message"], st
    assert "retrying in" in st["message"], st
    nm = names(n)
    for k in ("aaaa", "srv", "txt", "a"):
        rcode, answers = bl.bind.dig_full(*nm[k])
        assert rcode == "NXDOMAIN" and answers == [], (k, rcode, answers)


def test_publishing_off_without_a_server(bindlab: BindLab) -> None:
    bl = bindlab
    n = node(bl, bl.secret)
    n.config.write_text("\n".join(line for line in n.config.read_text().splitlines()
                                  if not line.startswith("server")) + "\n")
    start(bl.lab, n)
    st = publish(n)
    assert st["state"] == "disabled" and st["server"] is None, st
    assert "no [account] server" in st["message"], st
    assert bl.bind.dig(*names(n)["aaaa"]) == []
