"""Which IPv4 addresses mean "behind a NAT" (RFC 1918 private, RFC 6598 shared address space)."""

from __future__ import annotations

import pytest

from tunneld.net.links import DefaultRoute
from tunneld.proto.portmap.addresses import is_private_v4


@pytest.mark.parametrize(
    ("address", "private"),
    [
        ("10.1.2.3", True), ("172.16.0.1", True), ("172.31.255.254", True), ("192.168.77.2", True),
        ("100.64.0.1", True), ("100.127.255.254", True),  # RFC 6598: carrier-grade NAT
        ("172.32.0.1", False), ("100.128.0.1", False), ("203.0.113.1", False), ("192.0.2.1", False),
        ("8.8.8.8", False),
    ],
)
def test_private_means_behind_nat(address: str, private: bool) -> None:
    assert is_private_v4(address) is private
    assert DefaultRoute(gateway="192.0.2.254", ifindex=2, address=address).behind_nat is private
