"""The hosts block service: its lines, debounced rewrites with no write when unchanged, removal on a clean
stop, a write failure reported not raised; the daemon's `hosts` control command and `tunneld hosts` (with
the peers' host-key fingerprints)."""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tunneld import hosts_cmd
from tunneld.cli import main
from tunneld.config import NamesConfig, load_config
from tunneld.daemon import Daemon
from tunneld.identity import DeviceIdentity
from tunneld.marked_block import read_block, write_block
from tunneld.proto import hostkeys
from tunneld.services.hostkeys import KnownHostsService
from tunneld.services.names import DEBOUNCE, RETRY, NamesService, hosts_lines

DOMAIN = "home.example.net"
USER = "127.0.0.1 localhost\n"
KEY = hostkeys.read_public_key(
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl")
A, B, C = ipaddress.IPv6Address("fd00::a"), ipaddress.IPv6Address("fd00::b"), ipaddress.IPv6Address("fd00::c")


def test_lines_sorted_with_and_without_short_names() -> None:
    devices = [("laptop", B), ("Desktop", A)]
    assert hosts_lines(devices, "Home.Example.NET.", True) == [
        "fd00::a desktop.home.example.net desktop",
        "fd00::b laptop.home.example.net laptop",
    ]
    assert hosts_lines(devices, DOMAIN, False) == ["fd00::a desktop.home.example.net",
                                                   "fd00::b laptop.home.example.net"]


@pytest.mark.parametrize("name", ["bad name", "x\n127.0.0.1 evil", "", "a.b", "-x", "AutoTunnel-x"])
def test_a_name_that_is_not_one_label_never_reaches_the_block(name: str) -> None:
    assert hosts_lines([(name, A), ("ok", B)], DOMAIN, True) == ["fd00::b ok.home.example.net ok"]


class Recorder:
    """A writer that records each call and really writes (the block's text is checked too)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.changed = 0

    def __call__(self, path: Path, domain: str, lines: Sequence[str]) -> bool:
        self.calls.append(list(lines))
        changed = write_block(path, domain, lines)
        self.changed += changed
        return changed


def _run(test: Any) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def test_service_writes_debounced_and_removes_on_stop(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(USER)
    writer = Recorder()
    service = NamesService(NamesConfig(hosts_file=hosts), DOMAIN, [(b"me", "desktop", A)], write=writer)

    async def test() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            assert read_block(hosts.read_text(), DOMAIN) == ["fd00::a desktop.home.example.net desktop"]
            assert service.status() == {"state": "ok", "hosts_file": str(hosts), "names": 1, "writes": 1}
            # A burst of changes: one rewrite after the debounce.
            service.learned(b"k1", "laptop", B)
            service.learned(b"k2", "phone", C)
            service.gone(b"k2")
            await trio.sleep(DEBOUNCE / 2)
            assert len(writer.calls) == 1
            await trio.sleep(DEBOUNCE)
            assert len(writer.calls) == 2
            assert read_block(hosts.read_text(), DOMAIN) == [
                "fd00::a desktop.home.example.net desktop", "fd00::b laptop.home.example.net laptop"]
            # The same again changes nothing: no wake-up, no write.
            service.learned(b"k1", "laptop", B)
            service.gone(b"unknown")
            await trio.sleep(DEBOUNCE * 4)
            assert len(writer.calls) == 2
            # A static device (itself, a [[peer]]) stays when DNS says it is gone.
            service.gone(b"me")
            service.gone(b"k1")
            await trio.sleep(DEBOUNCE * 2)
            assert read_block(hosts.read_text(), DOMAIN) == ["fd00::a desktop.home.example.net desktop"]
            nursery.cancel_scope.cancel()
        assert hosts.read_text() == USER
        assert writer.changed == 4

    _run(test)


def test_service_disabled_never_writes(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    writer = Recorder()
    service = NamesService(NamesConfig(enabled=False, hosts_file=hosts), DOMAIN, [(b"me", "a", A)],
                           write=writer)

    async def test() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            service.learned(b"k", "b", B)
            await trio.sleep(DEBOUNCE * 2)
            nursery.cancel_scope.cancel()

    _run(test)
    assert writer.calls == [] and not hosts.exists()
    assert service.status() == {"state": "disabled"}
    assert service.answer()["lines"] == ["fd00::a a.home.example.net a", "fd00::b b.home.example.net b"]


def test_a_write_failure_is_reported_not_raised_and_retried(tmp_path: Path) -> None:
    hosts = tmp_path / "no-such-dir" / "hosts"
    service = NamesService(NamesConfig(hosts_file=hosts), DOMAIN, [(b"me", "a", A)])

    async def test() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            status = service.status()
            assert status["state"] == "error" and str(hosts) in status["error"], status
            hosts.parent.mkdir()  # the problem goes away; no device changes
            await trio.sleep(RETRY + DEBOUNCE * 2)
            assert service.status()["state"] == "ok"
            assert read_block(hosts.read_text(), DOMAIN) == ["fd00::a a.home.example.net a"]
            nursery.cancel_scope.cancel()

    _run(test)


def _daemon(tmp_path: Path, names: str = "") -> Daemon:
    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    secret.chmod(0o600)
    cfg = tmp_path / "tunneld.toml"
    cfg.write_text(f'[interface]\nstate_dir = "{tmp_path}"\ncontrol_socket = "{tmp_path / "c.sock"}"\n'
                   f'[account]\ndomain = "{DOMAIN}"\nsecret_file = "{secret}"\nname = "desk"\n'
                   f'[names]\nhosts_file = "{tmp_path / "hosts"}"\n{names}')
    return Daemon(load_config(cfg), DeviceIdentity.generate())


def test_daemon_answers_hosts_with_itself(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, "short_names = false\n")
    reply = trio.run(daemon.handle_control, {"cmd": "hosts"})
    assert reply == {"domain": DOMAIN, "enabled": True, "hosts_file": str(tmp_path / "hosts"),
                     "lines": [f"{daemon.ula} desk.{DOMAIN}"], "known_hosts": None, "host_keys": []}
    unknown = trio.run(daemon.handle_control, {"cmd": "nope"})
    assert "hosts" in unknown["error"]


def test_daemon_answers_hosts_with_the_peers_host_key_fingerprints(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path)
    known = tmp_path / "ssh_known_hosts"
    daemon.known_hosts = KnownHostsService(known, DOMAIN)
    daemon.known_hosts.learned("Phone", A, (KEY,))
    reply = trio.run(daemon.handle_control, {"cmd": "hosts"})
    assert reply["known_hosts"] == str(known)
    assert reply["host_keys"] == [{"name": "phone", "algorithm": "ssh-ed25519",
                                   "fingerprint": KEY.fingerprint_text}]
    daemon.known_hosts.gone("phone")
    assert trio.run(daemon.handle_control, {"cmd": "hosts"})["host_keys"] == []


def test_render_shows_fingerprints_as_comments_after_the_block() -> None:
    answer = {"domain": DOMAIN, "lines": ["fd00::a a.home.example.net a"], "known_hosts": "/k",
              "host_keys": [{"name": "a", "algorithm": "ssh-ed25519", "fingerprint": KEY.fingerprint_text}]}
    text = hosts_cmd.render(answer)
    assert read_block(text, DOMAIN) == answer["lines"]  # still a hosts file: the keys are comments
    tail = text.split("# END tunneld home.example.net\n", 1)[1]
    assert tail == f"# peer host keys in /k:\n#   a ssh-ed25519 {KEY.fingerprint_text}\n"
    assert "no peer host keys held yet" in hosts_cmd.render({**answer, "host_keys": []})
    assert "host keys" not in hosts_cmd.render({**answer, "known_hosts": None})
    with pytest.raises(ValueError):
        hosts_cmd.render({**answer, "host_keys": ["x"]})


def test_render_is_the_block_as_written() -> None:
    answer = {"domain": DOMAIN, "lines": ["fd00::a a.home.example.net a"]}
    text = hosts_cmd.render(answer)
    assert read_block(text, DOMAIN) == answer["lines"]
    assert text.startswith("# BEGIN tunneld home.example.net\n")
    assert "no devices" in hosts_cmd.render({"domain": DOMAIN, "lines": []})
    with pytest.raises(ValueError):
        hosts_cmd.render({"lines": "x"})


def test_cli_hosts_asks_the_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    answer = {"domain": DOMAIN, "enabled": True, "hosts_file": "/etc/hosts",
              "lines": ["fd00::a a.home.example.net a"], "known_hosts": "/etc/ssh/ssh_known_hosts",
              "host_keys": [{"name": "a", "algorithm": "ssh-ed25519", "fingerprint": KEY.fingerprint_text}]}
    asked: list[dict[str, Any]] = []

    def request(path: Path, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        asked.append(req)
        return answer

    monkeypatch.setattr("tunneld.services.control.request", request)
    sock = str(tmp_path / "c.sock")
    assert main(["hosts", "--socket", sock]) == 0
    out = capsys.readouterr().out
    assert out == hosts_cmd.render(answer) and KEY.fingerprint_text in out
    assert main(["hosts", "--socket", sock, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == answer
    assert asked == [{"cmd": "hosts"}, {"cmd": "hosts"}]


def test_cli_hosts_without_a_daemon_is_one_line_exit_1(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hosts", "--socket", str(tmp_path / "none.sock")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the daemon" in err
