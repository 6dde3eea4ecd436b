"""The attacker's bounded floods (lab.attacks), run inside the attacker's lab namespace.

  python -m lab.progs.flood udp DST PORT HEXFILE --count N --rate R --duration S [--sources A,B] [--ports P]
      payloads of HEXFILE (one hex string a line) round-robin from P source ports spread over the
      source addresses; counts the replies (sizes too, for reflection ratios)
  python -m lab.progs.flood tcp DST PORT HEXFILE --count N --rate R --duration S [--sources A,B]
      one connection per framed payload
  python -m lab.progs.flood slowloris DST PORT --connections N --hold S [--sources A,B]
      N connections that send one byte and then nothing, held S seconds

Prints {"phase": "sending"} as it starts (a slow-loris: {"phase": "open", ...} once its connections are
open), then one JSON report line (lab.attacks gives each flood's fields).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lab import attacks
from lab.progs import cli, endpoint, report


def _payloads(path: str) -> list[bytes]:
    return [bytes.fromhex(line) for line in Path(path).read_text().split()]


def _sources(a: argparse.Namespace) -> list[str]:
    return [s for s in a.sources.split(",") if s]


def _bounds(a: argparse.Namespace) -> attacks.Bounds:
    return attacks.Bounds(a.count, a.rate, a.duration)


def _flood_args(p: argparse.ArgumentParser) -> None:
    endpoint(p)
    p.add_argument("hexfile")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--sources", default="")


def _udp_args(p: argparse.ArgumentParser) -> None:
    _flood_args(p)
    p.add_argument("--ports", type=int, default=1)
    p.add_argument("--drain", type=float, default=0.5)


def _udp(a: argparse.Namespace) -> dict[str, Any]:
    report({"phase": "sending"})
    return attacks.udp_flood(a.addr, a.port, _payloads(a.hexfile), _bounds(a), _sources(a), a.ports, a.drain)


def _tcp(a: argparse.Namespace) -> dict[str, Any]:
    report({"phase": "sending"})
    return attacks.tcp_flood(a.addr, a.port, _payloads(a.hexfile), _bounds(a), _sources(a))


def _loris_args(p: argparse.ArgumentParser) -> None:
    endpoint(p)
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--hold", type=float, required=True)
    p.add_argument("--sources", default="")


def _loris(a: argparse.Namespace) -> dict[str, Any]:
    return attacks.slowloris(a.addr, a.port, a.connections, a.hold, _sources(a),
                             on_open=lambda got: report({"phase": "open", **got}))


def main(argv: list[str] | None = None) -> int:
    return cli("flood", {"udp": (_udp_args, _udp), "tcp": (_flood_args, _tcp),
                         "slowloris": (_loris_args, _loris)}, argv)


if __name__ == "__main__":
    sys.exit(main())
