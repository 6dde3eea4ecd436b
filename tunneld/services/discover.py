"""Finding the account's servers: `_dns-update._udp.DOMAIN` and `_dns-llq._udp.DOMAIN` SRV records
(servers are found by SRV, falling back to the configured server).

The configured server is asked; an SRV answer's target is resolved (A, then AAAA) from the same server.
Anything missing — no answer, no SRV, a target "." or without an address — means the configured server
itself, so a plain setup (one server for everything, as `tunneld serve-dns` is) needs no records at all.
Every exchange is bounded by a timeout. With the account key every query is signed and only answers
signed over it count (the account's server shows its records to its own clients alone).
"""

from __future__ import annotations

import logging
import os
import socket
import time

import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import trio

from tunneld.proto.dnsguard import parse
from tunneld.proto.errors import ParseError
from tunneld.proto.srv import LLQ_SRV_SERVICE, UPDATE_SRV_SERVICE, build_srv_query, pick_srv_target
from tunneld.proto.tsig import TsigError, TsigKey, sign, verify

log = logging.getLogger("tunneld.discover")

UPDATE_SERVICE = UPDATE_SRV_SERVICE
LLQ_SERVICE = LLQ_SRV_SERVICE
EXCHANGE_TIMEOUT = 2.0  # seconds per question


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


async def _address(server: tuple[str, int], target: str, key: TsigKey | None) -> str | None:
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        query = dns.message.make_query(dns.name.from_text(target), rdtype,
                                       id=int.from_bytes(os.urandom(2), "big"))
        wire, mac = query.to_wire(), b""
        if key is not None:
            wire, mac = sign(wire, key, int(time.time()))
        reply = await _exchange(server, wire, query.id)
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


async def find_server(configured: tuple[str, int], domain: str, service: str,
                      key_secret: bytes | None = None, algorithm: str = "hmac-sha256") -> tuple[str, int]:
    """The (address, port) that serves `service` for `domain`, or `configured` if the SRV says nothing.
    Queries are signed with the account's TSIG key (named after `domain`) if `key_secret` is given."""
    key = None if key_secret is None else TsigKey(dns.name.from_text(domain), key_secret, algorithm)
    query = build_srv_query(domain, service=service, key=key, now=time.time())
    reply = await _exchange(configured, query.payload, query.message_id)
    if reply is None:
        return configured
    try:
        target = pick_srv_target(reply, query, now=time.time())
    except ParseError as e:
        log.info("%s.%s SRV: unusable answer (%s); using %s:%d", service, domain, e, *configured)
        return configured
    if target is None:
        return configured
    name, port = target
    address = await _address(configured, name, key)
    if address is None:
        log.info("%s.%s SRV target %s has no address; using %s:%d", service, domain, name, *configured)
        return configured
    if (address, port) != configured:
        log.info("%s for %s: %s port %d (from its SRV record)", service, domain, address, port)
    return (address, port)
