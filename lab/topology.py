"""The lab's networks: two hosts on one link, and a host behind a NAT router with a public peer.

Addresses are documentation ranges (RFC 5737, RFC 3849) and, behind the NAT, an RFC 1918 range: they
exist only inside the lab's namespaces.
"""

from __future__ import annotations

from lab.netns import Host, Lab


def two_hosts(lab: Lab) -> tuple[Host, Host]:
    """Two hosts on one veth: a = 192.0.2.1, 2001:db8::1; b = 192.0.2.2, 2001:db8::2."""
    a, b = lab.host("a"), lab.host("b")
    lab.veth(a, "eth0", b, "eth0")
    for h, n in ((a, 1), (b, 2)):
        # Tests move addresses: deleting the primary must promote, not delete, the secondaries.
        lab.sysctl(h, "net.ipv4.conf.all.promote_secondaries", "1")
        lab.addr(h, "eth0", f"192.0.2.{n}/24")
        lab.addr(h, "eth0", f"2001:db8::{n}/64")
        h.addr4, h.addr6, h.ifname = f"192.0.2.{n}", f"2001:db8::{n}", "eth0"
    return a, b


NAT_RULESET = """
table ip nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" masquerade
  }
}
"""


def behind_nat(lab: Lab) -> tuple[Host, Host, Host]:
    """A host behind a NAT router, and a public peer.

    host 192.168.77.2/24 (default route via the router) — router lan0 192.168.77.1, wan0 203.0.113.1
    (masquerade out of wan0) — peer 203.0.113.2/24, with no route back to 192.168.77.0/24, so only
    traffic the NAT translated (or a mapping forwards) can pass.
    """
    host, router, peer = lab.host("host"), lab.host("router"), lab.host("peer")
    lab.veth(host, "eth0", router, "lan0")
    lab.veth(router, "wan0", peer, "eth0")
    lab.addr(host, "eth0", "192.168.77.2/24")
    lab.addr(router, "lan0", "192.168.77.1/24")
    lab.addr(router, "wan0", "203.0.113.1/24")
    lab.addr(peer, "eth0", "203.0.113.2/24")
    lab.ip(host, "route", "add", "default", "via", "192.168.77.1")
    lab.sysctl(router, "net.ipv4.ip_forward", "1")
    # Moving WAN addresses must not silently delete the secondaries with the primary.
    lab.sysctl(router, "net.ipv4.conf.all.promote_secondaries", "1")
    lab.nft(router, NAT_RULESET)
    host.addr4, host.ifname = "192.168.77.2", "eth0"
    router.addr4, router.ifname = "203.0.113.1", "wan0"
    router.extra["lan4"] = "192.168.77.1"
    peer.addr4, peer.ifname = "203.0.113.2", "eth0"
    return host, router, peer
