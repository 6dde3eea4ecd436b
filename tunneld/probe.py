"""`tunneld portmap probe`: what does the gateway speak, what is our public address, can we map a port?

A diagnostic in the spirit of `tailscale netcheck`: one short-lived PortMapper on a spare local port, driven
by the one driver until the test mapping is granted or refused (or nothing answers within PROBE_TIMEOUT),
then closed: the driver sends the delete and waits up to DELETE_WAIT for the gateway to confirm it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import trio

from tunneld.net import links
from tunneld.proto.portmap.events import Granted, PortmapEvent, Refused
from tunneld.proto.portmap.mapper import PortMapper
from tunneld.proto.portmap.pcp_wire import PCP_MAX_MESSAGE_LEN
from tunneld.services.driver import Driver

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
        mapper = PortMapper(internal, test_port, gateway, PROBE_LIFETIME)
        answered = trio.Event()

        def on_event(event: PortmapEvent) -> None:
            # Granted, or refused with an error code (a "success" granting nothing is retried instead).
            if isinstance(event, Granted) or (isinstance(event, Refused) and event.result_code != 0):
                answered.set()

        driver = Driver(mapper, [sock], on_event=on_event, grace=DELETE_WAIT,
                        max_datagram=PCP_MAX_MESSAGE_LEN + 1, name="probe")
        mapper.start(driver.now())
        async with trio.open_nursery() as nursery:
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
