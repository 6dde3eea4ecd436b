"""`tunneld serve-dns`: the account's rendezvous DNS server (UPDATE with leases, LLQ, STUN), run until
SIGINT/SIGTERM.

Its arguments are checked here (one line and exit 2 for each bad one); the server itself is
tunneld.dnsserver. It binds its ports as root, then runs as ``--user`` with no capability
(tunneld.dnsserver.unprivileged, docs/privilege.md): a --tls-cert/--tls-key chain is read before, at start,
and so is the --primary-key of front mode (tunneld.dnsserver.front: the devices' updates go to a primary).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import ipaddress
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunneld import logs
from tunneld.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError, _domain, _first, _one_line
from tunneld.config_values import show
from tunneld.privdrop import PrivilegeError

if TYPE_CHECKING:
    import ssl

    from tunneld.config_model import Endpoint

__all__ = ["DEFAULT_DNS_DB", "DEFAULT_DNS_LISTEN", "add_parser", "cmd_serve_dns"]

# Not the daemon's state directory (its device key): serve-dns hands the directory it creates to its user.
DEFAULT_DNS_DB = "/var/lib/tunneld-dns/dns.sqlite"
DEFAULT_DNS_LISTEN = "[::]:53"


def cmd_serve_dns(args: argparse.Namespace) -> int:
    """Run the rendezvous DNS server for one zone until SIGINT/SIGTERM (exit 0)."""
    import sqlite3

    import dns.name
    import trio

    from tunneld.config import load_account_secret, parse_endpoint
    from tunneld.dnsserver import unprivileged
    from tunneld.dnsserver.core import DnsCore, Policy, account_key
    from tunneld.dnsserver.llq import LLQServer
    from tunneld.dnsserver.serve import RrlLimits, bind_error_message, serve
    from tunneld.dnsserver.store import NotWritable, ZoneStore

    logs.setup(args.verbose, args.debug_libs)
    zone = _domain(args.zone, "--zone")
    try:
        listen = parse_endpoint(args.listen)
    except ValueError as e:
        raise UsageError(f"bad --listen: {e}") from None
    if isinstance(listen.host, ipaddress.IPv6Address) and listen.host.scope_id is not None:
        raise UsageError(f"bad --listen {show(args.listen)}: a scoped (link-local) address cannot be "
                         f"published for clients elsewhere; give a global address, or [::]:53 for all")
    if listen.port == 0:
        raise UsageError(f"bad --listen {args.listen!r}: port 0; give a port such as 53")
    try:
        server = dns.name.from_text(args.server_name or f"ns.{zone}")
    except Exception as e:  # dnspython's name errors are many classes
        raise UsageError(f"bad --server-name {args.server_name!r}: {e}; give a DNS host name") from None
    policy = Policy()
    if args.min_lease is not None:
        if not 1 <= args.min_lease <= policy.max_lease:
            raise UsageError(f"bad --min-lease {args.min_lease}: give 1 to {policy.max_lease} seconds")
        policy = dataclasses.replace(policy, min_lease=args.min_lease)
    if args.default_lease is not None and not (policy.min_lease <= args.default_lease <= policy.max_lease):
        raise UsageError(f"bad --default-lease {args.default_lease}: give {policy.min_lease} to "
                         f"{policy.max_lease} seconds")
    rrl = RrlLimits()
    if args.rate_limit is not None:
        if not 0 <= args.rate_limit <= 1_000_000:
            raise UsageError(f"bad --rate-limit {args.rate_limit}: give 0 (no limit) to 1000000 replies "
                             "per second")
        rrl = (dataclasses.replace(rrl, enabled=False) if args.rate_limit == 0 else
               dataclasses.replace(rrl, answers_per_second=args.rate_limit,
                                   errors_per_second=args.rate_limit / 2))
    metrics = None
    if args.metrics is not None:
        from tunneld.config_values import Problem, listen_address
        try:
            metrics = listen_address(args.metrics)
        except Problem as p:
            raise UsageError(f"bad --metrics: {p.problem}; {p.fix}") from None
    tls_listen = _tls_listen(args, listen)
    public = _public_chain(args, tls_listen, zone)  # read now, as root, before the drop
    stun_ports = list(dict.fromkeys(args.stun or ()))
    for port in stun_ports:
        if not 1 <= port <= 65535 or port == listen.port:
            raise UsageError(f"bad --stun {port}: give a free UDP port from 1 to 65535 other than the "
                             f"DNS port {listen.port}, which answers STUN anyway (e.g. --stun 3478)")
    primary = _primary(args, zone)  # read now, as root, before the drop
    max_llqs, per_key = _llq_caps(args)
    secret = load_account_secret(Path(args.secret_file))  # ConfigError: one line, exit 2
    account = unprivileged.account_for(args.user)  # PrivilegeError (no such user): exit 2
    db = Path(args.db)
    created = not db.absolute().parent.exists()
    try:
        if db.parent != Path(""):
            db.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Our SRV records (_dns-update._udp, _dns-llq._udp; with TLS _dns-update-tls._tcp,
        # _dns-query-tls._tcp, _dns-push-tls._tcp at the TLS port) name this server: give the name an
        # address when we listen on a specific one inside the zone, so that clients can follow the SRV.
        specific = not listen.host.is_unspecified and server.is_subdomain(dns.name.from_text(zone))
        store = ZoneStore(str(db), zone + ".", server, listen.port,
                          addresses=[str(listen.host)] if specific else (),
                          tls_port=tls_srv_port(listen, tls_listen, addressed=specific))
    except ValueError as e:  # the database holds another zone
        raise UsageError(f"--db {db}: {e}; give another --db for this zone") from None
    except (OSError, sqlite3.Error) as e:
        raise UsageError(f"cannot open the zone database --db {db}: {getattr(e, 'strerror', None) or e}; "
                         f"check the path and its permissions") from None
    try:  # found now, not at the first update
        store.check_writable()
        if created:
            unprivileged.hand_over(account, db.absolute())
    except NotWritable as e:
        store.close()
        raise UsageError(f"cannot write the zone database --db {db}: {e}") from None
    keys = [account_key(secret, zone)]
    tls = None
    renew_leaf = None
    if tls_listen is not None and public is not None:  # a given chain: no leaf of ours to renew
        import ssl

        from tunneld.dnsserver.tls import public_server_context
        try:
            tls = (str(tls_listen.host), tls_listen.port, public_server_context(*public, secret, zone))
        except ssl.SSLError as e:  # checked already: a key type or size this OpenSSL refuses
            store.close()
            raise UsageError(f"bad --tls-cert {show(args.tls_cert)}: OpenSSL refuses it ({e.reason or e}); "
                             f"give an RSA or ECDSA certificate and key") from None
    elif tls_listen is not None:
        from tunneld.dnsserver.tls import server_context
        # The certificate names what the account CA may name: the zone, and our server name if inside it.
        names = [n for n in (server.to_text(omit_final_dot=True), zone)
                 if dns.name.from_text(n).is_subdomain(dns.name.from_text(zone))]
        tls = (str(tls_listen.host), tls_listen.port, server_context(secret, zone, names, int(time.time())))
        renew_leaf = functools.partial(_renew_leaf, tls[2], secret, zone, names)
    core = DnsCore(store, keys, dataclasses.replace(policy, default_lease=args.default_lease))
    front = owner = None
    if primary is not None:
        import socket

        from tunneld.dnsserver.front import Front
        from tunneld.dnsserver.owner import LeaseOwner
        front = Front(store, primary[1], primary[0])
        owner = LeaseOwner(store, primary[1], host=socket.gethostname(), take_over=args.take_over)
    elif args.take_over:
        store.close()
        raise UsageError("--take-over without --primary: it takes a zone's leases over from another front")

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                # Long-lived queries on the same port (the zone's _dns-llq._udp SRV says so).
                await nursery.start(functools.partial(serve, core, str(listen.host), listen.port,
                                                      llq=LLQServer(core, max_llqs=max_llqs, per_key=per_key),
                                                      rrl=rrl,
                                                      stun_ports=stun_ports,
                                                      metrics=metrics, tls=tls, front=front,
                                                      primary_check=args.primary_check, owner=owner,
                                                      after_bind=functools.partial(
                                                          unprivileged.drop, account, args.user, store, db)))
                if renew_leaf is not None:
                    nursery.start_soon(renew_leaf)
                async for signum in signals:
                    logging.getLogger("tunneld.dnsserver").info(
                        "%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    except BaseException as e:  # bind failures arrive wrapped in exception groups
        if metrics is not None:
            from tunneld.services.metrics import MetricsError
            failure = _first(e, MetricsError)
            if failure is not None:
                print(f"tunneld: {_one_line(failure)}", file=sys.stderr)
                return EXIT_FAILURE
        from tunneld.dnsserver.owner import ClaimFailed, OwnerConflict
        conflict = _first(e, OwnerConflict)
        if conflict is not None:
            print(f"tunneld: {_one_line(conflict)}", file=sys.stderr)
            return EXIT_USAGE
        unclaimed = _first(e, ClaimFailed)
        if unclaimed is not None:
            print(f"tunneld: the primary {args.primary} did not take this front's claim of zone {zone}'s "
                  f"leases: {_one_line(unclaimed)}; check that it runs and grants the front key updates",
                  file=sys.stderr)
            return EXIT_FAILURE
        dropped = _first(e, PrivilegeError) or _first(e, unprivileged.DatabaseNotWritable)
        if dropped is not None:
            print(f"tunneld: {_one_line(dropped)}", file=sys.stderr)
            return EXIT_USAGE if isinstance(dropped, unprivileged.DatabaseNotWritable) else EXIT_FAILURE
        err = _first(e, OSError)
        if err is None:
            raise
        where = err.filename if isinstance(err.filename, str) else str(listen)
        print(f"tunneld: {bind_error_message(err, where)}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        store.close()
    return EXIT_OK


async def _renew_leaf(ctx: ssl.SSLContext, secret: bytes, zone: str, names: list[str]) -> None:
    """A fresh TLS leaf every RENEW_INTERVAL while serving (the one issued at start lasts 397 days)."""
    import ssl

    import trio

    from tunneld.dnsserver.tls import RENEW_INTERVAL, renew
    while True:
        await trio.sleep(RENEW_INTERVAL)
        try:
            renew(ctx, secret, zone, names, int(time.time()))
        except (OSError, ssl.SSLError, ValueError) as e:  # keep the current leaf; try again next time
            logging.getLogger("tunneld.dnsserver").warning("cannot renew the TLS certificate: %s", e)
        else:
            logging.getLogger("tunneld.dnsserver").info("TLS certificate renewed")


def tls_srv_port(listen: Endpoint, tls_listen: Endpoint | None, *, addressed: bool) -> int | None:
    """The port the TLS service SRV records name (None: publish none). They target the server name, whose
    address (when ``addressed``) is the --listen one: a TLS listener on another specific address is not
    there, and clients are better left to their configured server than sent to a closed port."""
    if tls_listen is None:
        return None
    if addressed and not tls_listen.host.is_unspecified and tls_listen.host != listen.host:
        logging.getLogger("tunneld.dnsserver").warning(
            "--tls-listen %s is not on the --listen address: no _dns-*-tls._tcp SRV records", tls_listen)
        return None
    return tls_listen.port


def _tls_listen(args: argparse.Namespace, listen: Any) -> Any:
    """Where DNS over TLS listens: --tls-listen, or --tls on the --listen address at port 853; None: off."""
    from tunneld.config import parse_endpoint
    from tunneld.proto.dnsframe import DOT_PORT

    if args.tls_listen is None:
        return dataclasses.replace(listen, port=DOT_PORT) if args.tls else None
    try:
        tls = parse_endpoint(args.tls_listen)
    except ValueError as e:
        raise UsageError(f"bad --tls-listen: {e}") from None
    if tls.port == 0 or (tls.port == listen.port and tls.host == listen.host):
        raise UsageError(f"bad --tls-listen {show(args.tls_listen)}: give a port other than the DNS "
                         f"port, such as {DOT_PORT}")
    return tls


MAX_PEM_FILE = 1 << 20  # bytes: a chain is a few kilobytes


def _positive_seconds(text: str) -> float:
    value = float(text)  # ValueError: argparse says "invalid _positive_seconds value", exit 2
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError("give 0.1 to 86400 seconds")
    return value


def _primary(args: argparse.Namespace, zone: str) -> tuple[tuple[str, int], Any] | None:
    """--primary and --primary-key checked and read: (the primary's address, the front key), or None
    when neither is given (the zone is served from our own store). The key must be named
    ``front.<zone>.``: the account key would be read, and every forward refused by the primary."""
    import dns.name

    from tunneld.config import parse_endpoint
    from tunneld.dnsserver.front import MAX_KEY_FILE, read_key_stanza
    from tunneld.proto.xfr import FRONT_KEY_LABEL

    if args.primary is None and args.primary_key is None:
        return None
    if args.primary is None or args.primary_key is None:
        given, missing = ("--primary", "--primary-key") if args.primary_key is None else ("--primary-key",
                                                                                          "--primary")
        raise UsageError(f"{given} without {missing}: give both, the primary's ADDR:PORT and the file with "
                         f"the front's TSIG key stanza")
    try:
        endpoint = parse_endpoint(args.primary)
    except ValueError as e:
        raise UsageError(f"bad --primary: {e}") from None
    try:
        with open(args.primary_key, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise UsageError(f"cannot read --primary-key {show(args.primary_key)}: {e.strerror or e}; check the "
                         f"path and that serve-dns (root at start) may read it") from None
    if len(data) > MAX_KEY_FILE:
        raise UsageError(f"bad --primary-key {show(args.primary_key)}: larger than {MAX_KEY_FILE} bytes; "
                         f"give the file with one key statement")
    try:
        key = read_key_stanza(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"bad --primary-key {show(args.primary_key)}: {e}") from None
    wanted = dns.name.from_text(f"{FRONT_KEY_LABEL}.{zone}")
    if key.name.canonicalize() != wanted.canonicalize():
        raise UsageError(f"bad --primary-key {show(args.primary_key)}: the key is named {key.name}, not "
                         f"{wanted}; give the front key, which `tunneld account primary-config` prints "
                         f"(not the account key)")
    return (str(endpoint.host), endpoint.port), key


LLQ_MAX_CAP = 1_000_000
"""The largest --llq-max: each LLQ holds a few KB (docs/protocol.md, "LLQ server behaviour")."""


def _llq_caps(args: argparse.Namespace) -> tuple[int, int | None]:
    """--llq-max and --llq-max-per-key, checked (None: three quarters of the first, LLQServer's default)."""
    from tunneld.dnsserver.llq_limits import MAX_LLQS

    most = MAX_LLQS if args.llq_max is None else args.llq_max
    if not 1 <= most <= LLQ_MAX_CAP:
        raise UsageError(f"bad --llq-max {most}: give 1 to {LLQ_MAX_CAP} LLQs")
    per_key = args.llq_max_per_key
    if per_key is not None and not 1 <= per_key <= most:
        raise UsageError(f"bad --llq-max-per-key {per_key}: give 1 to {most} LLQs (at most --llq-max)")
    return most, per_key


def _public_chain(args: argparse.Namespace, tls_listen: Any, zone: str) -> tuple[bytes, bytes] | None:
    """--tls-cert and --tls-key read and checked (chain, key), or None when neither is given."""
    from tunneld.dnsserver.tls import ChainError, check_public_chain

    if args.tls_cert is None and args.tls_key is None:
        return None
    if args.tls_cert is None or args.tls_key is None:
        given, missing = ("--tls-cert", "--tls-key") if args.tls_key is None else ("--tls-key", "--tls-cert")
        raise UsageError(f"{given} without {missing}: give both, the certificate chain and its private key "
                         f"(e.g. fullchain.pem and privkey.pem)")
    if tls_listen is None:
        raise UsageError("--tls-cert and --tls-key are for the DNS-over-TLS listener, which is off: "
                         "add --tls (or --tls-listen ADDR:PORT)")
    chain, key = _read_pem(args.tls_cert, "--tls-cert"), _read_pem(args.tls_key, "--tls-key")
    try:
        check_public_chain(chain, key, zone, int(time.time()))
    except ChainError as e:
        option, path = ("--tls-key", args.tls_key) if e.of_key else ("--tls-cert", args.tls_cert)
        raise UsageError(f"bad {option} {show(path)}: {e}") from None
    return chain, key


def _read_pem(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_FILE + 1)
    except OSError as e:
        raise UsageError(f"cannot read {option} {show(path)}: {e.strerror or e}; check the path and that "
                         f"serve-dns (root at start) may read it") from None
    if len(data) > MAX_PEM_FILE:
        raise UsageError(f"bad {option} {show(path)}: larger than {MAX_PEM_FILE} bytes; give the PEM file")
    return data


def add_parser(sub: Any) -> None:
    """The `serve-dns` subcommand and its options."""
    serve_dns = sub.add_parser("serve-dns", help="run the account's rendezvous DNS server (UPDATE, leases)")
    serve_dns.add_argument("--zone", required=True, help="the account's domain, served as the zone")
    serve_dns.add_argument("--secret-file", required=True,
                           help="the account secret (first line of `tunneld account new`)")
    serve_dns.add_argument("--listen", default=DEFAULT_DNS_LISTEN,
                           help=f"ADDR:PORT for UDP and TCP (default {DEFAULT_DNS_LISTEN}, IPv4 and IPv6)")
    serve_dns.add_argument("--db", default=DEFAULT_DNS_DB, help=f"zone database (default {DEFAULT_DNS_DB})")
    serve_dns.add_argument("--server-name", help="this server's host name in NS/SOA/SRV (default ns.ZONE)")
    serve_dns.add_argument("--min-lease", type=int, metavar="SECONDS",
                           help="the shortest update lease granted (default 1800, RFC 9664's minimum)")
    serve_dns.add_argument("--default-lease", type=int, metavar="SECONDS",
                           help="grant this lease to updates without an RFC 9664 lease option (plain "
                                "RFC 2136 clients such as nsupdate); without it such updates are refused")
    serve_dns.add_argument("--rate-limit", type=int, metavar="REPLIES",
                           help="unsigned UDP answers per second to one /24 or /56 (errors: half as many; "
                                "default 20; 0: no rate limiting); beyond, replies are dropped or truncated")
    serve_dns.add_argument("--stun", type=int, action="append", metavar="PORT",
                           help="also answer STUN Binding on this UDP port (repeatable; the DNS port always "
                                "does): a second port lets devices tell how their NAT maps")
    serve_dns.add_argument("--metrics", metavar="ADDR:PORT",
                           help="serve Prometheus metrics over HTTP there, e.g. 127.0.0.1:9587")
    serve_dns.add_argument("--tls", action="store_true",
                           help="also serve DNS over TLS (RFC 7858) on port 853 of the --listen address, "
                                "with a certificate under the account CA (`tunneld account ca`) or "
                                "--tls-cert's")
    serve_dns.add_argument("--tls-listen", metavar="ADDR:PORT",
                           help="serve DNS over TLS there instead (implies --tls)")
    serve_dns.add_argument("--tls-cert", metavar="FILE",
                           help="with --tls: present this PEM chain (e.g. a public CA's fullchain.pem) "
                                "instead of a certificate under the account CA; it must name the --zone "
                                "domain, and a renewed one needs a restart (read once, at start)")
    serve_dns.add_argument("--tls-key", metavar="FILE",
                           help="the private key (PEM) of --tls-cert, e.g. privkey.pem")
    serve_dns.add_argument("--primary", metavar="ADDR:PORT",
                           help="front mode: forward the devices' updates to this primary DNS server (BIND, "
                                "Knot, PowerDNS) and delete expired leases there; needs --primary-key")
    serve_dns.add_argument("--primary-key", metavar="FILE",
                           help="the TSIG key stanza (key \"front.ZONE.\" { algorithm ...; secret ...; };) "
                                "the front signs with; the primary grants it updates of the zone")
    serve_dns.add_argument("--primary-check", metavar="SECONDS", type=_positive_seconds,
                           help="front mode: ask the primary's SOA serial this often (default 30), so that "
                                "a change whose NOTIFY was lost still reaches the LLQ and DNS Push watchers")
    serve_dns.add_argument("--take-over", action="store_true",
                           help="front mode: take the zone's leases over from another front whose machine is "
                                "gone for good (records without a lease here get the longest lease)")
    serve_dns.add_argument("--llq-max", type=int, metavar="N",
                           help="long-lived queries held at most, half-open ones included (default 10000); "
                                "one client address may hold a quarter of them")
    serve_dns.add_argument("--llq-max-per-key", type=int, metavar="N",
                           help="of those, what the LLQs signed with one TSIG key may hold (default three "
                                "quarters of --llq-max: 7500)")
    serve_dns.add_argument("--user", default="tunneld",
                           help="run as this user once the ports are bound (default tunneld; root: no drop)")
    serve_dns.add_argument("--verbose", "-v", action="store_true", help="our debug logging")
    serve_dns.add_argument("--debug-libs", action="store_true", help="the libraries' debug logging too")
    serve_dns.set_defaults(func=cmd_serve_dns)
