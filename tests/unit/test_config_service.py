"""[service]: the user the daemon runs as after start-up, its default, and one-line errors."""

from __future__ import annotations

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
