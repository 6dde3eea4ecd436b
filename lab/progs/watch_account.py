"""Learn an account's devices as ``tunneld up`` does (the watching service, over UDP and TCP), and print
how many (for the LLQ tests).

  python -m lab.progs.watch_account SERVER PORT ZONE SECRET_FILE WANT SECONDS

Runs :class:`tunneld.services.watcher.WatcherService` as the daemon's own name ``me``; prints
{"learned": n, "t": seconds} at each new peer, and stops at WANT peers or after SECONDS with
{"peers": n, "t": seconds, "counters": {...}}.
"""

from __future__ import annotations

import sys
import time

import trio

from lab.progs import report
from tunneld.config import load_account_secret
from tunneld.crypto.kdf import derive_tsig_key
from tunneld.proto.watcher import PeerLearned, WatcherEvent
from tunneld.services.watcher import WatcherService


def main() -> int:
    server, port, zone, secret_file, want, seconds = sys.argv[1:7]
    secret = load_account_secret(secret_file)  # type: ignore[arg-type]
    learned: set[str] = set()
    t0 = time.monotonic()
    enough = trio.Event()

    def on_event(event: WatcherEvent) -> None:
        if isinstance(event, PeerLearned) and event.host.name not in learned:
            learned.add(event.host.name)
            report({"learned": len(learned), "t": round(time.monotonic() - t0, 3)})
            if len(learned) >= int(want):
                enough.set()

    service = WatcherService((server, int(port)), zone, "me", derive_tsig_key(secret, zone), on_event)

    counters: dict[str, int] = {}

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            with trio.move_on_after(float(seconds)):
                await enough.wait()
            counters.update(service.watcher.state["counters"])  # its clients' too, before they stop
            nursery.cancel_scope.cancel()

    trio.run(run)
    report({"peers": len(learned), "t": round(time.monotonic() - t0, 3), "counters": counters})
    return 0


if __name__ == "__main__":
    sys.exit(main())
