"""The configuration file, ``/etc/tunneld/tunneld.toml``: read with tomllib, checked strictly, frozen.

Strict because a daemon that quietly ignores ``nmae = "wlan0"`` or a peer without a port fails much later and
much less clearly. Every problem is reported as one :class:`ConfigError` whose message is one line that
names the file, the key (``interface.mtu``, ``peer[2].endpoint``; peers are counted from 1 in file order)
and the fix, so the command line can print it as is and exit 2 (ARCHITECTURE.md, "Command line").

Schema::

    [interface]                      # optional, every key has a default
    name = "btmm0"                   # Linux interface name: 1..15 characters, no "/", ":" or whitespace
    listen_port = 4500               # outer UDP port, 1..65535, or 0 for any free port
    mtu = 1400                       # inner MTU, 1280 (the IPv6 minimum) .. 9000
    state_dir = "/var/lib/tunneld"   # holds device.key (tunneld.identity)
    control_socket = "/run/tunneld/control.sock"
    suite = "aes-256-gcm"            # one of crypto.aead.SUITES

    [account]                        # required
    domain = "home.example.net"      # normalized by crypto.kdf.normalize_domain
    secret_file = "/etc/tunneld/account.secret"   # one line: base64 of 32 bytes, mode 0600
    server = "192.0.2.53:53"         # optional: the DNS UPDATE server (IP literal); none: publishing off
    name = "laptop"                  # optional: this device's DNS label (default: the hostname's 1st label)
    lease = 5400                     # optional: the update lease to ask for, 1800..7200 seconds

    [[peer]]                         # any number, optional: peers are also found through DNS
    name = "laptop"                  # unique DNS label
    public_key = "<base64 of 32 bytes>"
    endpoint = "192.0.2.1:4500"      # optional; IP literal only ("[2001:db8::1]:4500"), no DNS lookups
    ula = "fd..."                    # optional; if given, must equal tunneld.identity.ula_for(domain, key)

Relative paths are taken relative to the directory of the configuration file, so a config and its secret
can be moved together (tests and ``tunneld join`` write absolute paths anyway).

Secrets: the account secret is read only to derive :attr:`Config.psk` and :attr:`Config.tsig_key` (HKDF,
crypto.kdf) and is not kept. Neither the secret nor the derived keys appear in any repr or message; public
keys are not echoed in messages either, in case a private key was pasted where a public one belongs.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import json
import os
import re
import socket
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Final, NoReturn

from crypto.aead import DEFAULT_SUITE, SUITES
from crypto.kdf import ACCOUNT_SECRET_LEN, derive_psk, derive_tsig_key, normalize_domain
from tunneld.identity import account_prefix, ula_for
from tunneld.proto.dnsupdate import DEFAULT_LEASE, MAX_LEASE, MIN_LEASE
from tunneld.proto.peer import Timers
from tunneld.proto.portmap.natpmp_wire import NATPMP_DEFAULT_LIFETIME
from tunneld.proto.records import check_name

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_CONTROL_SOCKET",
    "DEFAULT_INTERFACE",
    "DEFAULT_LISTEN_PORT",
    "DEFAULT_MTU",
    "DEFAULT_STATE_DIR",
    "MAX_MTU",
    "MIN_MTU",
    "AccountConfig",
    "Config",
    "ConfigError",
    "Endpoint",
    "InterfaceConfig",
    "PeerConfig",
    "load_account_secret",
    "load_config",
    "parse_endpoint",
]

DEFAULT_CONFIG_PATH: Final = Path("/etc/tunneld/tunneld.toml")
DEFAULT_INTERFACE: Final = "btmm0"
DEFAULT_LISTEN_PORT: Final = 4500
"""RFC 3948's port: the port NATs and middleboxes expect ESP-in-UDP on."""
DEFAULT_MTU: Final = 1400
"""Leaves room for outer IPv4/UDP/ESP overhead (about 70 bytes) under a 1500-byte path MTU, with slack for
PPPoE and similar links."""
MIN_MTU: Final = 1280
"""RFC 8200 §5: every IPv6 link must carry 1280-byte packets; the TUN carries IPv6."""
MAX_MTU: Final = 9000
"""Jumbo frames; larger inner packets could not be carried without fragmenting the outer UDP anyway."""
DEFAULT_STATE_DIR: Final = Path("/var/lib/tunneld")
DEFAULT_CONTROL_SOCKET: Final = Path("/run/tunneld/control.sock")

_IFNAMSIZ = 16  # Linux: interface names are at most 15 bytes plus the NUL
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
_MAX_FILE = 1 << 20  # a config or secret file is tiny; do not read /dev/zero until memory runs out
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")

_TABLES: Final = ("interface", "account", "peer", "timers", "portmap")
_PORTMAP_KEYS: Final = ("enabled", "gateway", "lifetime")
_TIMER_KEYS: Final = ("rekey_after_time", "reject_after_time", "rekey_attempt_time", "rekey_timeout",
                      "keepalive_timeout", "rekey_after_messages")
_INTERFACE_KEYS: Final = ("name", "listen_port", "mtu", "state_dir", "control_socket", "suite", "offload")
_ACCOUNT_KEYS: Final = ("domain", "secret_file", "server", "name", "lease", "tsig_algorithm")
_TSIG_ALGORITHMS: Final = ("hmac-sha256", "hmac-md5")
_PEER_KEYS: Final = ("name", "public_key", "endpoint", "ula")


class ConfigError(Exception):
    """Anything wrong with the configuration: one line naming the file, the key and the fix.

    ``key`` is the dotted key (``peer[2].endpoint``) or table (``[interface]``) concerned, or None for a
    problem with the file as a whole; the message already contains it.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        # One line, whatever ended up in it (a path with a newline, say): the CLI prints it as one line.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
        self.key = key


# --------------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A peer's outer UDP address: an IP literal and a port."""

    host: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __str__(self) -> str:
        if isinstance(self.host, ipaddress.IPv6Address):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class InterfaceConfig:
    """``[interface]``: the local TUN device and the outer socket."""

    name: str = DEFAULT_INTERFACE
    listen_port: int = DEFAULT_LISTEN_PORT
    mtu: int = DEFAULT_MTU
    state_dir: Path = DEFAULT_STATE_DIR
    control_socket: Path = DEFAULT_CONTROL_SOCKET
    suite: str = DEFAULT_SUITE
    # TUN segmentation offload: superpackets from the kernel, sealed and coalesced in runs (the fast path;
    # the device falls back to plain packets by itself where the kernel refuses).
    offload: bool = True


@dataclass(frozen=True)
class AccountConfig:
    """``[account]``: the domain (normalized) and where the secret lives; the secret itself is not kept.

    ``server`` is the DNS UPDATE server our records are published to (None: publishing is off); ``name``
    is this device's DNS label (None only when no name was given, the hostname is not a valid label and
    publishing is off); ``lease`` is the update lease asked for, in seconds."""

    domain: str
    secret_file: Path
    server: Endpoint | None = None
    name: str | None = None
    lease: int = DEFAULT_LEASE
    tsig_algorithm: str = "hmac-sha256"  # hmac-md5 for old servers that know nothing better


@dataclass(frozen=True)
class PeerConfig:
    """One ``[[peer]]``. ``ula`` is always set: derived from the key, checked against the file if given."""

    name: str
    public_key: bytes
    ula: ipaddress.IPv6Address
    endpoint: Endpoint | None = None

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key).decode("ascii")


@dataclass(frozen=True)
class PortmapConfig:
    """[portmap]: NAT-PMP/PCP on the default gateway (or `gateway`), asking for `lifetime` seconds."""

    enabled: bool = True
    gateway: str | None = None
    lifetime: int = NATPMP_DEFAULT_LIFETIME


@dataclass(frozen=True)
class Config:
    """The whole configuration, validated. ``psk`` and ``tsig_key`` are derived from the account secret."""

    path: Path
    interface: InterfaceConfig
    account: AccountConfig
    peers: tuple[PeerConfig, ...]
    psk: bytes = field(repr=False)
    tsig_key: bytes = field(repr=False)
    timers: Timers = field(default_factory=Timers)
    portmap: PortmapConfig = field(default_factory=PortmapConfig)

    @property
    def prefix(self) -> ipaddress.IPv6Network:
        """The account's /48 (tunneld.identity.account_prefix)."""
        return account_prefix(self.account.domain)

    def peer(self, name: str) -> PeerConfig | None:
        """The configured peer called ``name`` (DNS names compare case-insensitively), if any."""
        wanted = name.lower()
        return next((p for p in self.peers if p.name.lower() == wanted), None)


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


class _Problem(Exception):
    """A problem with a value, before it is known which file and key it belongs to."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


def load_config(path: Path) -> Config:
    """Read, check and derive the configuration in ``path``; raise ConfigError for anything wrong."""
    return _Loader(Path(path)).load()


def load_account_secret(path: Path) -> bytes:
    """The 32-byte account secret in ``path`` (for commands given ``--secret-file`` directly).

    Raises ConfigError naming the file and the fix. The secret's bytes never appear in the message.
    """
    path = Path(path)
    try:
        return _read_secret(path)
    except _Problem as p:
        raise ConfigError(f"{p.problem}; {p.fix}", key=None) from None


def parse_endpoint(text: str) -> Endpoint:
    """``"192.0.2.1:4500"`` or ``"[2001:db8::1]:4500"`` → Endpoint; ValueError(problem; fix) otherwise.

    Only IP literals: resolving names here would make loading the config depend on the network, and a
    device's name is looked up through the account's DNS anyway (its SRV and A/AAAA records).
    """
    try:
        return _parse_endpoint(text)
    except _Problem as p:
        raise ValueError(f"{p.problem}; {p.fix}") from None


def _show(value: object) -> str:
    """A short, one-line rendering of a value from the file, for messages."""
    if isinstance(value, str):
        text = json.dumps(value)  # double quotes, like TOML, with control characters escaped
        return text if len(text) <= 70 else text[:60] + '…"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return _type_name(value)


def _type_name(value: object) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        return "a date/time"
    return type(value).__name__


def _unknown(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f"unknown key {_show(key)}{hint}"


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.absolute().parent  # relative paths stay valid if the daemon changes directory

    def fail(self, key: str | None, problem: str, fix: str) -> NoReturn:
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        raise ConfigError(f"{where}{problem}; {fix}", key=key)

    # -- the file ------------------------------------------------------------------------------------------

    def read(self) -> dict[str, object]:
        try:
            with open(self.path, "rb") as f:
                data = f.read(_MAX_FILE + 1)
        except FileNotFoundError:
            self.fail(
                None,
                "no such file",
                "create it with `tunneld join DOMAIN --server HOST --secret-file F`, or pass --config PATH",
            )
        except OSError as e:
            self.fail(
                None,
                f"cannot read: {e.strerror}",
                "check the path and its permissions, or pass --config PATH",
            )
        if len(data) > _MAX_FILE:
            self.fail(None, f"larger than {_MAX_FILE} bytes", "is this the right file? pass --config PATH")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(None, f"not UTF-8 text (byte {e.start})", "save the file as UTF-8, as TOML requires")
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            # tomllib's messages end in "(at line L, column C)", which is the part the user needs.
            self.fail(None, f"TOML syntax error: {e}", "fix the syntax at that line (see https://toml.io)")

    def load(self) -> Config:
        doc = self.read()
        for key, value in doc.items():
            if key not in _TABLES:
                what = f"unknown table [{key}]" if isinstance(value, dict) else _unknown(key, _TABLES)
                self.fail(None, what, "known tables: [interface], [account], [[peer]], [timers], [portmap]")

        interface = self.interface(self.table(doc, "interface", required=False))
        account_table = self.table(doc, "account", required=True)
        account, secret = self.account(account_table)
        peers = self.peers(doc.get("peer"), account.domain)
        timers = self.timers(self.table(doc, "timers", required=False))
        portmap = self.portmap(self.table(doc, "portmap", required=False))
        return Config(
            path=self.path,
            interface=interface,
            account=account,
            peers=peers,
            timers=timers,
            portmap=portmap,
            psk=derive_psk(secret, account.domain),
            tsig_key=derive_tsig_key(secret, account.domain),
        )

    def table(self, doc: Mapping[str, object], name: str, *, required: bool) -> dict[str, object]:
        value = doc.get(name)
        if value is None:
            if required:
                self.fail(
                    f"[{name}]",
                    "missing",
                    'add an [account] table with domain = "home.example.net" and secret_file = "/path"',
                )
            return {}
        if not isinstance(value, dict):
            self.fail(name, f"expected a table, got {_type_name(value)}", f"write it as a [{name}] table")
        return value

    def check_keys(self, table: Mapping[str, object], where: str, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self.fail(where, _unknown(key, known), "known keys: " + ", ".join(known))

    # -- typed values ----------------------------------------------------------------------------------------

    def string(self, table: Mapping[str, object], where: str, key: str, example: str) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(f"{where}.{key}", f"expected a string, got {_show(value)}", f"write {key} = {example}")
        return value

    def required_string(self, table: Mapping[str, object], where: str, key: str, example: str) -> str:
        value = self.string(table, where, key, example)
        if value is None:
            self.fail(f"{where}.{key}", "missing", f"add {key} = {example}")
        return value

    def integer(self, table: Mapping[str, object], where: str, key: str, default: int, example: str) -> int:
        value = table.get(key, default)
        # TOML booleans are Python bools, which are ints: refuse them explicitly.
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(
                f"{where}.{key}", f"expected an integer, got {_show(value)}", f"write {key} = {example}"
            )
        return value

    def path_value(
        self, table: Mapping[str, object], where: str, key: str, default: Path | None
    ) -> Path | None:
        text = self.string(table, where, key, '"/absolute/path"')
        if text is None:
            return default
        if not text or "\0" in text:
            self.fail(
                f"{where}.{key}", f"{_show(text)} is not a path", 'write a path, e.g. "/var/lib/tunneld"'
            )
        return self.base / text  # an absolute `text` replaces the base

    def seconds(self, table: Mapping[str, object], where: str, key: str, default: float) -> float:
        value = table.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1e9:
            self.fail(f"{where}.{key}", f"expected a positive number of seconds, got {_show(value)}",
                      f"write {key} = {default:g}")
        return float(value)

    # -- tables ----------------------------------------------------------------------------------------------

    def portmap(self, table: Mapping[str, object]) -> PortmapConfig:
        """[portmap]: keep the tunnel port open on the home router by NAT-PMP/PCP (RFC 6886/6887)."""
        self.check_keys(table, "[portmap]", _PORTMAP_KEYS)
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            self.fail("portmap.enabled", f"expected true or false, got {_show(enabled)}",
                      "write enabled = true")
        gateway = self.string(table, "portmap", "gateway", '"192.168.1.1"')
        if gateway is not None:
            try:
                gateway = str(ipaddress.IPv4Address(gateway))
            except ValueError:
                self.fail("portmap.gateway", f"{_show(gateway)} is not an IPv4 address",
                          'write the router\'s LAN address, e.g. "192.168.1.1", or leave it out to use the '
                          "default gateway")
        lifetime = self.integer(table, "portmap", "lifetime", NATPMP_DEFAULT_LIFETIME,
                                str(NATPMP_DEFAULT_LIFETIME))
        if not 120 <= lifetime <= 86400:
            self.fail("portmap.lifetime", f"{lifetime} is out of range",
                      f"use 120 to 86400 seconds (RFC 6886 recommends {NATPMP_DEFAULT_LIFETIME})")
        return PortmapConfig(enabled=enabled, gateway=gateway, lifetime=lifetime)

    def timers(self, table: Mapping[str, object]) -> Timers:
        """[timers]: the protocol's timers (WireGuard's values by default); tests shorten them."""
        self.check_keys(table, "[timers]", _TIMER_KEYS)
        d = Timers()
        t = Timers(
            rekey_after_time=self.seconds(table, "timers", "rekey_after_time", d.rekey_after_time),
            reject_after_time=self.seconds(table, "timers", "reject_after_time", d.reject_after_time),
            rekey_attempt_time=self.seconds(table, "timers", "rekey_attempt_time", d.rekey_attempt_time),
            rekey_timeout=self.seconds(table, "timers", "rekey_timeout", d.rekey_timeout),
            keepalive_timeout=self.seconds(table, "timers", "keepalive_timeout", d.keepalive_timeout),
            rekey_after_messages=self.integer(table, "timers", "rekey_after_messages",
                                              d.rekey_after_messages, "1152921504606846976"),
        )
        if t.rekey_after_messages < 1:
            self.fail("timers.rekey_after_messages", "must be at least 1", "use the default, 2^60")
        if t.reject_after_time <= t.rekey_after_time + t.rekey_timeout:
            self.fail("timers.reject_after_time",
                      f"{t.reject_after_time:g} s leaves no time to rekey after {t.rekey_after_time:g} s",
                      "make it larger than rekey_after_time + rekey_timeout (defaults 180 > 120 + 5)")
        return t

    def interface(self, table: Mapping[str, object]) -> InterfaceConfig:
        self.check_keys(table, "[interface]", _INTERFACE_KEYS)
        w = "interface"

        name = self.string(table, w, "name", '"btmm0"')
        if name is None:
            name = DEFAULT_INTERFACE
        else:
            try:
                _check_ifname(name)
            except _Problem as p:
                self.fail(f"{w}.name", p.problem, p.fix)

        listen_port = self.integer(table, w, "listen_port", DEFAULT_LISTEN_PORT, "4500")
        if not 0 <= listen_port <= 65535:
            self.fail(
                f"{w}.listen_port", f"{listen_port} is out of range", "use 1 to 65535, or 0 for any free port"
            )

        mtu = self.integer(table, w, "mtu", DEFAULT_MTU, str(DEFAULT_MTU))
        if not MIN_MTU <= mtu <= MAX_MTU:
            self.fail(
                f"{w}.mtu",
                f"{mtu} is out of range",
                f"use {MIN_MTU} (the IPv6 minimum) to {MAX_MTU}, e.g. {DEFAULT_MTU}",
            )

        state_dir = self.path_value(table, w, "state_dir", DEFAULT_STATE_DIR)
        control_socket = self.path_value(table, w, "control_socket", DEFAULT_CONTROL_SOCKET)
        assert state_dir is not None and control_socket is not None
        size = len(os.fsencode(control_socket))
        if size > _SUN_PATH_MAX:
            self.fail(
                f"{w}.control_socket",
                f"the path is {size} bytes long, over the {_SUN_PATH_MAX}-byte limit of a Unix socket path",
                'choose a shorter path, e.g. "/run/tunneld/control.sock"',
            )

        suite = self.string(table, w, "suite", f'"{DEFAULT_SUITE}"')
        if suite is None:
            suite = DEFAULT_SUITE
        elif suite not in SUITES:
            self.fail(f"{w}.suite", f"{_show(suite)} is not a known suite", "use one of " + ", ".join(SUITES))

        offload = table.get("offload", True)
        if not isinstance(offload, bool):
            self.fail(f"{w}.offload", f"expected true or false, got {_show(offload)}",
                      "write offload = true (the default) or offload = false")

        return InterfaceConfig(
            name=name,
            listen_port=listen_port,
            mtu=mtu,
            state_dir=state_dir,
            control_socket=control_socket,
            suite=suite,
            offload=offload,
        )

    def account(self, table: Mapping[str, object]) -> tuple[AccountConfig, bytes]:
        self.check_keys(table, "[account]", _ACCOUNT_KEYS)
        w = "account"
        raw_domain = self.required_string(table, w, "domain", '"home.example.net"')
        try:
            domain = normalize_domain(raw_domain)
        except ValueError as e:
            self.fail(
                f"{w}.domain",
                f"{_show(raw_domain)} is not a valid domain ({e})",
                'give the account\'s DNS name, e.g. "home.example.net"',
            )
        self.required_string(table, w, "secret_file", '"/etc/tunneld/account.secret"')
        secret_file = self.path_value(table, w, "secret_file", None)
        assert secret_file is not None
        try:
            secret = _read_secret(secret_file)
        except _Problem as p:
            self.fail(f"{w}.secret_file", p.problem, p.fix)

        server = None
        server_text = self.string(table, w, "server", '"192.0.2.53:53"')
        if server_text is not None:
            try:
                server = _parse_endpoint(server_text)
            except _Problem as p:
                self.fail(f"{w}.server", p.problem,
                          'write the DNS UPDATE server as "address:port", e.g. "192.0.2.53:53" or '
                          '"[2001:db8::53]:53", or leave server out to turn publishing off')

        name = self.string(table, w, "name", '"laptop"')
        if name is not None:
            try:
                check_name(name)
            except ValueError as e:
                self.fail(f"{w}.name", str(e), 'write e.g. name = "laptop"')
        else:
            name = _default_device_name()
            if name is None and server is not None:
                self.fail(f"{w}.name", "missing, and the hostname's first label is not a valid DNS label",
                          'add name = "laptop" (1 to 63 letters, digits and inner hyphens)')

        lease = self.integer(table, w, "lease", DEFAULT_LEASE, str(DEFAULT_LEASE))
        if not MIN_LEASE <= lease <= MAX_LEASE:
            self.fail(f"{w}.lease", f"{lease} is out of range",
                      f"use {MIN_LEASE} to {MAX_LEASE} seconds (default {DEFAULT_LEASE})")
        algorithm = self.string(table, w, "tsig_algorithm", '"hmac-sha256"') or "hmac-sha256"
        if algorithm not in _TSIG_ALGORITHMS:
            self.fail(f"{w}.tsig_algorithm", f"{_show(algorithm)} is not supported",
                      'use "hmac-sha256" (the default), or "hmac-md5" for an old server')
        return AccountConfig(domain=domain, secret_file=secret_file, server=server, name=name,
                             lease=lease, tsig_algorithm=algorithm), secret

    def peers(self, value: object, domain: str) -> tuple[PeerConfig, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            self.fail(
                "peer", f"expected an array of tables, got {_type_name(value)}", "write each peer as [[peer]]"
            )
        peers: list[PeerConfig] = []
        names: dict[str, int] = {}
        keys: dict[bytes, int] = {}
        for i, table in enumerate(value, start=1):
            w = f"peer[{i}]"
            self.check_keys(table, w, _PEER_KEYS)

            name = self.required_string(table, w, "name", '"laptop"')
            if not _DNS_LABEL.match(name):
                self.fail(
                    f"{w}.name",
                    f"{_show(name)} is not a DNS label",
                    'use 1 to 63 letters, digits and inner hyphens, e.g. "laptop"',
                )
            if name.lower() in names:
                self.fail(
                    f"{w}.name",
                    f"{_show(name)} is already the name of peer[{names[name.lower()]}]",
                    "give each peer its own name",
                )
            names[name.lower()] = i

            b64 = self.required_string(table, w, "public_key", '"<the peer\'s public key in base64>"')
            try:
                public_key = _decode_public_key(b64)
            except _Problem as p:
                self.fail(f"{w}.public_key", p.problem, p.fix)
            if public_key in keys:
                self.fail(
                    f"{w}.public_key",
                    f"the same key as peer[{keys[public_key]}]",
                    "each device has its own key; copy this peer's public key again",
                )
            keys[public_key] = i

            endpoint = None
            endpoint_text = self.string(table, w, "endpoint", '"192.0.2.1:4500"')
            if endpoint_text is not None:
                try:
                    endpoint = _parse_endpoint(endpoint_text)
                except _Problem as p:
                    self.fail(f"{w}.endpoint", p.problem, p.fix)

            ula = ula_for(domain, public_key)
            ula_text = self.string(table, w, "ula", f'"{ula}"')
            if ula_text is not None:
                try:
                    claimed = ipaddress.IPv6Address(ula_text)
                except ValueError:
                    self.fail(
                        f"{w}.ula",
                        f"{_show(ula_text)} is not an IPv6 address",
                        "remove the line (the ULA is derived from public_key)",
                    )
                if claimed != ula:
                    self.fail(
                        f"{w}.ula",
                        f"{claimed} does not match peer {_show(name)}'s public key, which gives {ula}",
                        "remove the line (the ULA is derived from public_key) or correct public_key",
                    )
            peers.append(PeerConfig(name=name, public_key=public_key, ula=ula, endpoint=endpoint))
        return tuple(peers)


# --------------------------------------------------------------------------------------------------------
# Value checks (raise _Problem; the loader adds the file and key)
# --------------------------------------------------------------------------------------------------------


def _check_ifname(name: str) -> None:
    # Linux dev_valid_name(): not empty, shorter than IFNAMSIZ, not "." or "..", no "/", ":" or whitespace.
    # We also keep to printable ASCII, so the name is safe in logs and shell commands.
    fix = 'use 1 to 15 characters without "/", ":" or whitespace, e.g. "btmm0"'
    if not name:
        raise _Problem("is empty", fix)
    if len(name.encode("utf-8")) >= _IFNAMSIZ:
        raise _Problem(f"{_show(name)} is longer than {_IFNAMSIZ - 1} bytes", fix)
    if name in (".", "..") or any(
        c in "/:" or not c.isascii() or not c.isprintable() or c.isspace() for c in name
    ):
        raise _Problem(f"{_show(name)} is not a valid Linux interface name", fix)


def _default_device_name() -> str | None:
    """The hostname's first label, lower-cased, if it is a valid device name."""
    label = socket.gethostname().split(".")[0].lower()
    try:
        return check_name(label)
    except ValueError:
        return None


def _decode_public_key(text: str) -> bytes:
    fix = 'copy the peer\'s public key exactly: 44 characters of base64, ending in "="'
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _Problem("not valid base64", fix) from None
    if len(raw) != 32:
        raise _Problem(f"decodes to {len(raw)} bytes, not 32", fix)
    return raw


def _parse_endpoint(text: str) -> Endpoint:
    fix = 'write "host:port" with an IP address, e.g. "192.0.2.1:4500" or "[2001:db8::1]:4500"'
    shown = _show(text)
    host: ipaddress.IPv4Address | ipaddress.IPv6Address
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise _Problem(f"{shown} has no closing bracket", fix)
        host_text, rest = text[1:close], text[close + 1 :]
        if not rest:
            raise _Problem(f"{shown} has no port", fix)
        if not rest.startswith(":"):
            raise _Problem(f"{shown} has something other than :port after the address", fix)
        port_text = rest[1:]
        try:
            host = ipaddress.IPv6Address(host_text)
        except ValueError:
            raise _Problem(f"{_show(host_text)} is not an IPv6 address", fix) from None
    else:
        host_text, colon, port_text = text.rpartition(":")
        if not colon:
            raise _Problem(f"{shown} has no port", fix)
        if ":" in host_text:
            raise _Problem(
                f"{shown} looks like an IPv6 address without brackets",
                'write "[v6]:port", e.g. "[2001:db8::1]:4500"',
            )
        try:
            host = ipaddress.IPv4Address(host_text)
        except ValueError:
            raise _Problem(
                f"{_show(host_text)} is not an IP address (names are not resolved here)",
                fix + "; leave endpoint out to find the peer through DNS",
            ) from None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise _Problem(f"{_show(port_text)} is not a port number", "use a port from 1 to 65535, e.g. 4500")
    return Endpoint(host, int(port_text))


def _read_secret(path: Path) -> bytes:
    """The account secret in ``path``. Problems name the file only: its content is never echoed."""
    made_by = "the first line printed by `tunneld account new DOMAIN`"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise _Problem(
            f"{path} does not exist", f"save the account secret there ({made_by}), mode 0600"
        ) from None
    except OSError as e:
        raise _Problem(
            f"cannot read {path}: {e.strerror}", "run tunneld as the file's owner, or fix its owner"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Problem(
                f"{path} is not a regular file", f"point secret_file at the file holding {made_by}"
            )
        if st.st_uid not in (os.geteuid(), 0):
            raise _Problem(
                f"{path} is owned by uid {st.st_uid}, not by this user",
                f"run `chown {os.geteuid()} {path}` if that is intended",
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise _Problem(
                f"{path} has mode {mode:04o}, which lets group or others access the account secret",
                f"run `chmod 600 {path}`",
            )
        data = os.read(fd, 4096)
    except OSError as e:
        raise _Problem(f"cannot read {path}: {e.strerror}", "check the file") from None
    finally:
        os.close(fd)

    fix = f"it must hold exactly one line, the base64 of {ACCOUNT_SECRET_LEN} bytes ({made_by})"
    body = data[:-1] if data.endswith(b"\n") else data
    if not body:
        raise _Problem(f"{path} is empty", fix)
    lines = body.count(b"\n") + 1
    if lines > 1:
        raise _Problem(f"{path} has {lines} lines", fix)
    try:
        secret = base64.b64decode(body.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _Problem(f"{path} is not valid base64", fix) from None
    if len(secret) != ACCOUNT_SECRET_LEN:
        raise _Problem(f"{path} decodes to {len(secret)} bytes, not {ACCOUNT_SECRET_LEN}", fix)
    return secret
