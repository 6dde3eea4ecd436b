"""The TLS side of serve-dns (RFC 7858, DNS over TLS): the server's certificate and its TLS context.

The certificate is issued at start under the account CA (tunneld.accountca), which every device rebuilds
from the account secret, so clients verify the server with nothing distributed or pinned. Its key is fresh
at every start and never touches a file system: OpenSSL's loader wants paths, so the key and chain go
through an anonymous memory file (memfd) that is closed once loaded. TLS 1.3 only (the issue's choice;
RFC 8446): no downgrade to negotiate, no renegotiation, no compression. The server asks for an optional
client certificate under the same CA: a peer that presents one (issued by accountca.issue_client to a
device of the zone) is a member, whose DNS Push session sees the private view (docs/dnspush.md); a peer
without one (kdig, dig +tls) is served as before; a certificate under any other CA fails the handshake.
A server may instead present a chain from a public CA (``serve-dns --tls-cert/--tls-key``,
:func:`public_server_context`): checked once at start (:func:`check_public_chain`), never renewed while
running; client certificates are still verified against the account CA (docs/dnspush.md).
"""

from __future__ import annotations

import datetime
import os
import ssl
from collections.abc import Callable, Sequence
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tunneld.accountca import AccountCA, account_ca, issue_server, new_serial
from tunneld.accountca import memory_file as _memory_file

__all__ = ["LEAF_LIFETIME", "RENEW_INTERVAL", "ChainError", "check_public_chain", "is_member",
           "public_server_context", "renew", "server_certificate", "server_context"]

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
    ctx = _context(ca)
    _load(ctx, ca, names, now, rand)
    return ctx


def public_server_context(chain: bytes, key: bytes, secret: bytes, zone: str) -> ssl.SSLContext:
    """The TLS 1.3 server context of serve-dns presenting ``chain`` (PEM, leaf first: a public CA's, say)
    with its PEM ``key``, which :func:`check_public_chain` accepted; client certificates are verified against
    the account CA as in :func:`server_context`. Nothing renews it: a new chain needs a restart."""
    ctx = _context(account_ca(secret, zone))
    with _memory_file(chain) as cert_path, _memory_file(key) as key_path:
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def _context(ca: AccountCA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_OPTIONAL  # a client may present none; one that does must verify
    ctx.load_verify_locations(cadata=ca.pem.decode("ascii"))
    return ctx


class ChainError(ValueError):
    """What is wrong with a certificate chain or its key ("problem; fix", one line); ``of_key``: the key
    file is the one at fault."""

    def __init__(self, message: str, *, of_key: bool = False) -> None:
        super().__init__(message)
        self.of_key = of_key


def check_public_chain(chain: bytes, key: bytes, zone: str, now: int) -> None:
    """ChainError unless ``chain`` is PEM certificates whose first (the leaf) is valid at ``now``, names
    ``zone`` (clients verify the server by the account domain) and matches the PEM private ``key``."""
    try:
        certs = x509.load_pem_x509_certificates(chain)
    except ValueError:
        raise ChainError("not a PEM certificate chain; give the full chain, leaf first (e.g. Let's "
                         "Encrypt's fullchain.pem)") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: an encrypted key
        raise ChainError("not an unencrypted PEM private key; give the key of the certificate (e.g. "
                         "Let's Encrypt's privkey.pem)", of_key=True) from None
    leaf = certs[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private.public_key().public_bytes(serialization.Encoding.DER, spki)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise ChainError("this key does not match the certificate; give the private key issued with it "
                         "(privkey.pem beside fullchain.pem)", of_key=True)
    if not _names(leaf, zone):
        raise ChainError(f"the certificate does not name the account domain {zone}; get one for {zone} "
                         f"(clients verify the server by that name)")
    at = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if not leaf.not_valid_before_utc <= at <= leaf.not_valid_after_utc:
        raise ChainError(f"the certificate is valid from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                         f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now; renew it")


def _names(leaf: x509.Certificate, zone: str) -> bool:
    """Does ``leaf``'s subjectAltName cover ``zone``, exactly or by a wildcard one label above (RFC 6125
    §6.4.3: ``*`` stands for one whole left-most label)?"""
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    zone = zone.rstrip(".").lower()
    parent = zone.partition(".")[2]
    for name in names.get_values_for_type(x509.DNSName):
        name = name.rstrip(".").lower()
        if name == zone or (parent and name == f"*.{parent}"):
            return True
    return False


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
