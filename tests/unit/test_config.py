"""The config file: a complete file, defaults, and one-line messages naming the key and the fix."""

from __future__ import annotations

import base64
import ipaddress
import time
from pathlib import Path

import pytest

from tunneld.config import (
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_STATE_DIR,
    Config,
    ConfigError,
    Endpoint,
    StunServer,
    load_account_secret,
    load_config,
    parse_endpoint,
)
from tunneld.crypto.kdf import derive_psk, derive_tsig_key
from tunneld.identity import ula_for

SECRET = bytes(range(100, 132))
SECRET_B64 = base64.b64encode(SECRET).decode()
KEY1 = bytes(range(32))
KEY2 = bytes(range(32, 64))
KEY1_B64 = base64.b64encode(KEY1).decode()
KEY2_B64 = base64.b64encode(KEY2).decode()
ULA1 = "fd40:6e19:fbec:0:630d:cd29:66c4:3366"  # ula_for("home.example.net", KEY1), see test_identity


def _secret_forms(secret: bytes = SECRET) -> list[str]:
    return [base64.b64encode(secret).decode(), secret.hex(), repr(secret)]


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "account.secret"
    path.write_text(SECRET_B64 + "\n")
    path.chmod(0o600)
    return path


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tunneld.toml"
    path.write_text(text)
    return path


def _account(secret_file: Path, domain: str = "Home.Example.NET.") -> str:
    return f'[account]\ndomain = "{domain}"\nsecret_file = "{secret_file}"\n'


def _full(tmp_path: Path, secret_file: Path) -> str:
    return f"""
[interface]
name = "tun7"
listen_port = 14500
mtu = 1420
state_dir = "{tmp_path}/state"
control_socket = "{tmp_path}/control.sock"
suite = "chacha20-poly1305"

{_account(secret_file)}
[[peer]]
name = "laptop"
public_key = "{KEY1_B64}"
endpoint = "192.0.2.1:4500"
ula = "{ULA1}"

[[peer]]
name = "nas"
public_key = "{KEY2_B64}"
endpoint = "[2001:db8::1]:4501"
"""


def test_complete_file(tmp_path: Path, secret_file: Path) -> None:
    path = _write(tmp_path, _full(tmp_path, secret_file))
    cfg = load_config(path)
    assert cfg.path == path
    i = cfg.interface
    assert (i.name, i.listen_port, i.mtu, i.suite) == ("tun7", 14500, 1420, "chacha20-poly1305")
    assert i.state_dir == tmp_path / "state" and i.control_socket == tmp_path / "control.sock"
    assert cfg.account.domain == "home.example.net"
    assert cfg.account.secret_file == secret_file
    assert cfg.psk == derive_psk(SECRET, "home.example.net")
    assert cfg.tsig_key == derive_tsig_key(SECRET, "home.example.net")
    laptop, nas = cfg.peers
    assert laptop.name == "laptop" and laptop.public_key == KEY1 and laptop.public_key_b64 == KEY1_B64
    assert laptop.endpoint == Endpoint(ipaddress.IPv4Address("192.0.2.1"), 4500)
    assert str(laptop.ula) == ULA1
    assert nas.endpoint == Endpoint(ipaddress.IPv6Address("2001:db8::1"), 4501)
    assert str(nas.endpoint) == "[2001:db8::1]:4501" and str(laptop.endpoint) == "192.0.2.1:4500"
    assert nas.ula == ula_for("home.example.net", KEY2)
    assert cfg.peer("LAPTOP") is laptop and cfg.peer("printer") is None
    assert cfg.prefix == ipaddress.IPv6Network("fd40:6e19:fbec::/48")


def test_defaults(tmp_path: Path, secret_file: Path) -> None:
    cfg = load_config(_write(tmp_path, _account(secret_file)))
    i = cfg.interface
    assert (i.name, i.listen_port, i.mtu, i.suite) == ("btmm0", 4500, 1400, "aes-256-gcm")
    assert i.state_dir == DEFAULT_STATE_DIR == Path("/var/lib/tunneld")
    assert i.control_socket == DEFAULT_CONTROL_SOCKET == Path("/run/tunneld/control.sock")
    assert cfg.peers == ()


def test_port_zero_means_any(tmp_path: Path, secret_file: Path) -> None:
    cfg = load_config(_write(tmp_path, "[interface]\nlisten_port = 0\n" + _account(secret_file)))
    assert cfg.interface.listen_port == 0


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, secret_file: Path) -> None:
    text = (
        '[interface]\nstate_dir = "state"\n[account]\ndomain = "a.example"\nsecret_file = "account.secret"\n'
    )
    cfg = load_config(_write(tmp_path, text))
    assert cfg.interface.state_dir == tmp_path / "state"
    assert cfg.account.secret_file == secret_file


def test_secret_never_in_repr(tmp_path: Path, secret_file: Path) -> None:
    cfg = load_config(_write(tmp_path, _full(tmp_path, secret_file)))
    text = repr(cfg) + str(cfg) + repr(cfg.account) + repr(cfg.peers)
    forms = _secret_forms() + _secret_forms(cfg.psk) + _secret_forms(cfg.tsig_key)
    for form in forms:
        assert form not in text
    assert "psk" not in text and "tsig_key" not in text


# --------------------------------------------------------------------------------------------------------
# Bad input: one line, naming the file, the key and the fix
# --------------------------------------------------------------------------------------------------------

# (id, config text; "{account}" is replaced by a valid [account] table, "{secret}" by the secret file's path,
#  expected substrings: the key, the problem and the fix)
BAD: list[tuple[str, str, list[str]]] = [
    (
        "syntax",
        "{account}\n[interface]\nname = \n",
        ["TOML syntax error", "line 6", "fix the syntax"],
    ),
    (
        "unknown table",
        "{account}\n[interfaces]\nname = 'x'\n",
        ["unknown table [interfaces]", "known tables: [interface], [account], [[peer]]"],
    ),
    ("unknown top key", "foo = 1\n{account}", ['unknown key "foo"', "known tables"]),
    (
        "unknown interface key",
        '[interface]\nnmae = "x"\n{account}',
        ["[interface]", 'unknown key "nmae"', 'did you mean "name"', "known keys: name, listen_port, mtu"],
    ),
    ("unknown account key", '{account}secret = "x"\n', ["[account]", 'unknown key "secret"', "known keys"]),
    (
        "unknown peer key",
        '{account}[[peer]]\nname = "a"\npublic_key = "' + KEY1_B64 + '"\nport = 1\n',
        ["peer[1]", 'unknown key "port"', "known keys: name, public_key, endpoint, ula"],
    ),
    ("interface not a table", "interface = 3\n{account}", ["interface", "expected a table", "[interface]"]),
    ("no account", "[interface]\n", ["[account]", "missing", "domain ="]),
    ("peer not array", '{account}[peer]\nname = "a"\n', ["peer", "array of tables", "[[peer]]"]),
    (
        "name type",
        "[interface]\nname = 7\n{account}",
        ["interface.name", "expected a string, got 7", 'name = "btmm0"'],
    ),
    (
        "name long",
        '[interface]\nname = "abcdefghijklmnop"\n{account}',
        ["interface.name", "longer than 15", "1 to 15"],
    ),
    (
        "name slash",
        '[interface]\nname = "a/b"\n{account}',
        ["interface.name", "not a valid Linux interface", '"/"'],
    ),
    ("name space", '[interface]\nname = "a b"\n{account}', ["interface.name", "whitespace"]),
    ("name colon", '[interface]\nname = "eth0:1"\n{account}', ["interface.name", "not a valid"]),
    ("name empty", '[interface]\nname = ""\n{account}', ["interface.name", "is empty", "1 to 15"]),
    ("name dot", '[interface]\nname = ".."\n{account}', ["interface.name", "not a valid"]),
    (
        "port string",
        '[interface]\nlisten_port = "4500"\n{account}',
        ["interface.listen_port", "expected an integer", 'got "4500"', "listen_port = 4500"],
    ),
    ("port bool", "[interface]\nlisten_port = true\n{account}", ["interface.listen_port", "got true"]),
    (
        "port range",
        "[interface]\nlisten_port = 65536\n{account}",
        ["interface.listen_port", "65536 is out of range", "1 to 65535, or 0"],
    ),
    ("port negative", "[interface]\nlisten_port = -1\n{account}", ["interface.listen_port", "out of range"]),
    (
        "mtu low",
        "[interface]\nmtu = 1279\n{account}",
        ["interface.mtu", "1279 is out of range", "1280 (the IPv6 minimum) to 9000"],
    ),
    ("mtu high", "[interface]\nmtu = 9001\n{account}", ["interface.mtu", "out of range", "9000"]),
    (
        "mtu float",
        "[interface]\nmtu = 1400.0\n{account}",
        ["interface.mtu", "expected an integer, got 1400.0", "mtu = 1400"],
    ),
    (
        "suite",
        '[interface]\nsuite = "aes-gcm"\n{account}',
        ["interface.suite", '"aes-gcm" is not a known suite', "aes-128-gcm, aes-256-gcm, chacha20-poly1305"],
    ),
    ("state_dir type", "[interface]\nstate_dir = 1\n{account}", ["interface.state_dir", "expected a string"]),
    ("state_dir empty", '[interface]\nstate_dir = ""\n{account}', ["interface.state_dir", "not a path"]),
    (
        "socket too long",
        '[interface]\ncontrol_socket = "/' + "s" * 120 + '"\n{account}',
        ["interface.control_socket", "107-byte limit", "shorter path"],
    ),
    (
        "domain missing",
        '[account]\nsecret_file = "{secret}"\n',
        ["account.domain", "missing", 'domain = "home.example.net"'],
    ),
    (
        "domain bad",
        '[account]\ndomain = "a..b"\nsecret_file = "{secret}"\n',
        ["account.domain", '"a..b" is not a valid domain', "empty label", "e.g."],
    ),
    (
        "domain type",
        '[account]\ndomain = ["a"]\nsecret_file = "{secret}"\n',
        ["account.domain", "got an array"],
    ),
    (
        "secret_file missing",
        '[account]\ndomain = "a.example"\n',
        ["account.secret_file", "missing", "secret_file ="],
    ),
    (
        "peer name missing",
        '{account}[[peer]]\npublic_key = "' + KEY1_B64 + '"\n',
        ["peer[1].name", "missing", 'name = "laptop"'],
    ),
    (
        "peer name bad",
        '{account}[[peer]]\nname = "my laptop"\npublic_key = "' + KEY1_B64 + '"\n',
        ["peer[1].name", "not a DNS label", "letters, digits"],
    ),
    (
        "peer name hyphen",
        '{account}[[peer]]\nname = "-a"\npublic_key = "' + KEY1_B64 + '"\n',
        ["peer[1].name", "not a DNS label"],
    ),
    (
        "peer name duplicate",
        '{account}[[peer]]\nname = "a"\npublic_key = "'
        + KEY1_B64
        + '"\n[[peer]]\nname = "A"\npublic_key = "'
        + KEY2_B64
        + '"\n',
        ["peer[2].name", "already the name of peer[1]", "its own name"],
    ),
    (
        "peer key missing",
        '{account}[[peer]]\nname = "a"\n',
        ["peer[1].public_key", "missing", "public_key ="],
    ),
    (
        "peer key b64",
        '{account}[[peer]]\nname = "a"\npublic_key = "not base64!"\n',
        ["peer[1].public_key", "not valid base64", "44 characters"],
    ),
    (
        "peer key short",
        '{account}[[peer]]\nname = "a"\npublic_key = "' + base64.b64encode(bytes(31)).decode() + '"\n',
        ["peer[1].public_key", "decodes to 31 bytes, not 32", "44 characters"],
    ),
    (
        "peer key duplicate",
        '{account}[[peer]]\nname = "a"\npublic_key = "'
        + KEY1_B64
        + '"\n[[peer]]\nname = "b"\npublic_key = "'
        + KEY1_B64
        + '"\n',
        ["peer[2].public_key", "same key as peer[1]", "own key"],
    ),
]

_PEER = '{account}[[peer]]\nname = "laptop"\npublic_key = "' + KEY1_B64 + '"\n'
ENDPOINTS: list[tuple[str, list[str]]] = [
    ("1.2.3.4", ['"1.2.3.4" has no port', 'write "host:port"', '"192.0.2.1:4500"']),
    ("1.2.3.4:", ['"" is not a port number', "1 to 65535"]),
    ("1.2.3.4:0", ['"0" is not a port number', "1 to 65535"]),
    ("1.2.3.4:65536", ['"65536" is not a port number']),
    ("1.2.3.4:http", ['"http" is not a port number']),
    ("1.2.3.4:+80", ['"+80" is not a port number']),
    ("host.example:4500", ['"host.example" is not an IP address', "names are not resolved", "through DNS"]),
    ("1.2.3.999:4500", ['"1.2.3.999" is not an IP address']),
    ("2001:db8::1:4500", ["IPv6 address without brackets", '"[v6]:port"']),
    ("[2001:db8::1]", ['"[2001:db8::1]" has no port']),
    ("[2001:db8::1", ["no closing bracket"]),
    ("[2001:db8::1]4500", ["something other than :port"]),
    ("[1.2.3.4]:4500", ['"1.2.3.4" is not an IPv6 address']),
]
for _ep, _expect in ENDPOINTS:
    BAD.append((f"endpoint {_ep}", _PEER + f'endpoint = "{_ep}"\n', ["peer[1].endpoint", *_expect]))
BAD += [
    ("endpoint type", _PEER + "endpoint = 4500\n", ["peer[1].endpoint", "expected a string, got 4500"]),
    (
        "ula not address",
        _PEER + 'ula = "nope"\n',
        ["peer[1].ula", '"nope" is not an IPv6 address', "remove the line"],
    ),
    (
        "ula mismatch",
        _PEER + 'ula = "fd40:6e19:fbec::1"\n',
        [
            "peer[1].ula",
            'fd40:6e19:fbec::1 does not match peer "laptop"',
            f"which gives {ULA1}",
            "remove the line",
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in BAD], ids=[i for i, _, _ in BAD])
def test_bad_input_gives_one_line(tmp_path: Path, secret_file: Path, text: str, expected: list[str]) -> None:
    text = text.replace("{account}", _account(secret_file)).replace("{secret}", str(secret_file))
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert "; " in msg  # problem; fix
    for part in expected:
        assert part in msg, (part, msg)
    for form in _secret_forms():
        assert form not in msg


def test_error_key_attribute(tmp_path: Path, secret_file: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(
            _write(tmp_path, _PEER.replace("{account}", _account(secret_file)) + 'endpoint = "1.2.3.4"\n')
        )
    assert e.value.key == "peer[1].endpoint"
    assert str(e.value) == (
        f'{tmp_path / "tunneld.toml"}: peer[1].endpoint: "1.2.3.4" has no port; '
        'write "host:port" with an IP address, e.g. "192.0.2.1:4500" or "[2001:db8::1]:4500"'
    )


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.toml")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'nope.toml'}: no such file; ") and "--config" in msg


def test_config_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        load_config(tmp_path)


def test_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "tunneld.toml"
    path.write_bytes(b'[account]\ndomain = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_path_with_newline_still_one_line(tmp_path: Path) -> None:
    weird = tmp_path / "a\nb"
    weird.mkdir()
    with pytest.raises(ConfigError) as e:
        load_config(weird / "tunneld.toml")
    assert "\n" not in str(e.value)


def test_endpoint_helper() -> None:
    assert parse_endpoint("[fe80::1%eth0]:4500").port == 4500
    with pytest.raises(ValueError, match="has no port"):
        parse_endpoint("192.0.2.1")


# --------------------------------------------------------------------------------------------------------
# The account secret file
# --------------------------------------------------------------------------------------------------------


def _load_with_secret(tmp_path: Path, secret_file: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _account(secret_file)))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path / 'tunneld.toml'}: account.secret_file: ")
    assert e.value.key == "account.secret_file"
    return msg


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_secret_file_permissions(tmp_path: Path, secret_file: Path, mode: int) -> None:
    secret_file.chmod(mode)
    msg = _load_with_secret(tmp_path, secret_file)
    assert f"mode {mode:04o}" in msg and f"chmod 600 {secret_file}" in msg
    for form in _secret_forms():
        assert form not in msg


def test_secret_file_missing(tmp_path: Path) -> None:
    msg = _load_with_secret(tmp_path, tmp_path / "absent.secret")
    assert "does not exist" in msg and "tunneld account new" in msg and "0600" in msg


def test_secret_file_is_directory(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    assert "not a regular file" in _load_with_secret(tmp_path, d)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (base64.b64encode(SECRET[:16]) + b"\n", "decodes to 16 bytes, not 32"),
        (base64.b64encode(SECRET + b"x") + b"\n", "decodes to 33 bytes, not 32"),
        (b"not*base64\n", "not valid base64"),
        (base64.b64encode(SECRET) + b"\n\n# TSIG key for the account\n", "has 3 lines"),
        (SECRET, "not valid base64"),
    ],
)
def test_secret_file_content(tmp_path: Path, secret_file: Path, content: bytes, problem: str) -> None:
    secret_file.write_bytes(content)
    msg = _load_with_secret(tmp_path, secret_file)
    assert problem in msg and "exactly one line" in msg and "tunneld account new" in msg
    for form in [*_secret_forms(), *_secret_forms(SECRET[:16]), *_secret_forms(SECRET + b"x")]:
        assert form not in msg


def test_secret_file_without_newline_is_fine(tmp_path: Path, secret_file: Path) -> None:
    secret_file.write_text(SECRET_B64)
    cfg = load_config(_write(tmp_path, _account(secret_file)))
    assert cfg.psk == derive_psk(SECRET, "home.example.net")


def test_load_account_secret(tmp_path: Path, secret_file: Path) -> None:
    assert load_account_secret(secret_file) == SECRET
    secret_file.chmod(0o644)
    with pytest.raises(ConfigError) as e:
        load_account_secret(secret_file)
    assert str(e.value).startswith(f"{secret_file} has mode 0644") and SECRET_B64 not in str(e.value)


def test_config_type() -> None:
    # The dataclass's generated repr must leave the derived keys out (field(repr=False)).
    cfg_fields = Config.__dataclass_fields__
    assert not cfg_fields["psk"].repr and not cfg_fields["tsig_key"].repr


# -- [timers] and [portmap] ------------------------------------------------------------------------------


def test_timers_and_portmap_defaults(tmp_path: Path, secret_file: Path) -> None:
    cfg = load_config(_write(tmp_path, _account(secret_file)))
    assert cfg.timers.rekey_after_time == 120.0 and cfg.timers.reject_after_time == 180.0
    assert cfg.portmap.enabled is True and cfg.portmap.gateway is None and cfg.portmap.lifetime == 7200


def test_timers_and_portmap_set(tmp_path: Path, secret_file: Path) -> None:
    text = _account(secret_file) + (
        "\n[timers]\nrekey_after_time = 1.5\nreject_after_time = 4\nrekey_timeout = 0.5\n"
        '\n[portmap]\nenabled = false\ngateway = "192.168.1.1"\nlifetime = 3600\n'
    )
    cfg = load_config(_write(tmp_path, text))
    t = cfg.timers
    assert (t.rekey_after_time, t.reject_after_time, t.rekey_timeout) == (1.5, 4.0, 0.5)
    assert (cfg.portmap.enabled, cfg.portmap.gateway, cfg.portmap.lifetime) == (False, "192.168.1.1", 3600)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("[timers]\nrekey_after_time = -1\n", "timers.rekey_after_time"),
        ("[timers]\nrekey_after_time = 100\nreject_after_time = 101\n", "timers.reject_after_time"),
        ("[timers]\nrekey_after = 1\n", "[timers]"),
        ("[portmap]\nenabled = 1\n", "portmap.enabled"),
        ('[portmap]\ngateway = "router.lan"\n', "portmap.gateway"),
        ("[portmap]\nlifetime = 30\n", "portmap.lifetime"),
        ("[portmap]\ngatway = 1\n", "[portmap]"),
    ],
)
def test_timers_and_portmap_errors_name_the_key(tmp_path: Path, secret_file: Path, table: str,
                                                key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _account(secret_file) + "\n" + table))
    assert e.value.key == key
    assert "\n" not in str(e.value) and "; " in str(e.value)  # one line, with the fix after "; "


def test_account_server_name_and_lease(tmp_path: Path, secret_file: Path) -> None:
    text = _account(secret_file) + ('server = "192.0.2.53:5353"\nname = "Laptop"\nlease = 1800\n'
                                    'tsig_algorithm = "hmac-md5"\n')
    cfg = load_config(_write(tmp_path, text))
    assert cfg.account.tsig_algorithm == "hmac-md5"
    assert load_config(_write(tmp_path, _account(secret_file))).account.tsig_algorithm == "hmac-sha256"
    assert cfg.account.server is not None and str(cfg.account.server) == "192.0.2.53:5353"
    assert cfg.account.name is not None and cfg.account.name.lower() == "laptop"
    assert cfg.account.lease == 1800


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('server = "ns.example.net:53"\n', "account.server"),  # an IP literal, not a name to resolve
        ('server = "192.0.2.53"\n', "account.server"),  # no port
        ('server = "192.0.2.53:53"\nname = "two.labels"\n', "account.name"),
        ("lease = 60\n", "account.lease"),
        ('tsig_algorithm = "hmac-sha1"\n', "account.tsig_algorithm"),
        ('transport = "https"\n', "account.transport"),
        ("transport = 1\n", "account.transport"),
        ('transport = "tls"\ntls_public_ca = "yes"\n', "account.tls_public_ca"),
        ("tls_public_ca = 1\n", "account.tls_public_ca"),
    ],
)
def test_account_publish_keys_errors(tmp_path: Path, secret_file: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _account(secret_file) + extra))
    assert e.value.key == key and "\n" not in str(e.value), str(e.value)


# -- [nat] ----------------------------------------------------------------------------------------------


def test_nat_stun_defaults_to_the_accounts_dns_server(tmp_path: Path, secret_file: Path) -> None:
    cfg = load_config(_write(tmp_path, _account(secret_file) + 'server = "192.0.2.53:5353"\n'))
    assert cfg.nat.stun is None and cfg.stun_servers == (StunServer("192.0.2.53", 5353),)
    assert load_config(_write(tmp_path, _account(secret_file))).stun_servers == ()  # no server, no STUN


def test_nat_stun_servers(tmp_path: Path, secret_file: Path) -> None:
    text = _account(secret_file) + ('server = "192.0.2.53:53"\n\n[nat]\nstun = ["Stun.Example.NET.:3478", '
                                    '"[2001:db8::53]:3478", "198.51.100.1:19302", "stun.example.net:3478"]\n')
    cfg = load_config(_write(tmp_path, text))
    assert cfg.stun_servers == (StunServer("stun.example.net", 3478), StunServer("2001:db8::53", 3478),
                                StunServer("198.51.100.1", 19302))  # the duplicate once
    assert [str(s) for s in cfg.stun_servers] == ["stun.example.net:3478", "[2001:db8::53]:3478",
                                                  "198.51.100.1:19302"]
    text = _account(secret_file) + 'server = "192.0.2.53:53"\n[nat]\nstun = []\n'
    empty = load_config(_write(tmp_path, text))
    assert empty.stun_servers == ()  # explicitly none


@pytest.mark.parametrize(
    ("table", "key", "said"),
    [
        ('[nat]\nstun = "192.0.2.1:3478"\n', "nat.stun", "expected an array of strings, got a string"),
        ("[nat]\nstun = [3478]\n", "nat.stun[1]", "expected a string, got 3478"),
        ('[nat]\nstun = ["192.0.2.1"]\n', "nat.stun[1]", "has no port"),
        ('[nat]\nstun = ["ok.example:1", "stun.example.net"]\n', "nat.stun[2]", "has no port"),
        ('[nat]\nstun = ["192.0.2.1:0"]\n', "nat.stun[1]", "is not a port number"),
        ('[nat]\nstun = ["2001:db8::1:3478"]\n', "nat.stun[1]", "without brackets"),
        ('[nat]\nstun = ["[2001:db8::1]"]\n', "nat.stun[1]", "has no port"),
        ('[nat]\nstun = ["1.2.3:3478"]\n', "nat.stun[1]", "is not an IPv4 address"),
        ('[nat]\nstun = ["st_un.example:3478"]\n', "nat.stun[1]", "neither an IP address nor a DNS name"),
        ("[nat]\nstun = [" + ", ".join([f'"a{i}.example:1"' for i in range(9)]) + "]\n", "nat.stun",
         "give at most 8"),
        ("[nat]\nstnu = []\n", "[nat]", 'did you mean "stun"'),
        ("[nat]\nenabled = true\n", "[nat]", "unknown key"),
    ],
)
def test_nat_errors_name_the_key_and_the_fix(tmp_path: Path, secret_file: Path, table: str, key: str,
                                             said: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _account(secret_file) + "\n" + table))
    assert e.value.key == key and said in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and "; " in str(e.value)


# --------------------------------------------------------------------------------------------------------
# Hostile values: every key, every kind of TOML value, nested tables where values belong
# --------------------------------------------------------------------------------------------------------

_KEYS = {
    "interface": ["name", "listen_port", "mtu", "state_dir", "control_socket", "suite", "offload"],
    "account": ["domain", "secret_file", "server", "name", "lease", "tsig_algorithm"],
    "portmap": ["enabled", "gateway", "lifetime"],
    "nat": ["stun"],
    "relay": ["server"],
    "names": ["enabled", "hosts_file", "short_names"],
    "timers": ["rekey_after_time", "reject_after_time", "rekey_attempt_time", "rekey_timeout",
               "keepalive_timeout", "rekey_after_messages"],
    "peer": ["name", "public_key", "endpoint", "ula"],
}
_VALUES = ["{a = 1}", "{}", "[1]", "[]", "[[1]]", "1979-05-27T07:32:00Z", "07:32:00", "inf", "nan", "-0.0",
           "1e400", "9223372036854775807", "-9223372036854775808", '""', '"\\u0000"',
           '"' + "x" * 100_000 + '"', '"\\n"', '"é"', '"/"', '"."', "true", '"[fe80::1%eth0]:53"',
           '"1.2.3.4:0"', '"::"', '"a\\"; b"']


def test_every_key_with_every_kind_of_value_is_loaded_or_one_configerror(tmp_path: Path,
                                                                          secret_file: Path) -> None:
    base = {"account": {"domain": '"home.example.net"', "secret_file": f'"{secret_file}"'},
            "peer": {"name": '"b"', "public_key": f'"{KEY1_B64}"'}}
    path = tmp_path / "tunneld.toml"
    for table, keys in _KEYS.items():
        for key in keys:
            for value in _VALUES:
                tables = {t: dict(kv) for t, kv in base.items()}
                tables.setdefault(table, {})[key] = value
                path.write_text("".join(
                    (f"[[{t}]]\n" if t == "peer" else f"[{t}]\n")
                    + "".join(f"{k} = {v}\n" for k, v in kv.items())
                    for t, kv in tables.items()))
                try:
                    load_config(path)
                except ConfigError as e:
                    assert "\n" not in str(e), (table, key, value)
                    assert str(path) in str(e)


@pytest.mark.parametrize(
    ("header", "named"),
    [("[interface.name]", "interface.name"), ("[interface.mtu]", "interface.mtu"),
     ("[portmap.enabled]", "portmap.enabled"), ("[timers.rekey_timeout]", "timers.rekey_timeout"),
     ("[[interface]]", "interface"), ("[interface.x.y]", '"x"'), ("[account.domain]", "TOML syntax error"),
     ("[peer.name]", "TOML syntax error")],
)
def test_nested_tables_where_values_belong(tmp_path: Path, secret_file: Path, header: str,
                                           named: str) -> None:
    text = _account(secret_file) + '\n[[peer]]\nname = "b"\npublic_key = "' + KEY1_B64 + '"\n'
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, f"{text}\n{header}\na = 1\n"))
    assert named in str(e.value) and "\n" not in str(e.value)


def test_a_nul_in_the_config_path_is_a_configerror(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NUL"):
        load_config(tmp_path / "a\0b")


def test_a_tls_account_carries_the_devices_client_certificate(tmp_path: Path, secret_file: Path) -> None:
    """transport = "tls" with a device name: a client certificate under the account CA (clientAuth, the
    device's name), its fresh key held in memory and shown by no repr; none for UDP."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    text = _account(secret_file) + 'server = "192.0.2.53:53"\nname = "Laptop"\ntransport = "tls"\n'
    cfg = load_config(_write(tmp_path, text))
    assert cfg.client_certificate is not None and cfg.account_ca is not None
    current = cfg.client_certificate.current(time.time())
    leaf, ca = x509.load_pem_x509_certificates(current.chain)
    assert ca.public_bytes(serialization.Encoding.PEM) == cfg.account_ca
    leaf.verify_directly_issued_by(ca)
    assert leaf.subject.rfc4514_string() == "CN=laptop.home.example.net"
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert b"PRIVATE KEY" in current.key
    assert "PRIVATE" not in repr(cfg) and "PRIVATE" not in repr(cfg.client_certificate)
    assert "PRIVATE" not in repr(current)
    again = load_config(_write(tmp_path, text)).client_certificate
    assert again is not None and again.current(time.time()).key != current.key  # a fresh key at every load
    assert load_config(_write(tmp_path, _account(secret_file))).client_certificate is None


def test_tls_public_ca_is_false_unless_set(tmp_path: Path, secret_file: Path) -> None:
    """[account] tls_public_ca: the system's CAs trusted beside the account CA only when asked for."""
    tls = _account(secret_file) + 'server = "192.0.2.53:53"\nname = "laptop"\ntransport = "tls"\n'
    assert load_config(_write(tmp_path, tls)).account.tls_public_ca is False
    assert load_config(_write(tmp_path, tls + "tls_public_ca = true\n")).account.tls_public_ca is True
    assert load_config(_write(tmp_path, tls + "tls_public_ca = false\n")).account.tls_public_ca is False
