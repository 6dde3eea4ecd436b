"""A serve-dns with a public CA's certificate (--tls-cert/--tls-key) and the clients that trust it
(``[account] tls_public_ca``): the client context trusts the system store (here a test CA that
SSL_CERT_FILE names) only when asked, the server's membership check still uses the account CA, the chain
is checked once at start (one line, exit 2, for each bad argument) and no leaf of ours is renewed."""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunneld.accountca import account_ca
from tunneld.cli import main
from tunneld.dnsserver.tls import (
    ChainError,
    check_public_chain,
    is_member,
    public_server_context,
    server_context,
)
from tunneld.services.tlsport import client_context

ZONE = "home.example.net"
SECRET = bytes(32)  # the secret file the serve-dns tests write


def _pem_key(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_public_ca(common_name: str = "Test Public Root") -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A self-signed root like a public CA's: (PEM certificate, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return _pem(cert), key


def issue_public_leaf(ca: tuple[bytes, ec.EllipticCurvePrivateKey], names: list[str],
                      days: tuple[int, int] = (-1, 30)) -> tuple[bytes, bytes]:
    """A server leaf for ``names`` under ``ca``: (PEM chain leaf then CA, as fullchain.pem; PEM key)."""
    ca_cert = x509.load_pem_x509_certificate(ca[0])
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    leaf = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=days[0]))
            .not_valid_after(now + datetime.timedelta(days=days[1]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()),
                           critical=False)
            .sign(ca[1], hashes.SHA256()))
    return _pem(leaf) + ca[0], _pem_key(key)


@pytest.fixture
def system_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A test "public" CA as the whole system trust store (SSL_CERT_FILE; SSL_CERT_DIR empty)."""
    ca = make_public_ca()
    (tmp_path / "public-ca.pem").write_bytes(ca[0])
    (tmp_path / "no-certs").mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "public-ca.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-certs"))
    return ca


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, hostname: str = ZONE) -> dict[str, Any]:
    """A TLS handshake over memory BIOs; the server's view of the client certificate. Raises the client's
    or the server's ssl.SSLError."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):  # a TLS 1.3 handshake takes a few flights
        for side, obj in (("c", c), ("s", s)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # the server reads the client's certificate after its Finished: one more exchange
            with contextlib.suppress(ssl.SSLWantReadError):
                s.read(1)
            return s.getpeercert() or {}
    raise AssertionError("the handshake did not finish")


def _public_server(ca: tuple[bytes, ec.EllipticCurvePrivateKey]) -> ssl.SSLContext:
    chain, key = issue_public_leaf(ca, [ZONE, f"ns.{ZONE}"])
    return public_server_context(chain, key, SECRET, ZONE)


def test_public_ca_trusts_the_system_store_and_only_then(system_store: Any) -> None:
    server = _public_server(system_store)
    ca_pem = account_ca(SECRET, ZONE).pem
    _handshake(client_context(ca_pem, public_ca=True), server)  # SSL_CERT_FILE's CA: trusted
    with pytest.raises(ssl.SSLCertVerificationError):  # the default: the account CA alone
        _handshake(client_context(ca_pem), server)
    # With the system store, the account CA still verifies a server of ours...
    ours = server_context(SECRET, ZONE, [ZONE], int(datetime.datetime.now(datetime.UTC).timestamp()))
    _handshake(client_context(ca_pem, public_ca=True), ours)
    # ...and a public certificate for another name is still refused by name.
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(client_context(ca_pem, public_ca=True), server, hostname="other.example.org")


def test_a_public_ca_outside_the_system_store_is_refused(system_store: Any) -> None:
    server = _public_server(make_public_ca("Another Root"))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(client_context(account_ca(SECRET, ZONE).pem, public_ca=True), server)


def test_membership_is_still_the_account_cas(system_store: Any) -> None:
    """A device's client certificate under the account CA is a member on the public-chain server; one under
    the public CA fails the handshake (membership is the account's, not the system store's)."""
    from tunneld.accountca import issue_client, new_serial

    server = _public_server(system_store)
    ca = account_ca(SECRET, ZONE)
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    leaf = issue_client(ca, "laptop", key.public_key(), now - 60, now + 3600, new_serial(lambda n: b"\1" * n))
    device = client_context(ca.pem, (_pem(leaf) + ca.pem, _pem_key(key)), public_ca=True)
    assert is_member(_handshake(device, server), ZONE)
    assert not is_member(_handshake(client_context(ca.pem, public_ca=True), server), ZONE)  # no certificate
    chain, pem_key = issue_public_leaf(system_store, [f"laptop.{ZONE}"])
    stranger = client_context(ca.pem, (chain, pem_key), public_ca=True)
    with pytest.raises(ssl.SSLError):
        _handshake(stranger, server)


def test_check_public_chain() -> None:
    ca = make_public_ca()
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    chain, key = issue_public_leaf(ca, [f"ns.{ZONE}", ZONE])
    check_public_chain(chain, key, ZONE, now)
    check_public_chain(*issue_public_leaf(ca, ["*.example.net"]), ZONE, now)  # a wildcard one label up
    other_key = _pem_key(ec.generate_private_key(ec.SECP256R1()))
    cases: list[tuple[bytes, bytes, str, bool]] = [
        (b"not pem", key, "not a PEM certificate chain", False),
        (chain, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not an unencrypted",
         True),
        (chain, _pem_key(ec.generate_private_key(ec.SECP256R1()), b"pw"), "not an unencrypted", True),
        (chain, other_key, "does not match", True),
        (*issue_public_leaf(ca, [f"ns.{ZONE}"]), f"does not name the account domain {ZONE}", False),
        (*issue_public_leaf(ca, ["*.home.example.net"]), "does not name", False),  # not the zone itself
        (*issue_public_leaf(ca, [ZONE], days=(-30, -1)), "not now; renew it", False),
    ]
    for bad_chain, bad_key, words, of_key in cases:
        with pytest.raises(ChainError) as e:
            check_public_chain(bad_chain, bad_key, ZONE, now)
        assert words in str(e.value) and e.value.of_key == of_key and "\n" not in str(e.value), str(e.value)


# -- serve-dns ---------------------------------------------------------------------------------------------


class _Served(Exception):
    """The fake serve's way out of serve-dns once the test saw what it wanted."""


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """serve-dns with its server faked (nothing binds): what it was given, and whether the leaf renewal
    started."""
    import tunneld.dnsserver.serve
    import tunneld.serve_dns_cmd

    seen: dict[str, Any] = {"renewal": False}

    async def serve(*args: object, tls: Any = None, task_status: Any = trio.TASK_STATUS_IGNORED,
                    **kwargs: object) -> None:
        seen["tls"] = tls
        task_status.started()
        await trio.testing.wait_all_tasks_blocked()  # the renewal, if any, has started by now
        raise _Served

    async def renew(*args: object) -> None:
        seen["renewal"] = True
        await trio.sleep_forever()

    monkeypatch.setattr(tunneld.dnsserver.serve, "serve", serve)
    monkeypatch.setattr(tunneld.serve_dns_cmd, "_renew_leaf", renew)
    return seen


def _serve_dns(tmp_path: Path, *extra: str) -> int:
    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(SECRET).decode() + "\n")
    secret.chmod(0o600)
    return main(["serve-dns", "--zone", ZONE, "--secret-file", str(secret), "--db",
                 str(tmp_path / "db.sqlite"), "--listen", "127.0.0.1:5353", "--user", "root", *extra])


def _until_served(tmp_path: Path, *extra: str) -> None:
    """serve-dns up to its (fake) serve, which ends it with _Served (within trio's exception group)."""
    try:
        _serve_dns(tmp_path, *extra)
    except BaseException as e:
        if not (isinstance(e, _Served) or
                (isinstance(e, BaseExceptionGroup) and e.subgroup(_Served) is not None)):
            raise
        return
    raise AssertionError("serve-dns returned without serving")


def test_serve_dns_presents_the_given_chain_and_renews_nothing(tmp_path: Path, served: dict[str, Any],
                                                               system_store: Any) -> None:
    chain, key = issue_public_leaf(system_store, [ZONE])
    (tmp_path / "fullchain.pem").write_bytes(chain)
    (tmp_path / "privkey.pem").write_bytes(key)
    _until_served(tmp_path, "--tls", "--tls-cert", str(tmp_path / "fullchain.pem"),
                  "--tls-key", str(tmp_path / "privkey.pem"))
    assert served["tls"][1] == 853 and not served["renewal"]
    # The listener presents the public chain: a client trusting that public CA alone verifies it.
    _handshake(client_context(system_store[0]), served["tls"][2])
    _until_served(tmp_path, "--tls")  # without: our own leaf, renewed while running
    assert served["renewal"]
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(client_context(system_store[0]), served["tls"][2])


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("cert-only", "--tls-cert without --tls-key"),
        ("key-only", "--tls-key without --tls-cert"),
        ("no-tls", "add --tls"),
        ("missing", "cannot read --tls-cert"),
        ("directory", "cannot read --tls-key"),
        ("not-pem", "not a PEM certificate chain"),
        ("key-not-pem", "bad --tls-key"),
        ("mismatch", "does not match"),
        ("other-name", "does not name the account domain"),
    ],
)
def test_serve_dns_tls_cert_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       served: dict[str, Any], case: str, words: str) -> None:
    ca = make_public_ca()
    chain, key = issue_public_leaf(ca, ["elsewhere.example.org" if case == "other-name" else ZONE])
    if case == "not-pem":
        chain = b"junk\n"
    if case == "key-not-pem":
        key = b"junk\n"
    if case == "mismatch":
        key = _pem_key(ec.generate_private_key(ec.SECP256R1()))
    files = {"cert": tmp_path / "fullchain.pem", "key": tmp_path / "privkey.pem"}
    files["cert"].write_bytes(chain)
    files["key"].write_bytes(key)
    args = {
        "cert-only": ["--tls", "--tls-cert", str(files["cert"])],
        "key-only": ["--tls", "--tls-key", str(files["key"])],
        "no-tls": ["--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])],
        "missing": ["--tls", "--tls-cert", str(tmp_path / "nonexistent.pem"), "--tls-key", str(files["key"])],
        "directory": ["--tls-listen", "127.0.0.1:8853", "--tls-cert", str(files["cert"]), "--tls-key",
                      str(tmp_path)],
    }.get(case, ["--tls", "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])])
    rc = _serve_dns(tmp_path, *args)
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert out == "" and err.count("\n") == 1 and err.startswith("tunneld: ") and words in err, err
    assert "Traceback" not in err and "tls" not in served  # refused before anything started


# -- join ---------------------------------------------------------------------------------------------------


def test_join_writes_tls_public_ca_and_refuses_it_without_tls(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from tunneld.config import load_config

    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(SECRET).decode() + "\n")
    secret.chmod(0o600)
    cfg = tmp_path / "tunneld.toml"
    argv = ["join", ZONE, "--server", "192.0.2.53", "--secret-file", str(secret), "--name", "laptop",
            "--config", str(cfg), "--state-dir", str(tmp_path / "state")]
    assert main([*argv, "--tls-public-ca"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tls-public-ca" in err and "add --tls" in err, err
    assert not cfg.exists()
    assert main([*argv, "--tls", "--tls-public-ca"]) == 0
    assert "tls_public_ca = true" in cfg.read_text()
    c = load_config(cfg)
    assert c.account.transport == "tls" and c.account.tls_public_ca
    assert main([*argv, "--tls", "--force"]) == 0
    assert "tls_public_ca =" not in cfg.read_text() and not load_config(cfg).account.tls_public_ca


def test_a_port_says_why_the_public_server_was_not_trusted(system_store: Any) -> None:
    """Without tls_public_ca the publisher's port refuses the public chain, and says why (the reason the
    watcher logs when it falls back to LLQ)."""
    from tunneld.services.tlsport import TlsPort

    server_ctx = _public_server(system_store)

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError):
            await tls.do_handshake()
        await trio.aclose_forcefully(tls)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
            at = listeners[0].socket.getsockname()[:2]
            ca = account_ca(SECRET, ZONE).pem
            refused, lost = TlsPort(at, client_context(ca), ZONE), []
            refused.on_lost = lost.append
            with trio.fail_after(10), pytest.raises(OSError) as e:
                await refused.sendto(b"\0" * 12, at)
            assert "CERTIFICATE_VERIFY_FAILED" in str(e.value) and lost == [str(e.value)], e.value
            trusted = TlsPort(at, client_context(ca, public_ca=True), ZONE)
            with trio.fail_after(10):
                await trusted.sendto(b"\0" * 12, at)
            assert trusted.connects == 1
            trusted.close()
            nursery.cancel_scope.cancel()

    trio.run(main)
