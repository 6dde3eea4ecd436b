"""The TLS side of serve-dns (RFC 7858, DNS over TLS): the server's certificate and its TLS context.

The certificate is issued at start under the account CA (tunneld.accountca), which every device rebuilds
from the account secret, so clients verify the server with nothing distributed or pinned. Its key is fresh
at every start and never touches a file system: OpenSSL's loader wants paths, so the key and chain go
through an anonymous memory file (memfd) that is closed once loaded. TLS 1.3 only (the issue's choice;
RFC 8446): no downgrade to negotiate, no renegotiation, no compression. The server asks for an optional
client certificate under the same CA: a peer that presents one (issued by accountca.issue_client to a
device of the zone) is a member, whose DNS Push session sees the private view (docs/dnspush.md); a peer
without one (kdig, dig +tls) is served as before; a certificate under any other CA fails the handshake.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Sequence
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tunneld.accountca import AccountCA, account_ca, issue_server, new_serial
from tunneld.accountca import memory_file as _memory_file

__all__ = ["LEAF_LIFETIME", "RENEW_INTERVAL", "is_member", "renew", "server_certificate", "server_context"]

LEAF_LIFETIME: Final = 397 * 86400  # seconds: the CA/B Forum's longest; a new leaf at every start
RENEW_INTERVAL: Final = 30 * 86400  # seconds between fresh leaves of a running server (renew)
CLOCK_SKEW: Final = 3600  # seconds the leaf is valid before its issue: clients whose clocks run behind


def server_certificate(ca: AccountCA, names: Sequence[str], now: int,
                       rand: Callable[[int], bytes] = os.urandom) -> tuple[bytes, bytes]:
    """A fresh P-256 key and a server certificate for ``names`` under ``ca``: (PEM chain, PEM key). The
    chain is the leaf then the CA, so a client that holds neither can still see the path. P-256 rather than
    Ed25519 for the leaf: every TLS 1.3 stack signs and verifies it (RFC 8446 §9.1 makes it mandatory)."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = issue_server(ca, names, key.public_key(), now - CLOCK_SKEW, now + LEAF_LIFETIME, new_serial(rand))
    chain = leaf.public_bytes(serialization.Encoding.PEM) + ca.pem
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return chain, pem_key


def server_context(secret: bytes, zone: str, names: Sequence[str], now: int,
                   rand: Callable[[int], bytes] = os.urandom) -> ssl.SSLContext:
    """The TLS 1.3 server context of serve-dns for ``zone``, presenting a certificate for ``names`` (the
    zone's server names) issued under the account CA derived from ``secret``, asking for an optional client
    certificate verified against that CA."""
    ca = account_ca(secret, zone)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    _load(ctx, ca, names, now, rand)
    ctx.verify_mode = ssl.CERT_OPTIONAL  # a client may present none; one that does must verify
    ctx.load_verify_locations(cadata=ca.pem.decode("ascii"))
    return ctx


def renew(ctx: ssl.SSLContext, secret: bytes, zone: str, names: Sequence[str], now: int,
          rand: Callable[[int], bytes] = os.urandom) -> None:
    """Give ``ctx`` (a :func:`server_context`) a fresh key and leaf: connections from now on get them, those
    open keep theirs. serve-dns calls it every :data:`RENEW_INTERVAL`, so a server that runs for years
    never presents an expired leaf."""
    _load(ctx, account_ca(secret, zone), names, now, rand)


def _load(ctx: ssl.SSLContext, ca: AccountCA, names: Sequence[str], now: int,
          rand: Callable[[int], bytes]) -> None:
    chain, key = server_certificate(ca, names, now, rand)
    with _memory_file(chain) as cert_path, _memory_file(key) as key_path:
        ctx.load_cert_chain(cert_path, key_path)


def is_member(peer_certificate: object, zone: str) -> bool:
    """Does the verified peer certificate (``SSLObject.getpeercert()``: empty or None without one) name a
    device of ``zone`` (CN ``<device>.<zone>``)? The chain and the clientAuth purpose were checked by the
    handshake (OpenSSL verifies a client's certificate for the TLS client purpose)."""
    if not isinstance(peer_certificate, dict) or not peer_certificate:
        return False
    suffix = "." + zone.rstrip(".").lower()
    for rdn in peer_certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str) and value.lower().endswith(suffix):
                return True
    return False
