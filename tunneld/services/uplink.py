"""Where this machine is seen from outside: the port mapping on the current gateway and the public
endpoint that follows from it, redone whenever the network or the outer port changes.

Three cases, decided from the default route: a private address behind a gateway (ask it for a mapping
by PCP, NAT-PMP or UPnP IGD; the endpoint is what it grants), a public address (the endpoint is that
address and our port), or no route (no endpoint). A device without an endpoint is still a member: it
publishes its identity alone and reaches its peers first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from tunneld.config import PortmapConfig
from tunneld.net import links
from tunneld.proto.portmap.events import Endpoint
from tunneld.services.portmap import PortmapService, status_dict

__all__ = ["Uplink"]

log = logging.getLogger("tunneld.uplink")


class Uplink:
    """Owns the port-mapping service; tells ``on_endpoint`` each new public endpoint (None: none)."""

    def __init__(self, config: PortmapConfig, local_port: Callable[[], int],
                 on_endpoint: Callable[[str | None], None],
                 default_route: Callable[[], links.DefaultRoute | None] = links.default_route_v4) -> None:
        self.config = config
        self.local_port = local_port
        self.on_endpoint = on_endpoint
        self.default_route = default_route
        self.portmap: PortmapService | None = None
        self.static = ("disabled", "disabled in the config")  # (state, result) without a mapper
        self.endpoint: str | None = None
        self.mappings_started = 0
        self._announced = False
        self._scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Find out where we are and, behind a NAT, start mapping (ready once the first request left).
        ``on_endpoint`` hears the outcome once, even when it is the same as before: the caller redoes
        what depends on it (until a gateway answers, the endpoint is None: the old one belongs to the
        old network)."""
        self._stop_mapping()
        self._announced = False
        self.endpoint = self._decide()
        if self.static[0] == "mapping":
            cfg, route = self.config, self.default_route()
            gateway = cfg.gateway or (route.gateway if route else "")
            internal = route.address if route is not None and cfg.gateway is None else \
                links.source_address_for(gateway)
            service = PortmapService(internal, self.local_port(), gateway, cfg.lifetime,
                                     on_endpoint=self._on_mapped)
            scope = trio.CancelScope()
            self.portmap, self._scope = service, scope
            self.mappings_started += 1

            async def run(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                with scope:  # cancelled: the service deletes its mapping within its grace, on its own
                    await service.run(task_status=task_status)

            await nursery.start(run)
        if not self._announced:  # a gateway that answered at once has announced it already
            self.on_endpoint(self.endpoint)

    def _decide(self) -> str | None:
        """Sets ``static`` and returns the endpoint known without asking a gateway."""
        cfg = self.config
        if not cfg.enabled:
            self.static = ("disabled", "disabled in the config")
            return None
        route = self.default_route()
        if cfg.gateway is None and route is None:
            self.static = ("no-gateway", "no IPv4 default route: nothing to map")
            return None
        if cfg.gateway is None and route is not None and not route.behind_nat:
            self.static = ("public", f"{route.address} is a public address: no port mapping needed")
            return f"{route.address}:{self.local_port()}"
        self.static = ("mapping", "asking the gateway")
        return None

    @property
    def behind_unmapped_nat(self) -> bool:
        """Whether we may sit behind a NAT that forwards nothing to us: a gateway is being asked and has
        not granted a mapping, or mapping is off and we cannot tell. Peers can then reach us only
        through bindings our own packets hold open."""
        return self.endpoint is None and self.static[0] in ("mapping", "disabled")

    def _stop_mapping(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        self._scope = None
        self.portmap = None

    def _on_mapped(self, endpoint: Endpoint | None) -> None:
        self._set_endpoint(f"{endpoint.address}:{endpoint.port}" if endpoint else None)

    def _set_endpoint(self, endpoint: str | None) -> None:
        if endpoint == self.endpoint:
            return
        self.endpoint = endpoint
        self._announced = True
        self.on_endpoint(endpoint)

    def status(self, now: float) -> dict[str, Any]:
        if self.portmap is not None:
            return self.portmap.status(now)
        return status_dict(*self.static, self.local_port(), self.endpoint)
