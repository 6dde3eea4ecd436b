"""The scale benchmark's pure parts: source addresses, the generated [[peer]] tables (through tunneld's own
config loader), /proc status parsing, the settings, the table, and the simulated peers driven against an
in-memory responder (a Handshaker as the daemon's)."""

from __future__ import annotations

import argparse
import base64
import io
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from bench import scale
from bench.scale_peers import SimPeer, handshake_summary, make_peers, write_spec
from bench.scale_wg import NO_PSK, TRANSPORT_HEADER, WG_IDENTIFIER, sim_allowed_ip, wg_config
from tests.helpers import drbg
from tunneld.config import load_config
from tunneld.crypto.esp import SecurityAssociation
from tunneld.crypto.noise import HASH, MAC, HandshakeState, public_key, xaead_encrypt
from tunneld.identity import ula_for
from tunneld.proto import constants as C
from tunneld.proto import handshake as hs
from tunneld.proto.handshake_wire import COOKIE_REPLY, HEADER2, INITIATION, RESERVED

SUITE = "aes-256-gcm"
SERVER = ("198.51.100.1", 4500)


def test_source_addresses_are_distinct_and_inside_the_simulated_net() -> None:
    assert scale.source_address(0) == "10.77.0.1"
    assert scale.source_address(254) == "10.77.0.255"
    assert scale.source_address(255) == "10.77.1.0"
    addrs = {scale.source_address(i) for i in range(1000)}
    assert len(addrs) == 1000
    assert all(a.startswith("10.77.") for a in addrs)
    for bad in (-1, scale.MAX_PEERS):
        with pytest.raises(ValueError):
            scale.source_address(bad)


def test_generated_peers_pass_tunneld_config_loader(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
    secret.chmod(0o600)
    keys = scale.generate_keys(50, drbg(1))
    assert all(pub == public_key(priv) for priv, pub in keys)
    assert len({pub for _, pub in keys}) == 50
    path = tmp_path / "tunneld.toml"
    path.write_text(f'[account]\ndomain = "lab.example"\nsecret_file = "{secret}"\n'
                    + scale.peers_toml([pub for _, pub in keys]))
    config = load_config(path)
    assert [p.name for p in config.peers] == [f"sim{i}" for i in range(50)]
    assert [p.public_key for p in config.peers] == [pub for _, pub in keys]
    assert all(p.endpoint is None for p in config.peers)  # the simulated peers contact the daemon
    assert config.peers[7].ula == ula_for("lab.example", keys[7][1])


def test_proc_status_parsing() -> None:
    text = "Name:\ttunneld\nVmPeak:\t  900 kB\nVmHWM:\t   81234 kB\nVmRSS:\t   80000 kB\nThreads:\t3\n"
    assert scale.parse_proc_status(text) == {"VmHWM": 81234 * 1024, "VmRSS": 80000 * 1024}
    assert scale.parse_proc_status("Name:\tkthreadd\nVmRSS:\tlots\n") == {}
    mine = scale.memory(os.getpid())
    assert 0 < mine["VmRSS"] <= mine["VmHWM"]


def test_log_problems_are_errors_and_tracebacks() -> None:
    log = ("2026-12-03T14:00:00.000Z INFO tunneld.daemon: up\n"
           "2026-12-03T14:00:01.000Z WARNING tunneld.daemon: [service] user = \"root\"\n"
           "2026-12-03T14:00:02.000Z ERROR tunneld.dataplane: send failed\n"
           "Traceback (most recent call last):\n")
    assert scale.log_problems(log) == log.splitlines()[2:]
    assert scale.log_problems(log, limit=1) == log.splitlines()[2:3]


def test_settings_quick_and_explicit_flags() -> None:
    p = argparse.ArgumentParser()
    scale.add_arguments(p)
    assert scale.settings(p.parse_args([])) == scale.Settings()
    quick = scale.settings(p.parse_args(["--quick"]))
    assert (quick.peers, quick.duration, quick.runs) == (100, 2, 1)
    assert scale.settings(p.parse_args(["--quick", "--peers", "300"])).peers == 300
    assert p.parse_args([]).modes == ["tunneld", "wireguard-go"]
    assert p.parse_args(["--modes", "wireguard-go,tunneld,wireguard-go"]).modes == ["wireguard-go", "tunneld"]
    for bad in (["--peers", "0"], ["--runs", "0"], ["--keepalive", "0"], ["--sources", "-1"]):
        with pytest.raises(ValueError):
            scale.settings(p.parse_args(bad))


# -- the simulated peers against an in-memory responder -------------------------------------------

class Responder:
    """The daemon's side of the handshake, in memory: a Handshaker and the sessions it derived."""

    def __init__(self, publics: set[bytes], under_load: bool = False) -> None:
        self.private = drbg(99)(32)
        self.psk = drbg(98)(32)
        self.handshaker = hs.Handshaker(self.private, self.psk, publics, rand=drbg(97))
        self.inbound: dict[int, SecurityAssociation] = {}
        self.under_load = under_load
        self.cookies = 0

    @property
    def public(self) -> bytes:
        return self.handshaker.public_key

    def receive(self, data: bytes, src: tuple[str, int], now: float) -> list[bytes]:
        if data[:4] != hs.MARKER:
            sa = self.inbound[int.from_bytes(data[:4], "big")]
            before = sa.rx_dummy
            assert sa.open_many([data]) == [] and sa.rx_dummy == before + 1  # an authenticated keepalive
            return []
        event = self.handshaker.receive(data[4:], src, now, under_load=self.under_load)
        if isinstance(event, hs.SendCookie):
            self.cookies += 1
            return [event.datagram]
        assert isinstance(event, hs.InitiationReceived), event
        _out, inbound = event.keys.security_associations(SUITE)
        self.inbound[inbound.spi] = inbound
        return [event.datagram]


def _peers(n: int, rate: float, keepalive: float = 25.0, under_load: bool = False
           ) -> tuple[list[SimPeer], Responder]:
    keys = scale.generate_keys(n, drbg(5))
    server = Responder({pub for _, pub in keys}, under_load)
    peers = make_peers([priv for priv, _ in keys], server.public, server.psk, SUITE, keepalive, rate, 10.0,
                       drbg(6))
    return peers, server


def _step(peers: list[SimPeer], server: Responder, now: float, lose: bool = False) -> int:
    """Run every peer's timers at `now` and carry each datagram both ways; returns datagrams sent."""
    sent = 0
    for p in peers:
        todo = p.due(now, 1.7e9 + now)
        while todo:
            data = todo.pop(0)
            sent += 1
            if lose:
                continue
            src = (scale.source_address(p.index), 40000 + p.index)
            for reply in server.receive(data, src, now):
                todo += p.receive(reply, SERVER, now, 1.7e9 + now)
    return sent


def test_simulated_peers_complete_handshakes_and_confirm_sessions() -> None:
    peers, server = _peers(20, rate=100.0)
    for i in range(30):
        _step(peers, server, 10.0 + i * 0.01)
    s = handshake_summary(peers)
    assert (s["completed"], s["failed"], s["initiations"], s["cookies"]) == (20, 0, 20, 0)
    assert s["seconds"] == pytest.approx(0.19)  # first at 10.00, the 20th at 10.19 (100 per second)
    assert s["handshakes_per_s"] == pytest.approx(20 / 0.19)
    assert len(server.inbound) == 20  # one session each, confirmed by a keepalive the responder opened
    assert all(p.keepalives == 1 for p in peers)


def test_unanswered_initiation_is_retried_after_rekey_timeout() -> None:
    peers, server = _peers(3, rate=0.0)
    assert _step(peers, server, 10.0, lose=True) == 3
    assert _step(peers, server, 10.0 + C.REKEY_TIMEOUT - 0.01) == 0
    _step(peers, server, 10.0 + C.REKEY_TIMEOUT + C.REKEY_TIMEOUT_JITTER_MAX)
    s = handshake_summary(peers)
    assert (s["completed"], s["initiations"]) == (3, 6)
    assert s["median_wait_s"] == pytest.approx(C.REKEY_TIMEOUT + C.REKEY_TIMEOUT_JITTER_MAX)


def test_cookie_reply_gets_an_immediate_retry_with_mac2() -> None:
    peers, server = _peers(4, rate=0.0, under_load=True)
    _step(peers, server, 10.0)
    s = handshake_summary(peers)
    assert server.cookies == 4
    assert (s["completed"], s["initiations"], s["cookies"]) == (4, 8, 4)
    assert s["seconds"] == 0.0


def test_keepalives_follow_the_interval_and_sessions_are_renewed() -> None:
    peers, server = _peers(2, rate=0.0, keepalive=5.0)
    _step(peers, server, 10.0)
    for t in (12.0, 15.0, 20.0):
        _step(peers, server, t)
    assert [p.keepalives for p in peers] == [3, 3]  # the confirmation, then at 15 and 20
    assert peers[0].deadline() == pytest.approx(25.0)
    _step(peers, server, 10.0 + C.REKEY_AFTER_TIME)
    assert [p.handshakes for p in peers] == [2, 2]
    assert len(server.inbound) == 4


def test_stray_esp_is_counted_not_answered() -> None:
    peers, _server = _peers(1, rate=0.0)
    assert peers[0].receive(b"\x80\x00\x00\x01" + bytes(40), SERVER, 10.0, 1.7e9) == []
    assert peers[0].rx_esp == 1


def test_wireguard_peer_speaks_wireguard() -> None:
    """Against a responder built from the Noise construction with WireGuard's prologue and mac1 key: the
    initiation parses (no non-ESP marker), the response completes it, the keepalive is a transport
    message the responder's key opens, and a cookie reply gets an initiation with mac2 at once."""
    server_private = drbg(7)(32)
    server_public = public_key(server_private)
    keys = scale.generate_keys(2, drbg(8))
    peers = make_peers([k for k, _ in keys], server_public, NO_PSK, "", 25.0, 0.0, 10.0, drbg(9),
                       kind="wireguard")
    (init,) = peers[0].due(10.0, 1.7e9)
    assert len(init) == INITIATION.size and init[0] == hs.MSG_INITIATION
    assert init[116:132] == MAC(HASH(hs.LABEL_MAC1 + server_public), init[:116])
    _t, _r, sender, ephemeral, static, stamp, _mac1, mac2 = INITIATION.unpack(init)
    assert mac2 == bytes(16)
    responder = HandshakeState("IKpsk2", False, WG_IDENTIFIER, server_private, psk=NO_PSK, e=drbg(10)(32))
    responder.read_message(ephemeral + static + stamp)
    assert responder.remote_static == keys[0][1]
    body = HEADER2.pack(hs.MSG_RESPONSE, RESERVED, 0x1234, sender) + responder.write_message(b"")
    response = body + MAC(HASH(hs.LABEL_MAC1 + keys[0][1]), body) + bytes(16)
    (keepalive,) = peers[0].receive(response, SERVER, 10.5, 1.7e9)
    i2r, _r2i = responder.split_keys()
    kind, _, receiver, counter = TRANSPORT_HEADER.unpack(keepalive[:TRANSPORT_HEADER.size])
    assert (kind, receiver, counter) == (4, 0x1234, 0)
    nonce = bytes(4) + counter.to_bytes(8, "little")
    assert ChaCha20Poly1305(i2r).decrypt(nonce, keepalive[TRANSPORT_HEADER.size:], None) == b""
    assert (peers[0].completed, peers[0].handshakes) == (10.5, 1)

    (init2,) = peers[1].due(10.0, 1.7e9)
    cookie, nonce24 = drbg(11)(16), drbg(12)(24)
    sealed = xaead_encrypt(HASH(hs.LABEL_COOKIE + server_public), nonce24, cookie, init2[116:132])
    reply = COOKIE_REPLY.pack(hs.MSG_COOKIE_REPLY, RESERVED, INITIATION.unpack(init2)[2], nonce24, sealed)
    (retry,) = peers[1].receive(reply, SERVER, 10.1, 1.7e9)
    assert retry[132:148] == MAC(cookie, retry[:132])
    assert (peers[1].cookies, peers[1].initiations) == (1, 2)


def test_wireguard_config_lists_every_peer() -> None:
    text = wg_config(bytes(32), [(bytes(range(32)), "192.0.2.1:51820", "2001:db8:77::1/128"),
                                 (bytes(32), None, sim_allowed_ip(9))])
    assert text.count("[Peer]") == 2 and "ListenPort = 51820" in text
    assert "Endpoint = 192.0.2.1:51820" in text and text.count("Endpoint") == 1
    assert "AllowedIPs = 2001:db8:78::a/128" in text


def test_spec_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    write_spec(path, [bytes(32)], ["10.77.0.1"], SERVER, "key", bytes(32), SUITE, 25.0, 0.0, 30.0)
    assert path.stat().st_mode & 0o777 == 0o600


def _result() -> dict[str, Any]:
    mem = {"VmRSS": 80 * 2**20, "VmHWM": 90 * 2**20}
    stream = {"gbps": 2.0, "retransmits": 0, "cpu": {"a": 0.9, "b": 0.8}}
    hs_ready = {"completed": 1000, "failed": 0, "seconds": 12.5, "handshakes_per_s": 80.0,
                "median_wait_s": 2.0, "initiations": 2356, "cookies": 873}
    run = {"start_seconds": 1.5, "rss_configured": mem, "rss_after_handshakes": mem, "rss_after_stream": mem,
           "handshakes": hs_ready, "handshake_cpu_seconds": 1.53, "sessions": 1000, "sessions_after": 1000,
           "handshake_load": {"under_load_episodes": 2}, "handshake_drops": {"busy": 483}, "stream": stream,
           "idle_cores": 0.0123}
    mode = {"mode": "tunneld", "rss_a_one_peer": mem,
            "without": [{"rss": mem, "idle_cores": 0.0021, "stream": stream, "rss_after_stream": mem}],
            "with": [run],
            "stream_one_peer": scale._stream_summary([stream]),
            "stream_idle_peers": scale._stream_summary([{**stream, "gbps": 1.5}]), "stream_ratio": 0.75,
            "daemon_log_problems": ["x ERROR y"]}
    wg = {**mode, "mode": "wireguard-go", "with": [{**run, "handshake_load": {}, "handshake_drops": {}}],
          "daemon_log_problems": []}
    return {"settings": scale.Settings().__dict__, "cpu_count": 2, "modes": ["tunneld", "wireguard-go", "x"],
            "results": {"tunneld": mode, "wireguard-go": wg}, "errors": {"x": "no such thing\nmore"}}


def test_table_shows_the_figures() -> None:
    out = io.StringIO()
    scale.print_table(_result(), out)
    text = out.getvalue()
    assert "1000 simulated peers" in text and "all at once" in text
    assert "\ntunneld in b\n" in text and "\nwireguard-go in b\n" in text
    assert "|   1 |      1000 |      0 |   12.50 |    80 |" in text
    assert "busy 483" in text
    assert "|          - |       1000 |      1.50 | - |" in text  # wireguard-go reports no defences
    assert "0.75x" in text
    assert text.count("b's log: x ERROR y") == 1
    assert "|      80.0 |      90.0 |" in text
    assert "0.0021 cores with one peer, 0.0123 with 1000 more" in text
    assert "x: NOT MEASURED: no such thing\n" in text
