"""The port-mapping service: a thin trio adapter around the sans-I/O PortMapper.

It owns two sockets: one for requests to the gateway's port 5351 (and their answers), and one bound
to 224.0.0.1:5350 for the gateway's announcements (RFC 6886 §3.2.1, RFC 6887 §14.1). It hands the
mapper bytes and `now`, sends what the mapper returns, sleeps until the mapper's deadline, and on
cancellation sends the mapper's delete (lifetime 0) before it returns, so a clean shutdown leaves no
mapping on the router.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable
from typing import Any

import trio

from tunneld.proto import natpmp

log = logging.getLogger("tunneld.portmap")

ANNOUNCE_GROUP = "224.0.0.1"
ANNOUNCE_PORT = 5350
MAX_REPLY = 1100  # RFC 6887 §8: the largest PCP message; NAT-PMP replies are shorter
STOP_GRACE = 1.0  # seconds to wait for the delete's answer on shutdown


class PortmapService:
    def __init__(self, internal_address: str, internal_port: int, gateway: str, lifetime: int,
                 on_endpoint: Callable[[natpmp.Endpoint | None], None] | None = None) -> None:
        self.mapper = natpmp.PortMapper(internal_address, internal_port, gateway, lifetime,
                                        on_change=self._changed)
        self.internal_address = internal_address
        self.on_endpoint = on_endpoint
        self._sock: trio.socket.SocketType | None = None
        self._changed_event = trio.Event()

    def _changed(self, ev: natpmp.EndpointChanged) -> None:
        new = f"{ev.new.address}:{ev.new.port}" if ev.new else "none"
        log.info("public endpoint %s", new)
        if self.on_endpoint is not None:
            self.on_endpoint(ev.new)

    async def _send(self, transmits: list[natpmp.Transmit]) -> None:
        sock = self._sock
        if sock is None:
            return
        for t in transmits:
            try:
                await sock.sendto(t.payload, (t.host, t.port))
            except OSError as e:  # no route to the gateway right now: the mapper retries
                log.debug("port mapping request to %s failed: %s", t.host, e)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        announce: trio.socket.SocketType | None = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            await sock.bind((self.internal_address, 0))
            assert announce is not None
            announce.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                # Every interface is in the all-hosts group already; binding to it is enough.
                await announce.bind((ANNOUNCE_GROUP, ANNOUNCE_PORT))
            except OSError as e:
                log.info("cannot listen for gateway announcements on %s:%d: %s", ANNOUNCE_GROUP,
                         ANNOUNCE_PORT, e)
                announce.close()
                announce = None
            self._sock = sock
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, sock, False)
                if announce is not None:
                    nursery.start_soon(self._receive, announce, True)
                await self._send(self.mapper.start(trio.current_time()))
                task_status.started()
                try:
                    while True:
                        # Sleep until the mapper's deadline, or until a received packet changed it
                        # (an announcement schedules a re-check much sooner than the renewal).
                        deadline = self.mapper.deadline()
                        with trio.move_on_at(deadline if deadline is not None else math.inf):
                            await self._changed_event.wait()
                        self._changed_event = trio.Event()
                        await self._send(self.mapper.poll(trio.current_time()))
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(STOP_GRACE):
                        await self._send(self.mapper.stop(trio.current_time()))
                        await trio.sleep(0.05)  # let the delete leave before the socket closes
        finally:
            self._sock = None
            sock.close()
            if announce is not None:
                announce.close()

    async def _receive(self, sock: trio.socket.SocketType, announcements: bool) -> None:
        while True:
            data, src = await sock.recvfrom(MAX_REPLY + 1)
            now = trio.current_time()
            if announcements:
                out = self.mapper.announcement(data, (src[0], src[1]), now)
            else:
                out = self.mapper.receive(data, (src[0], src[1]), now)
            await self._send(out)
            self._changed_event.set()  # the deadline may have moved: let the timer loop look again

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
