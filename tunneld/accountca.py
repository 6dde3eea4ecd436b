"""The account CA: an X.509 authority every device rebuilds, byte for byte, from the account secret.

Its Ed25519 key comes from the secret (tunneld.crypto.kdf.derive_account_ca_seed), and since Ed25519
signatures are deterministic (RFC 8032 §5.1.6) and every other field is fixed here, each device derives the
identical self-signed certificate: TLS peers trust it with nothing to distribute. Name constraints keep a
leaked CA to the account's own domain and ULA /48. Leaf certificates (a server's, a device's client
certificate) are issued under it; callers pass times and serials in, as nothing here reads a clock or
randomness. Every fixed field and the test vector are in docs/protocol.md ("Account CA").
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunneld.crypto.kdf import derive_account_ca_seed, normalize_domain
from tunneld.identity import account_prefix
from tunneld.proto.records import check_name

__all__ = [
    "CA_NOT_AFTER",
    "CA_NOT_BEFORE",
    "SERIAL_LEN",
    "AccountCA",
    "LeafKey",
    "account_ca",
    "ca_common_name",
    "issue_client",
    "issue_server",
    "memory_file",
    "new_serial",
    "public_key_raw",
]

CA_NOT_BEFORE: Final = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
"""The CA's notBefore: a fixed instant before any device's clock (UTCTime 000101000000Z)."""
CA_NOT_AFTER: Final = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
"""The CA's notAfter: RFC 5280 §4.1.2.5's "no well-defined expiration date" (GeneralizedTime
99991231235959Z). The CA lives as long as the account secret; rotating it means a new secret."""
SERIAL_LEN: Final = 16
"""Bytes of every serial we make: 16 random (or hashed) bytes, top bit clear, non-zero (RFC 5280
§4.1.2.2: a positive integer of at most 20 octets; CA/B Forum asks for 64 bits of entropy or more)."""
CA_PATH_LEN: Final = 0
"""BasicConstraints pathLenConstraint: the account CA issues leaves only, never another CA."""

LeafKey = Ed25519PublicKey | EllipticCurvePublicKey
"""A leaf's key: one that signs a TLS 1.3 CertificateVerify (RFC 8446 §4.2.3: Ed25519 or ECDSA)."""

_COMMON_NAME_PREFIX: Final = "tunneld account CA "
_MAX_SERIAL: Final = 1 << (8 * SERIAL_LEN - 1)


def ca_common_name(domain: str) -> str:
    """The CA's subject (and issuer) CN: ``tunneld account CA <normalized domain>``."""
    return _COMMON_NAME_PREFIX + normalize_domain(domain)


def _serial_from(data: bytes) -> int:
    """A serial from ``data``'s first SERIAL_LEN bytes: top bit cleared (positive in DER), never 0."""
    return int.from_bytes(data[:SERIAL_LEN], "big") % _MAX_SERIAL or 1


def new_serial(rand: Callable[[int], bytes]) -> int:
    """A fresh leaf serial from ``rand`` (e.g. os.urandom): SERIAL_LEN bytes, top bit clear, non-zero."""
    data = rand(SERIAL_LEN)
    if len(data) != SERIAL_LEN:
        raise ValueError(f"rand gave {len(data)} bytes, not {SERIAL_LEN}")
    return _serial_from(data)


@dataclass(frozen=True, eq=False, repr=False)
class AccountCA:
    """The account CA of ``domain``: its key and its certificate. The key never appears in repr."""

    domain: str
    key: Ed25519PrivateKey
    certificate: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def prefix(self) -> ipaddress.IPv6Network:
        """The account's ULA /48: the only addresses the CA may certify."""
        return account_prefix(self.domain)

    def __repr__(self) -> str:
        return f"AccountCA({self.domain!r}, sha256={hashlib.sha256(self.der).hexdigest()[:16]}…)"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("AccountCA holds the account CA's private key and cannot be pickled")


def account_ca(secret: bytes, domain: str) -> AccountCA:
    """The account CA for ``secret`` (32 bytes) and ``domain``; ValueError for a bad length or name.

    Deterministic: the same inputs give the same DER on every device and every run.
    """
    name = normalize_domain(domain)
    key = Ed25519PrivateKey.from_private_bytes(derive_account_ca_seed(secret, name))
    public = key.public_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_common_name(name))])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(_serial_from(hashlib.sha256(public_key_raw(public)).digest()))
        .not_valid_before(CA_NOT_BEFORE)
        .not_valid_after(CA_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=CA_PATH_LEN), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        # RFC 5280 §4.2.1.10: conforming CAs MUST mark name constraints critical. A dNSName subtree
        # covers the name and every name below it; an iPAddress subtree is an address and a mask.
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(name), x509.IPAddress(account_prefix(name))],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    )
    return AccountCA(name, key, builder.sign(key, None))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    # A CA signs certificates and CRLs; a leaf only signs (the TLS 1.3 CertificateVerify, RFC 8446 §4.4.3).
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def _in_domain(ca: AccountCA, hostname: str) -> str:
    try:
        name = normalize_domain(hostname)
    except ValueError as e:
        raise ValueError(f"bad host name {hostname!r}: {e}") from None
    if name != ca.domain and not name.endswith("." + ca.domain):
        raise ValueError(f"host name {name!r} is outside the account domain {ca.domain!r}")
    return name


def _time(t: int, what: str) -> datetime.datetime:
    if isinstance(t, bool) or not isinstance(t, int):
        raise ValueError(f"{what} must be whole Unix seconds, got {t!r}")
    if not CA_NOT_BEFORE.timestamp() <= t <= CA_NOT_AFTER.timestamp():
        raise ValueError(f"{what} {t} is outside the account CA's validity (2000-01-01 to 9999-12-31)")
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


def _issue(
    ca: AccountCA,
    common_name: str,
    names: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    public_key: LeafKey,
    not_before: int,
    not_after: int,
    serial: int,
) -> x509.Certificate:
    if not isinstance(public_key, LeafKey):
        raise ValueError(f"a leaf's key must be Ed25519 or ECDSA, not {type(public_key).__name__}")
    start, end = _time(not_before, "not_before"), _time(not_after, "not_after")
    if end <= start:
        raise ValueError(f"not_after {not_after} is not after not_before {not_before}")
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < _MAX_SERIAL:
        raise ValueError(f"serial must be an integer from 1 to 2**{8 * SERIAL_LEN - 1} - 1 (new_serial)")
    ca_public = ca.key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False)
    )
    return builder.sign(ca.key, None)


def issue_server(
    ca: AccountCA,
    hostnames: Sequence[str],
    public_key: LeafKey,
    not_before: int,
    not_after: int,
    serial: int,
    addresses: Sequence[ipaddress.IPv6Address] = (),
) -> x509.Certificate:
    """A TLS server certificate (serverAuth) for ``hostnames`` and ``addresses``, signed by ``ca``.

    Every host name must be the account domain or a name below it, and every address inside the account's
    ULA /48: what the CA's name constraints permit, refused here (ValueError) rather than by each verifier.
    The CN is the first host name. Times are Unix seconds; ``serial`` comes from new_serial.
    """
    if isinstance(hostnames, str) or not hostnames:
        raise ValueError("give the server's host names as a non-empty sequence")
    names = list(dict.fromkeys(_in_domain(ca, h) for h in hostnames))
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    for a in addresses:
        if not isinstance(a, ipaddress.IPv6Address) or a not in ca.prefix:
            raise ValueError(f"address {a} is outside the account's prefix {ca.prefix}")
        sans.append(x509.IPAddress(a))
    return _issue(ca, names[0], sans, ExtendedKeyUsageOID.SERVER_AUTH, public_key, not_before, not_after,
                  serial)


def issue_client(
    ca: AccountCA,
    device: str,
    public_key: LeafKey,
    not_before: int,
    not_after: int,
    serial: int,
) -> x509.Certificate:
    """A TLS client certificate (clientAuth) for the device ``device`` (one label, as in the config),
    signed by ``ca``: CN and the one dNSName are ``<device>.<domain>``, lower case."""
    try:
        label = check_name(device).lower()
    except ValueError as e:
        raise ValueError(f"bad device name: {e}") from None
    fqdn = _in_domain(ca, f"{label}.{ca.domain}")
    return _issue(ca, fqdn, [x509.DNSName(fqdn)], ExtendedKeyUsageOID.CLIENT_AUTH, public_key,
                  not_before, not_after, serial)


def public_key_raw(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key (as printed in the test vector)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@contextlib.contextmanager
def memory_file(data: bytes) -> Iterator[str]:
    """A path to ``data`` that exists only in memory (memfd_create), for OpenSSL's loaders, which want a
    path: a leaf's key is loaded without touching a file system."""
    fd = os.memfd_create("tunneld-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
