"""The `tunneld` command line.

Exit codes (ARCHITECTURE.md): 0 ok, 1 runtime failure, 2 bad usage or config, always with one line
that names the problem and the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from typing import NoReturn

from crypto.kdf import ACCOUNT_SECRET_LEN, derive_tsig_key, normalize_domain
from tunneld import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad usage or configuration: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; we print one line that says what to do.
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def tsig_stanza(domain: str, tsig_key: bytes) -> str:
    """The key statement for BIND's named.conf (and `nsupdate -k`); Knot reads the same three fields."""
    return (
        f'key "{domain}." {{\n'
        f"\talgorithm hmac-sha256;\n"
        f'\tsecret "{base64.b64encode(tsig_key).decode()}";\n'
        f"}};\n"
    )


def cmd_account_new(args: argparse.Namespace) -> int:
    try:
        domain = normalize_domain(args.domain)
    except ValueError as e:
        raise UsageError(
            f"bad account domain {args.domain!r}: {e}; give a DNS name such as home.example.net"
        ) from None
    secret = os.urandom(ACCOUNT_SECRET_LEN)
    # The first line alone is the secret file's content; everything after it is for the DNS server.
    sys.stdout.write(base64.b64encode(secret).decode() + "\n")
    sys.stdout.write(
        f"\n# Save the line above, alone, as the secret_file of every device of {domain} (mode 0600).\n"
        f"# TSIG key for the account's DNS server (BIND named.conf, nsupdate -k):\n"
    )
    sys.stdout.write(tsig_stanza(domain, derive_tsig_key(secret, domain)))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tunneld", description="Back to My Mac for Linux.")
    p.add_argument("--version", action="version", version=f"tunneld {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    account = sub.add_parser("account", help="manage the account shared by your devices")
    asub = account.add_subparsers(dest="account_command", required=True, parser_class=_Parser)
    new = asub.add_parser("new", help="print a fresh account secret and its TSIG key stanza")
    new.add_argument("domain", help="the account's DNS domain, e.g. home.example.net")
    new.set_defaults(func=cmd_account_new)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args))
    except UsageError as e:
        print(f"tunneld: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE
