"""The port-mapping service and `tunneld portmap probe` mapping by UPnP IGD, against a fake IGD on loopback.

The fake refuses PCP (NOT_AUTHORIZED, so the order moves on to UPnP at once), answers M-SEARCH on its port
1900, and serves miniupnpd 2.3.1's real description and SOAP replies (tests/data/upnp) over TCP, keeping
each connection open after its reply (the client must stop at Content-Length, or at the end of a chunked
body, not wait for a close). Checked: the endpoint reaches the service's callback with the protocol
"upnp", cancellation runs the DeletePortMapping exchange within the grace, and the probe maps, names
"upnp" and confirms the delete.
"""

from __future__ import annotations

import json
import random
import re
import socket
from pathlib import Path

import pytest
import trio

from tunneld.probe import probe
from tunneld.proto.portmap.events import Endpoint
from tunneld.proto.portmap.natpmp_wire import PORTMAP_SERVER_PORT
from tunneld.proto.portmap.pcp_wire import encode_pcp_map_response
from tunneld.services.portmap import PortmapService, http_exchange

DATA = json.loads((Path(__file__).parents[1] / "data" / "upnp" / "miniupnpd_2.3.1.json").read_text())
PUBLIC = "203.0.113.1"


def chunked(response: str) -> bytes:
    """The same response with a chunked body (miniupnpd sends Content-Length; other IGDs chunk)."""
    head, _, body = response.partition("\r\n\r\n")
    head = re.sub(r"Content-Length: \d+", "Transfer-Encoding: chunked", head)
    raw = body.encode("latin-1")
    parts = [raw[i:i + 100] for i in range(0, len(raw), 100)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    return head.encode() + b"\r\n\r\n" + chunks + b"0\r\n\r\n"


class FakeIgd:
    def __init__(self, address: str) -> None:
        self.address = address
        self.actions: list[str] = []
        self.http_port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        pcp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ssdp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        listeners = await trio.open_tcp_listeners(0, host=self.address)
        self.http_port = listeners[0].socket.getsockname()[1]
        with pcp, ssdp:
            await pcp.bind((self.address, PORTMAP_SERVER_PORT))
            await ssdp.bind((self.address, 1900))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pcp, pcp)
                nursery.start_soon(self._ssdp, ssdp)
                nursery.start_soon(trio.serve_listeners, self._http, listeners)
                task_status.started()

    async def _pcp(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, src = await sock.recvfrom(2048)
            if data[:2] == b"\x02\x01" and len(data) == 60:
                internal = int.from_bytes(data[40:42], "big")
                refusal = encode_pcp_map_response(data[24:36], internal, 0, "0.0.0.0", 30, 7, result=2)
                await sock.sendto(refusal, src)  # NOT_AUTHORIZED: the order moves on to UPnP at once

    async def _ssdp(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, src = await sock.recvfrom(2048)
            if data.startswith(b"M-SEARCH") and b"InternetGatewayDevice:1" in data:
                here = f"{self.address}:{self.http_port}"
                await sock.sendto(str(DATA["ssdp_igd1"]).replace("192.168.77.1:45385", here).encode(), src)

    async def _http(self, stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(4096)
            head = request.split(b"\r\n\r\n")[0].decode()
            m = re.search(r'SOAPAction: "[^#]+#(\w+)"', head)
            action = m.group(1) if m else "description"
            self.actions.append(action)
            reply = {"description": DATA["description"], "GetExternalIPAddress": DATA["get_external_ip"],
                     "AddPortMapping": DATA["add_port_mapping_ok"],
                     "DeletePortMapping": DATA["delete_port_mapping_ok"]}[action]
            await stream.send_all(chunked(reply) if action == "description" else reply.encode("latin-1"))
            await trio.sleep_forever()  # keep the connection open: the client must not wait for the close


def _address() -> str:
    return f"127.54.{random.randrange(1, 255)}.{random.randrange(1, 255)}"


async def _service_maps_by_upnp_and_deletes() -> None:
    igd = FakeIgd(_address())
    seen: list[Endpoint | None] = []
    public = trio.Event()

    def on_endpoint(endpoint: Endpoint | None) -> None:
        seen.append(endpoint)
        if endpoint is not None:
            public.set()

    service = PortmapService("127.0.0.1", 45000, igd.address, 7200, on_endpoint=on_endpoint)
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            await outer.start(igd.serve)
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                await public.wait()
                st = service.status(trio.current_time())
                assert (st["protocol"], st["endpoint"]) == ("upnp", f"{PUBLIC}:45000"), st
                nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    assert seen == [Endpoint(PUBLIC, 45000), None]
    assert igd.actions == ["description", "GetExternalIPAddress", "AddPortMapping", "DeletePortMapping"]
    assert service.mapper.finished() and service.mapper.delete_confirmed  # answered within the grace


def test_service_maps_by_upnp_and_deletes_on_cancel() -> None:
    trio.run(_service_maps_by_upnp_and_deletes)


async def _probe_by_upnp() -> None:
    igd = FakeIgd(_address())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(igd.serve)
            r = await probe(igd.address)
            nursery.cancel_scope.cancel()
    assert (r.ok, r.protocol, r.external_address, r.lifetime, r.deleted) == (True, "upnp", PUBLIC, 120, True)
    assert igd.actions == ["description", "GetExternalIPAddress", "AddPortMapping", "DeletePortMapping"]


def test_probe_maps_by_upnp_and_confirms_the_delete() -> None:
    trio.run(_probe_by_upnp)


@pytest.mark.parametrize("reply,expected", [
    (b"HTTP/1.1 200 OK\r\n\r\nuntil close", b"HTTP/1.1 200 OK\r\n\r\nuntil close"),
    (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 80_000, None),  # over the bound
])
def test_http_exchange_reads_to_the_close_within_the_bound(reply: bytes, expected: bytes | None) -> None:
    async def main() -> bytes | None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def handler(stream: trio.SocketStream) -> None:
            async with stream:
                await stream.receive_some(1024)
                await stream.send_all(reply)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, listeners)
            got = await http_exchange("127.0.0.1", port, b"GET / HTTP/1.1\r\n\r\n", timeout=5)
            nursery.cancel_scope.cancel()
        return got

    assert trio.run(main) == expected


def test_http_exchange_fails_on_refusal_and_timeout() -> None:
    async def main() -> tuple[bytes | None, bytes | None, float]:
        refused = await http_exchange("127.0.0.1", 1, b"GET / HTTP/1.1\r\n\r\n")
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:  # accepts, never answers
            nursery.start_soon(trio.serve_listeners, lambda s: trio.sleep_forever(), listeners)
            t0 = trio.current_time()
            silent = await http_exchange("127.0.0.1", port, b"GET / HTTP/1.1\r\n\r\n", timeout=0.2)
            took = trio.current_time() - t0
            nursery.cancel_scope.cancel()
        return refused, silent, took

    refused, silent, took = trio.run(main)
    assert refused is None and silent is None and took < 2
