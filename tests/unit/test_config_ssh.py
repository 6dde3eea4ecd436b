"""[ssh]: the host-key glob and the known-hosts file, their defaults, "" to turn them off, and one-line
errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import account_toml, load_toml
from tunneld.config import ConfigError, SshConfig

SECRET = bytes(range(32))


@pytest.fixture
def account(tmp_path: Path) -> str:
    return account_toml(tmp_path, SECRET)


def _load(tmp_path: Path, text: str) -> SshConfig:
    loaded: SshConfig = load_toml(tmp_path, text).ssh
    return loaded


def test_defaults_are_the_system_files(tmp_path: Path, account: str) -> None:
    expected = SshConfig("/etc/ssh/ssh_host_*_key.pub", Path("/etc/ssh/ssh_known_hosts"))
    assert _load(tmp_path, account) == expected
    assert _load(tmp_path, account + "\n[ssh]\n") == SshConfig()


def test_paths_relative_to_the_config_and_empty_turns_off(tmp_path: Path, account: str) -> None:
    ssh = _load(tmp_path, account + '\n[ssh]\nhost_keys = "keys/*.pub"\nknown_hosts = ""\n')
    assert ssh == SshConfig(str(tmp_path / "keys/*.pub"), None)
    ssh = _load(tmp_path, account + '\n[ssh]\nhost_keys = ""\nknown_hosts = "/x/known"\n')
    assert ssh == SshConfig(None, Path("/x/known"))


@pytest.mark.parametrize(("table", "key", "problem"), [
    ("host_keys = 1", "ssh.host_keys", "expected a string"),
    ("known_hosts = true", "ssh.known_hosts", "expected a string"),
    ('known_hosts = ["/a"]', "ssh.known_hosts", "expected a string"),
    ('known_hosts = "a\\u0000b"', "ssh.known_hosts", "is not a path"),
    ('host_keys = "a\\nb"', "ssh.host_keys", "is not a path"),
    ('host_keys = " /etc/ssh/*.pub"', "ssh.host_keys", "is not a path"),
    ('known_host = "/a"', "[ssh]", 'unknown key "known_host"'),
])
def test_bad_ssh_is_one_line_naming_the_key(tmp_path: Path, account: str, table: str, key: str,
                                           problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"{account}\n[ssh]\n{table}\n")
    text = str(e.value)
    assert problem in text and "\n" not in text, text
    assert e.value.key == key


def test_ssh_as_a_value_is_refused(tmp_path: Path, account: str) -> None:
    with pytest.raises(ConfigError, match="expected a table"):
        _load(tmp_path, 'ssh = "/etc/ssh"\n' + account)
