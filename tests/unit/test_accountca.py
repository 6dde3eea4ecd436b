"""tunneld.accountca: the account CA rebuilt from the secret, its fixed fields, its leaves.

The vector (docs/protocol.md, "Account CA") is checked against an HKDF written out from hmac + hashlib and,
when `openssl` is installed, against OpenSSL deriving the public key from the seed and verifying leaves
under the CA's name constraints. A TLS 1.3 handshake over memory BIOs (Python's ssl) shows a server and a
client certificate issued here are accepted by a stock TLS stack, and a certificate from another CA is not.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import pickle
import shutil
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tunneld.accountca import (
    CA_NOT_AFTER,
    CA_NOT_BEFORE,
    AccountCA,
    account_ca,
    issue_client,
    issue_server,
    new_serial,
    public_key_raw,
)
from tunneld.cli import main
from tunneld.crypto import kdf
from tunneld.identity import account_prefix

SECRET = bytes(range(32))
DOMAIN = "Example.COM."
SEED_HEX = "4b644e12e185df6e8d6a0268fee2b54f281382691d5c8ca0b46d6144dcafd02e"
PUBLIC_HEX = "7b8a1c60b37a36c5a51510d0576cac34f11026f96a9c854e2af519ca09a6fb00"
SERIAL_HEX = "3ae02b193a2c090a8fac01dca50e1b58"
DER_SHA256 = "b3c8cd5d5686b98821d4d8c2da454b49d6ab331271888157cf8dfdcde1e169d7"
PREFIX = "fda3:79a6:f6ee::/48"
CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBnDCCAU6gAwIBAgIQOuArGTosCQqPrAHcpQ4bWDAFBgMrZXAwKTEnMCUGA1UE
AwwedHVubmVsZCBhY2NvdW50IENBIGV4YW1wbGUuY29tMCAXDTAwMDEwMTAwMDAw
MFoYDzk5OTkxMjMxMjM1OTU5WjApMScwJQYDVQQDDB50dW5uZWxkIGFjY291bnQg
Q0EgZXhhbXBsZS5jb20wKjAFBgMrZXADIQB7ihxgs3o2xaUVENBXbKw08RAm+Wqc
hU4q9RnKCab7AKOBiTCBhjASBgNVHRMBAf8ECDAGAQH/AgEAMA4GA1UdDwEB/wQE
AwIBBjAdBgNVHQ4EFgQUWcn40p76NYRwPiYd+bzwZf0CipUwQQYDVR0eAQH/BDcw
NaAzMA2CC2V4YW1wbGUuY29tMCKHIP2jeab27gAAAAAAAAAAAAD///////8AAAAA
AAAAAAAAMAUGAytlcANBAEx8ixgiPDTalDpZaVUIaqtFhJdn5pZ2TCGDEGvQ8XkG
geudI6bd0SUCgVHcim/dOyqS8nGeKD0+YcmfCf3TGgk=
-----END CERTIFICATE-----
"""

T0 = 1_700_000_000  # 2023-11-14: a fixed leaf validity, so nothing here depends on today's date
T1 = T0 + 90 * 86400
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")


@pytest.fixture(scope="module")
def ca() -> AccountCA:
    return account_ca(SECRET, DOMAIN)


def _leaf_key(n: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


# --- the vector ------------------------------------------------------------------------------------------


def test_seed_known_answer_from_an_inline_hkdf() -> None:
    # One HKDF-SHA256 block (L = 32), no salt: PRK = HMAC(32 zero bytes, secret); T(1) = HMAC(PRK, info || 1).
    prk = hmac.new(bytes(32), SECRET, hashlib.sha256).digest()
    seed = hmac.new(prk, b"tunneld v1 account ca ed25519 example.com\x01", hashlib.sha256).digest()
    assert seed.hex() == SEED_HEX
    assert kdf.derive_account_ca_seed(SECRET, DOMAIN) == seed
    assert kdf.ACCOUNT_CA_INFO_PREFIX == b"tunneld v1 account ca ed25519 "


def test_the_ca_vector(ca: AccountCA) -> None:
    assert public_key_raw(ca.key.public_key()).hex() == PUBLIC_HEX
    assert format(ca.certificate.serial_number, "032x") == SERIAL_HEX
    assert hashlib.sha256(ca.der).hexdigest() == DER_SHA256
    assert ca.pem.decode("ascii") == CA_PEM  # the certificate printed in docs/protocol.md
    assert len(ca.der) == 416
    assert str(ca.prefix) == PREFIX == str(account_prefix(DOMAIN))


def test_seed_is_separate_from_the_other_account_keys() -> None:
    seed = kdf.derive_account_ca_seed(SECRET, DOMAIN)
    others = {kdf.derive_tsig_key(SECRET, DOMAIN), kdf.derive_psk(SECRET, DOMAIN),
              bytes.fromhex(kdf.derive_turn_secret(SECRET, DOMAIN))}
    assert seed not in others
    with pytest.raises(ValueError, match="account secret must be 32 bytes"):
        kdf.derive_account_ca_seed(SECRET[:31], DOMAIN)


@needs_openssl
def test_openssl_derives_the_same_public_key_from_the_seed(tmp_path: Path) -> None:
    # RFC 8410 PKCS#8 for Ed25519: a fixed 16-byte header, then the 32-byte seed.
    der = bytes.fromhex("302e020100300506032b657004220420") + bytes.fromhex(SEED_HEX)
    (tmp_path / "k.der").write_bytes(der)
    out = subprocess.run([str(OPENSSL), "pkey", "-inform", "DER", "-in", str(tmp_path / "k.der"), "-pubout",
                          "-outform", "DER"], capture_output=True, check=True, timeout=30).stdout
    assert out[-32:].hex() == PUBLIC_HEX


# --- determinism -----------------------------------------------------------------------------------------


def test_every_build_is_byte_identical(ca: AccountCA) -> None:
    assert account_ca(SECRET, DOMAIN).der == ca.der
    assert account_ca(bytes(SECRET), "example.com").der == ca.der  # any spelling of the domain


def test_another_secret_or_domain_gives_another_ca(ca: AccountCA) -> None:
    other_secret = account_ca(bytes(32), DOMAIN)
    other_domain = account_ca(SECRET, "example.org")
    assert len({ca.der, other_secret.der, other_domain.der}) == 3
    keys = {public_key_raw(c.key.public_key()) for c in (ca, other_secret, other_domain)}
    assert len(keys) == 3


@pytest.mark.parametrize(("secret", "domain", "problem"), [
    (SECRET[:16], DOMAIN, "account secret must be 32 bytes"),
    (SECRET, "bad_name.example", "letters, digits and hyphens"),
    (SECRET, "", "empty"),
])
def test_bad_inputs_are_refused(secret: bytes, domain: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        account_ca(secret, domain)


# --- every fixed field -----------------------------------------------------------------------------------


def test_the_fixed_fields(ca: AccountCA) -> None:
    cert = ca.certificate
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunneld account CA example.com")])
    assert cert.version is x509.Version.v3
    assert cert.subject == cert.issuer == name
    assert cert.not_valid_before_utc == CA_NOT_BEFORE == datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    assert cert.not_valid_after_utc == CA_NOT_AFTER
    assert datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC) == CA_NOT_AFTER
    raw = public_key_raw(ca.key.public_key())
    serial = int.from_bytes(hashlib.sha256(raw).digest()[:16], "big") & ((1 << 127) - 1)
    assert cert.serial_number == serial
    cert.verify_directly_issued_by(cert)  # self-signed, and the signature checks
    assert [(e.oid, e.critical) for e in cert.extensions] == [
        (x509.BasicConstraints.oid, True), (x509.KeyUsage.oid, True),
        (x509.SubjectKeyIdentifier.oid, False), (x509.NameConstraints.oid, True)]
    bc = _ext(cert, x509.BasicConstraints).value
    assert isinstance(bc, x509.BasicConstraints)
    assert (bc.ca, bc.path_length) == (True, 0)
    ku = _ext(cert, x509.KeyUsage).value
    assert isinstance(ku, x509.KeyUsage)
    assert (ku.key_cert_sign, ku.crl_sign, ku.digital_signature) == (True, True, False)
    nc = _ext(cert, x509.NameConstraints).value
    assert isinstance(nc, x509.NameConstraints)
    assert nc.permitted_subtrees == [x509.DNSName("example.com"),
                                     x509.IPAddress(ipaddress.IPv6Network(PREFIX))]
    assert nc.excluded_subtrees is None
    ski = _ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key())


def test_the_key_stays_out_of_repr_and_pickle(ca: AccountCA) -> None:
    seed = bytes.fromhex(SEED_HEX)
    assert SEED_HEX not in repr(ca)
    assert "example.com" in repr(ca)
    raw = ca.key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                               serialization.NoEncryption())
    assert raw == seed
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(ca)


# --- leaves ----------------------------------------------------------------------------------------------


def test_server_leaf(ca: AccountCA) -> None:
    ula = ipaddress.IPv6Address("fda3:79a6:f6ee::53")
    cert = issue_server(ca, ["NS.Example.com.", "example.com", "ns.example.com"], _leaf_key(1).public_key(),
                        T0, T1, 12345, addresses=[ula])
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ns.example.com"
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert list(san) == [x509.DNSName("ns.example.com"), x509.DNSName("example.com"), x509.IPAddress(ula)]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [  # type: ignore[call-overload]
        ExtendedKeyUsageOID.SERVER_AUTH]
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value == x509.BasicConstraints(ca=False, path_length=None)
    ku = _ext(cert, x509.KeyUsage).value
    assert isinstance(ku, x509.KeyUsage)
    assert ku.digital_signature and not ku.key_cert_sign
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    ski = _ext(ca.certificate, x509.SubjectKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier) and isinstance(ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ski.digest
    assert (cert.serial_number, int(cert.not_valid_before_utc.timestamp()),
            int(cert.not_valid_after_utc.timestamp())) == (12345, T0, T1)


def test_client_leaf(ca: AccountCA) -> None:
    cert = issue_client(ca, "Laptop", _leaf_key(2).public_key(), T0, T1, 7)
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "laptop.example.com"
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName("laptop.example.com")]  # type: ignore[call-overload]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [  # type: ignore[call-overload]
        ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize(("call", "problem"), [
    (lambda ca, k: issue_server(ca, ["github.com"], k, T0, T1, 1), "outside the account domain"),
    (lambda ca, k: issue_server(ca, ["notexample.com"], k, T0, T1, 1), "outside the account domain"),
    (lambda ca, k: issue_server(ca, ["a..example.com"], k, T0, T1, 1), "empty label"),
    (lambda ca, k: issue_server(ca, "example.com", k, T0, T1, 1), "non-empty sequence"),
    (lambda ca, k: issue_server(ca, [], k, T0, T1, 1), "non-empty sequence"),
    (lambda ca, k: issue_server(ca, ["example.com"], k, T0, T1, 1,
                                addresses=[ipaddress.IPv6Address("2001:db8::1")]),
     "outside the account's prefix"),
    (lambda ca, k: issue_server(ca, ["example.com"], k, T1, T0, 1), "not after not_before"),
    (lambda ca, k: issue_server(ca, ["example.com"], k, T0, T0, 1), "not after not_before"),
    (lambda ca, k: issue_server(ca, ["example.com"], k, 0, T1, 1), "outside the account CA's validity"),
    (lambda ca, k: issue_server(ca, ["example.com"], k, T0, 10**12, 1), "outside the account CA's validity"),
    (lambda ca, k: issue_server(ca, ["example.com"], k, 1.5e9, T1, 1), "whole Unix seconds"),
    (lambda ca, k: issue_server(ca, ["example.com"], k, T0, T1, 0), "serial"),
    (lambda ca, k: issue_server(ca, ["example.com"], k, T0, T1, 1 << 127), "serial"),
    (lambda ca, k: issue_client(ca, "laptop.example.com", k, T0, T1, 1), "bad device name"),
    (lambda ca, k: issue_client(ca, "AutoTunnel-x", k, T0, T1, 1), "reserved prefix"),
    (lambda ca, k: issue_client(ca, "-x", k, T0, T1, 1), "bad device name"),
])
def test_leaf_arguments_are_checked(ca: AccountCA, call: Callable[..., object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        call(ca, _leaf_key(3).public_key())


_LABELISH = st.text(alphabet="aZ09-._é\0 ", max_size=70)
_HOSTS = st.tuples(_LABELISH, st.sampled_from(["", ".example.com", ".Example.COM.", ".example.org"]))


@settings(max_examples=200, deadline=None)
@given(hosts=st.lists(_HOSTS.map("".join), min_size=1, max_size=3), device=_LABELISH)
@example(hosts=["ns.Example.COM."], device="Laptop")  # both succeed: the loop's checks run
@example(hosts=["example.com", "github.com"], device="a.b")  # both refused
def test_any_name_gives_a_leaf_inside_the_domain_or_value_error(
        ca: AccountCA, hosts: list[str], device: str) -> None:
    key = _leaf_key(7).public_key()
    attempts = (lambda: issue_server(ca, hosts, key, T0, T1, 3),
                lambda: issue_client(ca, device, key, T0, T1, 4))
    for issue in attempts:
        try:
            cert = issue()
        except ValueError:
            continue
        san = _ext(cert, x509.SubjectAlternativeName).value
        assert isinstance(san, x509.SubjectAlternativeName)
        for name in san.get_values_for_type(x509.DNSName):
            assert name == "example.com" or name.endswith(".example.com")
            assert name == name.lower()


def test_leaf_key_kinds(ca: AccountCA) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    issue_server(ca, ["ns.example.com"], p256, T0, T1, 1).verify_directly_issued_by(ca.certificate)
    x25519 = X25519PrivateKey.from_private_bytes(bytes(32)).public_key()
    with pytest.raises(ValueError, match="must be Ed25519 or ECDSA, not"):
        issue_client(ca, "laptop", x25519, T0, T1, 1)  # type: ignore[arg-type]


def test_new_serial() -> None:
    assert new_serial(lambda n: b"\xff" * n) == (1 << 127) - 1  # the top bit is cleared
    assert new_serial(lambda n: bytes(n)) == 1  # never zero
    assert new_serial(lambda n: bytes(range(n))) == int.from_bytes(bytes(range(16)), "big")
    with pytest.raises(ValueError, match="not 16"):
        new_serial(lambda n: bytes(n - 1))


# --- an independent verifier: openssl --------------------------------------------------------------------


def _openssl_verify(tmp_path: Path, ca: AccountCA, leaf: x509.Certificate, purpose: str) -> tuple[int, str]:
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    (tmp_path / "leaf.pem").write_bytes(_pem(leaf))
    # -attime: the leaf's own validity, so the answer does not depend on today's date.
    r = subprocess.run([str(OPENSSL), "verify", "-attime", str(T0 + 60), "-purpose", purpose, "-CAfile",
                        str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem")],
                       capture_output=True, text=True, timeout=30)
    return r.returncode, r.stdout + r.stderr


@needs_openssl
def test_openssl_accepts_the_leaves(tmp_path: Path, ca: AccountCA) -> None:
    server = issue_server(ca, ["ns.example.com"], _leaf_key(1).public_key(), T0, T1, 99,
                          addresses=[ipaddress.IPv6Address("fda3:79a6:f6ee::1")])
    assert _openssl_verify(tmp_path, ca, server, "sslserver") == (0, f"{tmp_path / 'leaf.pem'}: OK\n")
    client = issue_client(ca, "laptop", _leaf_key(2).public_key(), T0, T1, 100)
    assert _openssl_verify(tmp_path, ca, client, "sslclient") == (0, f"{tmp_path / 'leaf.pem'}: OK\n")
    rc, out = _openssl_verify(tmp_path, ca, client, "sslserver")  # the EKU keeps each leaf to its role
    assert rc != 0 and "unsuitable certificate purpose" in out


def _rogue(ca: AccountCA, name: x509.GeneralName, cn: str) -> x509.Certificate:
    """What a thief holding the CA key could sign: a leaf outside the CA's constraints."""
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.certificate.subject).public_key(_leaf_key(4).public_key()).serial_number(5)
            .not_valid_before(datetime.datetime.fromtimestamp(T0, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(T1, datetime.UTC))
            .add_extension(x509.SubjectAlternativeName([name]), critical=False)
            .sign(ca.key, None))


@needs_openssl
@pytest.mark.parametrize(("name", "cn"), [
    (x509.DNSName("github.com"), "github.com"),
    (x509.DNSName("example.com.evil.net"), "example.com.evil.net"),
    (x509.IPAddress(ipaddress.IPv4Address("192.0.2.1")), "ns.example.com"),
    (x509.IPAddress(ipaddress.IPv6Address("fd00::1")), "ns.example.com"),
])
def test_openssl_refuses_a_leaf_outside_the_name_constraints(
        tmp_path: Path, ca: AccountCA, name: x509.GeneralName, cn: str) -> None:
    rc, out = _openssl_verify(tmp_path, ca, _rogue(ca, name, cn), "any")
    assert rc != 0
    assert "permitted subtree violation" in out
    # The same leaf inside the domain passes: the refusal is the constraint's, not the leaf's shape.
    assert _openssl_verify(tmp_path, ca, _rogue(ca, x509.DNSName("x.example.com"), "x.example.com"),
                           "any")[0] == 0


@needs_openssl
def test_openssl_prints_the_constraints(tmp_path: Path, ca: AccountCA) -> None:
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    text = subprocess.run([str(OPENSSL), "x509", "-noout", "-text", "-in", str(tmp_path / "ca.pem")],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    assert "X509v3 Basic Constraints: critical\n                CA:TRUE, pathlen:0" in text
    assert "X509v3 Key Usage: critical\n                Certificate Sign, CRL Sign" in text
    assert "X509v3 Name Constraints: critical" in text
    assert "DNS:example.com" in text
    assert "IP:FDA3:79A6:F6EE:0:0:0:0:0/FFFF:FFFF:FFFF:0:0:0:0:0" in text
    assert "Not After : Dec 31 23:59:59 9999 GMT" in text


# --- a stock TLS 1.3 stack accepts them (Python's ssl over memory BIOs: no sockets) ----------------------


def _contexts(tmp_path: Path, ca: AccountCA, trusted: AccountCA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    # Python's ssl checks validity against today's clock; these leaves span it widely.
    start, end = 1_577_836_800, 4_102_444_800  # 2020-01-01 .. 2100-01-01
    keys = {}
    server_key, client_key = _leaf_key(5), _leaf_key(6)
    for role, key, cert in [
        ("server", server_key, issue_server(ca, ["ns.example.com"], server_key.public_key(), start, end, 1)),
        ("client", client_key, issue_client(ca, "laptop", client_key.public_key(), start, end, 2)),
    ]:
        (tmp_path / f"{role}.pem").write_bytes(_pem(cert) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        keys[role] = tmp_path / f"{role}.pem"
    (tmp_path / "trust.pem").write_bytes(trusted.pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for ctx, role in ((server, "server"), (client, "client")):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(keys[role])
        ctx.load_verify_locations(tmp_path / "trust.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    return server, client


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> ssl.SSLObject:
    sbio, sout, cbio, cout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server_ctx.wrap_bio(sbio, sout, server_side=True)
    c = client_ctx.wrap_bio(cbio, cout, server_hostname="ns.example.com")
    done = {"s": False, "c": False}
    for _ in range(10):  # TLS 1.3 with a client certificate needs two round trips
        for name, obj in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        sbio.write(cout.read())
        cbio.write(sout.read())
        if all(done.values()):
            break
    assert all(done.values())
    return s


def test_tls13_handshake_with_both_leaves(tmp_path: Path, ca: AccountCA) -> None:
    s = _handshake(*_contexts(tmp_path, ca, ca))
    assert s.version() == "TLSv1.3"
    peer = s.getpeercert()
    assert peer is not None and ("DNS", "laptop.example.com") in peer["subjectAltName"]


def test_tls13_refuses_another_accounts_ca(tmp_path: Path, ca: AccountCA) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
        _handshake(*_contexts(tmp_path, ca, account_ca(bytes(32), DOMAIN)))


# --- `tunneld account ca` ------------------------------------------------------------------------------


def _secret_file(tmp_path: Path, mode: int = 0o600) -> Path:
    import base64

    path = tmp_path / "secret"
    path.write_text(base64.b64encode(SECRET).decode() + "\n")
    path.chmod(mode)
    return path


def test_cli_prints_the_ca_pem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["account", "ca", DOMAIN, "--secret-file", str(_secret_file(tmp_path))]) == 0
    out = capsys.readouterr()
    assert out.out == CA_PEM
    assert out.out.count("BEGIN CERTIFICATE") == 1
    assert out.err == ""


@pytest.mark.parametrize(("args", "problem"), [
    (["bad_domain"], "bad account domain"),
    ([], "the following arguments are required: domain"),
])
def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                          problem: str) -> None:
    assert main(["account", "ca", *args, "--secret-file", str(_secret_file(tmp_path))]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("tunneld: ") and out.err.count("\n") == 1 and problem in out.err


def test_cli_secret_file_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loose = _secret_file(tmp_path, 0o644)
    assert main(["account", "ca", DOMAIN, "--secret-file", str(loose)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chmod 600" in err
    assert main(["account", "ca", DOMAIN, "--secret-file", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["account", "ca", DOMAIN]) == 2
    assert "--secret-file" in capsys.readouterr().err
