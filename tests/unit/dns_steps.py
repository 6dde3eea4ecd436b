"""Test views of the DNS client cores (LLQ client, watcher): each call of the core face, then what it sent
and reported, in one value the assertions read.

A core hands out its datagrams and events through ``transmits()`` and ``events()`` (:mod:`tunneld.proto.
core`); these views call the core, drain both, and return them as a :class:`Step`, whose transmits carry
``.wire``. Everything else (state, counters, records) is the core's own, read through.
"""

from __future__ import annotations

from typing import Any, Generic, NamedTuple, TypeVar

from tunneld.proto.core import Address
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
