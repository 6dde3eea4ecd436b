"""[service]: the user the daemon runs as after start-up, its default, and one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import account_toml, load_toml
from tunneld.config import ConfigError, ServiceConfig

SECRET = bytes(range(100, 132))


@pytest.fixture
def account(tmp_path: Path) -> str:
    return account_toml(tmp_path, SECRET)


def _load(tmp_path: Path, text: str) -> ServiceConfig:
    loaded: ServiceConfig = load_toml(tmp_path, text).service
    return loaded


def test_default_user_is_tunneld(tmp_path: Path, account: str) -> None:
    assert _load(tmp_path, account) == ServiceConfig("tunneld")
    assert _load(tmp_path, account + "[service]\n") == ServiceConfig("tunneld")


@pytest.mark.parametrize("user", ["root", "tunneld", "_tunneld", "svc-1"])
def test_user_names(tmp_path: Path, account: str, user: str) -> None:
    assert _load(tmp_path, f'{account}[service]\nuser = "{user}"\n').user == user


@pytest.mark.parametrize(
    ("table", "key", "said"),
    [
        ('user = ""', "service.user", "is not a user name"),
        ('user = "Root"', "service.user", "is not a user name"),
        ('user = "0"', "service.user", "is not a user name"),
        ('user = "a\\nb"', "service.user", "is not a user name"),
        ('user = "../etc"', "service.user", "is not a user name"),
        (f'user = "{"a" * 33}"', "service.user", "is not a user name"),
        ("user = 0", "service.user", "expected a string"),
        ("user = ['root']", "service.user", "expected a string"),
        ("group = 'tunneld'", "[service]", "unknown key"),
    ],
)
def test_bad_service_values_are_one_line(tmp_path: Path, account: str, table: str, key: str,
                                         said: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"{account}[service]\n{table}\n")
    assert e.value.key == key and said in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_service_as_a_value_is_refused(tmp_path: Path, account: str) -> None:
    with pytest.raises(ConfigError):
        _load(tmp_path, 'service = "root"\n' + account)


def test_status_asks_the_default_socket_when_the_secret_cannot_be_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A member of the daemon's group cannot read root's config directory (0700) or the secret: status
    then asks the default control socket instead of failing on the config."""
    import tunneld.cli
    from tunneld.cli import main

    monkeypatch.setattr(tunneld.cli, "DEFAULT_CONTROL_SOCKET", tmp_path / "default.sock")
    config = tmp_path / "tunneld.toml"
    config.write_text(f'[interface]\ncontrol_socket = "{tmp_path}/c.sock"\n\n[account]\n'
                      f'domain = "home.example.net"\nsecret_file = "{tmp_path}/missing-secret"\n')
    assert main(["status", "--config", str(config)]) == 1
    assert f"cannot reach the daemon at {tmp_path}/default.sock" in capsys.readouterr().err
    config.write_text(config.read_text() + "[interface2]\n")  # anything else wrong is still an error
    assert main(["status", "--config", str(config)]) == 2
    assert main(["status", "--config", str(tmp_path / "missing.toml")]) == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: a non-root start looks no user up")
def test_up_with_a_missing_user_exits_2_naming_the_fix(tmp_path: Path, account: str,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import tunneld.daemon
    from tunneld.cli import main

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the daemon was about to start")

    monkeypatch.setattr(tunneld.daemon, "Daemon", refuse)
    config = tmp_path / "tunneld.toml"
    config.write_text(f'[interface]\nstate_dir = "{tmp_path}/state"\n\n{account}\n[service]\n'
                      f'user = "no-such-user-x"\n')
    assert main(["up", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no user 'no-such-user-x'" in err, err
    assert "useradd --system" in err and '[service] user = "root"' in err
