"""Ask a NAT-PMP gateway for its external address (RFC 6886 opcode 0) until it answers or time is up.

  python -m lab.progs.natpmp_probe GATEWAY TIMEOUT

A request every 20 ms from an unconnected socket, so the ICMP port-unreachable that comes back before
miniupnpd has bound its socket is not an error. Prints one JSON line: the first answer with result 0
(exit 0), else the last answer or null (exit 1), as {"result": r, "epoch": e, "address": a}.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from typing import Any

NATPMP_PORT = 5351  # RFC 6886 section 3


def probe(gateway: str, timeout: float) -> tuple[bool, dict[str, Any] | None]:
    """(whether a good answer came, the last answer)."""
    last: dict[str, Any] | None = None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.sendto(b"\x00\x00", (gateway, NATPMP_PORT))
            s.settimeout(0.02)
            try:
                while True:
                    data, src = s.recvfrom(64)
                    if src != (gateway, NATPMP_PORT) or len(data) < 12 or data[:2] != b"\x00\x80":
                        continue
                    _, _, result, epoch = struct.unpack("!BBHI", data[:8])
                    last = {"result": result, "epoch": epoch, "address": socket.inet_ntoa(data[8:12])}
                    if result == 0:
                        return True, last
            except (TimeoutError, ConnectionRefusedError):
                pass
    return False, last


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    ok, last = probe(argv[1], float(argv[2]))
    print(json.dumps(last), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
