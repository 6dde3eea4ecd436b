"""Parsers for single configuration values: interface name, public key, endpoint, STUN server, secret.

Each raises :class:`Problem` (what is wrong and how to fix it) without knowing the file or key; the reader
(tunneld.config) adds those. Values are rendered for messages by :func:`show`; secrets never are.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
import socket
import stat
from datetime import date, datetime, time
from pathlib import Path

from tunneld.config_model import DEFAULT_SERVICE_USER, Endpoint, StunServer
from tunneld.crypto.kdf import ACCOUNT_SECRET_LEN, normalize_domain
from tunneld.proto.records import check_name

_IFNAMSIZ = 16  # Linux: interface names are at most 15 bytes plus the NUL


class Problem(Exception):
    """A problem with a value, before it is known which file and key it belongs to.

    ``str()`` gives the one line "problem; fix".
    """

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix



def show(value: object) -> str:
    """A short, one-line rendering of a value from the file, for messages."""
    if isinstance(value, str):
        text = json.dumps(value)  # double quotes, like TOML, with control characters escaped
        return text if len(text) <= 70 else text[:60] + '…"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return type_name(value)


def type_name(value: object) -> str:
    """What kind of TOML value ``value`` is, for messages."""
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


def interface_name(name: str) -> str:
    """``name`` if it is a valid Linux interface name."""
    # Linux dev_valid_name(): not empty, shorter than IFNAMSIZ, not "." or "..", no "/", ":" or whitespace.
    # We also keep to printable ASCII, so the name is safe in logs and shell commands.
    fix = 'use 1 to 15 characters without "/", ":" or whitespace, e.g. "btmm0"'
    if not name:
        raise Problem("is empty", fix)
    if len(name.encode("utf-8")) >= _IFNAMSIZ:
        raise Problem(f"{show(name)} is longer than {_IFNAMSIZ - 1} bytes", fix)
    if name in (".", "..") or any(
        c in "/:" or not c.isascii() or not c.isprintable() or c.isspace() for c in name
    ):
        raise Problem(f"{show(name)} is not a valid Linux interface name", fix)
    return name


def hostname_label() -> str | None:
    """The hostname's first label, lower-cased, if it is a valid device name."""
    label = socket.gethostname().split(".")[0].lower()
    try:
        return check_name(label)
    except ValueError:
        return None


def public_key(text: str) -> bytes:
    """A peer's 32-byte public key from its base64. The text is never echoed."""
    fix = 'copy the peer\'s public key exactly: 44 characters of base64, ending in "="'
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Problem("not valid base64", fix) from None
    if len(raw) != 32:
        raise Problem(f"decodes to {len(raw)} bytes, not 32", fix)
    return raw


def endpoint(text: str) -> Endpoint:
    """``"192.0.2.1:4500"`` or ``"[2001:db8::1]:4500"``: IP literals only, names are not resolved."""
    fix = 'write "host:port" with an IP address, e.g. "192.0.2.1:4500" or "[2001:db8::1]:4500"'
    shown = show(text)
    host: ipaddress.IPv4Address | ipaddress.IPv6Address
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise Problem(f"{shown} has no closing bracket", fix)
        host_text, rest = text[1:close], text[close + 1 :]
        if not rest:
            raise Problem(f"{shown} has no port", fix)
        if not rest.startswith(":"):
            raise Problem(f"{shown} has something other than :port after the address", fix)
        port_text = rest[1:]
        try:
            host = ipaddress.IPv6Address(host_text)
        except ValueError:
            raise Problem(f"{show(host_text)} is not an IPv6 address", fix) from None
    else:
        host_text, colon, port_text = text.rpartition(":")
        if not colon:
            raise Problem(f"{shown} has no port", fix)
        if ":" in host_text:
            raise Problem(
                f"{shown} looks like an IPv6 address without brackets",
                'write "[v6]:port", e.g. "[2001:db8::1]:4500"',
            )
        try:
            host = ipaddress.IPv4Address(host_text)
        except ValueError:
            raise Problem(
                f"{show(host_text)} is not an IP address (names are not resolved here)",
                fix + "; leave endpoint out to find the peer through DNS",
            ) from None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise Problem(f"{show(port_text)} is not a port number", "use a port from 1 to 65535, e.g. 4500")
    return Endpoint(host, int(port_text))


def stun_server(text: str) -> StunServer:
    """``"192.0.2.53:53"``, ``"[2001:db8::53]:3478"`` or ``"stun.example.net:3478"`` (a name is resolved
    when used, not here)."""
    return StunServer(*host_port(text, None))


def relay_server(text: str, default_port: int) -> tuple[str, int]:
    """A TURN relay, ``"HOST:PORT"`` or ``"HOST"`` (``default_port``)."""
    return host_port(text, default_port)


def host_port(text: str, default_port: int | None) -> tuple[str, int]:
    """``"HOST:PORT"`` (or ``"HOST"`` when there is a ``default_port``): HOST an IP literal (IPv6 in
    brackets) or a DNS name, resolved when it is used, not here. Names come back normalized."""
    example = default_port or 3478
    fix = (f'write "host:port", e.g. "server.example.net:{example}", "192.0.2.7:{example}" or '
           f'"[2001:db8::7]:{example}"')
    shown = show(text)
    port_text = ""
    if text.startswith("["):
        host_text, close, rest = text[1:].partition("]")
        if not close:
            raise Problem(f"{shown} has no closing bracket", fix)
        if rest and not rest.startswith(":"):
            raise Problem(f"{shown} has something other than :port after the address", fix)
        if not rest and default_port is None:
            raise Problem(f"{shown} has no port", fix)
        port_text = rest[1:] if rest else str(default_port)
        try:
            host = str(ipaddress.IPv6Address(host_text))
        except ValueError:
            raise Problem(f"{show(host_text)} is not an IPv6 address", fix) from None
    else:
        if text.count(":") > 1:
            raise Problem(f"{shown} looks like an IPv6 address without brackets",
                          f'write "[v6]:port", e.g. "[2001:db8::7]:{example}"')
        host_text, colon, port_text = text.partition(":")
        if not colon and default_port is None:
            raise Problem(f"{shown} has no port", fix)
        port_text = port_text if colon else str(default_port)
        try:
            host = str(ipaddress.IPv4Address(host_text))
        except ValueError:
            if host_text.replace(".", "").isdigit():
                raise Problem(f"{show(host_text)} is not an IPv4 address", fix) from None
            try:
                host = normalize_domain(host_text)
            except ValueError as e:
                raise Problem(f"{show(host_text)} is neither an IP address nor a DNS name ({e})",
                              fix) from None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise Problem(f"{show(port_text)} is not a port number",
                      f"use a port from 1 to 65535, e.g. {example}")
    return host, int(port_text)


def listen_address(text: str) -> tuple[str, int]:
    """A local TCP listen address, ``"ADDR:PORT"`` (``[v6]:PORT``): an IP literal, not a name."""
    host, port = host_port(text, None)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise Problem(f"{show(host)} is not an IP address",
                      'listen on an address of this host, e.g. "127.0.0.1:9586" or "[::1]:9586"') from None


def user_name(text: str | None) -> str:
    """``[service] user``: a system user's name as useradd accepts it by default (its NAME_REGEX); None
    gives the default."""
    if text is None:
        return DEFAULT_SERVICE_USER
    if re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", text) is None:
        raise Problem(f"{show(text)} is not a user name", 'write user = "tunneld", or "root"')
    return text


def account_secret(path: Path) -> bytes:
    """The account secret in ``path``. Problems name the file only: its content is never echoed."""
    made_by = "the first line printed by `tunneld account new DOMAIN`"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except ValueError:  # a NUL byte
        raise Problem(f"{str(path)!r} is not a path (it holds a NUL byte)",
                      f"give the file holding {made_by}") from None
    except FileNotFoundError:
        raise Problem(
            f"{path} does not exist", f"save the account secret there ({made_by}), mode 0600"
        ) from None
    except OSError as e:
        raise Problem(
            f"cannot read {path}: {e.strerror}", "run tunneld as the file's owner, or fix its owner"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Problem(
                f"{path} is not a regular file", f"point secret_file at the file holding {made_by}"
            )
        if st.st_uid not in (os.geteuid(), 0):
            raise Problem(
                f"{path} is owned by uid {st.st_uid}, not by this user",
                f"run `chown {os.geteuid()} {path}` if that is intended",
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise Problem(
                f"{path} has mode {mode:04o}, which lets group or others access the account secret",
                f"run `chmod 600 {path}`",
            )
        data = os.read(fd, 4096)
    except OSError as e:
        raise Problem(f"cannot read {path}: {e.strerror}", "check the file") from None
    finally:
        os.close(fd)

    fix = f"it must hold exactly one line, the base64 of {ACCOUNT_SECRET_LEN} bytes ({made_by})"
    body = data[:-1] if data.endswith(b"\n") else data
    if not body:
        raise Problem(f"{path} is empty", fix)
    lines = body.count(b"\n") + 1
    if lines > 1:
        raise Problem(f"{path} has {lines} lines", fix)
    try:
        secret = base64.b64decode(body.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Problem(f"{path} is not valid base64", fix) from None
    if len(secret) != ACCOUNT_SECRET_LEN:
        raise Problem(f"{path} decodes to {len(secret)} bytes, not {ACCOUNT_SECRET_LEN}", fix)
    return secret
