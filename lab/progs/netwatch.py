"""Print what tunneld's network watch reports, one JSON line each (for the roaming tests).

  python -m lab.progs.netwatch SECONDS [EXCLUDED_IFNAME ...]

First {"event": "ready", "snapshot": ...} once the netlink socket listens, then
{"event": "changed", "generation": N, "changed": [...], "vanished": [...], "new": ...} per change.
"""

from __future__ import annotations

import sys
from typing import Any

import trio

from lab.progs import report
from tunneld.net.netwatch import read_snapshot, watch
from tunneld.proto.netchange import NetWatch, NetworkChanged


async def _main(seconds: float, excluded: list[str]) -> None:
    core = NetWatch(read_snapshot(excluded), trio.current_time())

    async def changed(ch: NetworkChanged) -> None:
        report({"event": "changed", "generation": ch.generation, "changed": sorted(ch.changed),
                "vanished": sorted(ch.vanished), "new": ch.new.describe()})

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            await nursery.start(watch, core, changed, excluded)
            report({"event": "ready", "snapshot": core.current.describe(), "bursts": core.bursts})
    info: dict[str, Any] = {"event": "done", "bursts": core.bursts, "generation": core.generation}
    report(info)


def main() -> int:
    trio.run(_main, float(sys.argv[1]), sys.argv[2:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
