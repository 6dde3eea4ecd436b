"""The TURN client on the one driver (services/driver.py), over loopback, against the in-memory relay
served on a socket: allocate after an outside `start`, a permission after `permit`, relay data through
`receive`, and the allocation deleted by the driver's goodbye when the service is cancelled."""

from __future__ import annotations

import socket

import trio

from tests.unit.fake_turn import FakeRelay
from tunneld.proto import stun_wire as sw
from tunneld.proto.turn import Allocated, TurnClient, TurnEvent
from tunneld.services.driver import Driver

USER, PASSWORD = "1700000000:laptop", "secret"


async def _serve(relay: FakeRelay, sock: trio.socket.SocketType) -> None:
    while True:
        data, source = await sock.recvfrom(4096)
        for answer in relay.handle(data, source[:2]):
            await sock.sendto(answer, source)


def test_the_driver_runs_the_client_and_its_goodbye_deletes_the_allocation() -> None:
    async def main() -> None:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
                trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mine:
            await server.bind(("127.0.0.1", 0))
            await mine.bind(("127.0.0.1", 0))
            relay = FakeRelay({USER: PASSWORD}, server.getsockname())
            client = TurnClient(server.getsockname(), USER, PASSWORD)
            events: list[TurnEvent] = []
            allocated = trio.Event()

            def on_event(event: TurnEvent) -> None:
                events.append(event)
                allocated.set()

            driver = Driver(client, [mine], on_event=on_event, grace=2.0, name="turn")
            with trio.fail_after(10):
                async with trio.open_nursery() as outer:
                    outer.start_soon(_serve, relay, server)
                    async with trio.open_nursery() as service:
                        await service.start(driver.run)
                        client.start(driver.now())
                        driver.wake()
                        await allocated.wait()
                        me = mine.getsockname()
                        assert events == [Allocated(relay.allocations[me].relayed, me, 600)]
                        client.permit(["127.0.0.1"], driver.now())
                        driver.wake()
                        while "127.0.0.1" not in client.permitted():  # bounded by fail_after
                            await trio.sleep(0.01)
                        await server.sendto(relay.data_indication(("127.0.0.1", 9), b"hi"), me)
                        while not (got := client.received()):
                            await trio.sleep(0.01)
                        assert got == [(("127.0.0.1", 9), b"hi")]
                        service.cancel_scope.cancel()  # the service ends: the driver closes the core
                    outer.cancel_scope.cancel()
            assert client.finished() and client.state == "closed"
            assert relay.allocations == {}
            assert relay.requests[-1].method == sw.REFRESH and relay.requests[-1].lifetime() == 0

    trio.run(main)
