"""A lab for STUN: one public server and two hosts behind NATs of different kinds.

    ha 192.168.10.2 — ra (lan0 192.168.10.1, wan0 203.0.113.1/30, plain masquerade) —┐
                                                                                       srv (lo 198.51.100.53)
    hb 192.168.20.2 — rb (lan0 192.168.20.1, wan0 203.0.113.5/30, masquerade fully-random) —┘

Linux's plain masquerade keeps a flow's source port when it is free, so a socket keeps one mapping for
every destination (endpoint-independent); ``fully-random`` picks a new port for each new destination
(per destination). srv's service address sits on its loopback, reached over either link; it has no route
to the private LANs, so only what a NAT translated reaches it. Documentation and RFC 1918 addresses only.
"""

from __future__ import annotations

import secrets

from lab.netns import NETNS_PREFIX, Host, Lab

SERVER = "198.51.100.53"

NAT_RULESET = """
table ip nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" masquerade{flags}
  }}
}}
"""

# name: (LAN prefix, router WAN address, srv's address on that link, masquerade flags)
_SITES = {
    "a": ("192.168.10", "203.0.113.1", "203.0.113.2", ""),
    "b": ("192.168.20", "203.0.113.5", "203.0.113.6", " fully-random"),
}


def stun_lab() -> Lab:
    """A Lab whose namespaces are recognisably this lab's (``tdlstun…``)."""
    lab = Lab()
    lab.id = f"{NETNS_PREFIX}stun{secrets.token_hex(2)}"
    return lab


def two_nats(lab: Lab) -> dict[str, Host]:
    """The topology above: hosts "srv", "ra", "rb", "ha", "hb" (``ha.extra["wan"]``: its NAT's public
    address; ``ha.extra["gateway"]``: its router's LAN address)."""
    srv = lab.host("srv")
    lab.addr(srv, "lo", f"{SERVER}/32")
    srv.addr4 = SERVER
    hosts = {"srv": srv}
    for n, (lan, wan, srv_side, flags) in _SITES.items():
        host, router = lab.host(f"h{n}"), lab.host(f"r{n}")
        lab.veth(host, "eth0", router, "lan0")
        lab.veth(router, "wan0", srv, f"eth{n}")
        lab.addr(host, "eth0", f"{lan}.2/24")
        lab.addr(router, "lan0", f"{lan}.1/24")
        lab.addr(router, "wan0", f"{wan}/30")
        lab.addr(srv, f"eth{n}", f"{srv_side}/30")
        lab.ip(host, "route", "add", "default", "via", f"{lan}.1")
        lab.ip(router, "route", "add", "default", "via", srv_side)
        lab.sysctl(router, "net.ipv4.ip_forward", "1")
        lab.nft(router, NAT_RULESET.format(flags=flags))
        host.addr4, host.ifname = f"{lan}.2", "eth0"
        host.extra.update(wan=wan, gateway=f"{lan}.1")
        router.addr4, router.ifname = wan, "wan0"
        hosts[f"h{n}"], hosts[f"r{n}"] = host, router
    return hosts
