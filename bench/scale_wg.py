"""The scale benchmark's wireguard-go side (bench/scale.py, `--modes wireguard-go`): the same simulated
devices speaking WireGuard itself, and a wireguard-go pair with their [Peer] sections.

`WgPeer` is `SimPeer` (bench/scale_peers.py) with WireGuard's wire: its prologue and mac1/cookie keys (no
account PSK), messages without the non-ESP marker, and a transport-data keepalive (type 4, counter, an
empty ChaCha20-Poly1305 payload) in the place of the ESP one. The client behaviour (retries, cookies,
keepalives) is the same, so both daemons see the same load. `WgPair` runs wireguard-go in a and b as
bench/e2e.py does and restarts b with or without the simulated peers.
"""

from __future__ import annotations

import base64
import copy
import os
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from bench.scale_peers import SimPeer
from tunneld.crypto.noise import HASH, MAC, HandshakeState, NoiseError, xaead_decrypt
from tunneld.proto import constants as C
from tunneld.proto import handshake as hs
from tunneld.proto.handshake_wire import COOKIE_REPLY, HEADER, RESERVED, RESPONSE, tai64n

# WireGuard's wire (whitepaper §5.4; wireguard-go device/noise-protocol.go)
WG_IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
MSG_TRANSPORT = 4
TRANSPORT_HEADER = struct.Struct("<B3sIQ")  # type, reserved, receiver index, counter
NO_PSK = bytes(32)  # a peer without PresharedKey
WG_PORT = 51820
INNER = ("2001:db8:77::1", "2001:db8:77::2")  # a and b inside the tunnel, as bench/e2e.py


class WgPeer(SimPeer):
    """A simulated WireGuard device (see the module docstring); ``handshaker`` is unused."""

    _private: bytes
    _hs: HandshakeState | None
    _index: int
    _remote: int
    _key: ChaCha20Poly1305 | None
    _counter: int
    _last_mac1: bytes | None
    _cookie: bytes | None
    _cookie_at: float

    def setup(self, private: bytes) -> None:
        self._private, self._hs, self._index, self._remote = private, None, 0, 0
        self._key, self._counter, self._last_mac1 = None, 0, None
        self._cookie, self._cookie_at = None, 0.0

    def _initiate(self, now: float, wall: float) -> bytes:
        self._index = int.from_bytes(os.urandom(4), "little")
        self._hs = HandshakeState("IKpsk2", True, WG_IDENTIFIER, self._private, rs=self.server_public,
                                  psk=NO_PSK, e=os.urandom(32))
        body = HEADER.pack(hs.MSG_INITIATION, RESERVED, self._index) + self._hs.write_message(tai64n(wall))
        mac1 = MAC(HASH(hs.LABEL_MAC1 + self.server_public), body)
        fresh = self._cookie is not None and now - self._cookie_at < C.COOKIE_REFRESH_TIME
        mac2 = MAC(self._cookie, body + mac1) if fresh and self._cookie is not None else bytes(16)
        self._last_mac1 = mac1
        self.initiations += 1
        if self.first_sent is None:
            self.first_sent = now
        self.retry_at = now + C.REKEY_TIMEOUT + self.jitter.uniform(0, C.REKEY_TIMEOUT_JITTER_MAX)
        return body + mac1 + mac2

    def keepalive_payload(self) -> bytes:
        assert self._key is not None
        nonce = bytes(4) + self._counter.to_bytes(8, "little")
        header = TRANSPORT_HEADER.pack(MSG_TRANSPORT, RESERVED, self._remote, self._counter)
        self._counter += 1
        return header + self._key.encrypt(nonce, b"", None)

    def renewal_at(self) -> float | None:
        return None  # no renewal: the runs are shorter than REKEY_AFTER_TIME

    def has_session(self) -> bool:
        return self._key is not None

    def receive(self, data: bytes, source: tuple[str, int], now: float, wall: float) -> list[bytes]:
        kind = data[0] if data else 0
        if kind == MSG_TRANSPORT:
            self.rx_esp += 1
            return []
        if kind == hs.MSG_RESPONSE and len(data) == RESPONSE.size and self._hs is not None:
            _t, _r, sender, receiver, ephemeral, empty, _m1, _m2 = RESPONSE.unpack(data)
            if receiver != self._index:
                return self._drop("unknown-index")
            state = copy.deepcopy(self._hs)
            try:
                state.read_message(ephemeral + empty)
            except NoiseError:
                return self._drop("decrypt-failed")
            send, _recv = state.split_keys()
            self._key, self._remote, self._counter, self._hs = ChaCha20Poly1305(send), sender, 0, None
            self.retry_at, self.session_at = None, now
            self.handshakes += 1
            if self.completed is None:
                self.completed = now
            self.keepalive_at = now + self.keepalive
            self.keepalives += 1
            return [self.keepalive_payload()]  # key confirmation
        if kind == hs.MSG_COOKIE_REPLY and len(data) == COOKIE_REPLY.size and self._last_mac1 is not None:
            _t, _r, receiver, nonce, encrypted = COOKIE_REPLY.unpack(data)
            try:
                cookie = xaead_decrypt(HASH(hs.LABEL_COOKIE + self.server_public), nonce, encrypted,
                                       self._last_mac1)
            except NoiseError:
                return self._drop("bad-cookie")
            self._cookie, self._cookie_at, self._last_mac1 = cookie, now, None
            self.cookies += 1
            return [self._initiate(now, wall)] if receiver == self._index and self._hs is not None else []
        return self._drop("unexpected")

    def _drop(self, reason: str) -> list[bytes]:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return []


def wg_config(private: bytes, peers: Sequence[tuple[bytes, str | None, str]], port: int = WG_PORT) -> str:
    """A `wg setconf` file: our key and port, then (public key, endpoint or None, allowed IPs) per peer."""
    lines = ["[Interface]", f"PrivateKey = {base64.b64encode(private).decode()}", f"ListenPort = {port}"]
    for public, endpoint, allowed in peers:
        lines += ["", "[Peer]", f"PublicKey = {base64.b64encode(public).decode()}", f"AllowedIPs = {allowed}"]
        if endpoint is not None:
            lines.append(f"Endpoint = {endpoint}")
    return "\n".join(lines) + "\n"


def sim_allowed_ip(i: int) -> str:
    """The inner address the i-th simulated peer may use (each [Peer] gets its own, as in the field)."""
    return f"2001:db8:78::{i + 1:x}/128"


@dataclass
class WgPair:
    """wireguard-go in a and b (as bench/e2e.py), b restartable with or without the simulated peers."""

    lab: Any
    a: Any  # lab Hosts
    b: Any
    work: Path
    rec: Any
    sim_publics: Sequence[bytes]

    def __post_init__(self) -> None:
        from lab.netns import NETNS_PREFIX

        suffix = self.lab.id[len(NETNS_PREFIX):]
        self.names = {"a": f"wg{suffix}a", "b": f"wg{suffix}b"}
        self.keys = {side: os.urandom(32) for side in self.names}
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.logs: dict[str, Path] = {}

    def public(self, side: str) -> bytes:
        from tunneld.crypto.noise import public_key

        return public_key(self.keys[side])

    def _run(self, side: str, peers: Sequence[tuple[bytes, str | None, str]]) -> float:
        from bench.e2e import WG_RUN_DIR, _alive
        from lab.netns import wait_for

        host, name = (self.a, self.names["a"]) if side == "a" else (self.b, self.names["b"])
        if side in self.procs:
            self.lab.stop(self.procs.pop(side))
        sock = WG_RUN_DIR / f"{name}.sock"
        sock.unlink(missing_ok=True)  # ours: the lab id is in the name
        log = self.logs[side] = self.work / f"wireguard-go-{side}.log"
        t0 = time.monotonic()
        with log.open("a") as logf:
            p = self.rec.spawn(self.lab, host, ["env", "WG_PROCESS_FOREGROUND=1", "wireguard-go", "-f", name],
                               stdout=logf, stderr=subprocess.STDOUT)
        self.procs[side] = p
        wait_for(lambda: _alive(p, f"wireguard-go in {side}", log) and sock.exists(), timeout=10,
                 what=f"wireguard-go control socket {sock}")
        conf = self.work / f"wg-{side}.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(wg_config(self.keys[side], peers))
        self.lab.run(host, ["wg", "setconf", name, str(conf)], timeout=60)
        i = 0 if side == "a" else 1
        self.lab.addr(host, name, f"{INNER[i]}/64")
        self.lab.ip(host, "link", "set", name, "mtu", "1400", "up")
        return time.monotonic() - t0

    def start_a(self) -> None:
        self._run("a", [(self.public("b"), f"{self.b.addr4}:{WG_PORT}", f"{INNER[1]}/128")])

    def restart_b(self, big: bool) -> float:
        from bench.e2e import _ping_until

        peers: list[tuple[bytes, str | None, str]] = [(self.public("a"), f"{self.a.addr4}:{WG_PORT}",
                                                       f"{INNER[0]}/128")]
        if big:
            peers += [(k, None, sim_allowed_ip(i)) for i, k in enumerate(self.sim_publics)]
        took = self._run("b", peers)
        watch = [(p, f"wireguard-go in {side}", self.logs[side]) for side, p in self.procs.items()]
        _ping_until(self.lab, self.b, INNER[0], 30, "wireguard-go ping6 b -> a", watch)
        _ping_until(self.lab, self.a, INNER[1], 30, "wireguard-go ping6 a -> b", watch)
        return took

    def pid(self, side: str) -> int:
        return self.procs[side].pid

    def sessions(self) -> int:
        """Simulated peers with a completed handshake, from `wg show latest-handshakes`."""
        sims = {base64.b64encode(k).decode() for k in self.sim_publics}
        out = self.lab.run(self.b, ["wg", "show", self.names["b"], "latest-handshakes"]).stdout
        return sum(1 for line in out.splitlines()
                   if len(f := line.split()) == 2 and f[0] in sims and f[1] != "0")

    def defences(self) -> tuple[dict[str, Any], dict[str, int]]:
        return {}, {}  # wireguard-go exposes no counters for them

    def setup(self) -> Any:
        from bench.e2e import Setup

        return Setup(server_addr=INNER[1], daemons=dict(self.procs), logs=dict(self.logs),
                     interfaces=list(self.names.values()), tunnel_if=self.names["a"])

    def problems(self) -> list[str]:
        text = self.logs["b"].read_text(errors="replace") if "b" in self.logs else ""
        return [line for line in text.splitlines() if "ERROR" in line or "panic" in line][:20]

    def close(self) -> None:
        from bench.e2e import WG_RUN_DIR

        for side in list(self.procs):
            self.lab.stop(self.procs.pop(side))
        for name in self.names.values():
            (WG_RUN_DIR / f"{name}.sock").unlink(missing_ok=True)
