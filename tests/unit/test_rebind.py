"""`rebind` never leaves the daemon without its outer socket: a port that is in use or out of range is an
error for the caller, and the old socket goes on working.

The sockets here are real, bound to ::1 only; nothing is sent.
"""

from __future__ import annotations

import base64
import functools
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tunneld.config import load_config
from tunneld.daemon import Daemon
from tunneld.identity import DeviceIdentity
from tunneld.net.udp import UDPTransport


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on ::1 held by someone else."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        yield s.getsockname()[1]


def in_trio(test: Callable[..., None]) -> Callable[..., None]:
    """Run a test inside trio: closing a socket tells trio's waiters (`trio.lowlevel.notify_closing`)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            test(*args, **kwargs)

        trio.run(main)

    return run


def _alive(udp: UDPTransport) -> None:
    assert udp.sock is not None and udp.sock.fileno() >= 0
    assert udp.sock.getsockname()[1] == udp.local_port


@in_trio
def test_rebind_to_a_port_in_use_keeps_the_old_socket(busy_port: int) -> None:
    udp = UDPTransport(0, bind_host="::1")
    old, port, generation = udp.sock, udp.local_port, udp.generation
    with pytest.raises(OSError):
        udp.rebind(busy_port)
    assert udp.sock is old and udp.local_port == port and udp.generation == generation
    _alive(udp)
    udp.close()


@pytest.mark.parametrize("port", [-1, 65536, 70000])
@in_trio
def test_rebind_to_a_port_out_of_range_keeps_the_old_socket(port: int) -> None:
    udp = UDPTransport(0, bind_host="::1")
    old, before = udp.sock, udp.local_port
    with pytest.raises(ValueError, match="port"):
        udp.rebind(port)
    assert udp.sock is old and udp.local_port == before
    _alive(udp)
    udp.close()


@in_trio
def test_rebind_to_another_port_opens_the_new_socket_first() -> None:
    udp = UDPTransport(0, bind_host="::1")
    old = udp.sock
    assert old is not None
    udp.rebind(0)
    assert udp.sock is not old and old.fileno() == -1  # the old one is closed once the new one is open
    _alive(udp)
    assert udp.generation == 1
    udp.close()


@in_trio
def test_rebind_to_the_same_port_works() -> None:
    """Our own socket holds the port: it has to go first, and the same port comes back."""
    udp = UDPTransport(0, bind_host="::1")
    port = udp.local_port
    udp.rebind()
    assert udp.local_port == port
    _alive(udp)
    udp.rebind(port)
    assert udp.local_port == port
    _alive(udp)
    udp.close()


@in_trio
def test_rebind_to_another_address_on_the_same_port_works() -> None:
    """What a network change does when the bound address vanished: the port stays, the address becomes ::.
    The wildcard conflicts with our own ::1 binding, so ours goes first."""
    udp = UDPTransport(0, bind_host="::1")
    port = udp.local_port
    udp.rebind(bind_host="::")
    assert udp.local_port == port and udp.bind_host == "::"
    assert udp.sock is not None and udp.sock.getsockname()[0] == "::"
    _alive(udp)
    udp.close()


def _daemon(tmp_path: Path) -> Daemon:
    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    secret.chmod(0o600)
    cfg = tmp_path / "tunneld.toml"
    cfg.write_text(f'[interface]\nstate_dir = "{tmp_path}"\ncontrol_socket = "{tmp_path / "c.sock"}"\n'
                   f'[account]\ndomain = "home.example.net"\nsecret_file = "{secret}"\n')
    return Daemon(load_config(cfg), DeviceIdentity.generate())


@pytest.mark.parametrize("port", ["busy", 70000, -1, "4500", 4500.5, True, [1], {"a": 1}])
def test_a_bad_rebind_request_is_answered_and_the_daemon_keeps_its_socket(
        tmp_path: Path, busy_port: int, port: Any) -> None:
    daemon = _daemon(tmp_path)

    async def main() -> None:
        daemon.udp = udp = UDPTransport(0, bind_host="::1")
        old, before = udp.sock, udp.local_port
        reply = await daemon.handle_control({"cmd": "rebind", "port": busy_port if port == "busy" else port})
        assert set(reply) == {"error"} and "rebind" in reply["error"], reply
        assert "\n" not in reply["error"]
        assert udp.sock is old and udp.local_port == before
        _alive(udp)
        udp.close()

    trio.run(main)
