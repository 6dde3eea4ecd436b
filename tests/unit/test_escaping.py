"""No injection through names and paths: domains are LDH, TOML strings are escaped, BIND stanzas are checked.

`account new 'x"; include "/etc/shadow'` once printed a BIND stanza with that include in it, and `join`
wrote an injected `lease = 1800` into the TOML it wrote (through the domain, and through any path).
"""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.cli import main, tsig_stanza
from tunneld.config import load_config
from tunneld.config_write import toml_string
from tunneld.crypto.kdf import normalize_domain

INJECTIONS = [
    'x"; include "/etc/shadow',
    'x.example"; include "/etc/shadow"; #',
    'home.example.net"\nlease = 1800\n#',
    "home.example.net\nlease = 1800",
    "home.example.net\r",
    "a b.example",
    "a;b.example",
    "a\\.example",
    "a@b.example",
    "a\0b.example",
    "a{b}.example",
]


# -- domains -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [*INJECTIONS, "_dns-update._udp.example.net", "-a.example", "a-.example", "a_b.example", "a..example",
     "a.example..", "a" * 64 + ".example", "é.example"],
)
def test_domains_are_ldh_only(bad: str) -> None:
    with pytest.raises(ValueError) as e:
        normalize_domain(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("good", "normal"),
    [("Home.Example.NET.", "home.example.net"), ("xn--bcher-kva.example", "xn--bcher-kva.example"),
     ("a-b.0.example", "a-b.0.example"), ("1.2.3", "1.2.3"), ("A" * 63 + ".example", "a" * 63 + ".example")],
)
def test_ldh_domains_are_accepted(good: str, normal: str) -> None:
    assert normalize_domain(good) == normal


# -- account new: the BIND stanza --------------------------------------------------------------------------


@pytest.mark.parametrize("domain", INJECTIONS)
def test_account_new_refuses_what_would_inject_into_the_stanza(domain: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["account", "new", domain]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no secret, no stanza
    assert err.count("\n") == 1 and err.startswith("tunneld: bad account domain"), err
    assert "include" not in err or '\\"' in err or "'" in err  # echoed quoted, never as BIND syntax


def test_the_stanza_itself_refuses_a_bad_name() -> None:
    with pytest.raises(ValueError):
        tsig_stanza('x"; include "/etc/shadow', bytes(32))
    assert tsig_stanza("Home.Example.NET.", bytes(32)).startswith('key "home.example.net." {\n')


# -- join: the TOML it writes ---------------------------------------------------------------------------


def _secret(path: Path) -> Path:
    path.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    path.chmod(0o600)
    return path


def test_join_refuses_an_injected_domain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    assert main(["join", "home.example.net\nlease = 1800", "--server", "192.0.2.53",
                 "--secret-file", str(_secret(tmp_path / "s")), "--name", "laptop",
                 "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not cfg.exists()


@pytest.mark.parametrize("name", ['d"\nlease = 1800 #', 'd"\nlease = 1800 #\\ \t\x7f\x1bé'],
                         ids=["injection", "injection-and-controls"])
@pytest.mark.parametrize("which", ["secret-file", "state-dir"])
def test_join_escapes_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str,
                            name: str) -> None:
    """A path ending the TOML string and adding `lease = 1800` (the rest of the line a comment) stays a
    path: the config says what was given, and nothing else."""
    weird = tmp_path / name
    plain = tmp_path / "d"  # what the injected line would point secret_file/state_dir at instead
    _secret(plain) if which == "secret-file" else plain.mkdir()
    if which == "secret-file":
        secret, state = _secret(weird), tmp_path / "state"
    else:
        secret, state = _secret(tmp_path / "s"), weird
    cfg = tmp_path / "c.toml"
    assert main(["join", "home.example.net", "--server", "192.0.2.53", "--secret-file", str(secret),
                 "--state-dir", str(state), "--name", "laptop", "--config", str(cfg)]) == 0, \
        capsys.readouterr().err
    c = load_config(cfg)
    assert c.account.lease != 1800
    assert c.account.secret_file == secret and c.interface.state_dir == state
    assert (state / "device.key").exists()
    doc = tomllib.loads(cfg.read_text())
    assert set(doc["account"]) == {"domain", "secret_file", "server", "name"}


@pytest.mark.parametrize("which", ["--secret-file", "--state-dir", "--config"])
def test_join_refuses_a_nul_in_a_path(tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str) -> None:
    args = {"--secret-file": str(_secret(tmp_path / "s")), "--state-dir": str(tmp_path / "st"),
            "--config": str(tmp_path / "c.toml")}
    args[which] = str(tmp_path / "a\0b")
    assert main(["join", "home.example.net", "--server", "192.0.2.53", "--name", "laptop",
                 *[x for kv in args.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and which in err and "Traceback" not in err, err


def test_join_refuses_a_path_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path) + "/st\udcff"  # a byte that is not UTF-8, as Python spells it in a file name
    assert main(["join", "home.example.net", "--server", "192.0.2.53", "--name", "laptop",
                 "--secret-file", str(_secret(tmp_path / "s")), "--state-dir", state,
                 "--config", str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--state-dir" in err and "UTF-8" in err, err


# -- the escaper --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "plain", '"', "\\", '\\"', "\n", "\r\n", "\t", "\x00", "\x1f", "\x7f",
                                  "\b\f", "é€😀", "\u2028", '"""', "'''", "#", "a = 1\n[account]"])
def test_toml_string_round_trips(text: str) -> None:
    encoded = toml_string(text)
    assert "\n" not in encoded and "\r" not in encoded
    assert tomllib.loads(f"k = {encoded}\n") == {"k": text}


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_toml_string_round_trips_any_text(text: str) -> None:
    assert tomllib.loads(f"k = {toml_string(text)}\nafter = 1\n") == {"k": text, "after": 1}


def test_toml_string_refuses_lone_surrogates() -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        toml_string("a\udcff")
