"""What the port mapper reports: its events (out of :meth:`PortMapper.events`) and its status snapshot.

The daemon publishes :class:`EndpointChanged`; the one-shot probe waits for :class:`Granted` or
:class:`Refused`. Every event carries ``at``, the mapper's ``now`` when it happened.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Endpoint", "EndpointChanged", "Granted", "MapperState", "PortmapEvent", "Refused"]


@dataclass(frozen=True)
class Endpoint:
    """The public endpoint to publish: the gateway's external address and the *granted* external port."""

    address: str
    port: int


@dataclass(frozen=True)
class EndpointChanged:
    """The public endpoint appeared (old None), changed, or disappeared (new None) at time ``at``."""

    old: Endpoint | None
    new: Endpoint | None
    at: float


@dataclass(frozen=True)
class Granted:
    """The gateway granted (or renewed) the mapping: external ``port`` for ``lifetime`` seconds, in
    ``protocol``. Also sent behind a double NAT, where nothing is published."""

    protocol: str
    port: int
    lifetime: int
    at: float


@dataclass(frozen=True)
class Refused:
    """The gateway answered with an error (``result_code``), or with a success that grants nothing
    (``result_code`` 0, lifetime or port 0); ``message`` says which. The request is retried later."""

    protocol: str
    result_code: int
    message: str
    at: float


PortmapEvent = EndpointChanged | Granted | Refused


@dataclass(frozen=True)
class MapperState:
    """A status snapshot. ``protocol`` is the one the gateway has answered in (None before any answer);
    ``result_code`` is the last result code (None for conditions without one, such as no answer)."""

    protocol: str | None
    gateway: str
    internal_port: int
    external_address: str | None
    external_port: int | None
    lifetime: int | None
    expires_at: float | None
    endpoint: Endpoint | None
    result_code: int | None
    result_message: str
    double_nat: bool
    double_nat_message: str | None
    no_answer: bool
