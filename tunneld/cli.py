"""The `tunneld` command line.

Exit codes (docs/architecture.md): 0 ok, 1 runtime failure, 2 bad usage or config, always with one line
that names the problem and the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from tunneld import __version__, logs
from tunneld.config import DEFAULT_CONFIG_PATH, DEFAULT_CONTROL_SOCKET, Config, ConfigError, load_config
from tunneld.config_model import Endpoint
from tunneld.config_values import show
from tunneld.config_write import WriteRefused, join_config, toml_string, write_config
from tunneld.crypto.kdf import ACCOUNT_SECRET_LEN, derive_tsig_key, derive_turn_secret, normalize_domain
from tunneld.identity import DeviceIdentity, IdentityError
from tunneld.privdrop import PrivilegeError
from tunneld.zoneconf import (
    PDNS_SETTINGS,
    check_zone_file,
    key_stanza,
    pdns_primary_commands,
    primary_stanza,
    secondary_stanza,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_E = TypeVar("_E", bound=BaseException)


class UsageError(Exception):
    """Bad usage or configuration: printed as one line, exit code 2."""


class Failure(Exception):
    """A runtime failure (the file system, the daemon): printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; we print one line that says what to do.
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def tsig_stanza(domain: str, tsig_key: bytes) -> str:
    """The key statement for BIND's named.conf (and `nsupdate -k`); Knot reads the same three fields.

    The name is checked again here (LDH only, ValueError otherwise): nothing but a DNS name may reach
    the stanza's quotes. The secret is base64 and the algorithm fixed."""
    return key_stanza(normalize_domain(domain) + ".", tsig_key)


def front_key(secret: bytes, domain: str) -> bytes:
    """The front key of an account (:func:`tunneld.crypto.kdf.derive_front_key`): the key named
    ``front.<domain>.`` that the front, the primary and the secondaries share (docs/rendezvous.md)."""
    from tunneld.crypto.kdf import derive_front_key

    return derive_front_key(secret, domain)


def _domain(value: str, what: str) -> str:
    """A domain from the command line, normalized (LDH labels only), or UsageError naming ``what``."""
    try:
        return normalize_domain(value)
    except ValueError as e:
        raise UsageError(f"bad {what} {show(value)}: {e}; give a DNS name such as home.example.net") from None


def _path(value: str, option: str, *, toml: bool = False) -> Path:
    """A path from the command line, or UsageError: empty, a NUL byte, or (``toml``: to be written into a
    config) not UTF-8."""
    if not value:
        raise UsageError(f"bad {option}: the path is empty; give a path")
    if "\0" in value:
        raise UsageError(f"bad {option} {show(value)}: a path cannot contain a NUL byte; give a real path")
    if toml:
        try:
            toml_string(value)
        except ValueError as e:
            raise UsageError(f"bad {option} {show(value)}: {e}; rename it, or give another path") from None
    return Path(value)


def cmd_account_new(args: argparse.Namespace) -> int:
    domain = _domain(args.domain, "account domain")
    secret = os.urandom(ACCOUNT_SECRET_LEN)
    # The first line alone is the secret file's content; everything after it is for the DNS server.
    sys.stdout.write(base64.b64encode(secret).decode() + "\n")
    # The relay's line comes before the stanza, which runs to the end (it is cut out as a key file).
    sys.stdout.write(
        f"\n# Save the line above, alone, as the secret_file of every device of {domain} (mode 0600).\n"
        f"# Shared secret for the account's TURN relay (coturn turnserver.conf, with use-auth-secret):\n"
        f"static-auth-secret={derive_turn_secret(secret, domain)}\n"
        f"# TSIG key for the account's DNS server (BIND named.conf, nsupdate -k):\n"
    )
    sys.stdout.write(tsig_stanza(domain, derive_tsig_key(secret, domain)))
    # A comment, so the stanza cut out to the end stays a valid key file for BIND and nsupdate.
    sys.stdout.write(f"# The zone on a BIND or PowerDNS primary and secondaries: tunneld account "
                     f"primary-config and secondary-config {domain} --secret-file FILE\n")
    return EXIT_OK


def cmd_account_ca(args: argparse.Namespace) -> int:
    """The account CA's certificate (PEM), for TLS tools given the account's trust anchor (`kdig +tls-ca`)."""
    from tunneld.accountca import account_ca
    from tunneld.config import load_account_secret

    domain = _domain(args.domain, "account domain")
    secret = load_account_secret(_path(args.secret_file, "--secret-file"))  # ConfigError: exit 2
    sys.stdout.write(account_ca(secret, domain).pem.decode("ascii"))
    return EXIT_OK


def _server(value: str, option: str) -> Endpoint:
    """A DNS server's address from the command line, IP[:PORT] or [IPv6]:PORT (port 53 if none), or
    UsageError naming ``option``."""
    from tunneld.config import parse_endpoint

    try:
        return parse_endpoint(value)
    except ValueError:
        try:  # no port given: DNS's own
            return parse_endpoint(f"[{value}]:53" if ":" in value else f"{value}:53")
        except ValueError as e:
            raise UsageError(f"bad {option} {show(value)}: {e}") from None


def _zone_config(args: argparse.Namespace) -> tuple[str, bytes, str]:
    """(domain, account secret, zone file) of `account primary-config` and `secondary-config`."""
    from tunneld.config import load_account_secret

    domain = _domain(args.domain, "account domain")
    zone_file = args.zone_file if args.zone_file is not None else f"/var/lib/bind/{domain}.zone"
    try:
        check_zone_file(zone_file)
    except ValueError as e:
        raise UsageError(f"bad --zone-file: {e}; give a plain path") from None
    secret = load_account_secret(_path(args.secret_file, "--secret-file"))  # ConfigError: exit 2
    return domain, secret, zone_file


def cmd_account_primary_config(args: argparse.Namespace) -> int:
    """named.conf statements for the zone's primary (docs/rendezvous.md)."""
    domain, secret, zone_file = _zone_config(args)
    notify = [(e.host, e.port) for e in
              [_server(args.front, "--front")] + [_server(s, "--secondary") for s in args.secondary]]
    if args.powerdns:
        import shlex

        commands = pdns_primary_commands(domain, front_key(secret, domain), notify)
        sys.stdout.write("# pdns.conf, beside launch= and the backend's settings:\n"
                         + "".join(f"{line}\n" for line in PDNS_SETTINGS)
                         + f"# then, once the zone {domain} exists (pdnsutil load-zone or create-zone):\n"
                         + "".join(shlex.join(argv) + "\n" for argv in commands))
        return EXIT_OK
    sys.stdout.write(primary_stanza(domain, front_key(secret, domain), notify, zone_file))
    return EXIT_OK


def cmd_account_secondary_config(args: argparse.Namespace) -> int:
    """named.conf statements for a secondary of the zone (docs/rendezvous.md)."""
    domain, secret, zone_file = _zone_config(args)
    primary = _server(args.primary, "--primary")
    sys.stdout.write(secondary_stanza(domain, derive_tsig_key(secret, domain), front_key(secret, domain),
                                      (primary.host, primary.port), zone_file))
    return EXIT_OK


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def _identity(config: Config) -> DeviceIdentity:
    return DeviceIdentity.load_or_create(config.interface.state_dir)


def cmd_identity(args: argparse.Namespace) -> int:
    config = _config(args)
    ident = _identity(config)
    sys.stdout.write(f"public_key {ident.public_key_b64}\nula {ident.ula(config.account.domain)}\n")
    return EXIT_OK


def cmd_join(args: argparse.Namespace) -> int:
    """Write this machine's config for an account and create its identity: the one step after
    `tunneld account new` (and copying the secret file over) before `tunneld up`."""
    from tunneld.config import load_account_secret
    from tunneld.proto.records import check_name

    domain = _domain(args.domain, "account domain")
    if args.tls_public_ca and not args.tls:
        raise UsageError("--tls-public-ca is for a server reached over TLS: add --tls")
    server = str(_server(args.server, "--server"))
    name = args.name if args.name is not None else socket.gethostname().split(".")[0].lower()
    why = "given with --name" if args.name is not None else "this host's name; --name to choose another"
    try:
        name = check_name(name)
    except ValueError:
        raise UsageError(f"bad device name {show(name)}: not one DNS label of 1 to 63 letters, digits and "
                         f"inner hyphens; pass --name NAME, e.g. --name laptop") from None
    secret_file = _path(args.secret_file, "--secret-file", toml=True).absolute()
    state_dir = _path(args.state_dir, "--state-dir", toml=True).absolute() if args.state_dir else None
    path = _path(args.config, "--config")
    load_account_secret(secret_file)  # ConfigError (exit 2) if missing, unreadable, readable by others
    try:
        write_config(path, join_config(domain, secret_file, server, name, state_dir, args.tls,
                                       args.tls_public_ca), args.force)
    except WriteRefused as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise Failure(f"cannot write {path}: {e.strerror or e}; check the directory and its permissions, "
                      f"or pass --config PATH") from None
    config = load_config(path)  # what we wrote must load, or nothing is claimed
    ident = _identity(config)
    sys.stdout.write(f"config {path}\nname {name}\npublic_key {ident.public_key_b64}\n"
                     f"ula {ident.ula(config.account.domain)}\n")
    print(f"tunneld: name {name} ({why})", file=sys.stderr)  # stdout stays the machine-readable part
    return EXIT_OK


def cmd_up(args: argparse.Namespace) -> int:
    import trio

    from tunneld.daemon import Daemon, keylog_path, prepare_privileges, run_until_signalled
    from tunneld.keylog import KeyLog, KeyLogError

    logs.setup(args.verbose, args.debug_libs)
    secret_file = None if args.secret_file is None else _path(args.secret_file, "--secret-file").absolute()
    config = load_config(Path(args.config), secret_file=secret_file)
    ident = _identity(config)
    if args.keylog == "":
        raise UsageError("bad --keylog: the path is empty; give a file name, or leave --keylog out")
    kl = keylog_path(args.keylog)
    try:
        keylog = KeyLog(kl) if kl else None
    except KeyLogError as e:
        raise UsageError(f"{e} (--keylog or TUNNELD_KEYLOG)") from None
    plan, writer = prepare_privileges(config)  # PrivilegeError (no such user): exit 2
    try:
        trio.run(run_until_signalled, Daemon(config, ident, keylog, privileges=plan, writer=writer))
    except BaseException as e:  # start-up failures arrive wrapped in exception groups
        cause = _startup_failure(e)
        if cause is None:
            raise
        print(f"tunneld: {_one_line(cause)}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if writer is not None:
            writer.close()
    return EXIT_OK


def _startup_failure(e: BaseException) -> str | None:
    """The one-line message for an expected failure (TUN, socket), found inside exception groups."""
    from tunneld.net.tun import TunError
    from tunneld.services.control import ControlError
    from tunneld.services.metrics import MetricsError

    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            msg = _startup_failure(sub)
            if msg is not None:
                return msg
        return None
    if isinstance(e, TunError | ControlError | MetricsError):
        return str(e)
    if isinstance(e, PrivilegeError):
        return f"cannot drop privileges: {e}"
    if isinstance(e, OSError):
        return (f"cannot open the UDP socket: {e.strerror or e}; is another tunneld running, "
                f"or is the port in use? (set [interface] listen_port)")
    return None


def _first(e: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of ``kind`` in ``e``, looking inside exception groups."""
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            found = _first(sub, kind)
            if found is not None:
                return found
        return None
    return e if isinstance(e, kind) else None


def _control_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return _path(args.socket, "--socket")
    try:
        return _config(args).interface.control_socket
    except ConfigError as e:  # the daemon's group may ask it, not read root's config (0700) or secret
        if e.key != "account.secret_file" and not isinstance(e.__context__, PermissionError):
            raise
        return DEFAULT_CONTROL_SOCKET


def _ask(args: argparse.Namespace, req: dict[str, Any]) -> dict[str, Any] | None:
    from tunneld.services.control import request

    path = _control_path(args)
    try:
        return request(path, req)
    except PermissionError:
        print(_one_line(f"tunneld: permission denied on {path}: run as root or join the group tunneld "
                        f"(`usermod -aG tunneld USER`)"), file=sys.stderr)
        return None
    except (OSError, ValueError) as e:
        print(_one_line(f"tunneld: cannot reach the daemon at {path}: {getattr(e, 'strerror', None) or e}; "
                        f"is `tunneld up` running with this config?"), file=sys.stderr)
        return None


def cmd_status(args: argparse.Namespace) -> int:
    st = _ask(args, {"cmd": "status"})
    if st is None:
        return EXIT_FAILURE
    if args.json:
        sys.stdout.write(json.dumps(st, indent=2) + "\n")
        return EXIT_OK
    from tunneld.status_text import render_status

    sys.stdout.write(render_status(st))
    return EXIT_OK


def cmd_ping(args: argparse.Namespace) -> int:
    from tunneld import ping

    problem = ping.check_arguments(args.count, args.interval, args.timeout)
    if problem:
        raise UsageError(problem)
    try:
        return ping.run(args.peer, args.count, args.interval, args.timeout,
                        lambda: _ask(args, {"cmd": "status"}))
    except ping.PingError as e:
        print(f"tunneld: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE


def cmd_rebind(args: argparse.Namespace) -> int:
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"bad --port {args.port}: give a port from 1 to 65535 (or 0 for any free port)")
    reply = _ask(args, {"cmd": "rebind", "port": args.port})
    if reply is None:
        return EXIT_FAILURE
    if "error" in reply:
        print(f"tunneld: {_one_line(reply['error'])}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"listen_port {reply['listen_port']}")
    return EXIT_OK


def gateway_arg(text: str | None) -> str | None:
    """``--gateway``: the router's LAN address (IPv4), or None to use the default route's."""
    if text is None:
        return None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise UsageError(f"bad --gateway {show(text)}: not an IPv4 address; give the router's LAN "
                         f"address, e.g. --gateway 192.168.1.1, or leave it out") from None


def cmd_portmap_probe(args: argparse.Namespace) -> int:
    import trio

    from tunneld.probe import PROBE_TIMEOUT, ProbeError, probe

    gateway = gateway_arg(args.gateway)
    if gateway is None and args.config is not None:
        gateway = load_config(Path(args.config)).portmap.gateway
    try:
        r = trio.run(probe, gateway)
    except ProbeError as e:
        print(f"tunneld: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"gateway {r.gateway}")
    print(f"protocol {r.protocol or 'none'}")
    print(f"external {r.external_address or 'none'}")
    if r.double_nat:
        print(f"double-nat {r.double_nat}")
    if r.ok:
        print(f"mapping created {r.external_address}:{r.external_port} lifetime {r.lifetime} s, "
              f"{'deleted' if r.deleted else 'NOT confirmed deleted (it expires by itself)'}")
        return EXIT_OK
    print("mapping none")
    if r.protocol is None:
        why = (f"no answer in {PROBE_TIMEOUT:.0f} s; the router may not speak PCP, NAT-PMP or UPnP IGD, or "
               f"has them switched off (look for a UPnP/NAT-PMP setting)")
    else:
        why = r.result
    print(f"tunneld: no port mapping from {r.gateway}: {why}", file=sys.stderr)
    return EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tunneld", description="Back to My Mac for Linux.")
    p.add_argument("--version", action="version", version=f"tunneld {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    account = sub.add_parser("account", help="manage the account shared by your devices")
    asub = account.add_subparsers(dest="account_command", required=True, parser_class=_Parser)
    new = asub.add_parser("new", help="print a fresh account secret and its TSIG key stanza")
    new.add_argument("domain", help="the account's DNS domain, e.g. home.example.net")
    new.set_defaults(func=cmd_account_new)
    ca = asub.add_parser("ca", help="print the account CA's certificate (PEM), derived from the secret")
    ca.add_argument("domain", help="the account's DNS domain")
    ca.add_argument("--secret-file", required=True, metavar="PATH",
                    help="the account secret (from `tunneld account new`), mode 0600")
    ca.set_defaults(func=cmd_account_ca)
    for role, what, where in (("primary", "the zone's primary, updated by the front", "--front"),
                              ("secondary", "a secondary of the zone, answering the devices", "--primary")):
        zc = asub.add_parser(f"{role}-config", help=f"print BIND named.conf statements for {what}")
        zc.add_argument("domain", help="the account's DNS domain")
        zc.add_argument("--secret-file", required=True, metavar="PATH",
                        help="the account secret (from `tunneld account new`), mode 0600")
        zc.add_argument(where, required=True, metavar="ADDR[:PORT]",
                        help="the front's address (NOTIFY goes there)" if role == "primary"
                        else "the primary's address (transfers come from there)")
        zc.add_argument("--zone-file", metavar="PATH",
                        help="the zone file (default /var/lib/bind/DOMAIN.zone)")
        if role == "primary":
            zc.add_argument("--secondary", action="append", default=[], metavar="ADDR[:PORT]",
                            help="also NOTIFY this secondary (one not listed as the zone's NS; with "
                                 "--powerdns, every secondary); repeatable")
            zc.add_argument("--powerdns", action="store_true",
                            help="print pdns.conf settings and pdnsutil commands for a PowerDNS primary")
        zc.set_defaults(func=cmd_account_primary_config if role == "primary"
                        else cmd_account_secondary_config)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", default=str(DEFAULT_CONFIG_PATH),
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")

    join = sub.add_parser("join", help="write this machine's config for an account and create its identity")
    join.add_argument("domain", help="the account's DNS domain")
    join.add_argument("--server", required=True, help="the account's DNS server, HOST[:PORT] (IP literal)")
    join.add_argument("--secret-file", required=True, help="the account secret (from `tunneld account new`)")
    join.add_argument("--name", help="this device's DNS label (default: the host name)")
    join.add_argument("--tls", action="store_true",
                      help="all signalling over DNS over TLS to the server's port 853 (serve-dns --tls): "
                           "updates, lookups, and DNS Push to learn the others; verified against the "
                           "account CA")
    join.add_argument("--tls-public-ca", action="store_true",
                      help="with --tls: also trust the system's CAs (the server presents a public CA's "
                           "certificate for the account domain, serve-dns --tls-cert)")
    join.add_argument("--force", action="store_true", help="replace an existing config")
    join.add_argument("--state-dir", help="where the device key lives (default /var/lib/tunneld)")
    with_config(join)
    join.set_defaults(func=cmd_join)

    ident = sub.add_parser("identity", help="create the device key if missing; print public key and ULA")
    with_config(ident)
    ident.set_defaults(func=cmd_identity)

    up = sub.add_parser("up", help="run the daemon in the foreground until SIGINT/SIGTERM")
    with_config(up)
    up.add_argument("--keylog", help="append each SA's keys in Wireshark esp_sa format (or TUNNELD_KEYLOG)")
    up.add_argument("--secret-file", metavar="PATH",
                    help="the account secret, instead of [account] secret_file (e.g. a systemd credential)")
    up.add_argument("--verbose", "-v", action="store_true", help="our debug logging")
    up.add_argument("--debug-libs", action="store_true", help="the libraries' debug logging too")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="show the running daemon's interface and peers")
    with_config(status)
    status.add_argument("--socket", help="control socket (default: from the config)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    portmap = sub.add_parser("portmap", help="PCP/NAT-PMP/UPnP port mapping on the home router")
    psub = portmap.add_subparsers(dest="portmap_command", required=True, parser_class=_Parser)
    pprobe = psub.add_parser("probe", help="what the gateway speaks, our public address, a test mapping")
    pprobe.add_argument("--gateway", help="the router's address (default: the IPv4 default gateway)")
    pprobe.add_argument("--config", help="read [portmap] gateway from this config")
    pprobe.set_defaults(func=cmd_portmap_probe)

    ping = sub.add_parser("ping", help="authenticated probes to a peer, each with its path and round trip")
    with_config(ping)
    ping.add_argument("peer", help="the peer's name or ULA")
    ping.add_argument("--socket", help="control socket (default: from the config)")
    ping.add_argument("-c", "--count", type=int, default=3, help="probes to send (default 3)")
    ping.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each reply (default 2)")
    ping.add_argument("-i", "--interval", type=float, default=1.0, help="seconds between probes (default 1)")
    ping.set_defaults(func=cmd_ping)

    rebind = sub.add_parser("rebind", help="reopen the outer UDP socket (after a network change)")
    with_config(rebind)
    rebind.add_argument("--socket", help="control socket (default: from the config)")
    rebind.add_argument("--port", type=int, help="new port (default: the same)")
    rebind.set_defaults(func=cmd_rebind)

    from tunneld import netcheck
    netcheck.add_parser(sub)

    from tunneld import hosts_cmd
    hosts_cmd.add_parser(sub)

    from tunneld import serve_dns_cmd
    serve_dns_cmd.add_parser(sub)
    return p


_CONTROL_ESCAPES = {**{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}, ord("\n"): "\\n", ord("\r"): "\\r"}
_MAX_MESSAGE = 1000  # characters: a huge value echoed in a message is cut in the middle, the fix kept


def _one_line(e: object) -> str:
    """The message on one line and of bounded length, whatever a path or value in it holds."""
    text = str(e).translate(_CONTROL_ESCAPES)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # a file name's undecodable bytes
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE // 2] + " … " + text[-_MAX_MESSAGE // 2 :]
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    logs.setup()  # `up` and `serve-dns` set it up again with their --verbose and --debug-libs
    try:
        args = parser.parse_args(argv)
        return int(args.func(args))
    except (UsageError, ConfigError, IdentityError, PrivilegeError) as e:
        print(f"tunneld: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Failure as e:
        print(f"tunneld: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:  # stdout closed early (`tunneld account new | head -1`): no traceback
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("tunneld: the output was closed before everything was written", file=sys.stderr)
        return EXIT_FAILURE
