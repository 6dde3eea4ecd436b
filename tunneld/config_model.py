"""The configuration model: frozen dataclasses for a validated ``tunneld.toml``, its defaults and ConfigError.

Kept apart from the reader (tunneld.config) so the daemon and services depend on plain values, not on how the
file is parsed. The derived keys are excluded from every repr.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from tunneld.crypto.aead import DEFAULT_SUITE
from tunneld.identity import account_prefix
from tunneld.proto.dnsupdate import DEFAULT_LEASE
from tunneld.proto.peer import Timers
from tunneld.proto.portmap.natpmp_wire import NATPMP_DEFAULT_LIFETIME

if TYPE_CHECKING:
    from tunneld.device_cert import DeviceCertificates

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


class ConfigError(Exception):
    """Anything wrong with the configuration: one line naming the file, the key and the fix.

    ``key`` is the dotted key (``peer[2].endpoint``) or table (``[interface]``) concerned, or None for a
    problem with the file as a whole; the message already contains it.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        # One line, whatever ended up in it (a path with a newline, say): the CLI prints it as one line.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
        self.key = key



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
    transport: str = "udp"  # "tls": UPDATEs to the server over DNS over TLS (RFC 7858), port 853
    tls_public_ca: bool = False  # with "tls": trust the system's CAs too (a server with a public CA's cert)


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


DEFAULT_TURN_PORT: Final = 3478
"""RFC 8656 §4 (and RFC 5928 §3): TURN over UDP listens on 3478 by default."""


@dataclass(frozen=True)
class RelayConfig:
    """[relay]: the TURN relay (RFC 8656), ``server`` as (IP literal or DNS name, port). None: found as
    ``_turn._udp.DOMAIN`` SRV (RFC 5928) at the account's DNS server, if it has one."""

    server: tuple[str, int] | None = None


@dataclass(frozen=True)
class SshConfig:
    """[ssh]: the host keys we publish (a glob of OpenSSH ``.pub`` files) and the known-hosts file that gets
    the peers' keys in a marked block. None turns either off (``""`` in the file)."""

    host_keys: str | None = "/etc/ssh/ssh_host_*_key.pub"
    known_hosts: Path | None = Path("/etc/ssh/ssh_known_hosts")


@dataclass(frozen=True)
class StunServer:
    """A STUN server from ``[nat] stun``: an IP literal or a DNS name (resolved when used), and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NatConfig:
    """[nat]: ``stun`` lists the STUN servers that tell our public endpoint (None: the account's DNS
    server, which ``tunneld serve-dns`` makes a STUN server too; empty: no STUN)."""

    stun: tuple[StunServer, ...] | None = None


DEFAULT_HOSTS_FILE: Final = Path("/etc/hosts")


@dataclass(frozen=True)
class NamesConfig:
    """[names]: the marked block of every device's ``ULA NAME.DOMAIN NAME`` in ``hosts_file`` (docs/names.md);
    ``short_names`` adds the bare NAME."""

    enabled: bool = True
    hosts_file: Path = DEFAULT_HOSTS_FILE
    short_names: bool = True


DEFAULT_SERVICE_USER: Final = "tunneld"


@dataclass(frozen=True)
class ServiceConfig:
    """[service]: the user ``tunneld up`` runs as once its devices and sockets are open (docs/privilege.md);
    ``"root"`` keeps root."""

    user: str = DEFAULT_SERVICE_USER


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: where Prometheus text is served over HTTP (tunneld.services.metrics); None: off."""

    listen: tuple[str, int] | None = None


@dataclass(frozen=True, repr=False)
class ClientCertificate:
    """A TLS client certificate (PEM: the leaf, then the account CA) and its P-256 key (PEM, PKCS#8), made
    in memory (tunneld.device_cert) and never written anywhere; repr shows neither."""

    chain: bytes
    key: bytes

    def __repr__(self) -> str:
        return "ClientCertificate(…)"


@dataclass(frozen=True)
class Config:
    """The whole configuration, validated. ``psk``, ``tsig_key`` and ``turn_secret`` (the relay's shared
    secret as ASCII bytes, the HMAC key of TURN REST credentials) are derived from the account secret."""

    path: Path
    interface: InterfaceConfig
    account: AccountConfig
    peers: tuple[PeerConfig, ...]
    psk: bytes = field(repr=False)
    tsig_key: bytes = field(repr=False)
    turn_secret: bytes = field(repr=False)
    timers: Timers = field(default_factory=Timers)
    portmap: PortmapConfig = field(default_factory=PortmapConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    nat: NatConfig = field(default_factory=NatConfig)
    ssh: SshConfig = field(default_factory=SshConfig)
    names: NamesConfig = field(default_factory=NamesConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    account_ca: bytes | None = None
    """The account CA's certificate (PEM, public) when the account's transport is TLS: the one trust
    anchor of the server's certificate (tunneld.accountca)."""
    client_certificate: DeviceCertificates | None = field(default=None, repr=False)
    """This device's TLS client certificates under the account CA, when the transport is TLS and the device
    has a name: what proves membership to the server's DNS Push (a fresh key at every load and at every
    renewal)."""

    @property
    def stun_servers(self) -> tuple[StunServer, ...]:
        """The STUN servers to ask: ``[nat] stun``, or by default the account's DNS server (if any)."""
        if self.nat.stun is not None:
            return self.nat.stun
        server = self.account.server
        return () if server is None else (StunServer(str(server.host), server.port),)

    @property
    def prefix(self) -> ipaddress.IPv6Network:
        """The account's /48 (tunneld.identity.account_prefix)."""
        return account_prefix(self.account.domain)

    def peer(self, name: str) -> PeerConfig | None:
        """The configured peer called ``name`` (DNS names compare case-insensitively), if any."""
        wanted = name.lower()
        return next((p for p in self.peers if p.name.lower() == wanted), None)

