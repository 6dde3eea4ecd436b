"""Server configuration for the account zone on a real primary and its secondaries: BIND named.conf
statements, and PowerDNS settings and pdnsutil commands.

The text `tunneld account primary-config` and `secondary-config` print, and the lab's BIND and PowerDNS
run as it is (lab/bind.py, lab/pdns.py): one generator for both, so what the tests run is what the user
is told to write. Every value is checked before it reaches the text: names are LDH (normalize_domain),
addresses are IP literals, the zone file is printable ASCII without quotes or backslashes, keys are
base64. The roles, the keys and what each server allows: docs/rendezvous.md.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Final

from tunneld.config_values import show
from tunneld.crypto.kdf import normalize_domain


def key_stanza(name: str, tsig_key: bytes) -> str:
    """A named.conf key statement for ``name`` (already a checked, absolute DNS name)."""
    return (
        f'key "{name}" {{\n'
        f"\talgorithm hmac-sha256;\n"
        f'\tsecret "{base64.b64encode(tsig_key).decode()}";\n'
        f"}};\n"
    )


Server = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]

PRIMARY_OPTIONS: Final = ("notify-rate 1000;",)
"""Server-wide options a primary needs (named.conf's options block: no zone statement takes them). BIND
applies a rate above 10/s as batches of 10 every 10/rate seconds, and a NOTIFY queued while idle waits for
the next batch: 500 ms at the default 20/s, 10 ms at 1000/s (docs/rendezvous.md, "The secondary's lag")."""
SECONDARY_OPTIONS: Final = ("serial-query-rate 1000;",)
"""The same for a secondary: its SOA query and transfer after a NOTIFY go through that rate limiter too."""
_OPTIONS_NOTE: Final = "// and in named.conf's options { } block (server-wide: no zone statement takes it):\n"


def options_note(options: tuple[str, ...]) -> str:
    """The comment lines after a stanza that name the server-wide ``options`` to set (named.conf comments:
    the text stays one that named-checkconf accepts as it is)."""
    return _OPTIONS_NOTE + "".join(f"//\t{o}\n" for o in options)


def server_options(stanza: str) -> list[str]:
    """The options an :func:`options_note` in ``stanza`` names (what the lab puts in its options block)."""
    lines = stanza.splitlines(keepends=True)
    if _OPTIONS_NOTE not in lines:
        return []
    return [line[3:].strip() for line in lines[lines.index(_OPTIONS_NOTE) + 1:] if line.startswith("//\t")]


def check_zone_file(path: str) -> str:
    """A zone file path for a named.conf string: printable ASCII without quote or backslash, or ValueError."""
    if not path or not all(" " <= c <= "~" and c not in '"\\' for c in path):
        raise ValueError(f"zone file {show(path)} must be printable ASCII without quotes or backslashes")
    return path


def _address(server: Server) -> str:
    return f"{server[0]} port {server[1]}"


def primary_stanza(domain: str, front: bytes, notify: list[Server], zone_file: str) -> str:
    """BIND named.conf statements for the account zone's primary: the front key, and a zone that only the
    front key may update (update-policy), query and transfer (the front and the secondaries), that
    NOTIFYs at once its NS secondaries and, signed with the front key, ``notify`` (the front first).
    ValueError for a bad value."""
    name = normalize_domain(domain)
    targets = " ".join(f"{_address(s)} key front.{name}.;" for s in notify)
    return (
        key_stanza(f"front.{name}.", front)
        + f'zone "{name}" {{\n'
        f"\ttype primary;\n"
        f'\tfile "{check_zone_file(zone_file)}";\n'
        f"\tupdate-policy {{ grant front.{name}. zonesub ANY; }};\n"
        f"\tallow-query {{ key front.{name}.; }};\n"
        f"\tallow-transfer {{ key front.{name}.; }};\n"
        f"\tnotify yes;\n"
        f"\tnotify-delay 0;\n"
        f"\talso-notify {{ {targets} }};\n"
        f"}};\n"
        + options_note(PRIMARY_OPTIONS)
    )


def secondary_stanza(domain: str, account: bytes, front: bytes, primary: Server, zone_file: str) -> str:
    """BIND named.conf statements for a secondary of the account zone: both keys, and a zone transferred
    from ``primary`` with the front key, answering only queries signed with the account key, transferring
    to no one. ValueError for a bad value."""
    name = normalize_domain(domain)
    return (
        key_stanza(f"front.{name}.", front)
        + key_stanza(f"{name}.", account)
        + f'zone "{name}" {{\n'
        f"\ttype secondary;\n"
        f'\tfile "{check_zone_file(zone_file)}";\n'
        f"\tprimaries {{ {_address(primary)} key front.{name}.; }};\n"
        f"\tallow-query {{ key {name}.; }};\n"
        f"\tallow-transfer {{ none; }};\n"
        f"\tnotify no;\n"
        f"}};\n"
        + options_note(SECONDARY_OPTIONS)
    )


PDNS_SETTINGS = (
    "primary=yes",  # send NOTIFY (to the zone's NS and ALSO-NOTIFY)
    "dnsupdate=yes",  # RFC 2136, for the keys in TSIG-ALLOW-DNSUPDATE only
    "allow-dnsupdate-from=0.0.0.0/0,::/0",  # the address is not the check: the key is
    "allow-axfr-ips=",  # no transfer without a key in TSIG-ALLOW-AXFR
    "disable-axfr=no",
    "only-notify=",  # NOTIFY only ALSO-NOTIFY's addresses: no NS name is resolved (it would block updates)
)
"""pdns.conf settings of a PowerDNS primary of the account zone (beside launch= and the backend's)."""


def pdns_primary_commands(domain: str, front: bytes, notify: list[Server]) -> list[list[str]]:
    """pdnsutil commands (argument lists) that make an existing zone ``domain`` of a PowerDNS primary the
    account zone: the front key imported, updates and transfers for it only, the serial raised by each
    update (SOA-EDIT-DNSUPDATE) and NOTIFY sent at once after it (NOTIFY-DNSUPDATE), to ``notify`` too
    (ALSO-NOTIFY: the front and every secondary, as only-notify= turns off NOTIFY to the zone's NS).
    ValueError for a bad value."""
    name = normalize_domain(domain)
    key = f"front.{name}."
    targets = [f"[{a}]:{p}" if a.version == 6 else f"{a}:{p}" for a, p in notify]
    return [
        ["pdnsutil", "import-tsig-key", key, "hmac-sha256", base64.b64encode(front).decode()],
        ["pdnsutil", "set-kind", name, "primary"],
        ["pdnsutil", "set-meta", name, "TSIG-ALLOW-DNSUPDATE", key],
        ["pdnsutil", "set-meta", name, "TSIG-ALLOW-AXFR", key],
        ["pdnsutil", "set-meta", name, "SOA-EDIT-DNSUPDATE", "INCREASE"],
        ["pdnsutil", "set-meta", name, "NOTIFY-DNSUPDATE", "1"],
        ["pdnsutil", "set-meta", name, "ALSO-NOTIFY", *targets],
    ]
