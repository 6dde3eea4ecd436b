"""DNS Push watchers for `python -m bench.throughput dns` (the `push-events` command of lab.progs.dns_client).

K DNS Push (RFC 8765) sessions to serve-dns's DNS-over-TLS port, one TCP connection each, every one with a
client certificate issued under the account CA (so the sessions are members and see device records), each
subscribed to NAME AAAA; then M times an UPDATE (UDP, TSIG-signed, as the LLQ row sends it) replaces NAME's
AAAA and the client waits until every session has the PUSH that adds the new address. Latency runs from just
before the UPDATE's send to the kernel's receive timestamp (SO_TIMESTAMPNS, which TCP reports too) of the
segment whose bytes completed the PUSH, as the LLQ row measures its event datagrams. TLS is run over memory
BIOs (ssl.SSLObject) so that the raw socket can be read with recvmsg and its timestamps.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.name
import dns.rdataclass
import dns.rdatatype
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lab.progs import SO_TIMESTAMPNS, kernel_stamp
from tunneld.accountca import account_ca, issue_client, new_serial
from tunneld.proto import dso_wire as dso
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.errors import ParseError

CONNECT_TIMEOUT = 10.0
KEEPALIVE_ID, SUBSCRIBE_ID = 1, 2
KEEPALIVE_MS = 60_000


def client_context(secret: bytes, zone: str, device: str, work: Path) -> ssl.SSLContext:
    """A TLS 1.3 client context trusting the account CA and presenting a client certificate for
    ``device`` under it (key and chain in ``work``, a private temporary directory)."""
    ca = account_ca(secret, zone)
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    cert = issue_client(ca, device, key.public_key(), now - 3600, now + 86400, new_serial(os.urandom))
    chain, pem_key = work / "client.pem", work / "client.key"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.pem)
    fd = os.open(pem_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=ca.pem.decode("ascii"))
    ctx.load_cert_chain(chain, pem_key)
    return ctx


class Session:
    """One DSO session over TLS on a raw socket (memory BIOs), with kernel receive timestamps."""

    def __init__(self, ctx: ssl.SSLContext, server: tuple[str, int], hostname: str) -> None:
        self.sock = socket.create_connection(server, timeout=CONNECT_TIMEOUT)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)
        self.frames = FrameBuffer()
        self.counters: Counter[str] = Counter()
        self.subscribed = False
        end = time.monotonic() + CONNECT_TIMEOUT
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if time.monotonic() > end or self._fill() is None:
                    raise ConnectionError("TLS handshake did not finish") from None
        self._flush()
        self.sock.setblocking(False)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.setblocking(True)
            self.sock.sendall(data)

    def _fill(self) -> float | None:
        """Read what the socket has into the TLS engine: the kernel timestamp of it, None at EOF."""
        data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(16))
        if not data:
            return None
        self.incoming.write(data)
        return kernel_stamp(anc)

    def send(self, message: dso.DsoMessage) -> None:
        self.tls.write(frame(dso.encode(message)))
        self._flush()
        self.sock.setblocking(False)

    def receive(self) -> tuple[list[dso.DsoMessage], float] | None:
        """The DSO messages completed by what the socket holds now, and the kernel time it arrived;
        None at end of stream. Anything but a DSO message is counted and skipped."""
        try:
            stamp = self._fill()
        except BlockingIOError:
            return [], 0.0
        if stamp is None:
            return None
        out: list[dso.DsoMessage] = []
        while True:
            try:
                data = self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            self.frames.feed(data)
        while (wire := self.frames.next()) is not None:
            try:
                out.append(dso.decode(wire))
            except ParseError as e:
                self.counters[f"not DSO: {e}"] += 1
        return out, stamp

    def close(self) -> None:
        self.sock.close()


def run(server: str, port: int, zone: str, secret: bytes, name: str, watchers: int, events: int,
        update: Callable[[int, str], tuple[float, Callable[[], str]]], setup_timeout: float,
        event_timeout: float) -> dict[str, Any]:
    """Set up ``watchers`` sessions on ``name`` AAAA, then ``events`` times: ``update(k, address)`` sends
    the UPDATE that sets ``address`` and returns its send time and a function that collects and checks its
    reply (the rcode's text); each session's PUSH adding ``address`` is timed."""
    qname = dns.name.from_text(name)
    counters: Counter[str] = Counter()
    sessions: list[Session] = []
    by_fd: dict[int, int] = {}
    poller = select.poll()
    got: dict[int, float] = {}
    target = ""
    t0 = time.monotonic()

    def handle(i: int, messages: list[dso.DsoMessage], stamp: float) -> None:
        s = sessions[i]
        for m in messages:
            if m.response:
                if m.msg_id == SUBSCRIBE_ID:
                    if m.rcode != 0:
                        raise SystemExit(f"SUBSCRIBE refused, rcode {m.rcode}")
                    s.subscribed = True
                continue
            tlv = m.primary
            if not isinstance(tlv, dso.Push):
                counters["other DSO message"] += 1
                continue
            for rec in tlv.records:
                if target and i not in got and rec.added and rec.rdata is not None \
                        and rec.rdata.to_text() == target:
                    got[i] = stamp

    def pump(timeout: float) -> None:
        for fd, _ in poller.poll(max(0, int(timeout * 1000))):
            i = by_fd[fd]
            item = sessions[i].receive()
            if item is None:
                raise SystemExit(f"session {i}: the server closed the connection")
            handle(i, *item)

    with tempfile.TemporaryDirectory(prefix="push-watchers-") as tmp:
        ctx = client_context(secret, zone, "bench-watcher", Path(tmp))
    try:
        for i in range(watchers):
            s = Session(ctx, (server, port), zone)
            sessions.append(s)
            by_fd[s.sock.fileno()] = i
            poller.register(s.sock, select.POLLIN)
            s.send(dso.DsoMessage(KEEPALIVE_ID, (dso.Keepalive(15_000, KEEPALIVE_MS),)))
            s.send(dso.DsoMessage(SUBSCRIBE_ID, (dso.Subscribe(qname, dns.rdatatype.AAAA,
                                                               dns.rdataclass.IN),)))
        end = time.monotonic() + setup_timeout
        while not all(s.subscribed for s in sessions) and time.monotonic() < end:
            pump(0.05)
        setup_seconds = time.monotonic() - t0
        ready = sum(s.subscribed for s in sessions)
        if ready < watchers:
            raise SystemExit(f"only {ready} of {watchers} subscriptions were acknowledged")
        pump(0.2)  # the initial PUSHes
        samples: list[float] = []
        per_update: list[int] = []
        failures: Counter[str] = Counter()
        for k in range(events):
            target = f"2001:db8:8::{k + 1:x}"
            got.clear()
            t_send, finish = update(k, target)
            end = time.monotonic() + event_timeout
            while len(got) < watchers and time.monotonic() < end:
                pump(0.05)
            rc = finish()
            if rc != "NOERROR":
                failures[rc] += 1
            samples += [stamp - t_send for stamp in got.values()]
            per_update.append(len(got))
        for s in sessions:
            counters.update(s.counters)
    finally:
        for s in sessions:
            s.close()
    return {"watchers": watchers, "updates": events, "expected": watchers * events, "received": len(samples),
            "setup_seconds": setup_seconds, "samples": samples, "per_update": per_update,
            "failures": sum(failures.values()),
            "failure_kinds": dict(failures), "client_counters": dict(sorted(counters.items()))}

