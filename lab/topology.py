"""The lab's networks: two hosts on one link, a host behind a NAT router with a public peer, a
roaming laptop with two NAT uplinks and a public desktop, and two hosts behind NATs of chosen kinds
(endpoint-independent or per destination) with a public server.

Addresses are documentation ranges (RFC 5737, RFC 3849) and, behind the NAT, an RFC 1918 range: they
exist only inside the lab's namespaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from lab.netns import Host, Lab

STAR_HUB = "192.0.2.1"


def star(lab: Lab, names: tuple[str, ...]) -> list[Host]:
    """A hub (a bridge, 192.0.2.1) and one host per name on it, 192.0.2.2 onwards, default route via the
    hub: [hub, *hosts]. An account's devices on one LAN, the hub serving the account's DNS."""
    hub = lab.host("hub")
    lab.ip(hub, "link", "add", "br0", "type", "bridge")
    lab.addr(hub, "br0", f"{STAR_HUB}/24")
    lab.ip(hub, "link", "set", "br0", "up")
    hub.addr4 = STAR_HUB
    hosts = [hub]
    for i, name in enumerate(names, start=2):
        h = lab.host(name)
        lab.veth(hub, f"v{i}", h, "eth0")
        lab.ip(hub, "link", "set", f"v{i}", "master", "br0")
        lab.addr(h, "eth0", f"192.0.2.{i}/24")
        lab.ip(h, "route", "add", "default", "via", STAR_HUB)
        h.addr4, h.ifname = f"192.0.2.{i}", "eth0"
        hosts.append(h)
    return hosts


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


# -- two NATs: two private hosts, each behind its own NAT router, and a public server ----------------

NAT_KINDS = ("masquerade", "random", "fully-random", "none")
# nftables masquerade flags per NAT kind (docs/lab.md "Two NATs" has what each measured):
# masquerade keeps the source port when it is free (one mapping for every destination), `random`
# and `fully-random` pick the port per connection (a mapping per destination). "none" routes a
# public LAN without translation.
NAT_FLAGS = {"masquerade": "", "random": " random", "fully-random": " fully-random"}
TWO_NATS_SERVER = ("203.0.113.2", "203.0.113.3")  # the public server's two addresses
TWO_NATS_SITES = {
    # name: (router WAN address, LAN network prefix when NATted, LAN prefix when public ("none"))
    "a": ("198.51.100.2", "192.168.1", "198.51.100.34"),
    "b": ("198.51.100.18", "10.0.0", "198.51.100.50"),
}


@dataclass
class Site:
    """One side of `two_nats`: a host on the LAN of its router; `public` is the address its traffic
    leaves the site from (the router's WAN address behind a NAT, the host's own with kind "none")."""

    kind: str
    router: Host
    host: Host
    public: str


@dataclass
class TwoNats:
    inet: Host
    server: Host
    server_addrs: tuple[str, str]
    a: Site
    b: Site


# What every home router does besides translating: nothing unsolicited from the WAN reaches the router
# itself. It matters for hole punching: without it, the peer's first datagram (arriving before our own
# went out) is accepted as a local flow to a closed port, its conntrack entry takes the tuple, and our
# outgoing datagram to that peer is then translated to ANOTHER source port (docs/lab.md).
WAN_INPUT_RULESET = """
table ip filter {
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "wan0" ct state established,related accept
    iifname "wan0" counter drop
  }
}
"""


def nat_ruleset(kind: str) -> str:
    """The router's nftables NAT table and WAN input filter for `kind` (nothing for "none")."""
    if kind not in NAT_KINDS:
        raise ValueError(f"unknown NAT kind {kind!r}: {', '.join(NAT_KINDS)}")
    if kind == "none":
        return ""
    return NAT_RULESET.replace("masquerade\n", f"masquerade{NAT_FLAGS[kind]}\n") + WAN_INPUT_RULESET


def two_nats(lab: Lab, kind_a: str = "masquerade", kind_b: str = "masquerade") -> TwoNats:
    """Two sites, each a host behind its own router (NAT of `kind_x`), and a public server with two
    addresses, all joined by an "internet" router.

    server eth0 203.0.113.2 + .3/24 — inet (203.0.113.1, 198.51.100.1/28, 198.51.100.17/28)
    a: router wan0 198.51.100.2/28, lan0 192.168.1.1/24 — host eth0 192.168.1.2
    b: router wan0 198.51.100.18/28, lan0 10.0.0.1/24 — host eth0 10.0.0.2
    With kind "none" the site's LAN is public instead (a: 198.51.100.32/28, host .34; b:
    198.51.100.48/28, host .50; inet routes it via the router) and nothing is translated. inet has no
    route to the private LANs: only what a NAT translated passes. `block_direct` drops UDP between
    the two sites on inet.
    """
    for kind in (kind_a, kind_b):
        nat_ruleset(kind)  # unknown kinds fail before anything is built
    inet, server = lab.host("inet"), lab.host("server")
    lab.sysctl(inet, "net.ipv4.ip_forward", "1")
    lab.veth(inet, "s0", server, "eth0")
    lab.addr(inet, "s0", "203.0.113.1/24")
    for addr in TWO_NATS_SERVER:
        lab.addr(server, "eth0", f"{addr}/24")
    lab.ip(server, "route", "add", "default", "via", "203.0.113.1")
    server.addr4, server.ifname = TWO_NATS_SERVER[0], "eth0"
    sites = []
    for i, (name, kind) in enumerate((("a", kind_a), ("b", kind_b))):
        wan, private, public = TWO_NATS_SITES[name]
        base = 16 * i
        router, host = lab.host(f"nat{name}"), lab.host(f"host{name}")
        lab.veth(inet, f"{name}0", router, "wan0")
        lab.addr(inet, f"{name}0", f"198.51.100.{base + 1}/28")
        lab.addr(router, "wan0", f"{wan}/28")
        lab.ip(router, "route", "add", "default", "via", f"198.51.100.{base + 1}")
        lab.veth(host, "eth0", router, "lan0")
        lab.sysctl(router, "net.ipv4.ip_forward", "1")
        if kind == "none":
            gateway, lan = f"198.51.100.{base + 33}", f"198.51.100.{base + 32}/28"
            lab.ip(inet, "route", "add", lan, "via", wan)
            host_addr, prefix = public, 28
        else:
            gateway, lan, host_addr, prefix = f"{private}.1", f"{private}.0/24", f"{private}.2", 24
            lab.nft(router, nat_ruleset(kind))
        lab.addr(router, "lan0", f"{gateway}/{prefix}")
        lab.addr(host, "eth0", f"{host_addr}/{prefix}")
        lab.ip(host, "route", "add", "default", "via", gateway)
        router.addr4, router.ifname = wan, "wan0"
        router.extra["lan4"], router.extra["lan_net"], router.extra["kind"] = gateway, lan, kind
        host.addr4, host.ifname = host_addr, "eth0"
        sites.append(Site(kind=kind, router=router, host=host, public=host_addr if kind == "none" else wan))
    return TwoNats(inet=inet, server=server, server_addrs=TWO_NATS_SERVER, a=sites[0], b=sites[1])


BLOCK_TABLE = "blockdirect"


def block_direct(lab: Lab, net: TwoNats, blocked: bool = True) -> None:
    """Drop (or stop dropping) UDP between the two sites' public addresses on the inet router, in both
    directions: the direct path between the sites fails while the server stays reachable from both.
    Idempotent both ways."""
    pair = f"{{ {net.a.public}, {net.b.public} }}"
    ruleset = (f"table ip {BLOCK_TABLE} {{}}\ndelete table ip {BLOCK_TABLE}\n")
    if blocked:
        ruleset += (f"table ip {BLOCK_TABLE} {{\n  chain forward {{\n"
                    "    type filter hook forward priority filter; policy accept;\n"
                    f"    ip saddr {pair} ip daddr {pair} meta l4proto udp counter drop\n  }}\n}}\n")
    lab.nft(net.inet, ruleset)
