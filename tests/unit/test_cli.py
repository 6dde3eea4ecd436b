"""The command line: output contracts and one-line usage errors with exit code 2."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tunneld.cli import main
from tunneld.crypto.kdf import derive_tsig_key, derive_turn_secret


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """These tests run on the host: a check that let a bad value through must fail the test, not start a
    daemon, a DNS server or a port-mapping probe here, nor write to the default state directory."""
    import tunneld.config
    import tunneld.daemon
    import tunneld.dnsserver.serve
    import tunneld.netcheck
    import tunneld.probe

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bad value got through: something was about to start")

    monkeypatch.setattr(tunneld.daemon, "Daemon", refuse)
    monkeypatch.setattr(tunneld.dnsserver.serve, "serve", refuse)
    monkeypatch.setattr(tunneld.probe, "probe", refuse)
    monkeypatch.setattr(tunneld.netcheck, "run", refuse)
    monkeypatch.setattr(tunneld.config, "DEFAULT_STATE_DIR", tmp_path / "default-state")


def test_account_new_prints_secret_then_stanza(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["account", "new", "Home.Example.NET."]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    secret = base64.b64decode(first, validate=True)
    assert len(secret) == 32
    tsig = base64.b64encode(derive_tsig_key(secret, "home.example.net")).decode()
    assert 'key "home.example.net." {' in rest
    assert "algorithm hmac-sha256;" in rest
    assert f'secret "{tsig}";' in rest
    # The relay's shared secret: one line for turnserver.conf, before the stanza (cut out to the end).
    [relay] = [line for line in rest.splitlines() if line.startswith("static-auth-secret=")]
    assert relay == f"static-auth-secret={derive_turn_secret(secret, 'home.example.net')}"
    assert rest.index(relay) < rest.index('key "')


def test_account_new_is_random(capsys: pytest.CaptureFixture[str]) -> None:
    main(["account", "new", "a.example"])
    main(["account", "new", "a.example"])
    lines = capsys.readouterr().out.splitlines()
    secrets = [line for line in lines if len(line) == 44 and line.endswith("=")]
    assert len(secrets) == 2 and secrets[0] != secrets[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["account", "new", "bad..domain"],
        ["account", "new"],
        ["nosuchcommand"],
        [],
    ],
)
def test_usage_errors_are_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunneld: "), captured.err
    assert "Traceback" not in captured.err


def test_console_script_entry_point() -> None:
    r = subprocess.run([sys.executable, "-m", "tunneld", "account", "new", "x..y"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "bad account domain" in r.stderr


def test_join_writes_a_loadable_config_and_identity(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from tunneld.config import load_config

    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    secret.chmod(0o600)
    cfg = tmp_path / "etc" / "tunneld.toml"
    argv = ["join", "Home.Example.NET", "--server", "192.0.2.53", "--secret-file", str(secret),
            "--name", "laptop", "--config", str(cfg), "--state-dir", str(tmp_path / "state")]
    assert main(argv) == 0
    out = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines())
    c = load_config(cfg)
    assert c.account.domain == "home.example.net" and str(c.account.server) == "192.0.2.53:53"
    assert c.account.name == "laptop" and out["name"] == "laptop" and out["ula"].startswith("fd")
    assert (tmp_path / "state" / "device.key").stat().st_mode & 0o777 == 0o600
    assert main(argv) == 2  # exists: not replaced without --force
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force", "--server", "[2001:db8::53]:5353"]) == 0
    assert str(load_config(cfg).account.server) == "[2001:db8::53]:5353"
    assert load_config(cfg).account.transport == "udp" and load_config(cfg).account_ca is None
    assert main([*argv, "--force", "--tls"]) == 0  # DNS over TLS, verified against the account CA
    tls = load_config(cfg)
    assert tls.account.transport == "tls" and tls.account_ca is not None
    assert tls.account_ca.startswith(b"-----BEGIN CERTIFICATE-----")


def test_join_says_which_name_it_chose_and_why(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    secret.chmod(0o600)
    monkeypatch.setattr("socket.gethostname", lambda: "Desk.example.org")
    argv = ["join", "home.example.net", "--server", "192.0.2.53", "--secret-file", str(secret),
            "--config", str(tmp_path / "a.toml"), "--state-dir", str(tmp_path / "state")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "name desk\n" in captured.out  # stdout stays machine-readable
    assert captured.err == "tunneld: name desk (this host's name; --name to choose another)\n"
    argv[argv.index(str(tmp_path / "a.toml"))] = str(tmp_path / "b.toml")
    assert main([*argv, "--name", "laptop"]) == 0
    assert capsys.readouterr().err == "tunneld: name laptop (given with --name)\n"


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        (["--server", "not an address"], "--server"),
        (["--server", "192.0.2.53", "--name", "two.labels"], "device name"),
    ],
)
def test_join_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                  word: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    secret.chmod(0o600)
    assert main(["join", "home.example.net", "--secret-file", str(secret), "--config",
                 str(tmp_path / "c.toml"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err, err


# -- the key log -----------------------------------------------------------------------------------------


def test_keylog_is_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    from tunneld.keylog import KeyLog

    old = os.umask(0)
    try:
        log = KeyLog(tmp_path / "keys")
    finally:
        os.umask(old)
    log.close()
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o600


def test_keylog_appends_to_an_existing_private_file(tmp_path: Path) -> None:
    from tunneld.keylog import KeyLog

    path = tmp_path / "keys"
    path.write_text("earlier\n")
    path.chmod(0o600)
    log = KeyLog(path)
    log._f.write("later\n")
    log.close()
    assert path.read_text() == "earlier\nlater\n"


def _keylog_case(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "keys"
    private = tmp_path / "private"
    private.write_text("")
    private.chmod(0o600)
    if case.startswith("mode-"):
        path.write_text("")
        path.chmod(int(case[5:], 8))
    elif case == "symlink":
        path.symlink_to(private)  # even to a private file: the path could be pointed anywhere
    elif case == "dangling-symlink":
        path.symlink_to(tmp_path / "nowhere")
    elif case == "missing-dir":
        path = tmp_path / "no" / "such" / "dir" / "keys"
    elif case == "directory":
        path.mkdir()
    elif case == "fifo":
        os.mkfifo(path, 0o600)
    elif case == "nul":
        path = tmp_path / "a\0b"
    elif case == "newline":
        path = tmp_path / "missing\nsecond line" / "keys"
    return path


KEYLOG_CASES = {"mode-0644": "0644", "mode-0640": "0640", "mode-0604": "0604", "mode-0620": "0620",
                "symlink": "symbolic link", "dangling-symlink": "symbolic link",
                "missing-dir": "does not exist", "directory": "is a directory", "fifo": "not a regular file",
                "nul": "not a path", "newline": "does not exist"}


@pytest.mark.parametrize(("case", "word"), KEYLOG_CASES.items(), ids=KEYLOG_CASES.keys())
def test_keylog_refuses_unsafe_files(tmp_path: Path, case: str, word: str) -> None:
    from tunneld.keylog import KeyLog, KeyLogError

    path = _keylog_case(tmp_path, case)
    with pytest.raises(KeyLogError, match=word):
        KeyLog(path)
    assert (tmp_path / "private").read_text() == ""  # nothing written through a link


def _good_config(tmp_path: Path) -> Path:
    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    secret.chmod(0o600)
    cfg = tmp_path / "tunneld.toml"
    cfg.write_text(f'[interface]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'control_socket = "{tmp_path / "c.sock"}"\n'
                   f'[account]\ndomain = "home.example.net"\nsecret_file = "{secret}"\n')
    return cfg


@pytest.mark.parametrize("via", ["option", "environment"])
@pytest.mark.parametrize("case", ["mode-0644", "symlink", "missing-dir", "newline", "nul"])
def test_up_with_an_unsafe_keylog_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch, case: str,
                                                     via: str) -> None:
    """Refused before any device or socket is opened (the daemon is never started here)."""
    path = _keylog_case(tmp_path, case)
    if via == "environment":
        if case == "nul":
            pytest.skip("an environment variable cannot hold a NUL")
        monkeypatch.setenv("TUNNELD_KEYLOG", str(path))
        argv = ["up", "--config", str(_good_config(tmp_path))]
    else:
        argv = ["up", "--config", str(_good_config(tmp_path)), "--keylog", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tunneld: key log") and "Traceback" not in err, err
    assert not (tmp_path / "c.sock").exists()


# -- hostile values for every option -------------------------------------------------------------------

HOSTILE = {"empty": "", "huge": "x" * 100_000, "unicode": "é", "bidi": "\u202e", "nul": "a\0b",
           "newline": "\n", "bracket": "[", "format": "%s%n", "not-utf8": "\udcff", "dash": "-"}


def _templates(tmp_path: Path) -> dict[str, tuple[list[str], int]]:
    """Commands with one hostile value (H) and every other argument valid but harmless: nothing here can
    start a daemon or a server, or send anything (the checks come first, or a file is missing)."""
    secret = str(tmp_path / "secret")  # written by the test
    missing = str(tmp_path / "missing-secret")
    cfg = str(tmp_path / "c.toml")
    serve = ["serve-dns", "--zone", "z.example", "--secret-file", missing]
    return {
        "account-new": (["account", "new", "H"], 2),
        "join-domain": (["join", "H", "--server", "192.0.2.53", "--secret-file", secret, "--config", cfg], 2),
        "join-server": (["join", "a.example", "--server", "H", "--secret-file", secret, "--config", cfg], 2),
        "join-name": (["join", "a.example", "--server", "192.0.2.53", "--secret-file", secret, "--name", "H",
                       "--config", cfg], 2),
        "join-secret": (["join", "a.example", "--server", "192.0.2.53", "--secret-file", "H",
                         "--config", cfg], 2),
        "identity-config": (["identity", "--config", "H"], 2),
        "up-config": (["up", "--config", "H"], 2),
        "status-config": (["status", "--config", "H"], 2),
        "status-socket": (["status", "--socket", "H"], 1),
        "rebind-socket": (["rebind", "--socket", "H"], 1),
        "rebind-port": (["rebind", "--socket", str(tmp_path / "none.sock"), "--port", "H"], 2),
        "probe-gateway": (["portmap", "probe", "--gateway", "H"], 2),
        "probe-config": (["portmap", "probe", "--config", "H"], 2),
        "serve-zone": (["serve-dns", "--zone", "H", "--secret-file", missing], 2),
        "serve-listen": ([*serve, "--listen", "H"], 2),
        "serve-server-name": ([*serve, "--server-name", "H"], 2),
        "serve-min-lease": ([*serve, "--min-lease", "H"], 2),
        "serve-default-lease": ([*serve, "--default-lease", "H"], 2),
        "serve-secret": (["serve-dns", "--zone", "z.example", "--secret-file", "H"], 2),
        "serve-stun": ([*serve, "--stun", "H"], 2),
        "netcheck-stun": (["netcheck", "--stun", "H"], 2),
        "netcheck-gateway": (["netcheck", "--stun", "192.0.2.1:3478", "--gateway", "H"], 2),
        "netcheck-config": (["netcheck", "--config", "H"], 2),
        "command": (["H"], 2),
        "account-command": (["account", "H"], 2),
        "portmap-command": (["portmap", "H"], 2),
    }


def _secret_file(tmp_path: Path) -> Path:
    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    secret.chmod(0o600)
    return secret


def _assert_one_line(capsys: pytest.CaptureFixture[str], rc: int, code: int) -> str:
    out, err = capsys.readouterr()
    assert rc == code, err
    assert out == "" and err.count("\n") == 1 and err.startswith("tunneld: "), err[:300]
    assert "Traceback" not in err and len(err) < 1100 and "\0" not in err
    return err


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("template", list(_templates(Path("/nonexistent"))), ids=str)
def test_hostile_values_give_one_line_and_the_right_exit_code(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, template: str,
        value: str) -> None:
    monkeypatch.chdir(tmp_path)  # relative hostile paths resolve here, where nothing exists
    _secret_file(tmp_path)
    argv, code = _templates(tmp_path)[template]
    if template.endswith("-socket") and value in ("", "a\0b"):
        code = 2  # not a path at all: bad usage, not an unreachable daemon
    _assert_one_line(capsys, main([value if a == "H" else a for a in argv]), code)


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_rebind_port_out_of_range_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   port: str) -> None:
    rc = main(["rebind", "--socket", str(tmp_path / "none.sock"), "--port", port])
    assert "--port" in _assert_one_line(capsys, rc, 2)


@pytest.mark.parametrize("listen", ["[fe80::1%eth0]:53", "[fe80::1%1]:5353", "[::1%lo]:53"])
def test_scoped_listen_is_refused_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          listen: str) -> None:
    rc = main(["serve-dns", "--zone", "z.example", "--secret-file", str(_secret_file(tmp_path)),
               "--db", str(tmp_path / "db.sqlite"), "--listen", listen])
    assert "scoped" in _assert_one_line(capsys, rc, 2)
    assert not (tmp_path / "db.sqlite").exists()


@pytest.mark.parametrize("stun", ["0", "70000", "5353"])
def test_serve_dns_stun_port_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        stun: str) -> None:
    rc = main(["serve-dns", "--zone", "z.example", "--secret-file", str(_secret_file(tmp_path)),
               "--db", str(tmp_path / "db.sqlite"), "--listen", "127.0.0.1:5353", "--stun", stun])
    assert f"bad --stun {stun}" in _assert_one_line(capsys, rc, 2)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "dot"])
def test_join_never_replaces_what_is_not_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        kind: str) -> None:
    """The rename that installs the config would replace a device or a link (it once replaced a device
    node given as --config)."""
    target = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink":
        (tmp_path / "real").write_text("keep")
        target.symlink_to(tmp_path / "real")
    elif kind == "directory":
        target.mkdir()
    else:
        target = tmp_path / "."
    before = os.lstat(target)
    rc = main(["join", "a.example", "--server", "192.0.2.53", "--secret-file", str(_secret_file(tmp_path)),
               "--name", "laptop", "--config", str(target), "--force", "--state-dir", str(tmp_path / "st")])
    _assert_one_line(capsys, rc, 2)
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_closed_stdout_is_one_line_exit_1() -> None:
    p = subprocess.Popen([sys.executable, "-m", "tunneld", "account", "new", "a.example"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # like `| head -0`: the first write meets a closed pipe
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait(timeout=30) == 1
    assert err.count("\n") == 1 and err.startswith("tunneld: ") and "Traceback" not in err, err
