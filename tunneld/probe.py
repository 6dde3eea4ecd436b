"""`tunneld portmap probe`: what does the gateway speak, what is our public address, can we map a port?

A diagnostic in the spirit of `tailscale netcheck`: one short-lived PortMapper on a spare local port,
run until the test mapping is granted (or refused, or nothing answers), then deleted. Bounded: it
gives up after PROBE_TIMEOUT seconds. The sans-I/O mapper does the protocol; this only moves bytes.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass

import trio

from tunneld.net import links
from tunneld.proto import natpmp
from tunneld.proto.errors import ParseError

PROBE_TIMEOUT = 12.0  # seconds: PCP's first retry is at 3 s, NAT-PMP's ninth at 64 s; 12 s is plenty
PROBE_LIFETIME = 120  # seconds: the test mapping's requested lifetime (it is deleted at once anyway)


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
        mapper = natpmp.PortMapper(internal, test_port, gateway, PROBE_LIFETIME)

        async def send(ts: list[natpmp.Transmit]) -> None:
            for t in ts:
                with contextlib.suppress(OSError):  # unreachable gateway: the mapper retries
                    await sock.sendto(t.payload, (t.host, t.port))

        granted = trio.Event()
        with trio.move_on_after(PROBE_TIMEOUT):
            async with trio.open_nursery() as nursery:

                async def receive() -> None:
                    while True:
                        data, src = await sock.recvfrom(2048)
                        await send(mapper.receive(data, (src[0], src[1]), trio.current_time()))
                        st = mapper.state
                        if st.external_port is not None or (st.result_code not in (None, 0)):
                            granted.set()

                nursery.start_soon(receive)
                await send(mapper.start(trio.current_time()))
                while not granted.is_set():
                    deadline = mapper.deadline()
                    with trio.move_on_at(deadline if deadline is not None else trio.current_time() + 1):
                        await granted.wait()
                    if not granted.is_set():
                        await send(mapper.poll(trio.current_time()))
                nursery.cancel_scope.cancel()
        st = mapper.state
        deleted = False
        if st.external_port is not None:
            # Delete the test mapping and wait (briefly) for the gateway to confirm.
            await send(mapper.stop(trio.current_time()))
            with trio.move_on_after(3):
                while True:
                    data, src = await sock.recvfrom(2048)
                    if src[0] == gateway and _is_delete_ack(data):
                        deleted = True
                        break
    return ProbeResult(gateway=gateway, internal=f"{internal}:{test_port}", protocol=st.protocol,
                       external_address=st.external_address, external_port=st.external_port,
                       lifetime=st.lifetime, result=st.result_message, deleted=deleted,
                       double_nat=st.double_nat_message)


def _is_delete_ack(data: bytes) -> bool:
    """A successful map answer with lifetime 0 (what a gateway returns for a delete)."""
    try:
        if data[:1] == b"\x02":
            r = natpmp.parse_pcp_response(data)
            return r.result == 0 and r.lifetime == 0
        m = natpmp.parse_natpmp_response(data)
        return isinstance(m, natpmp.NatPmpMapResponse) and m.result == 0 and m.lifetime == 0
    except ParseError:  # not a well-formed answer, so not the acknowledgement either
        return False


class ProbeError(Exception):
    """The probe cannot run (no gateway); the message says what to do."""
