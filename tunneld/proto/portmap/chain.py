"""The gateway's port mapping in order: PCP, then NAT-PMP (the :class:`PortMapper`), then UPnP IGD.

A sans-I/O core over two cores. The PortMapper starts at once; the :class:`UpnpMapper` searches for an IGD
at the same time (SSDP, then the description: a few small exchanges) but maps only once PCP and NAT-PMP
have failed: no answer to either within :data:`UPNP_AFTER`, or an error answer. The first protocol to
grant a mapping is kept and the other core is dropped (it holds nothing). SSDP answers (HTTP text) go to
the UPnP core, every other datagram to the PortMapper. docs/portmap.md ("UPnP IGD") has the reasons.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Final

from tunneld.proto.core import Address, Outbox
from tunneld.proto.portmap.events import Granted, MapperState, Refused
from tunneld.proto.portmap.mapper import PortMapper
from tunneld.proto.portmap.natpmp_wire import NATPMP_DEFAULT_LIFETIME
from tunneld.proto.portmap.upnp import UPNP, HttpRequest, UpnpEvent, UpnpMapper

__all__ = ["UPNP_AFTER", "GatewayMapper", "HttpRequest", "UpnpEvent"]

UPNP_AFTER: Final = 3.0
"""Seconds without any PCP or NAT-PMP answer before UPnP maps (PCP's first retransmission time, RFC 6887
§8.1.1 IRT: a PCP gateway has answered by then)."""

PMP: Final = "pcp/nat-pmp"


class GatewayMapper(Outbox[UpnpEvent]):
    """One UDP mapping of ``internal_address``:``internal_port`` on ``gateway`` by whichever protocol it
    speaks. ``upnp=False`` leaves PCP and NAT-PMP alone; ``multicast`` also searches the SSDP group."""

    def __init__(self, internal_address: str, internal_port: int, gateway: str,
                 lifetime: int = NATPMP_DEFAULT_LIFETIME, rand: Callable[[int], bytes] = os.urandom,
                 upnp: bool = True, multicast: bool = False) -> None:
        super().__init__()
        self.pmp = PortMapper(internal_address, internal_port, gateway, lifetime, rand)
        self.upnp = UpnpMapper(internal_address, internal_port, gateway, lifetime, rand, multicast) \
            if upnp else None
        self.chosen: str | None = None  # PMP or UPNP, once decided
        self._started_at: float | None = None
        self._pmp_refused = False
        self._held: Refused | None = None  # a PCP/NAT-PMP refusal kept back while UPnP may still map
        self._dropped: Counter[str] = Counter()

    # -- what the service and status read ------------------------------------------------------------------

    @property
    def counters(self) -> Counter[str]:
        merged = Counter(self.pmp.counters) + self._dropped
        if self.upnp is not None:
            merged.update({f"upnp: {k}": v for k, v in self.upnp.counters.items()})
        return merged

    @property
    def state(self) -> MapperState:
        if self.chosen == UPNP and self.upnp is not None:
            return self.upnp.state
        return self.pmp.state

    @property
    def delete_confirmed(self) -> bool:
        if self.chosen == UPNP and self.upnp is not None:
            return self.upnp.delete_confirmed
        return self.pmp.delete_confirmed

    def _live(self) -> list[PortMapper | UpnpMapper]:
        cores: list[PortMapper | UpnpMapper] = []
        if self.chosen != UPNP:
            cores.append(self.pmp)
        if self.upnp is not None and self.chosen != PMP:
            cores.append(self.upnp)
        return cores

    # -- the core face -------------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        if self._started_at is not None:
            return
        self._started_at = now
        for core in self._live():
            core.start(now)
        self._settle(now)

    def receive(self, data: bytes, source: Address, now: float) -> None:
        ssdp = data[:5] == b"HTTP/"
        core = self.upnp if ssdp else self.pmp
        if core is None or core not in self._live():
            self._dropped["for the protocol not in use"] += 1
            return
        core.receive(data, source, now)
        self._settle(now)

    def http_answer(self, request_id: int, data: bytes | None, now: float) -> None:
        """The response to an :class:`HttpRequest` (None: the exchange failed)."""
        if self.upnp is not None and self.upnp in self._live():
            self.upnp.http_answer(request_id, data, now)
            self._settle(now)

    def poll(self, now: float) -> None:
        for core in self._live():
            core.poll(now)
        self._settle(now)

    def deadline(self) -> float | None:
        times = [t for core in self._live() if (t := core.deadline()) is not None]
        if self._undecided_upnp_waits():
            assert self._started_at is not None
            times.append(self._started_at + UPNP_AFTER)
        return min(times, default=None)

    def close(self, now: float) -> None:
        for core in self._live():
            core.close(now)
        self._settle(now)

    def finished(self) -> bool:
        return all(core.finished() for core in self._live())

    # -- the order -----------------------------------------------------------------------------------------

    def _undecided_upnp_waits(self) -> bool:
        return (self.chosen is None and self.upnp is not None and self.upnp.ready
                and self._started_at is not None and not self._pmp_refused
                and self.pmp.state.protocol is None)

    def _settle(self, now: float) -> None:
        self._pump()
        self._decide(now)
        self._pump()

    def _decide(self, now: float) -> None:
        upnp = self.upnp
        if self.chosen is not None or upnp is None or self._started_at is None:
            return
        if upnp.finished() and not upnp.ready:  # closed before finding anything
            return
        if not upnp.ready:
            if upnp.gave_up_search and self._held is not None:  # no IGD either: report the refusal
                self._emit(self._held)
                self._held = None
            return
        silent = self.pmp.state.protocol is None and now >= self._started_at + UPNP_AFTER
        if self._pmp_refused or silent:
            self.chosen = UPNP
            self._held = None
            upnp.map(now)

    def _pump(self) -> None:
        """Pass the live cores' datagrams and events on; the first grant decides the protocol."""
        pmp_live = self.chosen != UPNP
        transmits, events = self.pmp.transmits(), self.pmp.events()
        if pmp_live:
            for t in transmits:
                self._send(t.destination, t.payload)
            for event in events:
                if isinstance(event, Granted) and self.chosen is None:
                    self.chosen = PMP
                    self._held = None
                if isinstance(event, Refused) and self.chosen is None and self.upnp is not None \
                        and not self.upnp.gave_up_search:
                    self._pmp_refused = True
                    self._held = event
                    continue
                self._emit(event)
        if self.upnp is None:
            return
        transmits, upnp_events = self.upnp.transmits(), self.upnp.events()
        if self.chosen == PMP:
            return
        for t in transmits:
            self._send(t.destination, t.payload)
        for upnp_event in upnp_events:
            self._emit(upnp_event)
