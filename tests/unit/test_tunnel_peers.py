"""The peer table at run time: peers learned from DNS are added, updated and removed."""

from __future__ import annotations

import ipaddress

import pytest

from tests.helpers import drbg
from tunneld.crypto.noise import generate_keypair
from tunneld.proto.tunnel import FRESH_PACKET, Output, TunnelCore

PSK = bytes(32)
A_ULA = ipaddress.IPv6Address("fd00:1::a")
B_ULA = ipaddress.IPv6Address("fd00:1::b")
A_ADDR = ("::ffff:192.0.2.1", 4500)
B_ADDR = ("::ffff:192.0.2.2", 4500)


def packet(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address) -> bytes:
    return bytes.fromhex("6000000000083b40") + src.packed + dst.packed + bytes(8)


def pair() -> tuple[TunnelCore, TunnelCore, bytes, bytes]:
    a_priv, a_pub = generate_keypair()
    b_priv, b_pub = generate_keypair()
    a = TunnelCore(a_priv, PSK, rand=drbg(1))
    b = TunnelCore(b_priv, PSK, rand=drbg(2))
    return a, b, a_pub, b_pub


def deliver(sent: Output, to: TunnelCore, src: tuple[str, int], now: float, tun: list[bytes]) -> Output:
    out = to.inbound([(d, src) for f in sent.sends for d in f.all_datagrams()], now, 1e9 + now)
    tun += out.tun_in_order()
    return out


def handshake(a: TunnelCore, b: TunnelCore, now: float) -> list[bytes]:
    """a sends one packet to b; the handshake runs; returns what reached b's TUN."""
    tun_b: list[bytes] = []
    init = a.outbound([packet(A_ULA, B_ULA)], [], now, 1e9 + now)
    resp = deliver(init, b, A_ADDR, now, tun_b)
    data = deliver(resp, a, B_ADDR, now, [])
    deliver(data, b, A_ADDR, now, tun_b)
    return tun_b


def test_learned_peer_is_reachable() -> None:
    a, b, a_pub, b_pub = pair()
    a.learn_peer("b", b_pub, B_ULA, B_ADDR, 0.0)
    b.learn_peer("a", a_pub, A_ULA, None, 0.0)  # b only answers: no endpoint published yet
    assert handshake(a, b, 0.0) == [packet(A_ULA, B_ULA)]
    assert b.by_key[a_pub].endpoint == A_ADDR  # learned from the authenticated handshake


def test_dns_endpoint_updates_an_idle_peer_but_not_a_live_one() -> None:
    a, b, a_pub, b_pub = pair()
    a.learn_peer("b", b_pub, B_ULA, B_ADDR, 0.0)
    moved = ("::ffff:198.51.100.2", 4501)
    assert a.learn_peer("b", b_pub, B_ULA, moved, 0.0).endpoint == moved  # no session: follow DNS
    a.learn_peer("b", b_pub, B_ULA, B_ADDR, 0.0)
    b.learn_peer("a", a_pub, A_ULA, None, 0.0)
    handshake(a, b, 0.0)
    # A live session's endpoint comes from authenticated packets; a DNS record cannot move it.
    assert a.learn_peer("b", b_pub, B_ULA, moved, 1.0).endpoint == B_ADDR
    assert len(a.by_key) == 1  # updated in place, not added twice
    peer = a.by_key[b_pub]
    assert (peer.endpoint_source, peer.endpoint_at) == ("packet", 0.0)
    # A peer silent for longer than FRESH_PACKET may have moved and published it: the record wins then.
    assert a.learn_peer("b", b_pub, B_ULA, moved, FRESH_PACKET + 0.5).endpoint == moved
    assert (peer.endpoint_source, peer.endpoint_at) == ("dns", FRESH_PACKET + 0.5)


def test_a_peer_without_a_published_endpoint_keeps_the_one_its_packets_showed() -> None:
    a, b, a_pub, b_pub = pair()
    a.learn_peer("b", b_pub, B_ULA, B_ADDR, 0.0)
    b.learn_peer("a", a_pub, A_ULA, None, 0.0)
    handshake(a, b, 0.0)
    assert b.by_key[a_pub].endpoint == A_ADDR
    b.learn_peer("a", a_pub, A_ULA, None, 100.0)  # its records again, still without an endpoint
    assert b.by_key[a_pub].endpoint == A_ADDR and b.by_key[a_pub].endpoint_source == "packet"


def test_forgotten_peer_is_unreachable_and_its_spis_are_gone() -> None:
    a, b, a_pub, b_pub = pair()
    a.learn_peer("b", b_pub, B_ULA, B_ADDR, 0.0)
    b.learn_peer("a", a_pub, A_ULA, None, 0.0)
    handshake(a, b, 0.0)
    spis = set(b.by_spi)
    assert spis
    assert b.forget_peer(a_pub) and not b.forget_peer(a_pub)
    assert not set(b.by_spi) & spis and A_ULA.packed not in b.by_ula
    # a's packets on the old session now hit unknown SPIs and reach nothing.
    tun: list[bytes] = []
    deliver(a.outbound([packet(A_ULA, B_ULA)], [], 2.0, 1e9 + 2), b, A_ADDR, 2.0, tun)
    assert tun == [] and b.counters.rx_unknown_spi >= 1
    # and its handshakes are refused: it is not a peer any more.
    before = b.handshaker.drops.get("unknown-peer", 0)
    a.forget_peer(b_pub)
    a.learn_peer("b", b_pub, B_ULA, B_ADDR, 10.0)
    deliver(a.outbound([packet(A_ULA, B_ULA)], [], 10.0, 1e9 + 10), b, A_ADDR, 10.0, tun)
    assert b.handshaker.drops.get("unknown-peer", 0) == before + 1


def test_add_peer_refuses_duplicates() -> None:
    a, _b, _a_pub, b_pub = pair()
    a.add_peer("b", b_pub, B_ULA, None)
    with pytest.raises(ValueError):
        a.add_peer("b2", b_pub, ipaddress.IPv6Address("fd00:1::c"), None)
    with pytest.raises(ValueError):
        a.add_peer("c", generate_keypair()[1], B_ULA, None)
