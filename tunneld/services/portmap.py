"""The port-mapping service: the sans-I/O PortMapper on the one driver, with two sockets.

One socket talks to the gateway's port 5351; the other, bound to 224.0.0.1:5350, hears the gateway's
announcements (RFC 6886 §3.2.1, RFC 6887 §14.1). On cancellation the driver sends the mapper's delete
(lifetime 0) and waits briefly for its answer, so a clean shutdown leaves no mapping on the router.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

import trio

from tunneld.proto.portmap.events import Endpoint, EndpointChanged, PortmapEvent
from tunneld.proto.portmap.mapper import PortMapper
from tunneld.proto.portmap.natpmp_wire import PORTMAP_ANNOUNCE_GROUP, PORTMAP_CLIENT_PORT
from tunneld.proto.portmap.pcp_wire import PCP_MAX_MESSAGE_LEN
from tunneld.services.driver import Driver

log = logging.getLogger("tunneld.portmap")

STOP_GRACE = 1.0  # seconds to wait for the delete's answer on shutdown


class PortmapService:
    def __init__(self, internal_address: str, internal_port: int, gateway: str, lifetime: int,
                 on_endpoint: Callable[[Endpoint | None], None] | None = None) -> None:
        self.mapper = PortMapper(internal_address, internal_port, gateway, lifetime)
        self.internal_address = internal_address
        self.on_endpoint = on_endpoint

    def _on_event(self, event: PortmapEvent) -> None:
        if not isinstance(event, EndpointChanged):
            return
        new = f"{event.new.address}:{event.new.port}" if event.new else "none"
        log.info("public endpoint %s", new)
        if self.on_endpoint is not None:
            self.on_endpoint(event.new)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            await sock.bind((self.internal_address, 0))
            sockets = [sock]
            announce = stack.enter_context(trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            announce.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                # Every interface is in the all-hosts group already; binding to it is enough.
                await announce.bind((PORTMAP_ANNOUNCE_GROUP, PORTMAP_CLIENT_PORT))
                sockets.append(announce)
            except OSError as e:
                log.info("cannot listen for gateway announcements on %s:%d: %s", PORTMAP_ANNOUNCE_GROUP,
                         PORTMAP_CLIENT_PORT, e)
            driver = Driver(self.mapper, sockets, on_event=self._on_event, grace=STOP_GRACE,
                            max_datagram=PCP_MAX_MESSAGE_LEN + 1, name="portmap")
            self.mapper.start(driver.now())
            await driver.run(task_status=task_status)

    def status(self, now: float) -> dict[str, Any]:
        st = self.mapper.state
        return status_dict(
            "mapping", st.result_message, st.internal_port,
            endpoint=f"{st.endpoint.address}:{st.endpoint.port}" if st.endpoint else None,
            protocol=st.protocol, gateway=st.gateway, external_address=st.external_address,
            external_port=st.external_port,
            lifetime_left=round(st.expires_at - now, 1) if st.expires_at is not None else None,
            double_nat=st.double_nat, double_nat_message=st.double_nat_message,
            dropped=dict(self.mapper.counters),
        )


def status_dict(state: str, result: str, internal_port: int | None, endpoint: str | None = None,
                **mapping: Any) -> dict[str, Any]:
    """The `portmap` object of `tunneld status`, one shape for every state: "mapping" (a gateway is
    being asked), "public" (no NAT: nothing to map), "no-gateway", "disabled"."""
    return {
        "state": state, "result": result, "internal_port": internal_port, "endpoint": endpoint,
        "protocol": None, "gateway": None, "external_address": None, "external_port": None,
        "lifetime_left": None, "double_nat": False, "double_nat_message": None, "dropped": {},
        **mapping,
    }
