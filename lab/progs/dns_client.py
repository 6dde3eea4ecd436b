"""The client side of `python -m bench.throughput dns`, run inside the lab's client namespace.

  python -m lab.progs.dns_client updates SERVER PORT ZONE SECRET_FILE --count N --window W --prefix P
  python -m lab.progs.dns_client events SERVER PORT ZONE SECRET_FILE --watchers K --events M --name NAME
  python -m lab.progs.dns_client push-events SERVER PORT ZONE SECRET_FILE --tls-port P --watchers K ...

Prints one JSON object on stdout.

`updates`: N TSIG-signed UPDATEs (each adds one AAAA at a distinct name) over UDP: with W = 1 one at
a time, each waiting for its reply; otherwise with up to W outstanding. Every message is signed before the
clock starts (so the client's signing cost is not measured), every reply is checked afterwards (TSIG
with the request MAC, rcode NOERROR); a reply that does not come within TIMEOUT seconds is a failure.

`events`: K LLQ clients (tunneld.proto.llq.LLQClient, TSIG-signed, one UDP socket each) watch NAME AAAA,
established SETUP_BATCH at a time; then M times: an UPDATE replaces NAME's AAAA and the client waits until
every watcher has its Added event (or EVENT_TIMEOUT). Latency is from just before the UPDATE's sendto to
the kernel's receive timestamp (SO_TIMESTAMPNS) of the watcher's event datagram, so the time this process
spends handling the other 99 watchers is not counted. The watchers sign and verify with the daemon's own
TSIG session (tunneld.proto.tsig.TsigSession), so the run sees what `tunneld up` would; the sum of their
LLQClient counters is reported (`client_counters`: "tsig rejected", "retransmission", "duplicate or no-op
event", ...) to tell a lost datagram from a rejected one.

`push-events`: the same measurement with K DNS Push sessions over TLS (port P) instead of LLQ watchers
(lab.progs.push_watchers); the UPDATEs still go over UDP to PORT, as in `events`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import select
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.update

from lab.progs import SO_TIMESTAMPNS, cli, kernel_stamp, push_watchers
from tunneld.config import load_account_secret
from tunneld.dnsserver.core import account_key
from tunneld.proto import llq
from tunneld.proto.tsig import TsigKey, TsigSession
from tunneld.proto.xfr import front_key

TIMEOUT = 2.0  # seconds to wait for one UPDATE reply
EVENT_TIMEOUT = 10.0  # seconds to wait for every watcher's event (covers one server retransmission)
SETUP_TIMEOUT = 30.0  # seconds for all LLQs to be established
SETUP_BATCH = 200
"""LLQs started at once: serve-dns limits signed replies to one /24 (500 a second, a burst of 1,000), and
each LLQ takes two (challenge, acknowledgement); a larger burst loses setups to the limit."""
TTL = 60
CANCEL_BATCH = 100
"""LLQs cancelled at once: a burst of a thousand cancels overflows the server's socket buffer, and an LLQ
whose cancel is lost stays in its table until its lease ends (a later run's LLQs are then refused)."""
CANCEL_TIMEOUT = 2.0  # seconds to wait for one batch's replies


class Signer:
    """TSIG-signs UPDATEs with the account key and checks the replies (outside the timed loops)."""

    def __init__(self, zone: str, secret: bytes, front: bool = False) -> None:
        self.zone = dns.name.from_text(zone)
        # front: the front key, as the front signs its forwards (for the zone's primary directly)
        self.key = (front_key(secret, zone) if front else account_key(secret, zone)).dnspython()
        self.keyring = {self.key.name: self.key}

    def update(self, owner: str, address: str, msg_id: int, replace: bool = False) -> tuple[bytes, bytes]:
        """(wire, request MAC) of an UPDATE setting `owner` AAAA `address` (replacing any other)."""
        upd = dns.update.UpdateMessage(self.zone, id=msg_id)
        name = dns.name.from_text(owner)  # absolute: a string would be taken relative to the zone
        if replace:
            upd.replace(name, TTL, "AAAA", address)
        else:
            upd.add(name, TTL, "AAAA", address)
        upd.use_tsig(self.keyring, self.key.name)
        wire = upd.to_wire()
        return wire, upd.mac or b""

    def check(self, reply: bytes | None, mac: bytes) -> str:
        """'NOERROR' for a good signed reply, else what went wrong (rcode, 'timeout', 'bad TSIG: ...')."""
        if reply is None:
            return "timeout"
        try:
            msg = dns.message.from_wire(reply, keyring=self.keyring, request_mac=mac)
        except Exception as e:  # any TSIG or parse failure is a failed update
            return f"bad reply: {type(e).__name__}"
        if not msg.had_tsig:
            return "unsigned reply"
        return dns.rcode.to_text(msg.rcode())


def _pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def _latency_summary(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)
    return {"median_ms": _pct(s, 0.5) * 1e3, "p90_ms": _pct(s, 0.9) * 1e3,
            "max_ms": (s[-1] if s else 0) * 1e3}


def _connect(server: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.connect((server, port))
    return sock


def _failures(signer: Signer, replies: list[bytes | None], macs: list[bytes]) -> dict[str, int]:
    bad: dict[str, int] = {}
    for reply, mac in zip(replies, macs, strict=True):
        rc = signer.check(reply, mac)
        if rc != "NOERROR":
            bad[rc] = bad.get(rc, 0) + 1
    return bad


def sequential(sock: socket.socket, signer: Signer, prefix: str, count: int) -> dict[str, Any]:
    msgs = [signer.update(f"{prefix}-s{i}.{signer.zone}", f"2001:db8:5::{i % 65536:x}", i % 65536)
            for i in range(count)]
    replies: list[bytes | None] = []
    lat: list[float] = []
    t_start = time.perf_counter()
    for wire, _mac in msgs:
        msg_id = wire[:2]
        t0 = time.perf_counter()
        sock.send(wire)
        got: bytes | None = None
        deadline = t0 + TIMEOUT
        while (left := deadline - time.perf_counter()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65535)
            except (TimeoutError, ConnectionRefusedError):
                break
            if data[:2] == msg_id:
                got = data
                break
        lat.append(time.perf_counter() - t0)
        replies.append(got)
    elapsed = time.perf_counter() - t_start
    bad = _failures(signer, replies, [m for _, m in msgs])
    return {"updates": count, "seconds": elapsed, "per_second": count / elapsed, **_latency_summary(lat),
            "failures": sum(bad.values()), "failure_kinds": bad}


def pipelined(sock: socket.socket, signer: Signer, prefix: str, count: int, window: int) -> dict[str, Any]:
    msgs = [signer.update(f"{prefix}-p{i}.{signer.zone}", f"2001:db8:6::{i % 65536:x}", i % 65536)
            for i in range(count)]
    replies: list[bytes | None] = [None] * count
    sent_at = [0.0] * count
    lat: list[float] = []
    outstanding: dict[int, int] = {}  # message ID -> index
    sock.setblocking(False)
    nxt = 0
    t_start = last_progress = time.perf_counter()
    while nxt < count or outstanding:
        while nxt < count and len(outstanding) < window:
            sent_at[nxt] = time.perf_counter()
            sock.send(msgs[nxt][0])
            outstanding[nxt % 65536] = nxt
            nxt += 1
        ready, _, _ = select.select([sock], [], [], max(0.0, last_progress + TIMEOUT - time.perf_counter()))
        now = time.perf_counter()
        if not ready:  # nothing for TIMEOUT seconds: whatever is outstanding is lost
            outstanding.clear()
            last_progress = now
            continue
        while True:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                break
            idx = outstanding.pop(int.from_bytes(data[:2], "big"), None) if len(data) >= 2 else None
            if idx is not None:
                replies[idx] = data
                lat.append(now - sent_at[idx])
                last_progress = now
    elapsed = time.perf_counter() - t_start
    sock.setblocking(True)
    bad = _failures(signer, replies, [m for _, m in msgs])
    return {"updates": count, "window": window, "seconds": elapsed, "per_second": count / elapsed,
            **_latency_summary(lat), "failures": sum(bad.values()), "failure_kinds": bad}


def cmd_updates(a: argparse.Namespace, signer: Signer) -> dict[str, Any]:
    with _connect(a.server, a.port) as sock:
        if a.window == 1:
            return sequential(sock, signer, a.prefix, a.count)
        return pipelined(sock, signer, a.prefix, a.count, a.window)


def _id_base() -> int:
    """A random first message ID: a run that sends the same UPDATE as an earlier one within its TSIG
    window must not look like its retransmission (the server answers a copy without applying it)."""
    return int.from_bytes(os.urandom(2), "big")


def _recv_stamped(sock: socket.socket) -> tuple[bytes, float] | None:
    """One datagram and its kernel receive time (CLOCK_REALTIME seconds), or None if none is waiting."""
    try:
        data, anc, _flags, _addr = sock.recvmsg(65535, socket.CMSG_SPACE(16))
    except (BlockingIOError, ConnectionRefusedError):
        return None
    return data, kernel_stamp(anc)


def cancel_all(clients: list[llq.LLQClient], socks: list[socket.socket]) -> int:
    """Cancel every LLQ (a REFRESH with lease 0) CANCEL_BATCH at a time, each batch until the server has
    answered each cancel (its reply carries the cancel's message ID) or CANCEL_TIMEOUT. How many were
    answered."""
    answered = 0
    for start in range(0, len(clients), CANCEL_BATCH):
        waiting: dict[int, tuple[socket.socket, bytes]] = {}  # fd -> socket, the cancel's message ID
        poller = select.poll()
        for i in range(start, min(len(clients), start + CANCEL_BATCH)):
            clients[i].close(time.time())
            for tx in clients[i].transmits():
                try:
                    socks[i].send(tx.payload)
                except (BlockingIOError, ConnectionRefusedError):
                    continue
                waiting[socks[i].fileno()] = (socks[i], tx.payload[:2])
                poller.register(socks[i], select.POLLIN)
        end = time.monotonic() + CANCEL_TIMEOUT
        while waiting and (left := end - time.monotonic()) > 0:
            for fd, _ in poller.poll(max(1, int(left * 1000))):
                sock, msg_id = waiting[fd]
                while True:
                    try:
                        data = sock.recv(65535)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    if data[:2] == msg_id and fd in waiting:
                        del waiting[fd]
                        poller.unregister(fd)
                        answered += 1
    return answered


def distinct_ids() -> Callable[[int], bytes]:
    """The watchers' randomness, with message IDs that differ across all of them. Their SETUPs are the same
    question signed with the same key: two sent in the same second with the same random ID (at 1,000
    watchers some 8 pairs) are one byte-identical request, which the server takes as a replay of the first
    from another address and drops, and that watcher then waits out its retries (some 14 s)."""
    ids = itertools.count(int.from_bytes(os.urandom(2), "big"))

    def rand(n: int) -> bytes:
        return (next(ids) % 65536).to_bytes(2, "big") if n == 2 else os.urandom(n)
    return rand


def cmd_events(a: argparse.Namespace, signer: Signer) -> dict[str, Any]:
    qname = dns.name.from_text(a.name)
    dest = (a.server, a.port)
    rand = distinct_ids()

    def new_client() -> llq.LLQClient:
        tsig = TsigSession(TsigKey.of(signer.key))  # LLQ clients sign at Unix time: they run on time.time()
        return llq.LLQClient(qname, dns.rdatatype.AAAA, server=dest, rand=rand, tsig=tsig)

    clients: list[llq.LLQClient] = []
    socks: list[socket.socket] = []
    by_fd: dict[int, int] = {}
    t0 = time.monotonic()
    for i in range(a.watchers):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.setblocking(False)
        s.connect(dest)
        socks.append(s)
        clients.append(new_client())
        by_fd[s.fileno()] = i
    upd_sock = _connect(a.server, a.port)
    poller = select.poll()
    for s in socks:
        poller.register(s, select.POLLIN)

    established: set[int] = set()
    fell_back: set[int] = set()  # setups that got no answer (lost to the server's reply limit): started anew
    restarts = 0
    got: dict[int, float] = {}  # watcher -> arrival time of the current update's event
    target = ""  # the address the current update sets

    def handle(i: int, data: bytes, stamp: float) -> None:
        clients[i].receive(data, dest, time.time())  # a connected socket: only the server's datagrams
        for tx in clients[i].transmits():
            socks[i].send(tx.payload)
        for ev in clients[i].events():
            if isinstance(ev, llq.Established):
                established.add(i)
            elif isinstance(ev, llq.Fallback) and i not in established:
                fell_back.add(i)
            elif isinstance(ev, llq.Added) and target and i not in got and \
                    any(r.to_text() == target for r in ev.rrset):
                got[i] = stamp

    def pump(timeout: float) -> None:
        for fd, _ in poller.poll(max(0, int(timeout * 1000))):
            i = by_fd[fd]
            while (item := _recv_stamped(socks[i])) is not None:
                handle(i, *item)
        now = time.time()
        for i, c in enumerate(clients):
            d = c.deadline()
            if d is not None and d <= now:
                c.poll(now)
                for tx in c.transmits():
                    socks[i].send(tx.payload)

    try:
        # The name exists before the watchers start, so every event is a replacement.
        ids = _id_base()
        wire, mac = signer.update(a.name, "2001:db8:7::", ids, replace=True)
        upd_sock.send(wire)
        upd_sock.settimeout(TIMEOUT)
        first = signer.check(upd_sock.recv(65535), mac)
        if first != "NOERROR":
            raise SystemExit(f"the first update failed: {first}")
        end = time.monotonic() + SETUP_TIMEOUT
        for start in range(0, len(clients), SETUP_BATCH):  # a batch at a time: see SETUP_BATCH
            batch = range(start, min(len(clients), start + SETUP_BATCH))
            for i in batch:
                clients[i].start(time.time())
                for tx in clients[i].transmits():
                    socks[i].send(tx.payload)
            while not established.issuperset(batch) and time.monotonic() < end:
                pump(0.05)
                for i in sorted(fell_back):  # what a client does after retry_setup_in, now
                    fell_back.discard(i)
                    restarts += 1
                    clients[i] = new_client()
                    clients[i].start(time.time())
                    for tx in clients[i].transmits():
                        socks[i].send(tx.payload)
        setup_seconds = time.monotonic() - t0
        if len(established) < len(clients):
            seen: Counter[str] = Counter()
            for c in clients:
                seen.update(c.counters)
            raise SystemExit(f"only {len(established)} of {len(clients)} LLQs were established "
                             f"({restarts} setups restarted; watchers: {dict(seen)})")

        samples: list[float] = []
        failures: dict[str, int] = {}
        for k in range(a.events):
            target = f"2001:db8:7::{k + 1:x}"
            got.clear()
            wire, mac = signer.update(a.name, target, (ids + k + 1) % 65536, replace=True)
            upd_sock.setblocking(False)
            t_send = time.time()
            upd_sock.send(wire)
            reply: bytes | None = None
            end = time.monotonic() + EVENT_TIMEOUT
            while (len(got) < len(clients) or reply is None) and time.monotonic() < end:
                with_reply = select.select([upd_sock], [], [], 0)[0]
                if with_reply and reply is None:
                    data = upd_sock.recv(65535)
                    if data[:2] == wire[:2]:
                        reply = data
                pump(0.005 if reply is None else 0.05)
            rc = signer.check(reply, mac)
            if rc != "NOERROR":
                failures[rc] = failures.get(rc, 0) + 1
            samples += [stamp - t_send for stamp in got.values()]
        expected = a.watchers * a.events
        counters: Counter[str] = Counter()
        for c in clients:
            counters.update(c.counters)
        cancelled = cancel_all(clients, socks)
    finally:
        for s in socks:
            s.close()
        upd_sock.close()
    return {"watchers": a.watchers, "updates": a.events, "expected": expected, "received": len(samples),
            "setup_seconds": setup_seconds, "setup_restarts": restarts, **_latency_summary(samples),
            "samples_ms": [round(x * 1e3, 3) for x in samples],
            "failures": sum(failures.values()), "failure_kinds": failures, "cancelled": cancelled,
            "client_counters": dict(sorted(counters.items()))}


def cmd_push_events(a: argparse.Namespace, signer: Signer) -> dict[str, Any]:
    upd_sock = _connect(a.server, a.port)
    upd_sock.settimeout(TIMEOUT)
    try:
        # The name exists before the sessions subscribe, so every event is a replacement.
        ids = _id_base()
        wire, mac = signer.update(a.name, "2001:db8:8::", ids, replace=True)
        upd_sock.send(wire)
        first = signer.check(upd_sock.recv(65535), mac)
        if first != "NOERROR":
            raise SystemExit(f"the first update failed: {first}")

        def update(k: int, target: str) -> tuple[float, Callable[[], str]]:
            wire, mac = signer.update(a.name, target, (ids + k + 1) % 65536, replace=True)
            t_send = time.time()
            upd_sock.send(wire)

            def finish() -> str:
                end = time.monotonic() + TIMEOUT
                while time.monotonic() < end:
                    try:
                        data = upd_sock.recv(65535)
                    except TimeoutError:
                        break
                    if data[:2] == wire[:2]:
                        return signer.check(data, mac)
                return "timeout"

            return t_send, finish

        r = push_watchers.run(a.server, a.tls_port, a.zone, load_account_secret(Path(a.secret_file)), a.name,
                              a.watchers, a.events, update, SETUP_TIMEOUT, EVENT_TIMEOUT)
    finally:
        upd_sock.close()
    samples = r.pop("samples")
    return {**r, **_latency_summary(samples), "samples_ms": [round(x * 1e3, 3) for x in samples]}


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("server")
    p.add_argument("port", type=int)
    p.add_argument("zone")
    p.add_argument("secret_file")


def _updates_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--window", type=int, default=32, help="outstanding updates; 1: sequential")
    p.add_argument("--prefix", default="bench")
    p.add_argument("--front-key", action="store_true",
                   help="sign with the front key (for the zone's primary, which takes no other), not the "
                        "account key")


def _events_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("--watchers", type=int, default=100)
    p.add_argument("--events", type=int, default=20)
    p.add_argument("--name", default="watched")


def _push_events_args(p: argparse.ArgumentParser) -> None:
    _events_args(p)
    p.add_argument("--tls-port", type=int, default=853)


def _signer(a: argparse.Namespace) -> Signer:
    return Signer(a.zone, load_account_secret(Path(a.secret_file)))


def _events(a: argparse.Namespace) -> dict[str, Any]:
    a.name = f"{a.name}.{a.zone}"
    return cmd_events(a, _signer(a))


def _push_events(a: argparse.Namespace) -> dict[str, Any]:
    a.name = f"{a.name}.{a.zone}"
    return cmd_push_events(a, _signer(a))


def main(argv: list[str] | None = None) -> int:
    return cli("dns_client", {"updates": (_updates_args, lambda a: cmd_updates(
                                  a, Signer(a.zone, load_account_secret(Path(a.secret_file)), a.front_key))),
                              "events": (_events_args, _events),
                              "push-events": (_push_events_args, _push_events)}, argv)


if __name__ == "__main__":
    sys.exit(main())
