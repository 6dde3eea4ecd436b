"""Test views of the DNS client cores (publisher, LLQ client, watcher): each call of the core face, then
what it sent and reported, in one value the assertions read.

A core hands out its datagrams and events through ``transmits()`` and ``events()`` (:mod:`tunneld.proto.
core`); these views call the core, drain both, and return them as a :class:`Step`, whose transmits carry
``.wire``. Everything else (state, counters, records) is the core's own, read through.
"""

from __future__ import annotations

from typing import Any, Generic, NamedTuple, TypeVar

from tunneld.proto.core import Address
from tunneld.proto.dnsupdate import Event as PublisherEvent
from tunneld.proto.dnsupdate import Publisher
from tunneld.proto.llq import LLQClient
from tunneld.proto.watcher import Watcher

SERVER: Address = ("192.0.2.53", 53)

E = TypeVar("E")


class Sent(NamedTuple):
    """A datagram the core sent (to ``SERVER``: the view checks)."""

    wire: bytes


class Step(NamedTuple, Generic[E]):
    transmits: list[Sent]
    events: list[E]


class _View:
    def __init__(self, core: Any) -> None:
        self.core = core

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    def _step(self) -> Step[Any]:
        sent = []
        for t in self.core.transmits():
            assert t.destination == SERVER, t.destination
            sent.append(Sent(t.payload))
        return Step(sent, self.core.events())

    def receive(self, wire: bytes, now: float, source: Address = SERVER) -> Step[Any]:
        self.core.receive(wire, source, now)
        return self._step()

    def poll(self, now: float) -> Step[Any]:
        self.core.poll(now)
        return self._step()


class ClientView(_View):
    """An :class:`LLQClient`: ``start`` returns its one request, ``stop`` (close) what it sent."""

    core: LLQClient

    def start(self, now: float) -> Sent:
        self.core.start(now)
        [sent] = self._step().transmits
        return sent

    def stop(self, now: float) -> list[Sent]:
        self.core.close(now)
        return self._step().transmits


class WatcherView(_View):
    """A :class:`Watcher`: ``start`` and ``stop`` (close) return what it sent."""

    core: Watcher

    def start(self, now: float) -> list[Sent]:
        self.core.start(now)
        return self._step().transmits

    def stop(self, now: float) -> list[Sent]:
        self.core.close(now)
        return self._step().transmits


def llq_client(*args: Any, **kwargs: Any) -> ClientView:
    return ClientView(LLQClient(*args, server=SERVER, **kwargs))


def watcher(*args: Any, **kwargs: Any) -> WatcherView:
    return WatcherView(Watcher(*args, server=SERVER, **kwargs))


class Update(NamedTuple):
    """An UPDATE the publisher sent, and its message ID."""

    payload: bytes
    message_id: int


class PublisherView(_View):
    """A :class:`Publisher`: each call returns what it sent (publish, endpoint_changed, withdraw: the one
    UPDATE or None; poll: a list) or, for receive, the events. ``events`` keeps every event so far."""

    core: Publisher

    def __init__(self, core: Publisher) -> None:
        super().__init__(core)
        self.events: list[PublisherEvent] = []

    def _updates(self) -> list[Update]:
        sent = []
        for t in self.core.transmits():
            assert t.destination == SERVER, t.destination
            sent.append(Update(t.payload, int.from_bytes(t.payload[:2], "big")))
        self.events.extend(self.core.events())
        return sent

    def _one(self) -> Update | None:
        sent = self._updates()
        assert len(sent) <= 1
        return sent[0] if sent else None

    def publish(self, rrsets: Any, now: float) -> Update:
        self.core.publish(rrsets, now)
        sent = self._one()
        assert sent is not None
        return sent

    def endpoint_changed(self, rrsets: Any, now: float) -> Update:
        self.core.endpoint_changed(rrsets, now)
        sent = self._one()
        assert sent is not None
        return sent

    def withdraw(self, now: float) -> Update | None:
        self.core.withdraw(now)
        return self._one()

    def poll(self, now: float) -> list[Update]:  # type: ignore[override]
        self.core.poll(now)
        return self._updates()

    def receive(self, wire: bytes, now: float, source: Address = SERVER) -> list[PublisherEvent]:  # type: ignore[override]
        before = len(self.events)
        self.core.receive(wire, source, now)
        assert self._updates() == []
        return self.events[before:]


def publisher(*args: Any, **kwargs: Any) -> PublisherView:
    return PublisherView(Publisher(*args, server=SERVER, **kwargs))
