"""A TURN client run inside a lab namespace: tunneld's own core (tunneld.proto.turn) over a blocking
socket, for lab.coturn's readiness check and the relay tests.

    python -m lab.progs.turn allocate SERVER PORT USER PASSWORD [--permit IP] [--bind IP:PORT] [--echo]
                                      [--expect N] [--wait S] [--check-deleted]
    python -m lab.progs.turn send ADDR PORT TEXT [--source-port P] [--reply]

`allocate` prints {"relayed": [ip, port], "mapped": [ip, port]} once allocated, {"permitted": [...]}
once the relay confirmed every --permit, {"bound": [ip, port]} once it confirmed the --bind channel,
one {"peer": [ip, port], "data": TEXT} per datagram relayed to it (taken apart by `unwrap`; with --echo
sent back through the relay by `wrap`) until --expect of them came or --wait seconds passed, then
deletes the allocation and, to show
that the relay forgot it (with --check-deleted, once a line comes on stdin) sends one more signed
Refresh from the same socket: the last line is then {"after_close": CODE}, CODE the Refresh's error code
(437: no such allocation).
`send` sends one datagram (from an ephemeral port or --source-port) and with --reply waits for one back.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from lab.progs import cli, endpoint, report
from tunneld.proto import stun_wire as sw
from tunneld.proto.core import Address
from tunneld.proto.errors import ParseError
from tunneld.proto.turn import Allocated, AllocationFailed, PermissionFailed, TurnClient, TurnEvent


class _Run:
    """The core and its socket: send what it has, wait for a datagram or its deadline, feed it."""

    def __init__(self, client: TurnClient, sock: socket.socket) -> None:
        self.client, self.sock = client, sock
        self.events: list[TurnEvent] = []
        self.data: list[tuple[Address, bytes]] = []  # what peers sent through the relay

    def until(self, done: Callable[[], bool], timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            for t in self.client.transmits():
                self.sock.sendto(t.payload, t.destination)
            self.events += self.client.events()
            if done():
                return
            now = time.monotonic()
            if now >= end:
                raise TimeoutError(f"gave up after {timeout:.0f} s; events {self.events}")
            deadline = self.client.deadline()
            self.sock.settimeout(max(min(end, deadline if deadline is not None else end) - now, 0.001))
            try:
                data, source = self.sock.recvfrom(4096)
            except TimeoutError:
                self.client.poll(time.monotonic())
                continue
            # As the tunnel does: relay data (ChannelData, Data indications) by unwrap, the rest (the
            # relay's answers) to receive.
            relayed = self.client.unwrap(data, source[:2], time.monotonic())
            if relayed is not None:
                self.data.append(relayed)
            else:
                self.client.receive(data, source[:2], time.monotonic())
            self.client.poll(time.monotonic())


def _allocate(a: argparse.Namespace) -> dict[str, Any]:
    server = (a.addr, a.port)
    fam = socket.AF_INET6 if ":" in a.addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as sock:
        sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", 0))
        client = TurnClient(server, a.user, a.password)
        run = _Run(client, sock)
        client.start(time.monotonic())
        run.until(lambda: client.state != "allocating", a.timeout)
        failed = [e for e in run.events if isinstance(e, AllocationFailed)]
        if failed:
            return {"failed": failed[0].code, "reason": failed[0].reason}
        allocated = next(e for e in run.events if isinstance(e, Allocated))
        report({"relayed": list(allocated.relayed), "mapped": list(allocated.mapped)})
        if a.permit:
            client.permit(a.permit, time.monotonic())
            def answered() -> bool:
                refused = {e.ip for e in run.events if isinstance(e, PermissionFailed)}
                return client.permitted() | refused >= set(a.permit)

            run.until(answered, a.timeout)
            refused = [e.ip for e in run.events if isinstance(e, PermissionFailed)]
            report({"permitted": [ip for ip in a.permit if ip not in refused], "refused": refused})
        if a.bind:
            host, _, port = a.bind.rpartition(":")
            peer = (host, int(port))
            client.bind_channel(peer, time.monotonic())
            run.until(lambda: peer in client.bound(), a.timeout)
            report({"bound": list(peer)})
        got: list[tuple[Address, bytes]] = []

        def enough() -> bool:
            while run.data:
                peer, data = run.data.pop(0)
                report({"peer": list(peer), "data": data.decode(errors="replace")})
                got.append((peer, data))
                if a.echo:  # back through the relay: ChannelData on a bound channel, else a Send indication
                    sock.sendto(client.wrap(peer, b"echo " + data), server)
            return len(got) >= int(a.expect)

        with contextlib.suppress(TimeoutError):  # --wait is an upper bound: fewer than --expect may come
            run.until(enough, a.wait)
        client.close(time.monotonic())
        run.until(client.finished, a.timeout)
        if not a.check_deleted:
            return {"closed": True, "received": len(got)}
        # A Refresh revives an allocation the relay has not yet swept (coturn: within about a second
        # of the LIFETIME 0): the caller says when to ask, after it saw the relay delete it.
        report({"closed": True, "received": len(got)})
        ready, _, _ = select.select([sys.stdin], [], [], a.timeout)
        if not ready or not sys.stdin.readline():
            raise TimeoutError("no go-ahead for the Refresh after close")
        return {"after_close": _refresh_code(sock, server, a)}


def _refresh_code(sock: socket.socket, server: Address, a: argparse.Namespace) -> int:
    """The error code the relay gives a Refresh from this socket (0: it succeeded, -1: no answer): the
    401 names the realm and nonce, the signed retry asks about this 5-tuple's allocation (437: none)."""
    attrs: list[sw.Attribute] = [(sw.LIFETIME, sw.encode_u32(600))]
    key = None
    for _ in range(3):
        tid = os.urandom(sw.TRANSACTION_ID_LEN)
        sock.sendto(sw.encode(sw.REFRESH, sw.REQUEST, tid, attrs, integrity_key=key), server)
        sock.settimeout(2.0)
        try:
            while (answer := sw.decode(sock.recvfrom(4096)[0])).transaction_id != tid:
                pass
        except (TimeoutError, ParseError):
            return -1
        error = answer.error_code()
        realm, nonce = answer.realm(), answer.nonce()
        if error is None or error[0] not in (401, 438) or realm is None or nonce is None:
            return 0 if error is None else error[0]
        key = sw.long_term_key(a.user, realm, a.password)
        attrs = [(sw.LIFETIME, sw.encode_u32(600)), (sw.USERNAME, a.user.encode()),
                 (sw.REALM, realm.encode()), (sw.NONCE, nonce.encode())]
    return 401


def _add_allocate(p: argparse.ArgumentParser) -> None:
    endpoint(p)
    p.add_argument("user")
    p.add_argument("password")
    p.add_argument("--permit", action="append", default=[])
    p.add_argument("--bind", help="IP:PORT of a peer to bind a channel to")
    p.add_argument("--echo", action="store_true", help="send each datagram back through the relay")
    p.add_argument("--expect", type=int, default=0, help="datagrams to wait for")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for them at most")
    p.add_argument("--timeout", type=float, default=10.0, help="per step")
    p.add_argument("--check-deleted", action="store_true",
                   help="after close, on a line on stdin, send one more Refresh and report its error code")


def _send(a: argparse.Namespace) -> dict[str, Any]:
    fam = socket.AF_INET6 if ":" in a.addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as sock:
        sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", a.source_port))
        sock.sendto(a.text.encode(), (a.addr, a.port))
        out: dict[str, Any] = {"sent": a.text, "from": list(sock.getsockname()[:2])}
        if a.reply:
            sock.settimeout(5.0)
            data, source = sock.recvfrom(4096)
            out.update(reply=data.decode(errors="replace"), reply_from=list(source[:2]))
        return out


def _add_send(p: argparse.ArgumentParser) -> None:
    endpoint(p)
    p.add_argument("text")
    p.add_argument("--source-port", type=int, default=0)
    p.add_argument("--reply", action="store_true", help="wait for one datagram back (5 s at most)")


if __name__ == "__main__":
    raise SystemExit(cli("turn", {"allocate": (_add_allocate, _allocate), "send": (_add_send, _send)}))
