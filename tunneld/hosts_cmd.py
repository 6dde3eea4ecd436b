"""`tunneld hosts`: the lines the running daemon keeps (or would keep) in the hosts file's block.

For a user who manages /etc/hosts another way (``[names] enabled = false``): the daemon is asked over its
control socket, so the answer is the devices it knows now. Plain output is the block as it would be written,
then, as comment lines, the SHA-256 fingerprints of the peers' SSH host keys the daemon holds (to compare
with ``ssh-keygen -l`` on the peer).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tunneld.config_model import DEFAULT_CONFIG_PATH
from tunneld.marked_block import begin_marker, end_marker

__all__ = ["add_parser", "cmd_hosts", "render"]


def render(answer: dict[str, Any]) -> str:
    """The block as the daemon writes it, markers included, or a note that the account has no names; then
    the host-key fingerprints as comments (none when the daemon keeps no known-hosts block)."""
    lines = answer.get("lines")
    domain = answer.get("domain")
    if not isinstance(lines, list) or not isinstance(domain, str):
        raise ValueError("the daemon's hosts answer has no domain or lines")
    if not lines:
        text = f"# no devices of {domain} known yet\n"
    else:
        text = "".join(f"{line}\n" for line in [begin_marker(domain), *map(str, lines), end_marker(domain)])
    return text + _render_keys(answer)


def _render_keys(answer: dict[str, Any]) -> str:
    path, keys = answer.get("known_hosts"), answer.get("host_keys")
    if not isinstance(path, str):
        return ""  # no [ssh] known_hosts (or a daemon older than the fingerprints)
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise ValueError("the daemon's hosts answer has malformed host keys")
    if not keys:
        return f"# no peer host keys held yet (known hosts: {path})\n"
    rows = [(str(k.get("name")), str(k.get("algorithm")), str(k.get("fingerprint"))) for k in keys]
    width = max(len(name) for name, _, _ in rows)
    return f"# peer host keys in {path}:\n" + "".join(
        f"#   {name:<{width}} {algorithm} {fingerprint}\n" for name, algorithm, fingerprint in rows)


def cmd_hosts(args: argparse.Namespace) -> int:
    from tunneld.cli import EXIT_FAILURE, EXIT_OK, _ask

    answer = _ask(args, {"cmd": "hosts"})
    if answer is None:
        return EXIT_FAILURE
    if "error" in answer:
        print(f"tunneld: the daemon refused: {answer['error']} (is it older than this command?)",
              file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
        return EXIT_OK
    try:
        sys.stdout.write(render(answer))
    except ValueError as e:
        print(f"tunneld: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """The `hosts` subcommand (the command line's parser hook)."""
    p = sub.add_parser("hosts", help="print the names and ULAs the daemon keeps in the hosts file, and the "
                       "peers' host-key fingerprints")
    p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH),
                   help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    p.add_argument("--socket", help="control socket (default: from the config)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_hosts)
