"""The command line: output contracts and one-line usage errors with exit code 2."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

from crypto.kdf import derive_tsig_key
from tunneld.cli import main


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
