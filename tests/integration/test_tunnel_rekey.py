"""Rekeying under load: a TCP stream keeps flowing, intact, while the initiator renews the session every
second (short [timers] in both configs; the defaults are WireGuard's 120 s / 180 s)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.flows import Blast
from lab.netns import Lab, wait_for
from lab.tunnel import Node, peer_status, ping6, running_pair, status
from tests.helpers import SHORT_TIMERS

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                reason="needs root and iproute2 (CI runs as root)")

STREAM_SECONDS = 6.0


@pytest.fixture
def fast_rekey_pair(tmp_path: Path) -> Iterator[tuple[Lab, Node, Node]]:
    with running_pair(tmp_path, extra=SHORT_TIMERS) as p:
        yield p


def test_stream_survives_rekeys_every_second(fast_rekey_pair: tuple[Lab, Node, Node]) -> None:
    lab, a, b = fast_rekey_pair
    ping6(lab, a, b)  # a initiates: a is the side that renews its sessions
    blast = Blast(lab, a, b, seconds=STREAM_SECONDS)
    wait_for(lambda: peer_status(b, "a")["rx_bytes"] > 1_000_000, timeout=10, what="the stream to flow")
    before = peer_status(a, "b")["handshakes"]
    # tcpblast's sender exits non-zero if the connection is reset or times out; retransmits are fine.
    sent, got = blast.result(timeout=60)
    after = peer_status(a, "b")["handshakes"]
    assert sent["bytes"] == got["bytes"] > 0
    assert sent["sha256"] == got["sha256"]
    assert after - before >= 3, f"only {after - before} handshakes in a {STREAM_SECONDS:g} s stream"
    pa, pb = peer_status(a, "b"), peer_status(b, "a")
    assert pa["session_age"] is not None and pa["session_age"] < 3.0  # never past reject_after_time
    assert pb["rx_bytes"] >= got["bytes"]  # everything came through the tunnel
    # A rekey must not look like an attack: nothing replayed, no unknown SPI on either side.
    assert pb["replayed"] == 0 and pa["replayed"] == 0
    assert status(b)["counters"]["rx_unknown_spi"] == 0
    ping6(lab, a, b)
