"""`tunneld ping`: finding the peer, one line per probe with its path and round trip, the exit codes."""

from __future__ import annotations

from typing import Any

import pytest

from tunneld import ping
from tunneld.cli import main

STATUS = {"peers": [
    {"name": "desk", "ula": "fd00:1::d", "path": "direct", "endpoint": "198.51.100.2:4500", "relay": None},
    {"name": "Laptop", "ula": "fd00:1::1", "path": "relay", "endpoint": "203.0.113.9:49152",
     "relay": "203.0.113.9:49152"},
]}


class FakeProber:
    def __init__(self, answers: list[float | None]) -> None:
        self.answers = answers
        self.sent: list[tuple[int, float]] = []
        self.closed = False

    def probe(self, seq: int, timeout: float) -> float | None:
        self.sent.append((seq, timeout))
        return self.answers[seq - 1]

    def close(self) -> None:
        self.closed = True


Outcome = tuple[int, list[str], FakeProber]


def run(which: str, answers: list[float | None], status: dict[str, Any] | None = None) -> Outcome:
    lines: list[str] = []
    prober = FakeProber(answers)
    addresses: list[str] = []

    def prober_for(address: str) -> FakeProber:
        addresses.append(address)
        return prober

    code = ping.run(which, len(answers), 0.5, 1.5, lambda: status if status is not None else STATUS,
                    prober_for=prober_for, write=lines.append, sleep=lambda s: None)
    return code, lines, prober


def test_each_probe_prints_its_path_and_round_trip() -> None:
    code, lines, prober = run("laptop", [0.0123, None, 0.002])
    assert code == 0 and prober.closed and prober.sent == [(1, 1.5), (2, 1.5), (3, 1.5)]
    assert lines == [
        "pong from Laptop (fd00:1::1), relay via 203.0.113.9:49152, in 12.3 ms",
        "timeout from Laptop (fd00:1::1), relay via 203.0.113.9:49152, after 1.5 s",
        "pong from Laptop (fd00:1::1), relay via 203.0.113.9:49152, in 2.0 ms",
        "2/3 replies, round trip min/avg/max 2.0/7.2/12.3 ms",
    ]
    code, lines, _ = run("fd00:1:0::d", [0.001])  # by ULA, any spelling
    assert code == 0 and lines[0] == "pong from desk (fd00:1::d), direct 198.51.100.2:4500, in 1.0 ms"
    assert run("desk.home.example.net.", [0.001])[0] == 0  # NAME.DOMAIN


def test_no_reply_exits_1_and_an_unknown_peer_names_the_known_ones() -> None:
    code, lines, _ = run("desk", [None, None])
    assert code == 1 and lines[-1] == "0/2 replies"
    with pytest.raises(ping.PingError, match=r"no peer 'nas'; known peers: Laptop, desk"):
        run("nas", [0.001])


@pytest.mark.parametrize("argv", [["-c", "0"], ["-c", "1001"], ["--timeout", "0"], ["--timeout", "31"],
                                  ["-i", "-1"], ["-c", "x"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ping", "desk", "--socket", "/nonexistent/ctl", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tunneld: ") or "usage" in err


def test_without_a_daemon_ping_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ping", "desk", "--socket", "/nonexistent/ctl", "-c", "1"]) == 1
    assert "cannot reach the daemon" in capsys.readouterr().err


def test_status_shows_each_peers_path_and_the_traversal_line(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tunneld import cli

    st = {"interface": "btmm0", "ula": "fd00:1::a", "public_key": "k", "listen_port": 4500, "gso": True,
          "gro": True, "offload": False, "offload_error": "off in the config",
          "nat": {"state": "behind an unmapped NAT", "observed": {"203.0.113.2:5353": "198.51.100.2:4500"},
                  "kind": "endpoint-independent", "relay_state": "allocated", "relayed": "203.0.113.3:49152"},
          "peers": [{**p, "source": "dns", "endpoint_source": "packet", "endpoint_age": 1.0,
                     "last_handshake": None, "rx_bytes": 0, "tx_bytes": 0, "path_since": 12.0}
                    for p in STATUS["peers"]]}
    monkeypatch.setattr(cli, "_ask", lambda args, req: st)
    assert cli.main(["status", "--socket", "/nonexistent/ctl"]) == 0
    out = capsys.readouterr().out
    assert ("  traversal: behind an unmapped NAT; STUN: 198.51.100.2:4500 (from 203.0.113.2:5353), "
            "endpoint-independent; relay allocated at 203.0.113.3:49152") in out
    assert "  path: direct 198.51.100.2:4500, for 12 s" in out
    assert "  path: relay via 203.0.113.9:49152, for 12 s" in out


def test_status_text_says_when_the_daemon_is_still_starting(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from tunneld import cli

    base = {"interface": "btmm0", "ula": "fd00:1::a", "public_key": "k", "listen_port": 4500, "gso": True,
            "gro": True, "offload": False, "offload_error": "off in the config", "peers": []}
    for state, first in (("starting", "interface: btmm0 (starting)"), ("up", "interface: btmm0")):
        monkeypatch.setattr(cli, "_ask", lambda args, req, state=state: {**base, "state": state})
        assert cli.main(["status", "--socket", "/nonexistent/ctl"]) == 0
        assert capsys.readouterr().out.splitlines()[0] == first
