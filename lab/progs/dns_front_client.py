"""The client side of the front's rows in `python -m bench.throughput dns`, run in the lab's client namespace.

  python -m lab.progs.dns_front_client secondary SERVER PORT ZONE SECRET_FILE --secondary ADDR:PORT
  python -m lab.progs.dns_front_client hold SERVER PORT ZONE SECRET_FILE --llqs N --sources A,B,...

`secondary`: N times, one TSIG-signed UPDATE adds an AAAA at a fresh name through SERVER:PORT (the front);
once its signed NOERROR reply is in, the secondary at ADDR:PORT is asked for that name (signed with the
account key, UDP) every POLL_INTERVAL seconds until it answers with the record, or SECONDARY_TIMEOUT. The
sample is the time from the reply to the first answer that carries the record. Prints one JSON object.

`hold`: N LLQs (tunneld.proto.llq.LLQClient, TSIG-signed, one UDP socket each, bound round-robin to the
source addresses, since the server caps the LLQs of one address) on NAME, started BATCH at a time (a batch
with any LLQ refused or unanswered ends the setup). Prints a JSON line once all are established (or with
how many were, and why the others were not), keeps them (answering refreshes) until a line
or end of file on stdin, then cancels them (dns_client.cancel_all: paced, each until answered) and prints a
last JSON line with how many cancels the server answered.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset

from lab.progs import cli, report
from lab.progs.dns_client import (
    TIMEOUT,
    Signer,
    _connect,
    _id_base,
    _latency_summary,
    cancel_all,
    distinct_ids,
)
from tunneld.config import load_account_secret
from tunneld.proto import llq
from tunneld.proto.tsig import TsigKey, TsigSession

POLL_INTERVAL = 0.002  # seconds between two queries to the secondary
SECONDARY_TIMEOUT = 10.0  # seconds for the secondary to serve one new record
BATCH = 200  # LLQs started at once by `hold` (as dns_client.SETUP_BATCH: the server limits signed replies)
BATCH_TIMEOUT = 30.0  # seconds for one batch to be established
RETRIES = 3  # new setups of one LLQ whose setup went unanswered


def _signer(a: argparse.Namespace) -> Signer:
    return Signer(a.zone, load_account_secret(Path(a.secret_file)))


def _ask(sock: socket.socket, signer: Signer, name: dns.name.Name, msg_id: int, address: str) -> bool:
    """One signed AAAA query on the connected `sock`: does the answer (within 50 ms) hold `address`?"""
    q = dns.message.make_query(name, dns.rdatatype.AAAA, id=msg_id)
    q.use_tsig(signer.keyring, signer.key.name)
    sock.send(q.to_wire())
    end = time.monotonic() + 0.05
    while (left := end - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            return False
        try:
            data = sock.recv(65535)
        except ConnectionRefusedError:
            return False
        if data[:2] != q.id.to_bytes(2, "big"):
            continue  # a late answer to an earlier poll
        try:
            r = dns.message.from_wire(data, keyring=signer.keyring, request_mac=q.mac)
        except Exception:  # a bad or unsigned answer is not the record
            return False
        return any(rr.to_text() == address for rrset in r.answer for rr in rrset)
    return False


def cmd_secondary(a: argparse.Namespace) -> dict[str, Any]:
    signer = _signer(a)
    host, port = a.secondary.rsplit(":", 1)
    lag: list[float] = []
    failures: Counter[str] = Counter()
    ids = _id_base()
    with _connect(a.server, a.port) as upd, _connect(host, int(port)) as sec:
        for i in range(a.count):
            name = dns.name.from_text(f"{a.prefix}-{i}.{a.zone}")
            address = f"2001:db8:9::{i + 1:x}"
            wire, mac = signer.update(name.to_text(), address, (ids + i) % 65536)
            upd.settimeout(TIMEOUT)
            upd.send(wire)
            reply: bytes | None = None
            end = time.monotonic() + TIMEOUT
            while reply is None and time.monotonic() < end:
                try:
                    data = upd.recv(65535)
                except TimeoutError:
                    break
                if data[:2] == wire[:2]:
                    reply = data
            t_reply = time.perf_counter()
            rc = signer.check(reply, mac)
            if rc != "NOERROR":
                failures[rc] += 1
                continue
            end = time.monotonic() + SECONDARY_TIMEOUT
            seen = False
            k = 0
            while not seen and time.monotonic() < end:
                seen = _ask(sec, signer, name, (ids + 30000 + k) % 65536, address)
                k += 1
                if not seen:
                    time.sleep(POLL_INTERVAL)  # a poll interval, not synchronisation
            if seen:
                lag.append(time.perf_counter() - t_reply)
            else:
                failures["not on the secondary"] += 1
    return {"updates": a.count, "served": len(lag), **_latency_summary(lag),
            "samples_ms": [round(x * 1e3, 3) for x in lag],
            "failures": sum(failures.values()), "failure_kinds": dict(failures)}


def cmd_hold(a: argparse.Namespace) -> dict[str, Any]:
    signer = _signer(a)
    qname = dns.name.from_text(f"{a.name}.{a.zone}")
    dest = (a.server, a.port)
    sources = [s for s in a.sources.split(",") if s]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.llqs + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    clients: list[llq.LLQClient] = []
    socks: list[socket.socket] = []
    by_fd: dict[int, int] = {}
    poller = select.poll()
    established: set[int] = set()
    refused: dict[int, str] = {}
    lost: set[int] = set()
    retries: Counter[int] = Counter()

    rand = distinct_ids()  # byte-identical SETUPs would be taken for replays: see distinct_ids

    def new_client() -> llq.LLQClient:
        return llq.LLQClient(qname, dns.rdatatype.AAAA, server=dest, rand=rand,
                             tsig=TsigSession(TsigKey.of(signer.key)))

    def flush(i: int) -> None:
        for tx in clients[i].transmits():
            socks[i].send(tx.payload)
        for ev in clients[i].events():
            if isinstance(ev, llq.Established):
                established.add(i)
            elif isinstance(ev, llq.Fallback) and ev.reason.startswith("no answer") and retries[i] < RETRIES:
                lost.add(i)  # lost to the server's reply limit: started anew, as after retry_setup_in
            elif isinstance(ev, llq.Failed | llq.Fallback):  # refused (a cap, a full table) or unanswered
                refused[i] = ev.reason

    def pump(timeout: float) -> None:
        for fd, _ in poller.poll(max(0, int(timeout * 1000))):
            i = by_fd[fd]
            while True:
                try:
                    data = socks[i].recv(65535)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                clients[i].receive(data, dest, time.time())
                flush(i)
        now = time.time()
        for i, c in enumerate(clients):
            d = c.deadline()
            if d is not None and d <= now:
                c.poll(now)
                flush(i)

    t0 = time.monotonic()
    try:
        for start in range(0, a.llqs, BATCH):
            for i in range(start, min(a.llqs, start + BATCH)):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setblocking(False)
                s.bind((sources[i % len(sources)], 0))
                s.connect(dest)
                c = new_client()
                socks.append(s)
                clients.append(c)
                by_fd[s.fileno()] = i
                poller.register(s, select.POLLIN)
                c.start(time.time())
                flush(i)
            end = time.monotonic() + BATCH_TIMEOUT
            while len(established) + len(refused) < len(clients) and time.monotonic() < end:
                pump(0.05)
                for i in sorted(lost):
                    lost.discard(i)
                    retries[i] += 1
                    clients[i] = new_client()
                    clients[i].start(time.time())
                    flush(i)
            if len(established) < len(clients):
                break  # refused or too slow: more would only be refused too
        counters: Counter[str] = Counter()
        for c in clients:
            counters.update(c.counters)
        report({"llqs": a.llqs, "established": len(established), "sources": len(sources),
                "refused": dict(Counter(refused.values())), "setup_restarts": sum(retries.values()),
                "setup_seconds": round(time.monotonic() - t0, 3),
                "client_counters": dict(sorted(counters.items()))})
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        poller.register(stdin, select.POLLIN)
        by_fd[stdin] = -1
        end = time.monotonic() + a.hold_max
        while time.monotonic() < end:  # until the bench has read the server's memory
            ready = [fd for fd, _ in poller.poll(500)]
            if stdin in ready:
                break
            for fd in ready:
                i = by_fd[fd]
                while True:
                    try:
                        data = socks[i].recv(65535)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    clients[i].receive(data, dest, time.time())
                    flush(i)
        cancelled = cancel_all(clients, socks)
    finally:
        for s in socks:
            s.close()
    return {"closed": len(clients), "cancelled": cancelled}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("server")
    p.add_argument("port", type=int)
    p.add_argument("zone")
    p.add_argument("secret_file")


def _secondary_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--secondary", required=True, help="ADDR:PORT of the secondary")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--prefix", default="lag")


def _hold_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--llqs", type=int, default=1000)
    p.add_argument("--sources", required=True, help="comma-separated local addresses to bind")
    p.add_argument("--name", default="held")
    p.add_argument("--hold-max", type=float, default=120.0, help="seconds to hold at most")


def main(argv: list[str] | None = None) -> int:
    return cli("dns_front_client", {"secondary": (_secondary_args, cmd_secondary),
                                    "hold": (_hold_args, cmd_hold)}, argv)


if __name__ == "__main__":
    sys.exit(main())
