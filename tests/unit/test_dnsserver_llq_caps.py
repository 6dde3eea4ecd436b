"""`serve-dns --llq-max N --llq-max-per-key N`: the LLQ table's caps given to the LLQ server (the server
itself faked: nothing binds), their defaults, one line with exit 2 for each bad value, and --help."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.unit.serve_dns_fake import fake_serve
from tests.unit.serve_dns_fake import serve_dns as run_serve_dns
from tunneld.cli import main
from tunneld.dnsserver import serve as serve_module
from tunneld.dnsserver.llq import LLQServer


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return fake_serve(monkeypatch)


def serve_dns(tmp_path: Path, *extra: str) -> int:
    return run_serve_dns(tmp_path, *extra)


def caps(llq: LLQServer) -> tuple[int, int, int]:
    return llq.max_llqs, llq.caps.per_key, llq.caps.per_address


@pytest.mark.parametrize(("extra", "want"), [
    ((), (10_000, 7_500, 2_500)),
    (("--llq-max", "12000"), (12_000, 9_000, 3_000)),
    (("--llq-max", "12000", "--llq-max-per-key", "12000"), (12_000, 12_000, 3_000)),
    (("--llq-max-per-key", "10000"), (10_000, 10_000, 2_500)),
    (("--llq-max", "1"), (1, 1, 1)),
])
def test_the_caps_reach_the_llq_server(tmp_path: Path, served: dict[str, Any], extra: tuple[str, ...],
                                       want: tuple[int, int, int]) -> None:
    assert serve_dns(tmp_path, *extra) == -1
    assert caps(served["llq"]) == want


@pytest.mark.parametrize(("extra", "message"), [
    (("--llq-max", "0"), "bad --llq-max 0: give 1 to 1000000 LLQs"),
    (("--llq-max", "1000001"), "bad --llq-max 1000001: give 1 to 1000000 LLQs"),
    (("--llq-max-per-key", "0"), "bad --llq-max-per-key 0: give 1 to 10000 LLQs (at most --llq-max)"),
    (("--llq-max", "500", "--llq-max-per-key", "501"),
     "bad --llq-max-per-key 501: give 1 to 500 LLQs (at most --llq-max)"),
])
def test_bad_caps_are_one_line_and_exit_2(tmp_path: Path, served: dict[str, Any], extra: tuple[str, ...],
                                          message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_dns(tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "llq" not in served


def test_the_caps_are_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve-dns", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--llq-max N" in out and "--llq-max-per-key N" in out and "(default 10000)" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="forcing a buffer past net.core.rmem_max needs root")
def test_the_dns_udp_socket_holds_a_burst_of_a_thousand_acks() -> None:
    """serve-dns binds as root: its UDP socket's receive buffer is forced to UDP_BUFFER (the kernel
    reports twice what was set), past the ~208 KiB default cap that dropped acks of a 1,000-LLQ event."""
    async def main() -> None:
        sock = await serve_module._bind("127.0.0.1", 0, trio.socket.SOCK_DGRAM)
        with sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= serve_module.UDP_BUFFER
        tcp = await serve_module._bind("127.0.0.1", 0, trio.socket.SOCK_STREAM)
        with tcp:
            assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < serve_module.UDP_BUFFER

    trio.run(main)
