"""[names]: the hosts-file block's switches, their defaults, and one-line errors naming key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import account_toml, load_toml
from tunneld.config import ConfigError, NamesConfig

SECRET = bytes(range(100, 132))


@pytest.fixture
def account(tmp_path: Path) -> str:
    return account_toml(tmp_path, SECRET)


def _load(tmp_path: Path, text: str) -> NamesConfig:
    loaded: NamesConfig = load_toml(tmp_path, text).names
    return loaded


def test_defaults_are_on_and_etc_hosts(tmp_path: Path, account: str) -> None:
    assert _load(tmp_path, account) == NamesConfig(True, Path("/etc/hosts"), True)
    assert _load(tmp_path, account + "[names]\n") == NamesConfig(True, Path("/etc/hosts"), True)


def test_values_and_relative_path(tmp_path: Path, account: str) -> None:
    text = account + '[names]\nenabled = false\nhosts_file = "node/hosts"\nshort_names = false\n'
    assert _load(tmp_path, text) == NamesConfig(False, tmp_path / "node" / "hosts", False)
    text = account + f'[names]\nhosts_file = "{tmp_path}/h"\n'
    assert _load(tmp_path, text).hosts_file == tmp_path / "h"


@pytest.mark.parametrize(
    ("table", "key", "said"),
    [
        ("enabled = 1", "names.enabled", "expected true or false"),
        ('short_names = "yes"', "names.short_names", "expected true or false"),
        ('hosts_file = ""', "names.hosts_file", "is not a path"),
        ('hosts_file = "a\\u0000b"', "names.hosts_file", "is not a path"),
        ("hosts_file = 5", "names.hosts_file", "expected a string"),
        ("host_file = '/etc/hosts'", "[names]", "unknown key"),
    ],
)
def test_bad_names_values_are_one_line(tmp_path: Path, account: str, table: str, key: str, said: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"{account}[names]\n{table}\n")
    assert e.value.key == key and said in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_names_as_a_value_is_refused(tmp_path: Path, account: str) -> None:
    with pytest.raises(ConfigError):
        _load(tmp_path, 'names = "x"\n' + account)
