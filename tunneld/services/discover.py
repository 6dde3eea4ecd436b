"""Finding the account's servers: `_dns-update._udp.DOMAIN` and `_dns-llq._udp.DOMAIN` SRV records
(servers are found by SRV, falling back to the configured server), and the TURN relay: `[relay] server`,
else `_turn._udp.DOMAIN` SRV (RFC 5928), else none.

The configured server is asked; an SRV answer's target is resolved (A, then AAAA) from the same server.
Anything missing — no answer, no SRV, a target "." or without an address — means the configured server
itself, so a plain setup (one server for everything, as `tunneld serve-dns` is) needs no records at all.
Every exchange is bounded by a timeout. With the account key every query is signed and only answers
signed over it count (the account's server shows its records to its own clients alone). With DNS over TLS
(`[account] transport = "tls"`, :class:`TlsLookup`) a lookup's questions share one TLS connection to the
server's TLS port, verified against the account CA, and the TLS services are `_dns-update-tls._tcp` and
`_dns-query-tls._tcp`: nothing of the lookup crosses the network in clear.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import trio

from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.dnsguard import parse
from tunneld.proto.errors import ParseError
from tunneld.proto.srv import (
    LLQ_SRV_SERVICE,
    PUSH_TLS_SRV_SERVICE,
    QUERY_TLS_SRV_SERVICE,
    TURN_SRV_SERVICE,
    UPDATE_SRV_SERVICE,
    UPDATE_TLS_SRV_SERVICE,
    build_srv_query,
    pick_srv_target,
)
from tunneld.proto.tsig import TsigError, TsigKey, sign, verify
from tunneld.services.tlsport import CONNECT_TIMEOUT, client_context, failure_reason

log = logging.getLogger("tunneld.discover")

UPDATE_SERVICE = UPDATE_SRV_SERVICE
LLQ_SERVICE = LLQ_SRV_SERVICE
TURN_SERVICE = TURN_SRV_SERVICE
UPDATE_TLS_SERVICE = UPDATE_TLS_SRV_SERVICE
QUERY_TLS_SERVICE = QUERY_TLS_SRV_SERVICE
PUSH_TLS_SERVICE = PUSH_TLS_SRV_SERVICE
EXCHANGE_TIMEOUT = 2.0  # seconds per question (over TLS, the connection has CONNECT_TIMEOUT more)

Ask = Callable[[bytes, int], Awaitable[bytes | None]]
"""Send one query (wire, message ID) and wait for its answer: None if none came in time."""


@dataclass(frozen=True)
class TlsLookup:
    """Discovery over DNS over TLS (RFC 7858): ``context`` trusts the account CA, and the server's
    certificate must name ``hostname`` (the account domain, which every serve-dns certificate names)."""

    context: ssl.SSLContext
    hostname: str

    @classmethod
    def for_account(cls, ca_pem: bytes, domain: str, *, public_ca: bool = False) -> TlsLookup:
        """Lookups verified against the account CA, and with ``public_ca`` the system's CAs too."""
        return cls(client_context(ca_pem, public_ca=public_ca), domain)


async def _exchange(server: tuple[str, int], wire: bytes, message_id: int) -> bytes | None:
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock, trio.move_on_after(EXCHANGE_TIMEOUT):
        await sock.connect(server)
        await sock.send(wire)
        while True:
            try:
                reply = await sock.recv(65535)
            except OSError:  # ICMP unreachable: nobody listens there
                return None
            if len(reply) >= 2 and int.from_bytes(reply[:2], "big") == message_id:
                return reply
    return None


class _TlsChannel:
    """One lookup's TLS connection: opened at the first question, shared by the next ones (RFC 7766 §6.2.1:
    reuse), given up after a failure (every later question is unanswered at once, never a second try)."""

    def __init__(self, server: tuple[str, int], tls: TlsLookup) -> None:
        self.server = server
        self.tls = tls
        self._stream: trio.SSLStream[trio.SocketStream] | None = None
        self._frames = FrameBuffer()
        self._failed = False

    async def _open(self) -> trio.SSLStream[trio.SocketStream] | None:
        if self._stream is not None or self._failed:
            return self._stream
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                tcp = await trio.open_tcp_stream(*self.server)
                stream = trio.SSLStream(tcp, self.tls.context, server_hostname=self.tls.hostname)
                try:
                    await stream.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as e:  # refused, unverified, silent
            self._failed = True
            log.info("DNS over TLS to %s port %d: %s", *self.server, failure_reason(e))
            return None
        self._stream = stream
        return stream

    async def ask(self, wire: bytes, message_id: int) -> bytes | None:
        stream = await self._open()
        if stream is None:
            return None
        with trio.move_on_after(EXCHANGE_TIMEOUT):
            try:
                await stream.send_all(frame(wire))
                while True:
                    message = self._frames.next()
                    if message is None:
                        data = await stream.receive_some(65536)
                        if not data:
                            break
                        self._frames.feed(bytes(data))
                    elif int.from_bytes(message[:2], "big") == message_id:
                        return message
            except (trio.BrokenResourceError, trio.ClosedResourceError, ParseError):
                pass
        self._failed = True  # closed, broken, out of step or too slow: this connection is done
        await self.aclose()
        return None

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def _asking(server: tuple[str, int], tls: TlsLookup | None) -> AsyncIterator[Ask]:
    """How a lookup asks `server`: a UDP exchange per question, or one TLS connection for them all."""
    if tls is None:
        yield lambda wire, message_id: _exchange(server, wire, message_id)
        return
    channel = _TlsChannel(server, tls)
    try:
        yield channel.ask
    finally:
        await channel.aclose()


async def _address(ask: Ask, target: str, key: TsigKey | None) -> str | None:
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        query = dns.message.make_query(dns.name.from_text(target), rdtype,
                                       id=int.from_bytes(os.urandom(2), "big"))
        wire, mac = query.to_wire(), b""
        if key is not None:
            wire, mac = sign(wire, key, int(time.time()))
        reply = await ask(wire, query.id)
        if reply is None:
            return None
        try:
            if key is not None:
                verify(reply, key, mac, time.time())
            msg = parse(reply)
        except (TsigError, ParseError):  # a TSIG that does not verify, or a refused message: "no address"
            continue
        if not msg.flags & dns.flags.QR:
            continue
        for rrset in msg.answer:
            if rrset.rdtype == rdtype:
                for rd in rrset:
                    return str(rd.address)
    return None


async def _resolve(host: str, port: int) -> str | None:
    """An address of `host` from the system's resolver (an IP literal is itself), within the timeout."""
    with trio.move_on_after(EXCHANGE_TIMEOUT):
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError:  # socket.gaierror: no such name, or no resolver
            return None
        for family, _type, _proto, _name, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                return str(sockaddr[0])
    return None


async def lookup_srv(server: tuple[str, int], domain: str, service: str, key_secret: bytes | None = None,
                     algorithm: str = "hmac-sha256", *,
                     tls: TlsLookup | None = None) -> tuple[str, str, int] | None:
    """(target, address, port) of `service`.`domain` SRV as `server` answers it, the target's address
    from `server` too (A, then AAAA); address "" when `server` has none. None when there is no usable
    SRV. Queries are signed with the account's TSIG key (named after `domain`) if `key_secret` is given;
    with `tls`, `server` is the TLS port and every question goes over one TLS connection to it."""
    key = None if key_secret is None else TsigKey(dns.name.from_text(domain), key_secret, algorithm)
    async with _asking(server, tls) as ask:
        query = build_srv_query(domain, service=service, key=key, now=time.time())
        reply = await ask(query.payload, query.message_id)
        if reply is None:
            return None
        try:
            target = pick_srv_target(reply, query, now=time.time())
        except ParseError as e:
            log.info("%s.%s SRV: unusable answer (%s)", service, domain, e)
            return None
        if target is None:
            return None
        name, port = target
        return name, await _address(ask, name, key) or "", port


async def find_server(configured: tuple[str, int], domain: str, service: str,
                      key_secret: bytes | None = None, algorithm: str = "hmac-sha256", *,
                      tls: TlsLookup | None = None) -> tuple[str, int]:
    """The (address, port) that serves `service` for `domain`, or `configured` if the SRV says nothing.
    With `tls`, `configured` is the server's TLS port, asked over TLS (and the fallback)."""
    found = await lookup_srv(configured, domain, service, key_secret, algorithm, tls=tls)
    if found is None:
        return configured
    name, address, port = found
    if not address:
        # Normal: a server listening on all its addresses publishes none for its own name.
        log.debug("%s.%s SRV names %s, which has no address record: using the configured server %s:%d",
                  service, domain, name, *configured)
        return configured
    if (address, port) != configured:
        log.info("%s for %s: %s port %d (from its SRV record)", service, domain, address, port)
    return (address, port)


async def find_relay(configured: tuple[str, int] | None, dns_server: tuple[str, int] | None, domain: str,
                     key_secret: bytes | None = None, algorithm: str = "hmac-sha256", *,
                     tls: TlsLookup | None = None) -> tuple[str, int] | None:
    """The TURN relay's (address, port): `[relay] server` if configured (a name goes to the system's
    resolver), else the `_turn._udp.DOMAIN` SRV target from the account's DNS server (its address from
    that server, else from the system's resolver: a relay's name may live outside the account's zone).
    None when there is no relay, or its name has no address. With `tls`, `dns_server` is the server's TLS
    port and the SRV lookup goes over TLS."""
    if configured is not None:
        host, port = configured
    elif dns_server is not None:
        found = await lookup_srv(dns_server, domain, TURN_SERVICE, key_secret, algorithm, tls=tls)
        if found is None:
            return None
        host, address, port = found
        if address:
            return address, port
    else:
        return None
    resolved = await _resolve(host, port)
    if resolved is None:
        log.info("the TURN relay %s has no address; relaying is off", host)
        return None
    return resolved, port
