"""STUN through real NATs: `tunneld serve-dns` answers on its DNS port and a --stun port, and
`tunneld netcheck` behind Linux masquerade (endpoint-independent) and behind `masquerade fully-random`
(a mapping per destination) tells which is which.

Topology: lab/stun_lab.py (two NAT routers in front of one public server). The two ports of the one
server are two destinations for the NATs, so two STUN servers. DNS keeps working on the shared port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lab.netns import wait_for
from lab.stun_lab import SERVER, stun_lab, two_nats
from lab.tunnel import TUNNELD, write_secret

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft")
                       or not shutil.which("dig"),
                       reason="needs root, iproute2, nftables and dig (network namespaces)"),
]

ZONE = "stun.tunneld.test"
DNS_PORT = 5353
STUN_PORT = 3478


def test_netcheck_tells_endpoint_independent_from_per_destination_nat(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    write_secret(secret)
    log = tmp_path / "serve-dns.log"
    with stun_lab() as lab:
        h = two_nats(lab)
        with log.open("ab") as out:
            server = lab.spawn(h["srv"], [TUNNELD, "serve-dns", "--zone", ZONE, "--secret-file", str(secret),
                                          "--listen", f"{SERVER}:{DNS_PORT}", "--db", str(tmp_path / "db"),
                                          "--stun", str(STUN_PORT)], stdout=out, stderr=out)

        def ready() -> bool:
            assert server.poll() is None, f"serve-dns exited: {log.read_text()[-2000:]}"
            return f"STUN on UDP port {STUN_PORT}" in log.read_text()

        wait_for(ready, timeout=15, interval=0.05, what="serve-dns to listen")

        # Host a reads its STUN servers from its config; host b is given them on the command line.
        config = tmp_path / "a.toml"
        config.write_text(f'[account]\ndomain = "{ZONE}"\nsecret_file = "{secret}"\nname = "a"\n'
                          f'server = "{SERVER}:{DNS_PORT}"\n[nat]\n'
                          f'stun = ["{SERVER}:{DNS_PORT}", "{SERVER}:{STUN_PORT}"]\n')
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
            wan = h[name].extra["wan"]
            assert [s["server"] for s in r["stun"]] == [f"{SERVER}:{DNS_PORT}", f"{SERVER}:{STUN_PORT}"]
            for s in r["stun"]:  # the right XOR-MAPPED-ADDRESS: the NAT's public address
                assert s["error"] is None and s["mapped"].split(":")[0] == wan, r
            assert r["portmap"]["gateway"] == h[name].extra["gateway"] and r["portmap"]["protocol"] is None
            assert r["relay"] == "not configured"
        a, b = results["ha"], results["hb"]
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
    assert "Traceback" not in log.read_text(), log.read_text()[-2000:]
