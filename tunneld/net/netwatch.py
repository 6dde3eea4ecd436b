"""Netlink for network changes: an event socket that says *that* something changed, and a reading of the
default routes and addresses that says *what* the host's connectivity now is.

The event socket is a plain rtnetlink socket joined to the link, address and route groups; its messages
are only a trigger (anything from a sender other than the kernel is ignored), so nothing of them is
parsed beyond the sender. The tables are read whole through pyroute2 after each burst, which is simpler
and more robust than keeping them up to date from events (a dump is a few milliseconds).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Final

import trio
from pyroute2 import IPRoute

from tunneld.proto.netchange import IfAddr, NetSnapshot, NetWatch, NetworkChanged, Route, build_snapshot

__all__ = ["NetlinkEvents", "read_snapshot", "watch"]

NETLINK_ROUTE: Final = 0
# linux/rtnetlink.h multicast groups (the legacy bit masks for bind()).
RTMGRP_LINK: Final = 0x1
RTMGRP_IPV4_IFADDR: Final = 0x10
RTMGRP_IPV4_ROUTE: Final = 0x40
RTMGRP_IPV6_IFADDR: Final = 0x100
RTMGRP_IPV6_ROUTE: Final = 0x400
GROUPS: Final = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
READ_SIZE: Final = 65536
MAX_READS_PER_WAKEUP: Final = 256  # bounded drain: a flood of events is one trigger anyway


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def read_snapshot(excluded_ifnames: Collection[str] = ()) -> NetSnapshot:
    """The host's connectivity now, from the main table's default routes and the interfaces' addresses."""
    with IPRoute() as ip:
        excluded = set()
        for name in excluded_ifnames:
            excluded.update(ip.link_lookup(ifname=name))
        routes = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for rt in ip.get_default_routes(family=family):
                oif = _attr(rt, "RTA_OIF")
                if oif is None:
                    continue  # multipath defaults: not ours to choose among
                routes.append(Route(family, _attr(rt, "RTA_GATEWAY"), int(oif), _attr(rt, "RTA_PREFSRC"),
                                    int(_attr(rt, "RTA_PRIORITY") or 0)))
        addrs = []
        for a in ip.get_addr():
            address = _attr(a, "IFA_ADDRESS")
            if a["family"] == socket.AF_INET:
                address = _attr(a, "IFA_LOCAL") or address  # point-to-point: LOCAL is ours
            if address is None:
                continue
            flags = _attr(a, "IFA_FLAGS")
            addrs.append(IfAddr(int(a["index"]), int(a["family"]), str(address), int(a["prefixlen"]),
                                int(a["scope"]), int(flags if flags is not None else a["flags"])))
    return build_snapshot(routes, addrs, excluded)


class NetlinkEvents:
    """The rtnetlink event socket (link, address and route groups), non-blocking, for trio."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self.sock.setblocking(False)
            self.sock.bind((0, GROUPS))
        except BaseException:
            self.sock.close()
            raise
        self.ignored = 0

    def close(self) -> None:
        self.sock.close()

    async def wait(self) -> int:
        """Wait for a burst of events and drain it; returns how many messages came from the kernel."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            kernel = 0
            for _ in range(MAX_READS_PER_WAKEUP):
                try:
                    _, (pid, _groups) = self.sock.recvfrom(READ_SIZE)
                except BlockingIOError:
                    break
                except OSError:  # ENOBUFS: we fell behind; the tables are re-read anyway
                    kernel += 1
                    continue
                if pid == 0:
                    kernel += 1
                else:
                    self.ignored += 1
            if kernel:
                return kernel


async def watch(core: NetWatch, on_change: Callable[[NetworkChanged], Awaitable[None]],
                excluded_ifnames: Collection[str] = (), *,
                clock: Callable[[], float] = trio.current_time,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Feed ``core`` a fresh snapshot after each burst of netlink events and hand its changes to
    ``on_change`` (awaited, one at a time, in order)."""
    events = NetlinkEvents()
    try:
        # Whatever changed before the socket listened is seen by this first reading.
        core.observe(read_snapshot(excluded_ifnames), clock())
        task_status.started()
        while True:
            deadline = core.deadline()
            with trio.move_on_at(trio.current_time() + (deadline - clock()) if deadline is not None
                                 else trio.current_time() + 3600):
                await events.wait()
                core.observe(read_snapshot(excluded_ifnames), clock())
            core.poll(clock())
            for change in core.events():
                await on_change(change)
    finally:
        events.close()
