"""[relay]: the TURN relay's address (a name or an IP literal, port 3478 by default), its one-line errors
with exit 2, and the relay secret derived from the account secret, kept out of every repr."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import account_toml, load_toml
from tunneld.cli import main
from tunneld.config import ConfigError, RelayConfig, load_config
from tunneld.crypto.kdf import derive_turn_secret

SECRET = bytes(range(100, 132))


@pytest.fixture
def account(tmp_path: Path) -> str:
    return account_toml(tmp_path, SECRET, "Home.Example.NET.")


def _load(tmp_path: Path, text: str) -> RelayConfig:
    loaded: RelayConfig = load_toml(tmp_path, text).relay
    return loaded


@pytest.mark.parametrize(("value", "server"), [
    ("turn.example.net:3478", ("turn.example.net", 3478)),
    ("Turn.Example.NET.", ("turn.example.net", 3478)),
    ("192.0.2.7", ("192.0.2.7", 3478)),
    ("192.0.2.7:5349", ("192.0.2.7", 5349)),
    ("[2001:DB8::7]:3479", ("2001:db8::7", 3479)),
    ("[2001:db8::7]", ("2001:db8::7", 3478)),
])
def test_relay_server_forms(tmp_path: Path, account: str, value: str, server: tuple[str, int]) -> None:
    assert _load(tmp_path, f'{account}\n[relay]\nserver = "{value}"\n') == RelayConfig(server)


def test_no_relay_table_or_no_server_means_look_it_up(tmp_path: Path, account: str) -> None:
    assert _load(tmp_path, account) == RelayConfig(None)
    assert _load(tmp_path, account + "\n[relay]\n") == RelayConfig(None)


@pytest.mark.parametrize(("table", "problem"), [
    ('server = ""', "neither an IP address nor a DNS name"),
    ('server = "turn.example.net:0"', "not a port number"),
    ('server = "turn.example.net:65536"', "not a port number"),
    ('server = "turn.example.net:"', "not a port number"),
    ('server = "turn.example.net:34 78"', "not a port number"),
    ('server = "turn.example.net:\uff13\uff14\uff17\uff18"', "not a port number"),  # full-width digits
    ('server = "2001:db8::7"', "without brackets"),
    ('server = "[2001:db8::7"', "no closing bracket"),
    ('server = "[2001:db8::7]x"', "other than :port"),
    ('server = "[192.0.2.7]:3478"', "not an IPv6 address"),
    ('server = "turn_server:3478"', "neither an IP address nor a DNS name"),
    ('server = "tùrn.example:3478"', "neither an IP address nor a DNS name"),
    ('server = "a\\nb:3478"', "neither an IP address nor a DNS name"),
    ('server = "a\\u0000b"', "neither an IP address nor a DNS name"),
    ('server = "x; rm -rf /:3478"', "neither an IP address nor a DNS name"),
    ('server = "' + "a" * 300 + '"', "neither an IP address nor a DNS name"),
    ("server = 3478", "expected a string"),
    ("server = true", "expected a string"),
    ('server = ["192.0.2.7:3478"]', "expected a string"),
    ('servre = "192.0.2.7"', 'unknown key "servre" (did you mean "server"?)'),
])
def test_bad_relay_is_one_line_naming_the_key_and_the_fix(tmp_path: Path, account: str, table: str,
                                                          problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"{account}\n[relay]\n{table}\n")
    text = str(e.value)
    assert problem in text and "\n" not in text and "; " in text, text
    assert e.value.key in ("relay.server", "[relay]")


def test_relay_as_a_value_not_a_table_is_refused(tmp_path: Path, account: str) -> None:
    with pytest.raises(ConfigError, match="expected a table"):
        _load(tmp_path, 'relay = "192.0.2.7:3478"\n' + account)


def test_a_bad_relay_exits_2_with_one_line(tmp_path: Path, account: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tunneld.toml"
    path.write_text(f'{account}\n[relay]\nserver = "turn.example.net:99999"\n')
    assert main(["status", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "relay.server" in err and "Traceback" not in err


def test_turn_secret_is_derived_and_never_shown(tmp_path: Path, account: str) -> None:
    path = tmp_path / "tunneld.toml"
    path.write_text(account)
    cfg = load_config(path)
    assert cfg.turn_secret == derive_turn_secret(SECRET, "home.example.net").encode("ascii")
    text = (repr(cfg) + str(cfg)).replace(str(tmp_path), "")  # the path holds this test's name
    assert cfg.turn_secret.decode() not in text and "turn_secret" not in text
