"""The port-mapping service and `tunneld portmap probe` on the one driver, against a fake gateway on loopback.

The fake answers PCP MAP requests (or, as a NAT-PMP-only box, answers PCP with "unsupported version" and
then speaks NAT-PMP) on a random 127.53.x.y:5351, and acknowledges deletes. Checked: the endpoint reaches the
service's callback, cancellation sends the delete and waits for its answer, and the probe reports a granted,
confirmed-deleted test mapping.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest
import trio

from tunneld.probe import probe
from tunneld.proto.portmap.events import Endpoint
from tunneld.proto.portmap.natpmp_wire import (
    PORTMAP_SERVER_PORT,
    encode_natpmp_address_response,
    encode_natpmp_error,
    encode_natpmp_map_response,
)
from tunneld.proto.portmap.pcp_wire import encode_pcp_map_response
from tunneld.services.portmap import PortmapService

PUBLIC = "198.51.100.7"
EXTERNAL = 40000


class FakeGateway:
    """A gateway speaking PCP (or only NAT-PMP); ``requests`` are (protocol, lifetime) as received."""

    def __init__(self, sock: trio.socket.SocketType, natpmp_only: bool) -> None:
        self.sock = sock
        self.natpmp_only = natpmp_only
        self.requests: list[tuple[str, int]] = []
        self.epoch = 1000

    @property
    def address(self) -> str:
        return str(self.sock.getsockname()[0])

    async def serve(self) -> None:
        while True:
            data, src = await self.sock.recvfrom(2048)
            answer = self.answer(data)
            if answer is not None:
                await self.sock.sendto(answer, src)

    def answer(self, data: bytes) -> bytes | None:
        if data[:2] == b"\x02\x01" and len(data) == 60:  # PCP MAP request
            if self.natpmp_only:
                return encode_natpmp_error(1, 1, self.epoch)  # RFC 6887 §9: unsupported version
            (lifetime,) = struct.unpack_from("!I", data, 4)
            nonce, internal = data[24:36], struct.unpack_from("!H", data, 40)[0]
            self.requests.append(("pcp", lifetime))
            port = EXTERNAL if lifetime else 0
            return encode_pcp_map_response(nonce, internal, port, PUBLIC, lifetime, self.epoch)
        if data == b"\x00\x00":
            return encode_natpmp_address_response(self.epoch, PUBLIC)
        if data[:2] == b"\x00\x01" and len(data) == 12:
            internal, _suggested, lifetime = struct.unpack_from("!HHI", data, 4)
            self.requests.append(("nat-pmp", lifetime))
            return encode_natpmp_map_response(self.epoch, internal, EXTERNAL if lifetime else 0, lifetime)
        return None


async def _gateway(natpmp_only: bool) -> FakeGateway:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    address = f"127.53.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
    await sock.bind((address, PORTMAP_SERVER_PORT))
    return FakeGateway(sock, natpmp_only)


async def _service_maps_and_deletes_on_cancel(natpmp_only: bool) -> None:
    gateway = await _gateway(natpmp_only)
    seen: list[Endpoint | None] = []
    public = trio.Event()

    def on_endpoint(endpoint: Endpoint | None) -> None:
        seen.append(endpoint)
        if endpoint is not None:
            public.set()

    service = PortmapService("127.0.0.1", 45000, gateway.address, 7200, on_endpoint=on_endpoint)
    with gateway.sock, trio.fail_after(10):
        async with trio.open_nursery() as outer:
            outer.start_soon(gateway.serve)
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                await public.wait()
                assert service.status(trio.current_time())["endpoint"] == f"{PUBLIC}:{EXTERNAL}"
                nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    protocol = "nat-pmp" if natpmp_only else "pcp"
    assert seen == [Endpoint(PUBLIC, EXTERNAL), None]
    assert gateway.requests == [(protocol, 7200), (protocol, 0)]  # the mapping, then its delete
    assert service.mapper.finished() and service.mapper.delete_confirmed  # answered within the grace


@pytest.mark.parametrize("natpmp_only", [False, True])
def test_service_maps_publishes_and_deletes_on_cancel(natpmp_only: bool) -> None:
    trio.run(_service_maps_and_deletes_on_cancel, natpmp_only)


async def _probe_creates_and_deletes(natpmp_only: bool) -> None:
    gateway = await _gateway(natpmp_only)
    with gateway.sock, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gateway.serve)
            r = await probe(gateway.address)
            nursery.cancel_scope.cancel()
    protocol = "nat-pmp" if natpmp_only else "pcp"
    assert (r.ok, r.protocol, r.external_port, r.deleted) == (True, protocol, EXTERNAL, True)
    assert r.external_address == PUBLIC and r.internal.startswith("127.0.0.1:") and r.double_nat is None
    assert [lifetime for _, lifetime in gateway.requests] == [120, 0]


@pytest.mark.parametrize("natpmp_only", [False, True])
def test_probe_creates_and_confirms_the_delete(natpmp_only: bool) -> None:
    trio.run(_probe_creates_and_deletes, natpmp_only)
