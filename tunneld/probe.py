"""`tunneld portmap probe`: what does the gateway speak, what is our public address, can we map a port?

A diagnostic in the spirit of `tailscale netcheck`: one short-lived GatewayMapper (PCP, NAT-PMP, then UPnP
IGD) on a spare local port, driven by the one driver until the test mapping is granted or refused (or
nothing answers within PROBE_TIMEOUT), then closed: the driver sends the delete and waits up to
DELETE_WAIT for the gateway to confirm it. The result names the protocol: "pcp", "nat-pmp" or "upnp".
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import trio

from tunneld.net import links
from tunneld.proto.portmap.chain import GatewayMapper, HttpRequest, UpnpEvent
from tunneld.proto.portmap.events import Granted, Refused
from tunneld.services.driver import Driver
from tunneld.services.portmap import MAX_DATAGRAM, HttpExchanges, multicast_ok

PROBE_TIMEOUT = 12.0  # seconds: PCP's first retry is at 3 s, NAT-PMP's ninth at 64 s; 12 s is plenty
PROBE_LIFETIME = 120  # seconds: the test mapping's requested lifetime (it is deleted at once anyway)
DELETE_WAIT = 3.0  # seconds to wait for the gateway to confirm the delete


@dataclass
class ProbeResult:
    gateway: str
    internal: str
    protocol: str | None
    external_address: str | None
    external_port: int | None
    lifetime: int | None
    result: str
    deleted: bool
    double_nat: str | None

    @property
    def ok(self) -> bool:
        return self.external_port is not None


async def probe(gateway: str | None) -> ProbeResult:
    route = links.default_route_v4()
    if gateway is None:
        if route is None:
            raise ProbeError("no IPv4 default route: no gateway to ask (pass --gateway ADDR)")
        gateway = route.gateway
    internal = links.source_address_for(gateway)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # A spare port for the test mapping (>= 1024: some routers refuse low ports).
    test = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock, test:
        await sock.bind((internal, 0))
        await test.bind((internal, 0))
        test_port = test.getsockname()[1]
        mapper = GatewayMapper(internal, test_port, gateway, PROBE_LIFETIME, multicast=multicast_ok(gateway))
        answered = trio.Event()
        exchanges: HttpExchanges | None = None

        def on_event(event: UpnpEvent) -> None:
            if isinstance(event, HttpRequest):
                assert exchanges is not None
                exchanges.submit(event)
            # Granted, or refused with an error code (a "success" granting nothing is retried instead).
            elif isinstance(event, Granted) or (isinstance(event, Refused) and event.result_code != 0):
                answered.set()

        driver = Driver(mapper, [sock], on_event=on_event, grace=DELETE_WAIT, max_datagram=MAX_DATAGRAM,
                        name="probe")
        async with trio.open_nursery() as nursery:
            exchanges = HttpExchanges(mapper, nursery)
            exchanges.driver = driver
            mapper.start(driver.now())
            await nursery.start(driver.run)
            with trio.move_on_after(PROBE_TIMEOUT):
                await answered.wait()
            st = mapper.state  # before the delete clears it
            nursery.cancel_scope.cancel()  # the driver closes the mapper: delete, and wait for the answer
    return ProbeResult(gateway=gateway, internal=f"{internal}:{test_port}", protocol=st.protocol,
                       external_address=st.external_address, external_port=st.external_port,
                       lifetime=st.lifetime, result=st.result_message, deleted=mapper.delete_confirmed,
                       double_nat=st.double_nat_message)


class ProbeError(Exception):
    """The probe cannot run (no gateway); the message says what to do."""
