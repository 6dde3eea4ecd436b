"""DNS Push over TLS through a week of the account's server: devices joined with `--tls` learn each other by
DNS Push (RFC 8765) as members of the account (their client certificates under the account CA); serve-dns
restarts (its sessions end) and every watcher reconnects and subscribes again without forgetting a peer for a
moment; a third device then joins and is learned by Push, and leaves and is forgotten by Push."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from lab.netns import Lab, wait_for
from lab.topology import star
from lab.tunnel import Node, joined, serve_dns, status, write_secret

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dig"),
                                reason="needs root and dig (bind9-dnsutils)")

RESTART_WINDOW = 20.0  # seconds to watch the peers across the server's restart and the resubscription


def knows(n: Node, other: Node) -> bool:
    return any(p["ula"] == other.ula for p in status(n)["peers"])


def watch(n: Node) -> dict[str, object]:
    w: dict[str, object] = status(n)["watch"]
    return w


def test_push_survives_a_server_restart_and_learns_a_third_device(tmp_path: Path) -> None:
    with Lab() as lab:
        hub, laptop_h, desktop_h, tablet_h = star(lab, ("laptop", "desktop", "tablet"))
        secret = tmp_path / "secret"
        write_secret(secret)
        dns_at = (hub.addr4, 5353)
        server_node = Node(hub, tmp_path / "dns", hub.addr4)
        server = serve_dns(lab, server_node, secret, tmp_path, dns_at, tls=True)
        laptop = joined(lab, laptop_h, "laptop", secret, dns_at, tmp_path, tls=True)
        desktop = joined(lab, desktop_h, "desktop", secret, dns_at, tmp_path, tls=True)
        wait_for(lambda: knows(laptop, desktop) and knows(desktop, laptop), timeout=20,
                 what="the two devices to learn each other")
        for n in (laptop, desktop):
            assert watch(n)["transport"] == "push", watch(n)
        sessions_before = watch(laptop)["counters"]

        # The server restarts (same database): the sessions end; the watchers reconnect and resubscribe.
        server.terminate()
        server.wait(timeout=10)
        server = serve_dns(lab, server_node, secret, tmp_path, dns_at, tls=True)
        end = time.monotonic() + RESTART_WINDOW
        resubscribed = False
        while time.monotonic() < end and not resubscribed:  # bounded; each turn asks both daemons
            assert knows(laptop, desktop) and knows(desktop, laptop), "a peer forgotten across the restart"
            w = watch(laptop)
            counters = w["counters"]
            assert isinstance(counters, dict) and isinstance(sessions_before, dict)
            resubscribed = (w["transport"] == "push" and w["push"] == "up"
                            and counters.get("push: sessions", 0) > sessions_before.get("push: sessions", 0))
            time.sleep(0.2)  # a poll interval, not a synchronisation: the loop checks state each turn
        assert resubscribed, f"the laptop's watcher did not resubscribe by Push: {watch(laptop)}"
        assert counters.get("push: connection lost", 0) >= 1, counters

        # A third device joins after the restart: learned through the new subscriptions, by Push.
        tablet = joined(lab, tablet_h, "tablet", secret, dns_at, tmp_path, tls=True)
        wait_for(lambda: knows(laptop, tablet) and knows(desktop, tablet), timeout=15,
                 what="the tablet to be learned after the restart")
        assert watch(laptop)["transport"] == "push" and watch(desktop)["transport"] == "push"

        # It leaves (a clean stop withdraws its records): the removals are pushed, the others forget it.
        assert tablet.proc is not None
        tablet.proc.terminate()  # SIGTERM: the daemon withdraws its records before it exits
        tablet.proc.wait(timeout=15)
        wait_for(lambda: not knows(laptop, tablet) and not knows(desktop, tablet), timeout=15,
                 what="the others to forget the tablet")
        assert knows(laptop, desktop) and knows(desktop, laptop)
        assert watch(laptop)["transport"] == "push"
