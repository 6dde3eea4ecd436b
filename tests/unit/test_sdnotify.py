"""tunneld.sdnotify against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tunneld.sdnotify import Notifier, address


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """The service manager's end: a bound datagram socket, and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)


def test_ready_status_stopping_arrive_as_datagrams(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("up, 0 of 1 peers with a session")
    assert sock.recv(4096) == b"READY=1\nSTATUS=up, 0 of 1 peers with a session"
    assert n.status("up, 1 of 1 peers with a session")
    assert sock.recv(4096) == b"STATUS=up, 1 of 1 peers with a session"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=shutting down"
    assert n.status("two\nlines")  # a field never splits into two
    assert sock.recv(4096) == b"STATUS=two lines"
    n.close()
    assert not n.status("after close")


def test_the_socket_is_connected_at_start_up(manager: tuple[socket.socket, str], tmp_path: Path) -> None:
    """Messages still arrive once the path is gone (as when the daemon can no longer reach it)."""
    sock, path = manager
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    os.rename(path, tmp_path / "moved")
    assert n.ready("up")
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    n.close()


def test_abstract_socket_names() -> None:
    name = f"tunneld-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        n.close()


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"},
                                 {"NOTIFY_SOCKET": "@"}])
def test_without_a_usable_notify_socket_nothing_happens(env: dict[str, str]) -> None:
    n = Notifier.from_env(env)
    assert not n.enabled
    assert not n.ready("up") and not n.stopping()


def test_a_socket_nobody_listens_on_is_no_error(tmp_path: Path) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    assert not n.enabled and not n.ready("up")


def test_address_forms() -> None:
    assert address("/run/systemd/notify") == "/run/systemd/notify"
    assert address("@x") == b"\0x"
    assert address("x") is None


def test_follow_sends_a_status_line_only_when_the_summary_changes(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    counts = iter([0, 0, 0, 1, 1, 2] + [2] * 100)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(n.follow, lambda: f"up, {next(counts)} of 2 peers with a session")
            await trio.sleep(20)  # virtual time: 20 looks
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    sock.setblocking(False)
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except BlockingIOError:
            break
    assert got == [b"STATUS=up, 1 of 2 peers with a session", b"STATUS=up, 2 of 2 peers with a session"]
    n.close()


# -- the daemon's side: READY waits for the first publication's answer, bounded ------------------------------

class _FakeDaemon:
    """What Daemon._announce_ready uses: a publisher's first-answer event, the notifier, the summary."""

    def __init__(self, notifier: Notifier, publisher: object | None) -> None:
        self.notifier = notifier
        self.publisher = publisher
        self.summary = lambda: "up, 0 of 0 peers with a session"


def _ready_at(manager: tuple[socket.socket, str], answer_at: float | None, publisher: bool = True) -> float:
    """When (virtual seconds after start) READY=1 left, the publisher answering at ``answer_at``."""
    from types import SimpleNamespace

    from tunneld.daemon import Daemon

    sock, path = manager
    sock.setblocking(False)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    fake = _FakeDaemon(notifier, SimpleNamespace(answered=trio.Event()) if publisher else None)
    when: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Daemon._announce_ready, fake)  # type: ignore[arg-type]
            if answer_at is not None and fake.publisher is not None:
                await trio.sleep(answer_at)
                fake.publisher.answered.set()  # type: ignore[attr-defined]
            while not when:
                await trio.sleep(0.5)
                try:
                    assert sock.recv(4096).startswith(b"READY=1\n")
                    when.append(trio.current_time())
                except BlockingIOError:
                    pass
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    notifier.close()
    return when[0]


def test_ready_waits_for_the_first_publication(manager: tuple[socket.socket, str]) -> None:
    assert 4.0 <= _ready_at(manager, answer_at=4.0) <= 4.5


def test_ready_does_not_wait_forever_for_a_silent_server(manager: tuple[socket.socket, str]) -> None:
    from tunneld.daemon import READY_PUBLISH_WAIT

    assert READY_PUBLISH_WAIT <= _ready_at(manager, answer_at=None) <= READY_PUBLISH_WAIT + 0.5


def test_ready_at_once_without_a_publisher(manager: tuple[socket.socket, str]) -> None:
    assert _ready_at(manager, answer_at=None, publisher=False) <= 0.5


def test_the_publishers_first_answer_is_an_event() -> None:
    from tunneld.proto.dnsupdate import Failed, Published
    from tunneld.services.publisher import PublisherService

    service = PublisherService(("192.0.2.53", 53), "example.com", bytes(32), 1800, start_delay=0)
    assert not service.answered.is_set()
    service.on_event(Failed("TIMEOUT", "no answer"))
    assert service.answered.is_set()
    service = PublisherService(("192.0.2.53", 53), "example.com", bytes(32), 1800, start_delay=0)
    service.on_event(Published(1800, True, 0.0, 0.0))
    assert service.answered.is_set()
