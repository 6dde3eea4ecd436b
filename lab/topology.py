"""The lab's networks: two hosts on one link, a host behind a NAT router with a public peer, and a
roaming laptop with two NAT uplinks and a public desktop.

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


# -- roaming: a laptop with two uplinks (home and café NATs) and a public desktop -------------------

ROAMING_UPLINKS = {
    # name: (laptop interface, laptop address/prefix, gateway (the router's LAN address), LAN network)
    "home": ("eth0", "192.168.1.20/24", "192.168.1.1", "192.168.1.0/24"),
    "cafe": ("eth1", "10.0.0.7/24", "10.0.0.1", "10.0.0.0/24"),
}
ROAMING_WAN = {"home": "198.51.100.2", "cafe": "198.51.100.18"}  # each router's public address


def roaming(lab: Lab, at: str = "home") -> dict[str, Host]:
    """The roaming lab: an "internet" router with a public desktop and two NAT routers behind it, and a
    laptop with one uplink into each router's LAN, only `at`'s up.

    desktop 203.0.113.2/24 — inet (203.0.113.1, 198.51.100.1/28, 198.51.100.17/28)
    home wan0 198.51.100.2/28, lan0 192.168.1.1/24 (masquerade; miniupnpd may run on it: lab.upnp)
    cafe wan0 198.51.100.18/28, lan0 10.0.0.1/24 (masquerade only)
    laptop eth0 192.168.1.20 (home), eth1 10.0.0.7 (café): `move()` switches between them.
    The inet router has no route to the private LANs: only what a NAT translated passes.
    Returns {"inet", "desktop", "home", "cafe", "laptop"}.
    """
    inet, desktop = lab.host("inet"), lab.host("desktop")
    home, cafe, laptop = lab.host("home"), lab.host("cafe"), lab.host("laptop")
    lab.sysctl(inet, "net.ipv4.ip_forward", "1")
    lab.veth(inet, "d0", desktop, "eth0")
    lab.addr(inet, "d0", "203.0.113.1/24")
    lab.addr(desktop, "eth0", "203.0.113.2/24")
    lab.ip(desktop, "route", "add", "default", "via", "203.0.113.1")
    desktop.addr4, desktop.ifname = "203.0.113.2", "eth0"
    for i, (router, name) in enumerate(((home, "home"), (cafe, "cafe"))):
        ifname, _, gateway, lan = ROAMING_UPLINKS[name]
        inet_if, base = f"{name[0]}0", 16 * i
        lab.veth(inet, inet_if, router, "wan0")
        lab.addr(inet, inet_if, f"198.51.100.{base + 1}/28")
        lab.addr(router, "wan0", f"{ROAMING_WAN[name]}/28")
        lab.ip(router, "route", "add", "default", "via", f"198.51.100.{base + 1}")
        lab.veth(laptop, ifname, router, "lan0")
        lab.addr(router, "lan0", f"{gateway}/{lan.split('/')[1]}")
        lab.sysctl(router, "net.ipv4.ip_forward", "1")
        lab.sysctl(router, "net.ipv4.conf.all.promote_secondaries", "1")
        lab.nft(router, NAT_RULESET)
        router.addr4, router.ifname = ROAMING_WAN[name], "wan0"
        router.extra["lan4"], router.extra["lan_net"] = gateway, lan
    laptop.extra["at"] = ""
    for ifname, *_ in ROAMING_UPLINKS.values():
        lab.ip(laptop, "link", "set", ifname, "down")
    arrive(lab, laptop, at)
    return {"inet": inet, "desktop": desktop, "home": home, "cafe": cafe, "laptop": laptop}


def arrive(lab: Lab, laptop: Host, to: str) -> None:
    """Bring `to`'s uplink up with its address and default route (what DHCP does)."""
    ifname, cidr, gateway, _ = ROAMING_UPLINKS[to]
    lab.ip(laptop, "link", "set", ifname, "up")
    lab.addr(laptop, ifname, cidr)
    lab.ip(laptop, "route", "add", "default", "via", gateway)
    laptop.addr4, laptop.ifname, laptop.extra["at"] = cidr.split("/")[0], ifname, to


def leave(lab: Lab, laptop: Host) -> None:
    """Drop the current uplink: flush its addresses (what a network manager does on disconnect), link down."""
    at = laptop.extra.get("at")
    if not at:
        return
    ifname = ROAMING_UPLINKS[at][0]
    lab.ip(laptop, "addr", "flush", "dev", ifname)
    lab.ip(laptop, "link", "set", ifname, "down")
    laptop.addr4, laptop.extra["at"] = "", ""


def move(lab: Lab, laptop: Host, to: str) -> None:
    """Move the laptop of `roaming()` to the "home" or "cafe" uplink (leave the current one, arrive)."""
    if to not in ROAMING_UPLINKS:
        raise ValueError(f"unknown uplink {to!r}: {', '.join(ROAMING_UPLINKS)}")
    leave(lab, laptop)
    arrive(lab, laptop, to)


def set_udp_timeout(lab: Lab, router: Host, seconds: int) -> None:
    """The router's conntrack UDP timeouts (per namespace): a NAT binding with no packet for this long
    is dropped, for one-way (`udp_timeout`) and two-way (`udp_timeout_stream`) flows alike."""
    for key in ("net.netfilter.nf_conntrack_udp_timeout", "net.netfilter.nf_conntrack_udp_timeout_stream"):
        lab.sysctl(router, key, str(seconds))


def public_host(lab: Lab, inet: Host, name: str, n: int) -> Host:
    """One more public device on the roaming lab's internet: its own link to the inet router,
    192.0.2.{n}/24 with inet at 192.0.2.1 (n >= 2; one host per lab)."""
    h = lab.host(name)
    lab.veth(inet, f"p{n}", h, "eth0")
    lab.addr(inet, f"p{n}", "192.0.2.1/24")
    lab.addr(h, "eth0", f"192.0.2.{n}/24")
    lab.ip(h, "route", "add", "default", "via", "192.0.2.1")
    h.addr4, h.ifname = f"192.0.2.{n}", "eth0"
    return h
