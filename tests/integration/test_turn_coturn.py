"""tunneld's TURN client (tunneld/proto/turn.py) against a real relay: Debian's coturn in a namespace,
configured with the static-auth-secret line of `tunneld account new` (lab/coturn.py).

    a 198.51.100.2 ── 198.51.100.1 relay (coturn listens) 203.0.113.1 (relays from) ── 203.0.113.2 b

a allocates (the 401 dance, REST credentials from the account's relay secret), permits b's address and
binds a channel to one port of b. b sends plain UDP to the relayed address: from another port it arrives
at a as a Data indication, from the bound one as ChannelData, both taken apart by `unwrap` to b's address
and payload; a echoes each back through `wrap` (a Send indication, then ChannelData) and b receives it
from the relayed address. On close the allocation is deleted (coturn logs the delete) and a Refresh from
the same 5-tuple afterwards is answered 437 (no such allocation).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import progs
from lab.coturn import TURNSERVER, Coturn
from lab.netns import Host, Lab, wait_for
from lab.tunnel import TUNNELD

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2"),
]

DOMAIN = "lab.tunneld.test"
BOUND = 40000  # b's port with a channel bound to it


def _relay_lab(lab: Lab) -> tuple[Host, Host, Host]:
    a, b, relay = lab.host("turnA"), lab.host("turnB"), lab.host("turnR")
    lab.veth(a, "eth0", relay, "ra")
    lab.veth(b, "eth0", relay, "rb")
    for h, ifname, cidr in ((a, "eth0", "198.51.100.2/24"), (relay, "ra", "198.51.100.1/24"),
                            (b, "eth0", "203.0.113.2/24"), (relay, "rb", "203.0.113.1/24")):
        lab.addr(h, ifname, cidr)
    a.addr4, b.addr4, relay.addr4 = "198.51.100.2", "203.0.113.2", "198.51.100.1"
    return a, b, relay


def test_allocate_permit_relay_and_delete_against_coturn(tmp_path: Path) -> None:
    if not os.access(TURNSERVER, os.X_OK):
        pytest.fail(f"{TURNSERVER} is missing: tools/install.sh installs Debian coturn")
    out = subprocess.run([TUNNELD, "account", "new", DOMAIN], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    [line] = [x for x in out.splitlines() if x.startswith("static-auth-secret=")]
    secret = line.split("=", 1)[1]
    with Lab() as lab:
        a, b, relay = _relay_lab(lab)
        with Coturn(lab, relay, secret, tmp_path / "coturn", listen="198.51.100.1",
                    relay="203.0.113.1") as turn:
            user, password = turn.credentials("laptop")
            proc = progs.spawn(lab, a, "turn", "allocate", turn.listen, str(turn.port), user, password,
                               "--permit", b.addr4, "--bind", f"{b.addr4}:{BOUND}", "--echo", "--expect", "2",
                               "--wait", "10", "--check-deleted",
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            lines = progs.Lines(proc)
            allocated = lines.next(15)
            assert allocated["relayed"][0] == "203.0.113.1" and allocated["mapped"][0] == a.addr4
            assert lines.next(10) == {"permitted": [b.addr4], "refused": []}
            assert lines.next(10) == {"bound": [b.addr4, BOUND]}
            host, port = allocated["relayed"]
            by_indication = progs.run(lab, b, "turn", "send", host, str(port), "one", "--reply")
            by_channel = progs.run(lab, b, "turn", "send", host, str(port), "two",
                                   "--source-port", str(BOUND), "--reply")
            got = [lines.next(10), lines.next(10)]
            assert got == [{"peer": [b.addr4, by_indication["from"][1]], "data": "one"},
                           {"peer": [b.addr4, BOUND], "data": "two"}]
            for sent, text in ((by_indication, "echo one"), (by_channel, "echo two")):
                assert (sent["reply"], sent["reply_from"]) == (text, [host, port])
            assert lines.next(10) == {"closed": True, "received": 2}
            wait_for(lambda: f"delete: realm=<{DOMAIN}>, username=<{user}>" in turn.log_text(), timeout=10,
                     what="coturn to delete the allocation")
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert lines.next(10) == {"after_close": 437}
            assert proc.wait(timeout=10) == 0
