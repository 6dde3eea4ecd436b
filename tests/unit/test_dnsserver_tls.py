"""serve-dns's DNS over TLS (RFC 7858) on loopback: the certificate under the account CA, TLS 1.3 only,
and the TCP limits applied to the handshake (a silent client or a client that fails the handshake holds its
slot for one idle timeout, and is counted)."""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import struct
import time

import dns.message
import dns.rcode
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.unit.test_dnsserver_tcp import DOMAIN, free_port, make_core
from tunneld.accountca import account_ca
from tunneld.dnsserver.serve import serve
from tunneld.dnsserver.tcp import TcpLimits
from tunneld.dnsserver.tls import LEAF_LIFETIME, renew, server_certificate, server_context
from tunneld.services.tlsport import client_context

SECRET = bytes(range(32))
NOW = 1_800_000_000
NAME = f"ns.{DOMAIN}"


def test_the_certificate_names_the_server_under_the_account_ca() -> None:
    ca = account_ca(SECRET, DOMAIN)
    chain, key = server_certificate(ca, [NAME, DOMAIN], NOW)
    leaf, issuer = x509.load_pem_x509_certificates(chain)
    assert issuer.public_bytes(serialization.Encoding.DER) == ca.der
    leaf.verify_directly_issued_by(ca.certificate)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [NAME, DOMAIN]
    assert leaf.not_valid_after_utc.timestamp() == NOW + LEAF_LIFETIME
    assert b"PRIVATE KEY" in key
    with pytest.raises(ValueError):  # outside the account domain: the CA may not name it
        server_certificate(ca, ["dns.example.org"], NOW)


async def _serve_tls(nursery: trio.Nursery, limits: TcpLimits | None = None) -> int:
    ctx = server_context(SECRET, DOMAIN, [NAME], int(time.time()))  # verified against today's clock
    for _ in range(5):
        port, tls_port = free_port(), free_port()
        try:
            await nursery.start(functools.partial(serve, make_core(), "127.0.0.1", port, tcp=limits,
                                                  tls=("127.0.0.1", tls_port, ctx)))
        except OSError:
            continue
        return tls_port
    raise AssertionError("could not bind")


async def _query(port: int, ctx: ssl.SSLContext) -> dns.message.Message:
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx, https_compatible=False)
    wire = dns.message.make_query(DOMAIN, "SOA").to_wire()
    async with stream:
        await stream.send_all(struct.pack("!H", len(wire)) + wire)
        head = await stream.receive_some(2)
        size = struct.unpack("!H", head)[0]
        body = b""
        while len(body) < size:
            body += await stream.receive_some(size - len(body))
    return dns.message.from_wire(body)


def _client(ca_secret: bytes = SECRET) -> ssl.SSLContext:
    ctx = client_context(account_ca(ca_secret, DOMAIN).pem)
    ctx.check_hostname = False  # loopback by address; the name is checked by the integration test (dig)
    return ctx


def test_a_query_over_tls_is_answered_and_a_stranger_ca_is_refused() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _serve_tls(nursery)
            reply = await _query(port, _client())
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer
            with pytest.raises(trio.BrokenResourceError):
                await _query(port, _client(bytes(32)))  # another account's CA
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_tls_1_2_is_refused() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _serve_tls(nursery)
            ctx = _client()
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            with pytest.raises(trio.BrokenResourceError):
                await _query(port, ctx)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_silent_client_is_closed_after_the_idle_timeout_without_a_handshake() -> None:
    async def main() -> None:
        limits = TcpLimits(idle_timeout=0.3, busy_idle_timeout=0.3)
        async with trio.open_nursery() as nursery:
            port = await _serve_tls(nursery, limits)
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            await sock.connect(("127.0.0.1", port))
            with trio.fail_after(5):  # the server closes it: end of stream, not our timeout
                assert await sock.recv(100) == b""
            sock.close()
            reply = await _query(port, _client())  # and serves the next client as usual
            assert reply.rcode() == dns.rcode.NOERROR
            nursery.cancel_scope.cancel()

    trio.run(main)


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> x509.Certificate:
    """A TLS handshake over memory BIOs: the leaf the server presented."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # a TLS 1.3 handshake takes two flights each way
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        der = c.getpeercert(binary_form=True) if s.version() and c.version() else None
        if der:
            return x509.load_der_x509_certificate(der)
    raise AssertionError("the handshake did not finish")


def test_renew_gives_new_connections_a_fresh_leaf_and_key() -> None:
    """serve-dns renews its leaf while running (a server up for more than 397 days): the same context
    presents a new certificate and key, still under the account CA and for the same names."""
    now = int(time.time())
    ctx = server_context(SECRET, DOMAIN, [NAME], now)
    client = client_context(account_ca(SECRET, DOMAIN).pem)
    before = _handshake(ctx, client, NAME)
    renew(ctx, SECRET, DOMAIN, [NAME], now + 60)
    after = _handshake(ctx, client, NAME)
    assert after.serial_number != before.serial_number
    assert after.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo) != \
        before.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert after.not_valid_after_utc.timestamp() == now + 60 + LEAF_LIFETIME
    assert after.issuer == before.issuer
