"""The rendezvous DNS server (``tunneld serve-dns``): zone store with leases, and the sans-I/O handler.

- :mod:`tunneld.dnsserver.store`: :class:`ZoneStore`, SQLite-backed, durable, time passed in.
- :mod:`tunneld.dnsserver.core`: :class:`DnsCore`, ``handle(wire, src, now_wall) -> bytes | None`` for
  QUERY and UPDATE with TSIG and RFC 9664 leases.

The LLQ server and the trio listeners build on these two (see the module docstrings for the seams).
"""

from __future__ import annotations

from tunneld.dnsserver.core import DnsCore, Policy, account_key
from tunneld.dnsserver.store import Lease, ZoneStore

__all__ = ["DnsCore", "Lease", "Policy", "ZoneStore", "account_key"]
