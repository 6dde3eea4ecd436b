"""The configuration file, ``/etc/tunneld/tunneld.toml``: read with tomllib, checked strictly, frozen.

Strict because a daemon that quietly ignores ``nmae = "wlan0"`` or a peer without a port fails much later and
much less clearly. Every problem is reported as one :class:`ConfigError` whose message is one line that
names the file, the key (``interface.mtu``, ``peer[2].endpoint``; peers are counted from 1 in file order)
and the fix, so the command line can print it as is and exit 2 (docs/architecture.md, "Contracts").

Schema::

    [interface]                      # optional, every key has a default
    name = "btmm0"                   # Linux interface name: 1..15 characters, no "/", ":" or whitespace
    listen_port = 4500               # outer UDP port, 1..65535, or 0 for any free port
    mtu = 1400                       # inner MTU, 1280 (the IPv6 minimum) .. 9000
    state_dir = "/var/lib/tunneld"   # holds device.key (tunneld.identity)
    control_socket = "/run/tunneld/control.sock"
    suite = "aes-256-gcm"            # one of tunneld.crypto.aead.SUITES
    offload = true                   # TUN segmentation offload (the fast path)

    [account]                        # required
    domain = "home.example.net"      # normalized by tunneld.crypto.kdf.normalize_domain
    secret_file = "/etc/tunneld/account.secret"   # one line: base64 of 32 bytes, mode 0600
    server = "192.0.2.53:53"         # optional: the DNS UPDATE server (IP literal); none: publishing off
    name = "laptop"                  # optional: this device's DNS label (default: the hostname's 1st label)
    lease = 5400                     # optional: the update lease to ask for, 1800..7200 seconds
    tsig_algorithm = "hmac-sha256"   # optional: or "hmac-md5" for an old server
    transport = "udp"                # optional: "tls": UPDATEs over DNS over TLS, to the server host:853
    tls_public_ca = false            # optional, with "tls": the system's CAs too, not the account CA alone

    [ssh]                            # optional; "" turns either off
    host_keys = "/etc/ssh/ssh_host_*_key.pub"    # a glob: the host keys published as SSHFP + TXT
    known_hosts = "/etc/ssh/ssh_known_hosts"     # gets the peers' host keys in a marked block

    [[peer]]                         # any number, optional: peers are also found through DNS
    name = "laptop"                  # unique DNS label
    public_key = "<base64 of 32 bytes>"
    endpoint = "192.0.2.1:4500"      # optional; IP literal only ("[2001:db8::1]:4500"), no DNS lookups
    ula = "fd..."                    # optional; if given, must equal tunneld.identity.ula_for(domain, key)

    [portmap]                        # optional: NAT-PMP/PCP; enabled = true, gateway = "192.168.1.1",
                                     # lifetime = 7200 (120..86400 seconds)
    [nat]                            # optional: stun = ["host:port", ...] (default: the account's server)
    [relay]                          # optional: the TURN relay, server = "turn.example.net:3478" (a name
                                     # or an IP literal; port 3478 if left out). Without it the relay is
                                     # found as _turn._udp.DOMAIN SRV (RFC 5928), if there is one
    [names]                          # optional: enabled = true, hosts_file = "/etc/hosts", short_names = true
    [metrics]                        # optional: listen = "127.0.0.1:9586" (Prometheus text; off without)
    [service]                        # optional: user = "tunneld" (run as it after start-up; "root": stay)
    [timers]                         # optional: the protocol's timers (tunneld.proto.peer.Timers), in seconds

Relative paths are taken relative to the directory of the configuration file, so a config and its secret
can be moved together (tests and ``tunneld join`` write absolute paths anyway).

Secrets: the account secret is read only to derive :attr:`Config.psk`, :attr:`Config.tsig_key` and
:attr:`Config.turn_secret` (HKDF, crypto.kdf) and is not kept. Neither the secret nor the derived keys appear
in any repr or message; public keys are not echoed in messages either, in case a private key was pasted
where a public one belongs.

This module is the reader; the values it builds are in tunneld.config_model and the parsers of single values
in tunneld.config_values. The public names of both are re-exported here.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

from tunneld import config_values as values
from tunneld.config_model import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_HOSTS_FILE,
    DEFAULT_INTERFACE,
    DEFAULT_LISTEN_PORT,
    DEFAULT_MTU,
    DEFAULT_STATE_DIR,
    DEFAULT_TURN_PORT,
    MAX_MTU,
    MIN_MTU,
    AccountConfig,
    ClientCertificate,
    Config,
    ConfigError,
    Endpoint,
    InterfaceConfig,
    MetricsConfig,
    NamesConfig,
    NatConfig,
    PeerConfig,
    PortmapConfig,
    RelayConfig,
    ServiceConfig,
    SshConfig,
    StunServer,
)
from tunneld.config_reader import TableReader, unknown_key
from tunneld.config_values import Problem, show, type_name
from tunneld.crypto.aead import DEFAULT_SUITE, SUITES
from tunneld.crypto.kdf import derive_psk, derive_tsig_key, derive_turn_secret, normalize_domain
from tunneld.identity import ula_for
from tunneld.proto.dnsupdate import DEFAULT_LEASE, MAX_LEASE, MIN_LEASE
from tunneld.proto.peer import Timers
from tunneld.proto.portmap.natpmp_wire import NATPMP_DEFAULT_LIFETIME
from tunneld.proto.records import check_name

if TYPE_CHECKING:
    from tunneld.device_cert import DeviceCertificates

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
    "ClientCertificate",
    "Config",
    "ConfigError",
    "Endpoint",
    "InterfaceConfig",
    "MetricsConfig",
    "NamesConfig",
    "NatConfig",
    "PeerConfig",
    "PortmapConfig",
    "RelayConfig",
    "ServiceConfig",
    "SshConfig",
    "StunServer",
    "load_account_secret",
    "load_config",
    "parse_endpoint",
]

_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")

_TABLES: Final = ("interface", "account", "peer", "timers", "portmap", "nat", "relay", "names", "ssh",
                   "metrics", "service")
_NAMES_KEYS: Final = ("enabled", "hosts_file", "short_names")
_PORTMAP_KEYS: Final = ("enabled", "gateway", "lifetime")
_NAT_KEYS: Final = ("stun",)
_MAX_STUN_SERVERS: Final = 8
_TIMER_KEYS: Final = ("rekey_after_time", "reject_after_time", "rekey_attempt_time", "rekey_timeout",
                      "keepalive_timeout", "rekey_after_messages")
_INTERFACE_KEYS: Final = ("name", "listen_port", "mtu", "state_dir", "control_socket", "suite", "offload")
_ACCOUNT_KEYS: Final = ("domain", "secret_file", "server", "name", "lease", "tsig_algorithm", "transport",
                        "tls_public_ca")
_TRANSPORTS: Final = ("udp", "tls")
_TSIG_ALGORITHMS: Final = ("hmac-sha256", "hmac-md5")
_PEER_KEYS: Final = ("name", "public_key", "endpoint", "ula")

def load_config(path: Path, *, secret_file: Path | None = None) -> Config:
    """Read, check and derive the configuration in ``path``; raise ConfigError for anything wrong.
    ``secret_file`` (a systemd credential, say) replaces the config's ``[account] secret_file``."""
    return _Loader(Path(path), secret_file).load()


def load_account_secret(path: Path) -> bytes:
    """The 32-byte account secret in ``path`` (for commands given ``--secret-file`` directly).

    Raises ConfigError naming the file and the fix. The secret's bytes never appear in the message.
    """
    path = Path(path)
    try:
        return values.account_secret(path)
    except Problem as p:
        raise ConfigError(str(p), key=None) from None


def parse_endpoint(text: str) -> Endpoint:
    """``"192.0.2.1:4500"`` or ``"[2001:db8::1]:4500"`` → Endpoint; ValueError(problem; fix) otherwise.

    Only IP literals: resolving names here would make loading the config depend on the network, and a
    device's name is looked up through the account's DNS anyway (its SRV and A/AAAA records).
    """
    try:
        return values.endpoint(text)
    except Problem as p:
        raise ValueError(str(p)) from None


def _account_tls(secret: bytes, domain: str, device: str | None) -> tuple[bytes, DeviceCertificates | None]:
    """The account CA's certificate (PEM), and for a named device its client certificates under that CA
    (the first issued now, renewed while the daemon runs)."""
    from tunneld.accountca import account_ca  # x509: only when TLS is used
    from tunneld.device_cert import DeviceCertificates

    ca = account_ca(secret, domain)
    if device is None:
        return ca.pem, None
    return ca.pem, DeviceCertificates(ca, device, time.time())


class _Loader(TableReader):
    def __init__(self, path: Path, secret_file: Path | None = None) -> None:
        super().__init__(path)
        self.secret_file = secret_file

    def load(self) -> Config:
        doc = self.read()
        for key, value in doc.items():
            if key not in _TABLES:
                what = f"unknown table [{key}]" if isinstance(value, dict) else unknown_key(key, _TABLES)
                self.fail(None, what, "known tables: [interface], [account], [[peer]], [timers], [portmap], "
                          "[nat], [relay], [names], [ssh], [metrics], [service]")

        interface = self.interface(self.table(doc, "interface", required=False))
        account_table = self.table(doc, "account", required=True)
        account, secret = self.account(account_table)
        tls = _account_tls(secret, account.domain, account.name) if account.transport == "tls" else None
        peers = self.peers(doc.get("peer"), account.domain)
        timers = self.timers(self.table(doc, "timers", required=False))
        portmap = self.portmap(self.table(doc, "portmap", required=False))
        nat = self.nat(self.table(doc, "nat", required=False))
        relay = self.relay(self.table(doc, "relay", required=False))
        ssh = self.ssh(self.table(doc, "ssh", required=False))
        names = self.names(self.table(doc, "names", required=False))
        metrics_table = self.table(doc, "metrics", required=False)
        self.check_keys(metrics_table, "[metrics]", ("listen",))
        listen = self.string(metrics_table, "metrics", "listen", '"127.0.0.1:9586"')
        service_table = self.table(doc, "service", required=False)
        self.check_keys(service_table, "[service]", ("user",))
        user = self.string(service_table, "service", "user", '"tunneld"')
        return Config(
            path=self.path,
            interface=interface,
            account=account,
            peers=peers,
            timers=timers,
            portmap=portmap,
            nat=nat,
            relay=relay,
            ssh=ssh,
            names=names,
            metrics=MetricsConfig(None if listen is None else
                                  self.parsed("metrics.listen", values.listen_address, listen)),
            service=ServiceConfig(self.parsed("service.user", values.user_name, user)),
            psk=derive_psk(secret, account.domain),
            tsig_key=derive_tsig_key(secret, account.domain),
            turn_secret=derive_turn_secret(secret, account.domain).encode("ascii"),
            account_ca=tls[0] if tls else None,
            client_certificate=tls[1] if tls else None,
        )

    # -- tables ----------------------------------------------------------------------------------------------

    def portmap(self, table: Mapping[str, object]) -> PortmapConfig:
        """[portmap]: keep the tunnel port open on the home router by NAT-PMP/PCP (RFC 6886/6887)."""
        self.check_keys(table, "[portmap]", _PORTMAP_KEYS)
        enabled = self.boolean(table, "portmap", "enabled", "write enabled = true")
        gateway = self.string(table, "portmap", "gateway", '"192.168.1.1"')
        if gateway is not None:
            try:
                gateway = str(ipaddress.IPv4Address(gateway))
            except ValueError:
                self.fail("portmap.gateway", f"{show(gateway)} is not an IPv4 address",
                          'write the router\'s LAN address, e.g. "192.168.1.1", or leave it out to use the '
                          "default gateway")
        lifetime = self.bounded(table, "portmap", "lifetime", NATPMP_DEFAULT_LIFETIME, 120, 86400,
                                f"use 120 to 86400 seconds (RFC 6886 recommends {NATPMP_DEFAULT_LIFETIME})")
        return PortmapConfig(enabled=enabled, gateway=gateway, lifetime=lifetime)

    def nat(self, table: Mapping[str, object]) -> NatConfig:
        """[nat]: the STUN servers that tell the endpoint a NAT gives us (docs/nat.md)."""
        self.check_keys(table, "[nat]", _NAT_KEYS)
        value = table.get("stun")
        if value is None:
            return NatConfig()
        fix = 'write stun = ["host:port", ...], e.g. ["stun.example.net:3478"], or [] for no STUN'
        if not isinstance(value, list):
            self.fail("nat.stun", f"expected an array of strings, got {type_name(value)}", fix)
        for i, v in enumerate(value, start=1):
            if not isinstance(v, str):
                self.fail(f"nat.stun[{i}]", f"expected a string, got {show(v)}", fix)
        if len(value) > _MAX_STUN_SERVERS:
            self.fail("nat.stun", f"{len(value)} servers", f"give at most {_MAX_STUN_SERVERS} (two suffice)")
        servers = tuple(self.parsed(f"nat.stun[{i}]", values.stun_server, v)
                        for i, v in enumerate(value, start=1))
        return NatConfig(stun=tuple(dict.fromkeys(servers)))

    def relay(self, table: Mapping[str, object]) -> RelayConfig:
        """[relay]: the TURN relay (RFC 8656); a name is kept as a name, resolved when it is used."""
        self.check_keys(table, "[relay]", ("server",))
        text = self.string(table, "relay", "server", '"turn.example.net:3478"')
        if text is None:
            return RelayConfig()
        return RelayConfig(self.parsed("relay.server", lambda t: values.relay_server(t, DEFAULT_TURN_PORT),
                                       text))

    def ssh(self, table: Mapping[str, object]) -> SshConfig:
        """[ssh]: paths relative to the config file's directory; an empty string turns the item off."""
        self.check_keys(table, "[ssh]", ("host_keys", "known_hosts"))
        default = SshConfig()
        found: list[str | None] = []
        for key, fallback in (("host_keys", default.host_keys), ("known_hosts", str(default.known_hosts))):
            text = self.string(table, "ssh", key, f'"{fallback}"')
            if text is not None and ("\0" in text or "\n" in text or text != text.strip()):
                self.fail(f"ssh.{key}", f"{show(text)} is not a path", f'write {key} = "{fallback}", or ""')
            found.append(fallback if text is None else str(self.base / text) if text else None)
        return SshConfig(found[0], None if found[1] is None else Path(found[1]))

    def names(self, table: Mapping[str, object]) -> NamesConfig:
        """[names]: the block of the account's devices in the hosts file (docs/names.md)."""
        self.check_keys(table, "[names]", _NAMES_KEYS)
        enabled = self.boolean(table, "names", "enabled", "write enabled = true")
        short_names = self.boolean(table, "names", "short_names", "write short_names = true")
        hosts_file = self.path_value(table, "names", "hosts_file", DEFAULT_HOSTS_FILE)
        assert hosts_file is not None
        return NamesConfig(enabled=enabled, hosts_file=hosts_file, short_names=short_names)

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
            rekey_after_messages=self.integer(
                table, "timers", "rekey_after_messages", d.rekey_after_messages
            ),
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
        name = DEFAULT_INTERFACE if name is None else self.parsed(f"{w}.name", values.interface_name, name)
        listen_port = self.bounded(table, w, "listen_port", DEFAULT_LISTEN_PORT, 0, 65535,
                                   "use 1 to 65535, or 0 for any free port")
        mtu = self.bounded(table, w, "mtu", DEFAULT_MTU, MIN_MTU, MAX_MTU,
                           f"use {MIN_MTU} (the IPv6 minimum) to {MAX_MTU}, e.g. {DEFAULT_MTU}")

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
            self.fail(f"{w}.suite", f"{show(suite)} is not a known suite", "use one of " + ", ".join(SUITES))

        offload = self.boolean(table, w, "offload", "write offload = true (the default) or offload = false")

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
                f"{show(raw_domain)} is not a valid domain ({e})",
                'give the account\'s DNS name, e.g. "home.example.net"',
            )
        if self.secret_file is None:  # else `up --secret-file`: the key is not required, its file not read
            self.required_string(table, w, "secret_file", '"/etc/tunneld/account.secret"')
        secret_file = self.secret_file or self.path_value(table, w, "secret_file", None)
        assert secret_file is not None
        where = f"{w}.secret_file" if self.secret_file is None else "--secret-file"
        secret = self.parsed(where, values.account_secret, secret_file)
        server = self.endpoint(table, w, "server", '"192.0.2.53:53"',
                               'write the DNS UPDATE server as "address:port", e.g. "192.0.2.53:53" or '
                               '"[2001:db8::53]:53", or leave server out to turn publishing off')

        name = self.string(table, w, "name", '"laptop"')
        if name is not None:
            try:
                check_name(name)
            except ValueError as e:
                self.fail(f"{w}.name", str(e), 'write e.g. name = "laptop"')
        else:
            name = values.hostname_label()
            if name is None and server is not None:
                self.fail(f"{w}.name", "missing, and the hostname's first label is not a valid DNS label",
                          'add name = "laptop" (1 to 63 letters, digits and inner hyphens)')

        lease = self.bounded(table, w, "lease", DEFAULT_LEASE, MIN_LEASE, MAX_LEASE,
                             f"use {MIN_LEASE} to {MAX_LEASE} seconds (default {DEFAULT_LEASE})")
        algorithm = self.string(table, w, "tsig_algorithm", '"hmac-sha256"') or "hmac-sha256"
        if algorithm not in _TSIG_ALGORITHMS:
            self.fail(f"{w}.tsig_algorithm", f"{show(algorithm)} is not supported",
                      'use "hmac-sha256" (the default), or "hmac-md5" for an old server')
        transport = self.string(table, w, "transport", '"tls"') or "udp"
        if transport not in _TRANSPORTS:
            self.fail(f"{w}.transport", f"{show(transport)} is not a transport",
                      'use "udp" (the default) or "tls" (DNS over TLS to the server\'s port 853)')
        public_ca = self.boolean(table, w, "tls_public_ca", "write tls_public_ca = true (the server has a "
                                 "public CA's certificate) or false (the default)", default=False)
        return AccountConfig(domain=domain, secret_file=secret_file, server=server, name=name,
                             lease=lease, tsig_algorithm=algorithm, transport=transport,
                             tls_public_ca=public_ca), secret

    def peers(self, value: object, domain: str) -> tuple[PeerConfig, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            self.fail(
                "peer", f"expected an array of tables, got {type_name(value)}", "write each peer as [[peer]]"
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
                    f"{show(name)} is not a DNS label",
                    'use 1 to 63 letters, digits and inner hyphens, e.g. "laptop"',
                )
            if name.lower() in names:
                self.fail(
                    f"{w}.name",
                    f"{show(name)} is already the name of peer[{names[name.lower()]}]",
                    "give each peer its own name",
                )
            names[name.lower()] = i

            b64 = self.required_string(table, w, "public_key", '"<the peer\'s public key in base64>"')
            public_key = self.parsed(f"{w}.public_key", values.public_key, b64)
            if public_key in keys:
                self.fail(
                    f"{w}.public_key",
                    f"the same key as peer[{keys[public_key]}]",
                    "each device has its own key; copy this peer's public key again",
                )
            keys[public_key] = i

            endpoint = self.endpoint(table, w, "endpoint", '"192.0.2.1:4500"')
            ula = ula_for(domain, public_key)
            ula_text = self.string(table, w, "ula", f'"{ula}"')
            if ula_text is not None:
                try:
                    claimed = ipaddress.IPv6Address(ula_text)
                except ValueError:
                    self.fail(
                        f"{w}.ula",
                        f"{show(ula_text)} is not an IPv6 address",
                        "remove the line (the ULA is derived from public_key)",
                    )
                if claimed != ula:
                    self.fail(
                        f"{w}.ula",
                        f"{claimed} does not match peer {show(name)}'s public key, which gives {ula}",
                        "remove the line (the ULA is derived from public_key) or correct public_key",
                    )
            peers.append(PeerConfig(name=name, public_key=public_key, ula=ula, endpoint=endpoint))
        return tuple(peers)
