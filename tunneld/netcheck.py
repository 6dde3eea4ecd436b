"""`tunneld netcheck`: what this network lets us do, in about three seconds, without a running daemon.

It asks, at the same time: the gateway, which port-mapping protocol it speaks (the probe of
:mod:`tunneld.probe`); every STUN server (``[nat] stun``, or ``--stun``), which endpoint it sees us at and
how fast, from one ephemeral UDP socket per address family driven by :class:`tunneld.proto.stun.StunClient`
on the one driver, hence whether the NAT maps per destination; and the relay, whether it answers
(:func:`relay_check`). Whatever has not answered by :data:`TIMEOUT` is reported as silent; the command
exits 0 whenever it ran, 2 for a bad argument or config.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunneld.config import Config, StunServer

__all__ = ["TIMEOUT", "NetcheckResult", "add_parser", "relay_check", "run"]

TIMEOUT = 3.0
"""Seconds the checks may take together (a port mapping granted meanwhile is then deleted, within the
probe's own bounded wait)."""
STUN_RTO = 0.25  # seconds: three requests per server (at 0, 0.25 and 0.75 s) fit well inside TIMEOUT
STUN_ATTEMPTS = 3


@dataclass
class StunResult:
    server: str  # as configured (a name, or an address)
    address: str | None = None  # what it resolved to
    mapped: str | None = None  # the endpoint it saw us at
    rtt_ms: float | None = None
    error: str | None = None


@dataclass
class NetcheckResult:
    portmap: dict[str, Any] = field(default_factory=dict)
    stun: list[StunResult] = field(default_factory=list)
    nat: dict[str, Any] = field(default_factory=dict)  # family -> {"kind": ..., "mapped": ...}
    relay: str = "not configured"


def _text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def relay_check(config: Config | None, timeout: float) -> str:
    """Whether the relay (``[relay] server``, else ``_turn._udp.DOMAIN`` SRV) answers a TURN Allocate with
    the account's REST credentials: "answers (HOST:PORT, relayed ADDRESS, N ms)" or why not. The
    allocation is deleted again (Refresh with LIFETIME 0) before this returns, within a short grace."""
    import time

    import trio

    from tunneld.proto.turn import Allocated, AllocationFailed, TurnClient, TurnEvent, rest_credentials
    from tunneld.services.discover import find_relay
    from tunneld.services.driver import Driver

    if config is None:
        return "not configured"
    acct = config.account
    server = None if acct.server is None else (str(acct.server.host), acct.server.port)
    with trio.move_on_after(timeout * 0.5) as scope:
        relay = await find_relay(config.relay.server, server, acct.domain, config.tsig_key,
                                 acct.tsig_algorithm)
    if scope.cancelled_caught:
        return f"not found in {timeout * 0.5:g} s (the _turn._udp SRV lookup did not finish)"
    if relay is None:
        return "not configured"
    where = _text(relay)
    user, password = rest_credentials(config.turn_secret, acct.name or "netcheck", time.time())
    client = TurnClient(relay, user, password)
    outcome: list[str] = []
    done = trio.Event()
    started = trio.current_time()

    def on_event(event: TurnEvent) -> None:
        if isinstance(event, Allocated):
            ms = round((trio.current_time() - started) * 1000, 1)
            outcome.append(f"answers ({where}, relayed {_text(event.relayed)}, {ms:g} ms)")
        elif isinstance(event, AllocationFailed):
            outcome.append(f"refused ({where}): {event.code} {event.reason}" if event.code else
                           f"no answer from {where}")
        else:
            return
        done.set()

    family = trio.socket.AF_INET6 if ":" in relay[0] else trio.socket.AF_INET
    with trio.socket.socket(family, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("::" if family == trio.socket.AF_INET6 else "0.0.0.0", 0))
        driver = Driver(client, [sock], on_event=on_event, grace=0.5, max_datagram=2048,
                        name="netcheck-relay")
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            client.start(driver.now())
            driver.wake()
            with trio.move_on_after(max(0.1, timeout - (trio.current_time() - started))):
                await done.wait()
            nursery.cancel_scope.cancel()  # the driver's goodbye deletes the allocation
    return outcome[0] if outcome else f"no answer from {where} in {timeout:g} s"


async def _resolve(servers: tuple[StunServer, ...], results: list[StunResult]) -> dict[tuple[str, int], int]:
    """Each server's first address (IP literals as they are); index into ``results`` by address."""
    import socket

    import trio

    from tunneld.proto.stun import normal_address

    found: dict[tuple[str, int], int] = {}
    for server in servers:
        r = StunResult(str(server))
        results.append(r)
        try:
            infos = await trio.socket.getaddrinfo(server.host, server.port, type=socket.SOCK_DGRAM)
        except OSError as e:
            r.error = f"cannot resolve {server.host}: {getattr(e, 'strerror', None) or e}"
            continue
        address = normal_address((str(infos[0][4][0]), int(infos[0][4][1])))
        r.address = _text(address)
        if address in found:
            r.error = f"the same address as {results[found[address]].server}"
            continue
        found[address] = len(results) - 1
    return found


async def _stun(family_servers: list[tuple[str, int]], family: int, results: list[StunResult],
                index: dict[tuple[str, int], int], nat: dict[str, Any], name: str, until: float,
                timeout: float) -> None:
    """One StunClient round over an ephemeral socket of ``family``, until every server has answered or
    failed, or ``until`` (trio time): then the silent ones count as failed, and the answers so far give
    the verdict."""
    import trio

    from tunneld.proto.stun import NatKind, Observed, ServerFailed, StunClient, StunEvent
    from tunneld.services.driver import Driver

    client = StunClient(family_servers, interval=3600.0, rto=STUN_RTO, attempts=STUN_ATTEMPTS)
    pending = set(client.servers)
    nat[name] = {"kind": client.kind, "mapped": None}
    done = trio.Event()

    def on_event(event: StunEvent) -> None:
        if isinstance(event, Observed):
            r = results[index[event.server]]
            r.mapped, r.rtt_ms, r.error = _text(event.mapped), round(event.rtt * 1000, 2), None
        elif isinstance(event, ServerFailed):
            silent = event.reason == "no answer yet"  # end_round, at our time bound
            results[index[event.server]].error = f"no answer in {timeout:g} s" if silent else event.reason
        elif isinstance(event, NatKind):
            nat[name] = {"kind": event.kind, "mapped": None if event.mapped is None else _text(event.mapped)}
        if isinstance(event, Observed | ServerFailed):
            pending.discard(event.server)
            if not pending:
                done.set()

    try:
        sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
    except OSError as e:  # no IPv6 here, say
        for server in family_servers:
            results[index[server]].error = f"cannot open a socket: {e.strerror or e}"
        return
    with sock:
        await sock.bind(("::" if family == trio.socket.AF_INET6 else "0.0.0.0", 0))
        driver = Driver(client, [sock], on_event=on_event, grace=0.0, max_datagram=2048, name="netcheck")
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            with trio.move_on_at(until):
                await done.wait()
            client.end_round(driver.now())
            for event in client.events():
                on_event(event)
            nursery.cancel_scope.cancel()


async def _portmap(gateway: str | None, out: dict[str, Any], timeout: float) -> None:
    from tunneld.net import links
    from tunneld.probe import ProbeError, probe

    if gateway is None:  # the probe's own choice, known here even if it is cut short
        route = links.default_route_v4()
        gateway = None if route is None else route.gateway
    out.update(gateway=gateway, protocol=None, external=None, result=f"no answer in {timeout:g} s")
    try:
        r = await probe(gateway)
    except ProbeError as e:
        out["result"] = str(e)
        return
    except OSError as e:
        out["result"] = f"cannot ask the gateway: {e.strerror or e}"
        return
    out.update(gateway=r.gateway, protocol=r.protocol, external=r.external_address, result=r.result)


async def run(servers: tuple[StunServer, ...], gateway: str | None, config: Config | None,
              timeout: float = TIMEOUT) -> NetcheckResult:
    """All the checks at once, bounded by ``timeout`` seconds in all (see the module docstring)."""
    import socket

    import trio

    result = NetcheckResult()
    start = trio.current_time()
    until = start + timeout * 0.9  # the STUN verdict is made before everything is cut short
    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = start + timeout

        async def stun_all() -> None:
            index = await _resolve(servers, result.stun)
            for family, name in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
                mine = [a for a in index if (":" in a[0]) == (family == socket.AF_INET6)]
                if mine:
                    nursery.start_soon(_stun, mine, family, result.stun, index, result.nat, name, until,
                                       timeout)

        nursery.start_soon(stun_all)
        nursery.start_soon(_portmap, gateway, result.portmap, timeout)

        async def relay() -> None:
            result.relay = await relay_check(config, timeout * 0.9)

        nursery.start_soon(relay)
    for r in result.stun:  # the bound came before the names were resolved
        if r.address is None and r.error is None:
            r.error = f"not resolved in {timeout:g} s"
        elif r.mapped is None and r.error is None:
            r.error = f"no answer in {timeout:g} s"
    return result


def _kind_line(name: str, nat: dict[str, Any]) -> str:
    kind, mapped = nat.get("kind"), nat.get("mapped")
    if kind == "endpoint-independent":
        return f"nat {name}: endpoint-independent (one mapping for every destination, {mapped}): direct " \
               f"paths can be punched"
    if kind == "per-destination":
        return f"nat {name}: per-destination (another mapping for each destination): peers need a relay " \
               f"unless the other side can be reached directly"
    why = "one server answered" if mapped else "no server answered"
    return f"nat {name}: unknown ({why}; two STUN servers at distinct addresses or ports tell)"


def render(result: NetcheckResult) -> str:
    pm = result.portmap
    if pm.get("protocol"):
        lines = [f"portmap: {pm['protocol']} (gateway {pm['gateway']}, external {pm.get('external') or '?'})"]
    else:
        lines = [f"portmap: none (gateway {pm.get('gateway') or 'default'}: {pm.get('result')})"]
    if not result.stun:
        lines.append("stun: no servers (set [nat] stun or [account] server, or pass --stun HOST:PORT)")
    for r in result.stun:
        where = r.server if r.address in (None, r.server) else f"{r.server} ({r.address})"
        lines.append(f"stun {where}: " + (f"{r.mapped} in {r.rtt_ms:g} ms" if r.mapped else f"{r.error}"))
    for name in ("ipv4", "ipv6"):
        if name in result.nat:
            lines.append(_kind_line(name, result.nat[name]))
    lines.append(f"relay: {result.relay}")
    return "\n".join(lines) + "\n"


def cmd_netcheck(args: argparse.Namespace) -> int:

    import trio

    from tunneld.cli import EXIT_OK, UsageError, gateway_arg
    from tunneld.config import load_config
    from tunneld.config_model import DEFAULT_CONFIG_PATH
    from tunneld.config_values import Problem, show, stun_server

    servers: tuple[StunServer, ...] = ()
    for text in args.stun or ():
        try:
            servers += (stun_server(text),)
        except Problem as p:
            raise UsageError(f"bad --stun {show(text)}: {p}") from None
    gateway = gateway_arg(args.gateway)
    config = None
    if args.config is not None or not servers:  # --stun alone needs no config
        config = load_config(Path(args.config) if args.config is not None else DEFAULT_CONFIG_PATH)
        servers = servers or config.stun_servers
        gateway = gateway or config.portmap.gateway
    result = trio.run(run, tuple(dict.fromkeys(servers)), gateway, config)
    if args.json:
        sys.stdout.write(json.dumps(asdict(result), indent=2) + "\n")
    else:
        sys.stdout.write(render(result))
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """The `netcheck` subcommand (the command line's parser hook)."""
    p = sub.add_parser("netcheck", help="what this network allows: port mapping, STUN endpoints, NAT kind, "
                                        "relay")
    p.add_argument("--config", help="read [nat] stun, [account] server and [portmap] gateway from this "
                                    "config (default /etc/tunneld/tunneld.toml, unless --stun is given)")
    p.add_argument("--stun", action="append", metavar="HOST:PORT",
                   help="ask this STUN server instead of the config's (repeatable; two tell the NAT's kind)")
    p.add_argument("--gateway", help="the router's address (default: the IPv4 default gateway)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_netcheck)
