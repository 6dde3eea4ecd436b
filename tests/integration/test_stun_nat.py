"""STUN through real NATs: `tunneld serve-dns` answers on its DNS port and a --stun port, and
`tunneld netcheck` behind Linux masquerade (endpoint-independent) and behind `masquerade fully-random`
(a mapping per destination) tells which is which, and whether the account's relay (a real coturn
given the account's `static-auth-secret`) answers a TURN Allocate.

Topology: lab.topology.two_nats (two NAT routers in front of one public server). The two ports of the
one server are two destinations for the NATs, so two STUN servers. DNS keeps working on the shared port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lab.coturn import TURNSERVER, Coturn
from lab.netns import Lab, wait_for
from lab.topology import TWO_NATS_SERVER, two_nats
from lab.tunnel import TUNNELD, write_secret
from tunneld.config import load_account_secret
from tunneld.crypto.kdf import derive_turn_secret

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft")
                       or not shutil.which("dig"),
                       reason="needs root, iproute2, nftables and dig (network namespaces)"),
]

ZONE = "stun.tunneld.test"
DNS_PORT = 5353
STUN_PORT = 3479  # coturn has 3478 on the server's other address
SERVER, RELAY = TWO_NATS_SERVER


def test_netcheck_tells_endpoint_independent_from_per_destination_nat(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    write_secret(secret)
    log = tmp_path / "serve-dns.log"
    if not os.access(TURNSERVER, os.X_OK):
        pytest.fail(f"{TURNSERVER} is missing: tools/install.sh installs Debian coturn")
    turn_secret = derive_turn_secret(load_account_secret(secret), ZONE)
    with Lab() as lab:
        net = two_nats(lab, "masquerade", "fully-random")
        h = {"srv": net.server, "ha": net.a.host, "hb": net.b.host}
        wans = {"ha": net.a.public, "hb": net.b.public}
        gateways = {"ha": net.a.router.extra["lan4"], "hb": net.b.router.extra["lan4"]}
        turn = Coturn(lab, net.server, turn_secret, tmp_path / "coturn", listen=RELAY)
        turn.start()
        with log.open("ab") as out:
            server = lab.spawn(h["srv"], [TUNNELD, "serve-dns", "--zone", ZONE, "--secret-file", str(secret),
                                          "--listen", f"{SERVER}:{DNS_PORT}", "--db", str(tmp_path / "db"),
                                          "--stun", str(STUN_PORT), "--user", "root"],
                               stdout=out, stderr=out)

        def ready() -> bool:
            assert server.poll() is None, f"serve-dns exited: {log.read_text()[-2000:]}"
            return f"STUN on UDP port {STUN_PORT}" in log.read_text()

        wait_for(ready, timeout=15, interval=0.05, what="serve-dns to listen")

        # Host a reads its STUN servers from its config; host b is given them on the command line.
        config = tmp_path / "a.toml"
        config.write_text(f'[account]\ndomain = "{ZONE}"\nsecret_file = "{secret}"\nname = "a"\n'
                          f'server = "{SERVER}:{DNS_PORT}"\n[nat]\n'
                          f'stun = ["{SERVER}:{DNS_PORT}", "{SERVER}:{STUN_PORT}"]\n'
                          f'[relay]\nserver = "{RELAY}:{turn.port}"\n')
        both = ["--stun", f"{SERVER}:{DNS_PORT}", "--stun", f"{SERVER}:{STUN_PORT}"]
        runs = {  # at once: each takes its whole time bound (the routers speak no port mapping)
            "ha": lab.spawn(h["ha"], [TUNNELD, "netcheck", "--config", str(config), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            "hb": lab.spawn(h["hb"], [TUNNELD, "netcheck", *both, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            "text": lab.spawn(h["hb"], [TUNNELD, "netcheck", *both],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        }
        outputs: dict[str, str] = {}
        for name, proc in runs.items():
            outputs[name], err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
        results: dict[str, dict[str, Any]] = {name: json.loads(outputs[name]) for name in ("ha", "hb")}

        for name in ("ha", "hb"):
            r = results[name]
            wan = wans[name]
            assert [s["server"] for s in r["stun"]] == [f"{SERVER}:{DNS_PORT}", f"{SERVER}:{STUN_PORT}"]
            for s in r["stun"]:  # the right XOR-MAPPED-ADDRESS: the NAT's public address
                assert s["error"] is None and s["mapped"].split(":")[0] == wan, r
            assert r["portmap"]["gateway"] == gateways[name] and r["portmap"]["protocol"] is None
        a, b = results["ha"], results["hb"]
        # a's config names the relay: coturn allocates with the account's REST credentials (relayed
        # from its own address); b, with no config, has none.
        assert a["relay"].startswith(f"answers ({RELAY}:{turn.port}, relayed {RELAY}:"), a["relay"]
        assert b["relay"] == "not configured"
        assert a["nat"] == {"ipv4": {"kind": "endpoint-independent", "mapped": a["stun"][0]["mapped"]}}, a
        assert a["stun"][0]["mapped"] == a["stun"][1]["mapped"]
        assert b["nat"] == {"ipv4": {"kind": "per-destination", "mapped": None}}, b
        assert b["stun"][0]["mapped"] != b["stun"][1]["mapped"]

        # DNS on the port that answers STUN, as ever.
        dig = lab.run(h["ha"], ["dig", f"@{SERVER}", "-p", str(DNS_PORT), "+norec", "+tries=2", "+time=2",
                                "SOA", ZONE], check=False, timeout=20)
        assert "status: NOERROR" in dig.stdout, dig.stdout + dig.stderr
        assert "nat ipv4: per-destination" in outputs["text"], outputs["text"]  # the text form says so too
        lab.stop(server)
        turn.stop()
    assert "Traceback" not in log.read_text(), log.read_text()[-2000:]
