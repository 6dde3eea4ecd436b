"""Which IPv4 addresses are not public: private space behind a NAT, and external addresses no one can reach.

Two questions, one table. Is this host behind a NAT (its own address is RFC 1918 or RFC 6598 space, so it
needs a mapping on its gateway)? Can the gateway's reported external address be published (if it is not
public, another NAT sits upstream: double NAT)?
"""

from __future__ import annotations

import ipaddress
from typing import Final

__all__ = ["NOT_PUBLIC_V4", "PRIVATE_V4", "external_address_problem", "is_private_v4"]

PRIVATE_V4: Final = (
    (ipaddress.IPv4Network("10.0.0.0/8"), "RFC 1918 private"),
    (ipaddress.IPv4Network("172.16.0.0/12"), "RFC 1918 private"),
    (ipaddress.IPv4Network("192.168.0.0/16"), "RFC 1918 private"),
    (ipaddress.IPv4Network("100.64.0.0/10"), "RFC 6598 carrier-grade NAT"),
)
"""Address space that only makes sense behind a NAT."""

NOT_PUBLIC_V4: Final = (
    *PRIVATE_V4,
    (ipaddress.IPv4Network("127.0.0.0/8"), "loopback"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "RFC 3927 link-local"),
    (ipaddress.IPv4Network("0.0.0.0/8"), "RFC 1122 'this network'"),
)
"""External addresses that mean "this gateway is behind another NAT" (or has no address at all)."""


def is_private_v4(address: str) -> bool:
    """True if ``address`` is RFC 1918 or RFC 6598 space: a host with it is behind a NAT."""
    ip = ipaddress.IPv4Address(address)
    return any(ip in net for net, _ in PRIVATE_V4)


def external_address_problem(address: str) -> str | None:
    """Why ``address`` cannot be a public external address (a status message), or None if it can."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        return (f"double NAT or no WAN address: the gateway reports external address {address}; it has no "
                "usable public address (its own uplink is down or behind another NAT), nothing is published")
    if isinstance(ip, ipaddress.IPv4Address):
        for net, what in NOT_PUBLIC_V4:
            if ip in net:
                return (f"double NAT: the gateway's external address {address} is {what}, so another NAT "
                        "sits upstream and a mapping on this gateway cannot be reached from the Internet; "
                        "nothing is published")
        return None
    if ip.is_private or ip.is_link_local or ip.is_loopback:
        return f"double NAT: the gateway's external address {address} is not global; nothing is published"
    return None
