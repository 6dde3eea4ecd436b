"""The port-mapping service: the sans-I/O GatewayMapper (PCP, NAT-PMP, then UPnP IGD) on the one driver.

One socket talks to the gateway: PCP/NAT-PMP requests to its port 5351 and SSDP searches to its port 1900
(the answers come back to the same socket); the other, bound to 224.0.0.1:5350, hears the gateway's
announcements (RFC 6886 §3.2.1, RFC 6887 §14.1). UPnP's description and SOAP actions are HTTP over TCP:
the core asks for each exchange (:class:`HttpRequest`) and :class:`HttpExchanges` runs it, bounded in time
and size, and hands the response back. On cancellation the driver sends the mapper's delete and waits
briefly for its answer, so a clean shutdown leaves no mapping on the router.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any

import trio

from tunneld.proto.portmap.chain import GatewayMapper, HttpRequest, UpnpEvent
from tunneld.proto.portmap.events import Endpoint, EndpointChanged
from tunneld.proto.portmap.natpmp_wire import PORTMAP_ANNOUNCE_GROUP, PORTMAP_CLIENT_PORT
from tunneld.proto.portmap.pcp_wire import PCP_MAX_MESSAGE_LEN
from tunneld.proto.portmap.upnp_wire import HTTP_MAX_RESPONSE, SSDP_MAX_RESPONSE, http_response_complete
from tunneld.services.driver import Driver

log = logging.getLogger("tunneld.portmap")

STOP_GRACE = 1.0  # seconds to wait for the delete's answer on shutdown
HTTP_EXCHANGE_TIMEOUT = 4.0  # one UPnP HTTP exchange (the core gives up after 5 s)
MAX_DATAGRAM = max(PCP_MAX_MESSAGE_LEN, SSDP_MAX_RESPONSE) + 1  # one more: too large is seen as such


async def http_exchange(host: str, port: int, payload: bytes, timeout: float = HTTP_EXCHANGE_TIMEOUT,
                        ) -> bytes | None:
    """One HTTP/1.1 request over TCP; the response up to the server's close or its own framing
    (Content-Length, chunked), at most HTTP_MAX_RESPONSE bytes; None on failure, timeout or excess."""
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(payload)
                buf = bytearray()
                while chunk := await stream.receive_some(16384):
                    buf += chunk
                    if len(buf) > HTTP_MAX_RESPONSE:
                        log.debug("portmap: HTTP response from %s:%d too large", host, port)
                        return None
                    if http_response_complete(bytes(buf)):
                        break
                return bytes(buf)
        except (OSError, trio.BrokenResourceError) as e:
            log.debug("portmap: HTTP to %s:%d: %s", host, port, e)
    return None


class HttpExchanges:
    """Runs a mapper's HTTP requests in ``nursery`` and feeds the answers back through ``driver``. The
    goodbye (the delete on shutdown) is shielded, bounded by the driver's grace, so it runs while the
    service is being cancelled."""

    def __init__(self, mapper: GatewayMapper, nursery: trio.Nursery) -> None:
        self.mapper = mapper
        self.nursery = nursery
        self.driver: Driver[UpnpEvent] | None = None

    def submit(self, request: HttpRequest) -> None:
        self.nursery.start_soon(self._run, request)

    async def _run(self, request: HttpRequest) -> None:
        shield = trio.CancelScope(shield=request.goodbye)
        with shield:
            timeout = STOP_GRACE if request.goodbye else HTTP_EXCHANGE_TIMEOUT
            data = await http_exchange(request.host, request.port, request.payload, timeout)
            driver = self.driver
            if driver is not None:
                self.mapper.http_answer(request.request_id, data, driver.now())
                driver.wake()


def multicast_ok(gateway: str) -> bool:
    """Search the SSDP group too, unless the gateway is on loopback (tests)."""
    return not ipaddress.ip_address(gateway).is_loopback


class PortmapService:
    def __init__(self, internal_address: str, internal_port: int, gateway: str, lifetime: int,
                 on_endpoint: Callable[[Endpoint | None], None] | None = None) -> None:
        self.mapper = GatewayMapper(internal_address, internal_port, gateway, lifetime,
                                    multicast=multicast_ok(gateway))
        self.internal_address = internal_address
        self.on_endpoint = on_endpoint
        self._exchanges: HttpExchanges | None = None

    def _on_event(self, event: UpnpEvent) -> None:
        if isinstance(event, HttpRequest):
            if self._exchanges is not None:
                self._exchanges.submit(event)
            return
        if not isinstance(event, EndpointChanged):
            return
        new = f"{event.new.address}:{event.new.port}" if event.new else "none"
        log.info("public endpoint %s (%s)", new, self.mapper.state.protocol or "no protocol yet")
        if self.on_endpoint is not None:
            self.on_endpoint(event.new)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            exchanges = self._exchanges = HttpExchanges(self.mapper, nursery)
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
                                max_datagram=MAX_DATAGRAM, name="portmap")
                exchanges.driver = driver
                self.mapper.start(driver.now())
                try:
                    await driver.run(task_status=task_status)
                finally:
                    exchanges.driver = None

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
    being asked), "public" (no NAT: nothing to map), "no-gateway", "disabled". ``protocol`` names the
    protocol the gateway answered in: "pcp", "nat-pmp" or "upnp"."""
    return {
        "state": state, "result": result, "internal_port": internal_port, "endpoint": endpoint,
        "protocol": None, "gateway": None, "external_address": None, "external_port": None,
        "lifetime_left": None, "double_nat": False, "double_nat_message": None, "dropped": {},
        **mapping,
    }
