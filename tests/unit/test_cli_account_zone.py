"""`tunneld account primary-config` and `secondary-config`: the BIND statements for the account zone on a
primary and its secondaries, every value checked before it reaches the text, errors on one line, exit 2."""

from __future__ import annotations

import base64
import hashlib
import hmac
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tunneld.cli import main, tsig_stanza
from tunneld.crypto.kdf import derive_tsig_key
from tunneld.zoneconf import check_zone_file, primary_stanza, secondary_stanza

SECRET = bytes(range(32))


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(base64.b64encode(SECRET).decode() + "\n")
    path.chmod(0o600)
    return path


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def hkdf_by_hand(ikm: bytes, info: bytes) -> bytes:
    """RFC 5869 with SHA-256, no salt, one block of output: written out, not through the library."""
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def front(domain: str = "home.example.net") -> bytes:
    return hkdf_by_hand(SECRET, b"tunneld v1 front tsig " + domain.encode())


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_front_key_is_the_designs_hkdf() -> None:
    from tunneld.cli import front_key

    assert front_key(SECRET, "Home.Example.NET.") == front() != derive_tsig_key(SECRET, "home.example.net")
    assert len(front()) == 32


def test_primary_config(secret: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["account", "primary-config", "Home.Example.NET.", "--secret-file", str(secret),
                          "--front", "192.0.2.10:5300", "--secondary", "2001:db8::3",
                          "--secondary", "[2001:db8::4]:5353"], capsys)
    assert (code, err) == (0, "")
    assert out == (
        'key "front.home.example.net." {\n'
        "\talgorithm hmac-sha256;\n"
        f'\tsecret "{b64(front())}";\n'
        "};\n"
        'zone "home.example.net" {\n'
        "\ttype primary;\n"
        '\tfile "/var/lib/bind/home.example.net.zone";\n'
        "\tupdate-policy { grant front.home.example.net. zonesub ANY; };\n"
        "\tallow-query { key front.home.example.net.; };\n"
        "\tallow-transfer { key front.home.example.net.; };\n"
        "\tnotify yes;\n"
        "\tnotify-delay 0;\n"
        "\talso-notify { 192.0.2.10 port 5300 key front.home.example.net.; "
        "2001:db8::3 port 53 key front.home.example.net.; "
        "2001:db8::4 port 5353 key front.home.example.net.; };\n"
        "};\n"
        "// and in named.conf's options { } block (server-wide: no zone statement takes it):\n"
        "//\tnotify-rate 1000;\n"
    )
    # The account key (the devices') is not on the primary: only the front writes there.
    assert b64(derive_tsig_key(SECRET, "home.example.net")) not in out


def test_secondary_config(secret: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["account", "secondary-config", "home.example.net", "--secret-file", str(secret),
                          "--primary", "192.0.2.2", "--zone-file", "/srv/dns/home.zone"], capsys)
    assert (code, err) == (0, "")
    account = tsig_stanza("home.example.net", derive_tsig_key(SECRET, "home.example.net"))
    assert out == (
        'key "front.home.example.net." {\n'
        "\talgorithm hmac-sha256;\n"
        f'\tsecret "{b64(front())}";\n'
        "};\n"
        + account +
        'zone "home.example.net" {\n'
        "\ttype secondary;\n"
        '\tfile "/srv/dns/home.zone";\n'
        "\tprimaries { 192.0.2.2 port 53 key front.home.example.net.; };\n"
        "\tallow-query { key home.example.net.; };\n"
        "\tallow-transfer { none; };\n"
        "\tnotify no;\n"
        "};\n"
        "// and in named.conf's options { } block (server-wide: no zone statement takes it):\n"
        "//\tserial-query-rate 1000;\n"
    )


@pytest.mark.parametrize("extra, what", [
    (["--front", "ns.example.net"], "bad --front"),
    (["--front", "192.0.2.1:99999"], "bad --front"),
    (["--front", "[2001:db8::1"], "bad --front"),
    (["--front", '192.0.2.1"; };'], "bad --front"),
    (["--front", "192.0.2.1", "--secondary", "x"], "bad --secondary"),
    (["--front", "192.0.2.1", "--zone-file", 'a"; include "/etc/shadow'], "bad --zone-file"),
    (["--front", "192.0.2.1", "--zone-file", "a\nb"], "bad --zone-file"),
    (["--front", "192.0.2.1", "--zone-file", ""], "bad --zone-file"),
    ([], "--front"),
])
def test_primary_config_errors_are_one_line_exit_2(secret: Path, extra: list[str], what: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["account", "primary-config", "home.example.net", "--secret-file", str(secret),
                          *extra], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("tunneld: ") and what in err, err


@pytest.mark.parametrize("argv, what", [
    (["bad..domain", "--primary", "192.0.2.2"], "bad account domain"),
    (['x"; include "/etc/shadow', "--primary", "192.0.2.2"], "bad account domain"),
    (["home.example.net", "--primary", "192.0.2.2:0x35"], "bad --primary"),
    (["home.example.net", "--primary", "2001:db8::2:53:x"], "bad --primary"),
])
def test_secondary_config_errors_are_one_line_exit_2(secret: Path, argv: list[str], what: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["account", "secondary-config", *argv, "--secret-file", str(secret)], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("tunneld: ") and what in err, err


def test_a_secret_file_others_can_read_is_refused(secret: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret.chmod(0o644)
    code, out, err = run(["account", "secondary-config", "home.example.net", "--secret-file", str(secret),
                          "--primary", "192.0.2.2"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1


@pytest.mark.parametrize("path", ["", 'a"b', "a\\b", "a\nb", "a\tb", "zoné"])
def test_zone_file_check(path: str) -> None:
    with pytest.raises(ValueError):
        check_zone_file(path)
    with pytest.raises(ValueError):
        primary_stanza("home.example.net", bytes(32), [], path)


def test_the_generator_checks_the_domain_too() -> None:
    import ipaddress

    primary = (ipaddress.ip_address("192.0.2.2"), 53)
    with pytest.raises(ValueError):
        secondary_stanza('x" { }; zone "evil', bytes(32), bytes(32), primary, "/z")


@pytest.mark.skipif(shutil.which("named-checkconf") is None, reason="BIND's named-checkconf is not installed")
def test_bind_accepts_the_statements(secret: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["primary-config", "home.example.net", "--front", "[2001:db8::1]:5300"],
                 ["secondary-config", "home.example.net", "--primary", "192.0.2.2:5353"]):
        code, out, _ = run(["account", *argv, "--secret-file", str(secret)], capsys)
        assert code == 0
        conf = tmp_path / "named.conf"
        conf.write_text(out)
        r = subprocess.run(["named-checkconf", str(conf)], capture_output=True, text=True, timeout=30,
                           check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_primary_config_for_powerdns(secret: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["account", "primary-config", "home.example.net", "--secret-file", str(secret),
                          "--front", "192.0.2.10:5300", "--secondary", "2001:db8::3", "--powerdns"], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    settings = [line for line in lines if "=" in line and not line.startswith(("#", "pdnsutil"))]
    assert settings == ["primary=yes", "dnsupdate=yes", "allow-dnsupdate-from=0.0.0.0/0,::/0",
                        "allow-axfr-ips=", "disable-axfr=no", "only-notify="]
    commands = [shlex.split(line) for line in lines if line.startswith("pdnsutil ")]
    assert commands == [
        ["pdnsutil", "import-tsig-key", "front.home.example.net.", "hmac-sha256", b64(front())],
        ["pdnsutil", "set-kind", "home.example.net", "primary"],
        ["pdnsutil", "set-meta", "home.example.net", "TSIG-ALLOW-DNSUPDATE", "front.home.example.net."],
        ["pdnsutil", "set-meta", "home.example.net", "TSIG-ALLOW-AXFR", "front.home.example.net."],
        ["pdnsutil", "set-meta", "home.example.net", "SOA-EDIT-DNSUPDATE", "INCREASE"],
        ["pdnsutil", "set-meta", "home.example.net", "NOTIFY-DNSUPDATE", "1"],
        ["pdnsutil", "set-meta", "home.example.net", "ALSO-NOTIFY", "192.0.2.10:5300", "[2001:db8::3]:53"],
    ]


def test_account_new_points_to_them_after_the_stanza(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["account", "new", "home.example.net"], capsys)
    assert code == 0
    last = out.splitlines()[-1]
    assert last.startswith("# ") and "account primary-config and secondary-config home.example.net" in last
    assert out.index('key "home.example.net." {') < out.index(last)
    if shutil.which("named-checkconf") is not None:  # the stanza cut out to the end is still a key file
        keyfile = tmp_path / "account.key"
        keyfile.write_text(out[out.index('key "'):])
        r = subprocess.run(["named-checkconf", str(keyfile)], capture_output=True, text=True, timeout=30,
                           check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_the_lab_writes_what_the_cli_prints(secret: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lab.bind's helpers (the front's tests pass their own front key) give the CLI's text for that key."""
    from lab.bind import primary_config, secondary_config

    work = Path("/srv/lab")
    _, primary, _ = run(["account", "primary-config", "home.example.net", "--secret-file", str(secret),
                         "--front", "192.0.2.10:5300", "--zone-file", "/srv/lab/home.example.net.zone"],
                        capsys)
    assert primary_config("Home.Example.NET.", front(), [("192.0.2.10", 5300)], work) == primary
    _, second, _ = run(["account", "secondary-config", "home.example.net", "--secret-file", str(secret),
                        "--primary", "[2001:db8::2]:5353", "--zone-file", "/srv/lab/home.example.net.zone"],
                       capsys)
    account = derive_tsig_key(SECRET, "home.example.net")
    assert secondary_config("home.example.net", account, front(), ("2001:db8::2", 5353), work) == second


@pytest.mark.skipif(shutil.which("named-checkconf") is None, reason="BIND's named-checkconf is not installed")
def test_the_server_options_the_note_names_are_bind_options(secret: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The closing comment of each stanza names the server-wide options (the lab sets what it reads back
    from it); BIND takes them in an options block, and not in a zone statement."""
    from tunneld.zoneconf import server_options
    wanted = {"primary-config": ["notify-rate 1000;"], "secondary-config": ["serial-query-rate 1000;"]}
    for command, where in (("primary-config", ["--front", "192.0.2.10"]),
                           ("secondary-config", ["--primary", "192.0.2.2"])):
        _, out, _ = run(["account", command, "home.example.net", "--secret-file", str(secret), *where],
                        capsys)
        options = server_options(out)
        assert options == wanted[command]
        conf = tmp_path / "named.conf"
        conf.write_text("options {\n" + "".join(f"\t{o}\n" for o in options) + "};\n" + out)
        r = subprocess.run(["named-checkconf", str(conf)], capture_output=True, text=True, timeout=30,
                           check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    assert server_options("zone x { };\n") == []
