"""The one face of every sans-I/O protocol core (docs/architecture.md, "Cores and the driver").

A core takes bytes and ``now`` and hands out what to send and what happened, the same way for every
protocol, so one trio driver (:mod:`tunneld.services.driver`) runs any of them and tests drive any of them
in memory. A core never reads a clock, a socket or the environment; randomness comes in through its
constructor. ``now`` is in the core's own clock, chosen by whoever drives it (the driver's ``clock``):
monotonic seconds for most cores, Unix seconds for the DNS cores, whose TSIG needs the wall clock and whose
leases must count the time a laptop spends suspended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

__all__ = ["Address", "Core", "Outbox", "Transmit"]

Address = tuple[str, int]
"""(host, port): the peer a datagram came from or goes to."""

E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class Transmit:
    """One datagram to send."""

    destination: Address
    payload: bytes


class Core(Protocol[E]):
    """What the driver needs of a core. Inputs that are not datagrams or timers (a new endpoint to
    publish, a question to watch) are the core's own methods; the caller then asks the driver to flush."""

    def receive(self, data: bytes, source: Address, now: float) -> None:
        """A datagram from the network. Never raises on bad input: it is dropped and counted."""

    def poll(self, now: float) -> None:
        """Timers: retransmissions, renewals, refreshes. Harmless when nothing is due."""

    def deadline(self) -> float | None:
        """When :meth:`poll` next has work (in the core's clock), or None."""

    def transmits(self) -> list[Transmit]:
        """What to send now; each call hands out what accumulated since the last one."""

    def events(self) -> list[E]:
        """What happened (typed dataclasses of the core's module); drained like :meth:`transmits`."""

    def close(self, now: float) -> None:
        """Begin the goodbye (delete the mapping, withdraw records, cancel queries); its messages come
        out of :meth:`transmits`. After this the core renews nothing."""

    def finished(self) -> bool:
        """True once the goodbye needs nothing more (answered, or nothing to say)."""


class Outbox(Generic[E]):
    """The queues behind :meth:`Core.transmits` and :meth:`Core.events`, for a core to inherit."""

    def __init__(self) -> None:
        self._transmits: list[Transmit] = []
        self._events: list[E] = []

    def transmits(self) -> list[Transmit]:
        out, self._transmits = self._transmits, []
        return out

    def events(self) -> list[E]:
        out, self._events = self._events, []
        return out

    def _send(self, destination: Address, payload: bytes) -> None:
        self._transmits.append(Transmit(destination, payload))

    def _emit(self, event: E) -> None:
        self._events.append(event)
