"""The rendezvous server and the tunnel port under attack, in namespaces: a device of the account keeps
being served while each attack runs (bench.attack's steps; lab.attacks' bounded floods).

Each test asserts the hardened behaviour, against a baseline measured in the same run: the device's
success rate (>= 95 %) and p95 latency (within PLENTY of the baseline's), the amplification a stranger
gets (<= 3x), a replayed signed UPDATE not bringing a stale record back after a restart, a new device
setting up LLQs after a replayed SETUP flood, TCP clients served during a slow-loris, strangers reading
no device records, and the tunnel carrying traffic (and a restarted peer handshaking) during handshake
floods. Every flood stops by itself (count and time bounded); the labs remove their namespaces and end
their processes by PID, also when a test fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import attack
from bench.attack import DnsRig, Timing

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dig") or not shutil.which("ping"),
                       reason="needs root, dig (bind9-dnsutils) and ping"),
]

T = Timing(seconds=3.0, connections=300, replay_ports=1250)
MIN_SUCCESS = 0.95
MIN_SUCCESS_AT_100K = 0.35  # see test_handshake_flood_at_100k_per_second
PLENTY = 10.0  # the device's p95 during an attack may be this many times its baseline p95 ...
FLOOR_MS = 500.0  # ... or this, whichever is larger (the machine is shared and noisy)
MAX_AMPLIFICATION = 3.0
MAX_CPU_SHARE = 0.5  # of one core, for the tunnel daemon under a 5,000/s handshake flood
MAX_HANDSHAKE_S = 16.0
"""A restarted peer under flood: each try is an initiation and its retry with the cookie's mac2, both
through b's overflowing socket (at 100k/s about half of what arrives is dropped by the kernel), and a
lost try waits rekey_timeout (5 s): three tries. Measured 5-11 s with the defences; 17-28 s in the issue."""


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsRig]:
    info: dict[str, Any] = {}
    with attack.dns_rig(tmp_path_factory.mktemp("attack-dns"), T, info) as d:
        yield d
    assert "server_traceback" not in info, info.get("server_traceback")


def served(r: dict[str, Any], min_success: float = MIN_SUCCESS) -> None:
    """The device was served during the attack: success rate and p95 latency against its baseline."""
    legit, base = r["legit"], r["baseline"]
    assert legit["n"] > 0, r
    assert legit["success"] >= min_success, (r["attack"], legit, r["notes"])
    bound = max(FLOOR_MS, PLENTY * base["p95_ms"])
    assert legit["p95_ms"] <= bound, (r["attack"], legit["p95_ms"], bound, base)


def test_pointer_bomb_over_udp(dns: DnsRig) -> None:
    served(attack.STEPS["pointer bomb udp"](dns, T))


def test_pointer_bomb_over_tcp(dns: DnsRig) -> None:
    served(attack.STEPS["pointer bomb tcp"](dns, T))


def test_unsigned_answers_amplify_at_most_3x(dns: DnsRig) -> None:
    r = attack.STEPS["reflection 50"](dns, T)
    assert all(v <= MAX_AMPLIFICATION for v in r["ratios"].values()), (r["ratios"], r["query_bytes"])
    served(r)


def test_tcp_clients_are_served_during_a_slow_loris(dns: DnsRig) -> None:
    r = attack.STEPS["slow-loris"](dns, T)
    assert r["flood"]["opened"] > 64, r["flood"]  # more than the old 64-connection table: a real attack
    served(r)


def test_a_new_device_gets_an_llq_after_a_replayed_setup_flood(dns: DnsRig) -> None:
    r = attack.STEPS["llq replay"](dns, T)
    assert set(r["legit"]["ops"]) == {"llq"}, r["legit"]
    served(r)


def test_a_replayed_update_does_not_return_after_a_restart(dns: DnsRig) -> None:
    r = attack.STEPS["update replay"](dns, T)
    assert r["stale_returned"] is False, r["notes"]
    served(r)


def test_strangers_read_no_device_records(dns: DnsRig) -> None:
    r = attack.STEPS["privacy"](dns, T)
    assert r["device_sees"] == 5, r  # the records are there: the account's own device reads them
    assert r["stranger"]["records"] == 0, r["stranger"]


@pytest.fixture(scope="module")
def handshake_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    work = tmp_path_factory.mktemp("attack-tunnel")
    rows = attack.handshake_floods(Path(work), T, [5000, 100_000], {})
    return {r["attack"]: r for r in rows}


def test_handshake_flood_at_5k_per_second(handshake_rows: dict[str, dict[str, Any]]) -> None:
    r = handshake_rows["handshake 5k/s"]
    assert r["server_cpu_s"] <= MAX_CPU_SHARE * r["window_s"], (r["server_cpu_s"], r["window_s"], r["notes"])
    served(r)


def test_handshake_flood_at_100k_per_second(handshake_rows: dict[str, dict[str, Any]]) -> None:
    """A good part of the data still passes, and a restarted peer still handshakes. Not 95 %: at this rate the
    one thread that reads the port cannot take every datagram off the socket, and the kernel drops from
    a full buffer whatever the kind, ESP included, however cheaply a stranger's message is then refused
    (measured with the hardened port: 73-75 % of the pings passed with a stranger's mac1, at least 51 %
    with the account's, which every message of this flood carries; on main, 11-18 %)."""
    r = handshake_rows["handshake 100k/s"]
    assert r["handshake_s"] is not None and r["handshake_s"] <= MAX_HANDSHAKE_S, r["notes"]
    served(r, MIN_SUCCESS_AT_100K)
