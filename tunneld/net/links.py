"""What the kernel says about our IPv4 connectivity: the default gateway and our address toward it.

Read through netlink (pyroute2). Used to decide whether the host sits behind a NAT (its address
toward the default gateway is private: RFC 1918 or the RFC 6598 shared space) and so needs a port
mapping on that gateway, or is reachable as it is.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute

from tunneld.proto.portmap.addresses import is_private_v4
from tunneld.proto.portmap.natpmp_wire import PORTMAP_SERVER_PORT


@dataclass(frozen=True)
class DefaultRoute:
    gateway: str
    ifindex: int
    address: str  # our primary IPv4 address on the interface the default route leaves by

    @property
    def behind_nat(self) -> bool:
        return is_private_v4(self.address)


def default_route_v4() -> DefaultRoute | None:
    """The IPv4 default route's gateway and our address on its interface, or None if there is none."""
    with IPRoute() as ip:
        routes = ip.get_default_routes(family=socket.AF_INET)
        best = None
        for rt in routes:
            gw = rt.get_attr("RTA_GATEWAY")
            oif = rt.get_attr("RTA_OIF")
            if gw is None or oif is None:
                continue
            prio = rt.get_attr("RTA_PRIORITY") or 0
            if best is None or prio < best[0]:
                best = (prio, gw, oif, rt.get_attr("RTA_PREFSRC"))
        if best is None:
            return None
        _, gw, oif, prefsrc = best
        if prefsrc is None:
            # The primary address of the interface: the one in the gateway's subnet if any.
            gw_ip = ipaddress.IPv4Address(gw)
            candidates = []
            for a in ip.get_addr(family=socket.AF_INET, index=oif):
                addr = a.get_attr("IFA_ADDRESS")
                net = ipaddress.IPv4Network(f"{addr}/{a['prefixlen']}", strict=False)
                candidates.append((gw_ip not in net, addr))
            if not candidates:
                return None
            prefsrc = sorted(candidates)[0][1]
        return DefaultRoute(gateway=str(gw), ifindex=int(oif), address=str(prefsrc))


def source_address_for(destination: str) -> str:
    """Our IPv4 source address toward `destination` (a UDP connect sends nothing; it only routes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((destination, PORTMAP_SERVER_PORT))
        return str(s.getsockname()[0])
