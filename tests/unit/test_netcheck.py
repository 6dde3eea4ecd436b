"""`tunneld netcheck` on loopback: STUN servers of our own (one honest, one that sees another port, as a
NAT mapping per destination would make it), the gateway a loopback address where nothing answers."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import trio

import tunneld.netcheck
from tests.helpers import account_toml, load_toml
from tests.unit.fake_turn import FakeRelay
from tunneld.cli import main
from tunneld.config import Config, StunServer
from tunneld.dnsserver.stun import respond
from tunneld.netcheck import NetcheckResult, StunResult, relay_check, render, run
from tunneld.proto import stun_wire as sw

GATEWAY = "127.0.0.9"  # loopback: the port-mapping probe is refused there, nothing leaves the host


def run_with(shifts: list[int], extra: tuple[StunServer, ...] = (), timeout: float = 1.0) -> NetcheckResult:
    """netcheck's run() with loopback STUN servers answering inside the same trio run."""

    async def body() -> NetcheckResult:
        async def serve(sock: trio.socket.SocketType, shift: int) -> None:
            with sock:
                await answer(sock, shift)

        async def answer(sock: trio.socket.SocketType, shift: int) -> None:
            while True:
                data, src = await sock.recvfrom(2048)
                answer = respond(data, (src[0], (src[1] + shift) % 65536))
                if answer is not None:
                    await sock.sendto(answer, src)

        servers: list[StunServer] = []
        async with trio.open_nursery() as nursery:
            for shift in shifts:
                sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                await sock.bind(("127.0.0.1", 0))
                servers.append(StunServer("127.0.0.1", sock.getsockname()[1]))
                nursery.start_soon(serve, sock, shift)
            result = await run((*servers, *extra), GATEWAY, None, timeout)
            nursery.cancel_scope.cancel()
        return result

    return trio.run(body)


def test_two_servers_that_agree_make_an_endpoint_independent_verdict() -> None:
    r = run_with([0, 0])
    assert [s.error for s in r.stun] == [None, None]
    mapped = {s.mapped for s in r.stun}
    assert len(mapped) == 1 and all(s.rtt_ms is not None and s.rtt_ms < 1000 for s in r.stun)
    assert r.nat == {"ipv4": {"kind": "endpoint-independent", "mapped": mapped.pop()}}
    assert r.portmap["gateway"] == GATEWAY and r.portmap["protocol"] is None
    assert r.relay == "not configured"
    assert "nat ipv4: endpoint-independent" in render(r)


def test_two_servers_that_see_different_ports_make_a_per_destination_verdict() -> None:
    r = run_with([0, 1])
    assert r.nat == {"ipv4": {"kind": "per-destination", "mapped": None}}
    assert "nat ipv4: per-destination" in render(r)


def test_a_silent_server_is_reported_within_the_bound_and_the_rest_still_counts() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never read: no ICMP, no answer
        t0 = time.monotonic()
        r = run_with([0], extra=(StunServer("127.0.0.1", silent.getsockname()[1]),), timeout=1.0)
        took = time.monotonic() - t0
    assert took < 1.0 + 0.5  # the time bound (plus start-up)
    assert r.stun[0].mapped is not None and r.stun[1].error == "no answer in 1 s"
    assert r.nat["ipv4"]["kind"] == "unknown" and r.nat["ipv4"]["mapped"] == r.stun[0].mapped
    assert "one server answered" in render(r)


def test_render_names_each_part() -> None:
    r = NetcheckResult(portmap={"gateway": "192.168.1.1", "protocol": "pcp", "external": "203.0.113.1"},
                       stun=[StunResult("stun.example.net:3478", "198.51.100.1:3478", "203.0.113.1:4500",
                                        12.5),
                             StunResult("192.0.2.1:53", "192.0.2.1:53", error="error 400 Bad Request")])
    text = render(r)
    assert "portmap: pcp (gateway 192.168.1.1, external 203.0.113.1)" in text
    assert "stun stun.example.net:3478 (198.51.100.1:3478): 203.0.113.1:4500 in 12.5 ms" in text
    assert "stun 192.0.2.1:53: error 400 Bad Request" in text
    assert text.endswith("relay: not configured\n")
    assert "no servers" in render(NetcheckResult())


# ---- the command line -------------------------------------------------------------------------------------


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []

    async def fake(servers: tuple[StunServer, ...], gateway: str | None, config: object,
                   timeout: float = 3.0) -> NetcheckResult:
        calls.append((servers, gateway, config))
        return NetcheckResult(stun=[StunResult(str(s)) for s in servers])

    monkeypatch.setattr(tunneld.netcheck, "run", fake)
    return calls


def test_cli_stun_alone_needs_no_config_and_json_is_json(fake_run: list[tuple[Any, ...]],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["netcheck", "--stun", "192.0.2.1:3478", "--stun", "stun.example.net:3478", "--stun",
                 "192.0.2.1:3478", "--gateway", GATEWAY, "--json"]) == 0
    servers, gateway, config = fake_run[0]
    assert servers == (StunServer("192.0.2.1", 3478), StunServer("stun.example.net", 3478))
    assert gateway == GATEWAY and config is None
    out = json.loads(capsys.readouterr().out)
    assert [s["server"] for s in out["stun"]] == ["192.0.2.1:3478", "stun.example.net:3478"]
    assert out["relay"] == "not configured"


def test_cli_reads_the_config(fake_run: list[tuple[Any, ...]], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret"
    secret.write_text("A" * 43 + "=\n")
    secret.chmod(0o600)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[account]\ndomain = "a.example"\nsecret_file = "{secret}"\nserver = "192.0.2.53:53"\n'
                   f'name = "x"\n[portmap]\ngateway = "{GATEWAY}"\n')
    assert main(["netcheck", "--config", str(cfg)]) == 0
    servers, gateway, config = fake_run[0]
    assert servers == (StunServer("192.0.2.53", 53),) and gateway == GATEWAY and config is not None
    assert "stun 192.0.2.53:53" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "said"), [
    (["--stun", "192.0.2.1"], "bad --stun"),
    (["--stun", "a_b:1"], "bad --stun"),
    (["--stun", "192.0.2.1:1", "--gateway", "router"], "bad --gateway"),
    (["--config", "/nonexistent/c.toml"], "no such file"),
])
def test_cli_bad_arguments_exit_2_with_one_line(fake_run: list[tuple[Any, ...]],
                                                capsys: pytest.CaptureFixture[str], argv: list[str],
                                                said: str) -> None:
    assert main(["netcheck", *argv]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1 and not fake_run


def test_a_family_without_sockets_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    real = trio.socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> trio.socket.SocketType:
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr(trio.socket, "socket", no_ipv6)
    r = run_with([0], extra=(StunServer("2001:db8::53", 3478),))
    assert r.stun[0].mapped is not None
    assert r.stun[1].error == "cannot open a socket: Address family not supported by protocol"


class _RestUsers(dict[str, str]):
    """coturn's use-auth-secret: any "EXPIRY:NAME" user, its password HMAC'd from the shared secret."""

    def __init__(self, secret: bytes) -> None:
        super().__init__()
        self.secret = secret

    def get(self, user: str, default: Any = None) -> Any:  # type: ignore[override]
        expiry, _, name = user.partition(":")
        if not expiry.isdigit() or int(expiry) < time.time():
            return default
        return sw.turn_rest_credentials(self.secret, name, int(expiry))[1]

    def __getitem__(self, user: str) -> str:
        got = self.get(user)
        if got is None:
            raise KeyError(user)
        return str(got)


def _relay_config(tmp_path: Path, port: int) -> Config:
    config: Config = load_toml(tmp_path, account_toml(tmp_path, bytes(range(32))) + 'name = "laptop"\n'
                               f'[relay]\nserver = "127.0.0.1:{port}"\n')
    return config


@pytest.mark.parametrize("right_secret", [True, False])
def test_relay_check_allocates_with_the_account_credentials_and_deletes(tmp_path: Path,
                                                                          right_secret: bool) -> None:
    async def body() -> tuple[str, FakeRelay]:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
            await server.bind(("127.0.0.1", 0))
            config = _relay_config(tmp_path, server.getsockname()[1])
            relay = FakeRelay({}, server.getsockname())
            relay.users = _RestUsers(config.turn_secret if right_secret else b"another secret")

            async def serve() -> None:
                while True:
                    data, source = await server.recvfrom(4096)
                    for answer in relay.handle(data, source[:2]):
                        await server.sendto(answer, source)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                with trio.fail_after(10):
                    outcome = await relay_check(config, 2.0)
                nursery.cancel_scope.cancel()
            return outcome, relay

    outcome, relay = trio.run(body)
    if right_secret:
        assert outcome.startswith("answers (127.0.0.1:") and "relayed 127.0.0.1:" in outcome, outcome
        assert not relay.allocations, "the goodbye's Refresh with LIFETIME 0 deletes the allocation"
    else:
        assert outcome.startswith("refused (127.0.0.1:") and "401" in outcome, outcome


def test_relay_check_without_a_relay_says_so(tmp_path: Path) -> None:
    assert trio.run(relay_check, None, 1.0) == "not configured"
