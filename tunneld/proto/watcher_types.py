"""The watcher's events and the face of its clients (one per question: an LLQ client, or a Push client).

Split out of :mod:`tunneld.proto.watcher` (which re-exports them) when the watcher learnt DNS Push: the
events are what the daemon consumes, whatever carries the records.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import dns.name
import dns.rdatatype

from tunneld.proto import hostkeys, records
from tunneld.proto.core import Address, Transmit
from tunneld.proto.llq import Event, LLQState, TcpQuery
from tunneld.proto.push_client import DropConnection, Refused
from tunneld.proto.tsig import TsigSession

__all__ = [
    "ClientFactory",
    "DropConnection",
    "PeerGone",
    "PeerLearned",
    "PeerRejected",
    "QueryStatus",
    "TcpQuery",
    "TransportStatus",
    "WatchClient",
    "WatcherEvent",
]


# -- events ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerLearned:
    """A host's records are consistent (new, or changed since the last PeerLearned): its identity, and
    its endpoint if it publishes one."""

    host: records.HostRecords
    host_keys: tuple[hostkeys.HostKey, ...] = ()
    """The host's SSH host keys, each vouched for by its SSHFP (empty unless the watcher follows them)."""

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """The host's published outer (address, port) pairs, IPv4 first (none for an identity alone)."""
        return self.host.endpoints

    @property
    def endpoint(self) -> tuple[str, int] | None:
        """The first published endpoint (IPv4 preferred), for ``TunnelCore.learn_peer``; None when the
        host publishes no endpoint (it is then reached once it has sent us an authenticated packet)."""
        endpoints = self.endpoints
        return endpoints[0] if endpoints else None

    @property
    def nat(self) -> str | None:
        """The host's ``nat=`` mark: "ei" (its endpoint is an observed binding: punch it), "pd" (only its
        address means something), or None (a mapped or public endpoint)."""
        return self.host.nat

    @property
    def relay(self) -> tuple[str, int] | None:
        """The host's TURN relayed address (``relay=``), where a peer sends when no direct path works."""
        return self.host.relay


@dataclass(frozen=True)
class PeerGone:
    """A host learned before is no longer usable (records withdrawn, broken, or the host left)."""

    name: str
    public_key: bytes


@dataclass(frozen=True)
class PeerRejected:
    """A host's records are inconsistent; ``reason`` is the ParseError message (``<counter>: <detail>``)."""

    name: str
    reason: str


@dataclass(frozen=True)
class QueryStatus:
    """A client's LLQ status changed: ``status`` is ``established``, ``failed`` or ``fallback``."""

    qname: dns.name.Name
    rdtype: dns.rdatatype.RdataType
    status: str
    detail: str = ""


@dataclass(frozen=True)
class TransportStatus:
    """What the watcher follows the account by: ``push`` (DNS Push over TLS) or ``llq`` (LLQ over UDP:
    the only path without TLS, and the fallback while Push is unavailable, ``detail`` saying why)."""

    transport: str
    detail: str = ""


WatcherEvent = (PeerLearned | PeerGone | PeerRejected | QueryStatus | TransportStatus | TcpQuery
                | DropConnection)
"""A client's :class:`TcpQuery` is passed on as it is: the service sends it and feeds the reply back. The
Push session's :class:`DropConnection` too: the service closes the TLS connection."""


# -- the client interface ----------------------------------------------------------------------------------


class WatchClient(Protocol):
    """What the watcher needs of a client for one question (:class:`~tunneld.proto.llq.LLQClient`)."""

    qname: dns.name.Name
    rdtype: dns.rdatatype.RdataType
    state: LLQState
    counters: Counter[str]

    def start(self, now: float) -> None: ...

    def close(self, now: float) -> None: ...

    def receive(self, data: bytes, source: Address, now: float) -> None: ...

    def poll(self, now: float) -> None: ...

    def transmits(self) -> list[Transmit]: ...

    def events(self) -> Sequence[Event | Refused]: ...

    def deadline(self) -> float | None: ...


class ClientFactory(Protocol):
    def __call__(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, *,
                 server: Address, rand: Callable[[int], bytes], lease: int,
                 tsig: TsigSession | None) -> WatchClient: ...
