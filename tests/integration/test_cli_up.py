"""`tunneld up` and `tunneld status` as a user runs them: exit codes, one-line errors, clean shutdown.

docs/architecture.md's contract: exit 0 ok, 1 runtime failure, 2 bad usage or config, always with one line
that names the problem and the fix, never a traceback. Daemons run in lab namespaces only, so a config that
unexpectedly works could not touch the machine's own interfaces.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.netns import Host, Lab, wait_for
from lab.tunnel import DOMAIN, TUNNELD, Node, control, names_toml, running_pair, start, status, write_secret
from tests.helpers import exit_on_signal

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                reason="needs root and iproute2 (CI runs as root)")

PEER_KEY = "krAVIkvrOQV8sXunPS/UZL6sraw8GjzS5z9yUcdeP18="  # any 32 bytes in base64


@pytest.fixture
def ns() -> Iterator[tuple[Lab, Host]]:
    with Lab() as lab:
        yield lab, lab.host("cli")


def good_toml(d: Path, secret: Path) -> str:
    return (f'[interface]\nname = "btmm0"\nlisten_port = 4500\nmtu = 1400\n'
            f'state_dir = "{d / "state"}"\ncontrol_socket = "{d / "control.sock"}"\n\n'
            f'[account]\ndomain = "{DOMAIN}"\nsecret_file = "{secret}"\n\n'
            f'[[peer]]\nname = "b"\npublic_key = "{PEER_KEY}"\nendpoint = "192.0.2.2:4500"\n\n'
            + names_toml(d))


def _unknown_interface_key(t: str, d: Path) -> str:
    return t.replace('name = "btmm0"', 'nmae = "btmm0"')


def _bad_port(t: str, d: Path) -> str:
    return t.replace("listen_port = 4500", "listen_port = 70000")


def _port_not_integer(t: str, d: Path) -> str:
    return t.replace("listen_port = 4500", 'listen_port = "4500"')


def _missing_account(t: str, d: Path) -> str:
    head, rest = t.split("[account]\n", 1)
    return head + rest.split("\n\n", 1)[1]


def _missing_secret_file(t: str, d: Path) -> str:
    return t.replace(str(d / "secret"), str(d / "no-such-secret"))


def _secret_file_mode(t: str, d: Path) -> str:
    loose = d / "loose-secret"
    write_secret(loose)
    loose.chmod(0o644)
    return t.replace(str(d / "secret"), str(loose))


def _secret_file_is_directory(t: str, d: Path) -> str:
    return t.replace(str(d / "secret"), str(d))


def _peer_key_wrong_length(t: str, d: Path) -> str:
    return t.replace(PEER_KEY, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==")  # 31 bytes


def _peer_key_not_base64(t: str, d: Path) -> str:
    return t.replace(PEER_KEY, "not base64!")


def _timers_leave_no_time_to_rekey(t: str, d: Path) -> str:
    return t + "\n[timers]\nrekey_after_time = 10\nrekey_timeout = 5\nreject_after_time = 12\n"


def _not_toml(t: str, d: Path) -> str:
    return t + "\n[interface\n"


def _nested_table_for_a_value(t: str, d: Path) -> str:
    return t.replace('name = "btmm0"\n', "") + '\n[interface.name]\nx = "btmm0"\n'


def _injected_domain(t: str, d: Path) -> str:
    return t.replace(f'domain = "{DOMAIN}"', f'domain = "{DOMAIN}\\";x"')


Mutation = Callable[[str, Path], str]
BAD_CONFIGS: list[tuple[Mutation, tuple[str, ...]]] = [
    (_unknown_interface_key, ("[interface]", '"nmae"')),
    (_bad_port, ("interface.listen_port", "70000")),
    (_port_not_integer, ("interface.listen_port",)),
    (_missing_account, ("[account]",)),
    (_missing_secret_file, ("account.secret_file", "no-such-secret")),
    (_secret_file_mode, ("account.secret_file", "0644")),
    (_secret_file_is_directory, ("account.secret_file",)),
    (_peer_key_wrong_length, ("peer[1].public_key", "31 bytes")),
    (_peer_key_not_base64, ("peer[1].public_key",)),
    (_timers_leave_no_time_to_rekey, ("timers.reject_after_time",)),
    (_not_toml, ("tunneld.toml",)),
    (_nested_table_for_a_value, ("interface.name", "a table")),
    (_injected_domain, ("account.domain",)),
]

CASE_IDS = [m.__name__.strip("_") for m, _ in BAD_CONFIGS]


@pytest.mark.parametrize(("mutate", "named"), BAD_CONFIGS, ids=CASE_IDS)
def test_up_with_bad_config_exits_2_with_one_line(ns: tuple[Lab, Host], tmp_path: Path, mutate: Mutation,
                                                  named: tuple[str, ...]) -> None:
    lab, h = ns
    secret = tmp_path / "secret"
    write_secret(secret)
    cfg = tmp_path / "tunneld.toml"
    cfg.write_text(mutate(good_toml(tmp_path, secret), tmp_path))
    r = lab.run(h, [TUNNELD, "up", "--config", str(cfg)], check=False, timeout=30)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tunneld: ") and "Traceback" not in lines[0]
    for word in named:
        assert word in lines[0], lines[0]
    assert secret.read_text().strip() not in r.stderr  # the secret is never echoed
    assert r.stdout == ""
    assert lab.run(h, ["ip", "link", "show", "btmm0"], check=False).returncode != 0, "a TUN was created"


def test_the_good_config_is_good(ns: tuple[Lab, Host], tmp_path: Path) -> None:
    """The base of the table above loads: each case fails for its own mutation only."""
    lab, h = ns
    secret = tmp_path / "secret"
    write_secret(secret)
    cfg = tmp_path / "tunneld.toml"
    cfg.write_text(good_toml(tmp_path, secret))
    r = lab.run(h, [TUNNELD, "identity", "--config", str(cfg)], check=False)
    assert r.returncode == 0, r.stderr


def test_status_without_a_daemon_exits_1_with_one_line(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    write_secret(secret)
    cfg = tmp_path / "tunneld.toml"
    cfg.write_text(good_toml(tmp_path, secret))
    for case in ("no socket", "stale socket"):
        if case == "stale socket":  # what a daemon killed by SIGKILL leaves behind: nobody listening
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(str(tmp_path / "control.sock"))
        for extra in ([], ["--json"]):
            r = subprocess.run([TUNNELD, "status", "--config", str(cfg), *extra], capture_output=True,
                               text=True, timeout=30, check=False)
            lines = r.stderr.splitlines()
            assert r.returncode == 1, (case, r.stderr)
            assert len(lines) == 1, (case, r.stderr)
            assert lines[0].startswith("tunneld: ") and str(tmp_path / "control.sock") in lines[0]
            assert r.stdout == ""


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Lab, Node]]:
    with running_pair(tmp_path, start_b=False) as (lab, a, _b):
        yield lab, a


@pytest.fixture(scope="module")
def running_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Node]]:
    """`running`, shared by the tests that leave the daemon as they found it."""
    with running_pair(tmp_path_factory.mktemp("running"), start_b=False) as (lab, a, _b):
        yield lab, a


def account_routes(lab: Lab, n: Node) -> list[str]:
    prefix = ipaddress.IPv6Network(f"{n.ula}/48", strict=False)
    return [line for line in lab.ip(n.host, "-6", "route", "show").splitlines()
            if line.split()[0] == str(prefix)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_shuts_down_cleanly(running: tuple[Lab, Node], sig: signal.Signals) -> None:
    lab, a = running
    assert a.proc is not None
    assert lab.run(a.host, ["ip", "link", "show", "btmm0"], check=False).returncode == 0
    assert account_routes(lab, a), "no route to the account's /48 while up"
    assert status(a)["interface"] == "btmm0"
    exit_on_signal(a.proc, sig, a.log, "tunneld")
    r = lab.run(a.host, ["ip", "link", "show", "btmm0"], check=False)
    assert r.returncode != 0, "btmm0 is still there"
    assert account_routes(lab, a) == [], "the route to the account's /48 is still there"
    assert not any(a.ula in line for line in lab.ip(a.host, "-6", "addr", "show").splitlines())
    wait_for(lambda: not a.socket.exists(), timeout=2, what="the control socket to be removed")
    # The port is free again: a restart works at once.
    start(lab, a)
    assert status(a)["listen_port"] == 4500


def test_up_when_port_in_use_exits_1_with_one_line(running_shared: tuple[Lab, Node], tmp_path: Path) -> None:
    lab, a = running_shared
    cfg = tmp_path / "second.toml"  # same port as the running daemon, another TUN and socket
    cfg.write_text(a.config.read_text().replace('name = "btmm0"', 'name = "btmm9"')
                   .replace(str(a.socket), str(tmp_path / "second.sock")))
    r = lab.run(a.host, [TUNNELD, "up", "--config", str(cfg)], check=False, timeout=30)
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert lab.run(a.host, ["ip", "link", "show", "btmm9"], check=False).returncode != 0


def _one_line(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    lines = r.stderr.splitlines()
    assert r.returncode == code, r.stderr
    assert len(lines) == 1 and lines[0].startswith("tunneld: ") and "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_rebind_to_a_busy_or_bad_port_is_refused_and_the_daemon_goes_on(running: tuple[Lab, Node]) -> None:
    """Used to kill the daemon: the old socket was closed before the new one failed to open."""
    lab, a = running
    assert a.proc is not None
    holder = lab.spawn(a.host, [sys.executable, "-c",
                                "import socket, sys\ns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
                                "s.bind(('::', 4600))\nprint('bound', flush=True)\nsys.stdin.read()"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "bound\n"
    try:
        rebind = [TUNNELD, "rebind", "--socket", str(a.socket), "--port"]
        _one_line(lab.run(a.host, [*rebind, "4600"], check=False), 1, "4600", "4500")
        _one_line(lab.run(a.host, [*rebind, "70000"], check=False), 2, "--port", "70000")
        for port in (70000, -1, "4600", True, [4600]):  # past the command line's own check
            reply = control(a, {"cmd": "rebind", "port": port})
            assert "rebind failed" in reply["error"], reply
        assert a.proc.poll() is None, "the daemon died"
        assert status(a)["listen_port"] == 4500
        ss = lab.run(a.host, ["ss", "-Hulnp"]).stdout
        assert ":4500 " in ss, ss
    finally:
        lab.stop(holder)
    r = lab.run(a.host, [TUNNELD, "rebind", "--socket", str(a.socket), "--port", "4601"], check=False)
    assert r.returncode == 0 and r.stdout == "listen_port 4601\n", r.stderr
    assert status(a)["listen_port"] == 4601


def test_control_socket_survives_hostile_requests(running_shared: tuple[Lab, Node]) -> None:
    _, a = running_shared
    assert a.proc is not None
    for data in (b"[" * 4096, b"{" * 70_000, b"\xff\xfe\n", b'{"cmd": "rebind", "port": 1e999}\n'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(a.socket))
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            assert b'"error"' in s.recv(65536)
    assert a.proc.poll() is None and status(a)["listen_port"] == 4500


def test_a_second_daemon_with_the_same_control_socket_refuses_to_start(running_shared: tuple[Lab, Node],
                                                                      tmp_path: Path) -> None:
    """Another account's daemon given the same control_socket used to take the socket over and unlink
    it on exit."""
    lab, a = running_shared
    secret = tmp_path / "other-secret"
    write_secret(secret)
    cfg = tmp_path / "other.toml"
    cfg.write_text(f'[interface]\nname = "btmm9"\nlisten_port = 4700\nstate_dir = "{tmp_path / "other"}"\n'
                   f'control_socket = "{a.socket}"\n\n' + names_toml(tmp_path) +
                   f'[account]\ndomain = "other.example.org"\nsecret_file = "{secret}"\n')
    inode = a.socket.stat().st_ino
    r = lab.run(a.host, [TUNNELD, "up", "--config", str(cfg)], check=False, timeout=30)
    _one_line(r, 1, str(a.socket), "control_socket")
    assert lab.run(a.host, ["ip", "link", "show", "btmm9"], check=False).returncode != 0
    assert a.socket.stat().st_ino == inode, "the running daemon's socket was replaced or removed"
    assert status(a)["interface"] == "btmm0"


@pytest.mark.parametrize("where", ["missing-dir", "world-readable", "symlink"])
def test_up_with_an_unsafe_keylog_exits_2_with_one_line(ns: tuple[Lab, Host], tmp_path: Path,
                                                        where: str) -> None:
    lab, h = ns
    secret = tmp_path / "secret"
    write_secret(secret)
    cfg = tmp_path / "tunneld.toml"
    cfg.write_text(good_toml(tmp_path, secret))
    keys = tmp_path / "keys"
    if where == "missing-dir":
        keys = tmp_path / "no-such-dir" / "keys"
    elif where == "world-readable":
        keys.write_text("")
        keys.chmod(0o644)
    else:
        keys.symlink_to(tmp_path / "elsewhere")
    r = lab.run(h, [TUNNELD, "up", "--config", str(cfg), "--keylog", str(keys)], check=False, timeout=30)
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "key log" in lines[0], r.stderr
    assert lab.run(h, ["ip", "link", "show", "btmm0"], check=False).returncode != 0, "a TUN was created"
    assert not (tmp_path / "elsewhere").exists()
