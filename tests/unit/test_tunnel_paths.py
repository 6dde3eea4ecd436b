"""Paths in the tunnel core, in virtual time over an in-memory internet (tests/unit/nat_sim.py): hole
punching through two endpoint-independent NATs, relay fallback and upgrade, per-destination NATs, the
demultiplexing of STUN and relayed data on the tunnel socket, and status."""

from __future__ import annotations

from tests.helpers import drbg
from tests.unit.nat_sim import Host, Net
from tests.unit.test_tunnel_peers import A_ULA, B_ULA, PSK, packet
from tunneld.crypto.esp import Kind, classify
from tunneld.crypto.noise import generate_keypair
from tunneld.proto import stun_wire as sw
from tunneld.proto.paths import PUNCH_SCHEDULE, PUNCH_WINDOW, UPGRADE_INTERVAL, PathChanged
from tunneld.proto.tunnel import TunnelCore

A_IP, B_IP = "::ffff:198.51.100.1", "::ffff:198.51.100.2"
STUN_SERVER = ("::ffff:192.0.2.53", 3478)


def setup(*, per_destination: bool = False) -> tuple[Net, Host, Host, bytes, bytes]:
    a_priv, a_pub = generate_keypair()
    b_priv, b_pub = generate_keypair()
    net = Net()
    a = net.add(Host("a", TunnelCore(a_priv, PSK, rand=drbg(1)), A_IP, per_destination=per_destination))
    b = net.add(Host("b", TunnelCore(b_priv, PSK, rand=drbg(2)), B_IP, per_destination=per_destination))
    return net, a, b, a_pub, b_pub


def handshakes_to(host: Host, dest: tuple[str, int]) -> list[float]:
    """When `host` sent handshake messages to `dest` (initiations and responses)."""
    return [t for t, d, data in host.sent if d == dest and classify(data) is Kind.CONTROL]


def exchange(net: Net, a: Host, b: Host, until: float) -> None:
    """One packet each way; both must arrive by ``until``."""
    a.tun.clear()
    b.tun.clear()
    net.send_packet(a, packet(A_ULA, B_ULA))
    net.send_packet(b, packet(B_ULA, A_ULA))
    net.run(until)
    assert b.tun == [packet(A_ULA, B_ULA)] and a.tun == [packet(B_ULA, A_ULA)]


def status(host: Host, name: str, now: float) -> dict[str, object]:
    [s] = [p for p in host.core.peer_status(now) if p["name"] == name]
    return s


def test_two_endpoint_independent_nats_punch_through_at_once_and_stop_punching() -> None:
    net, a, b, a_pub, b_pub = setup()
    a.core.set_nat("ei")
    b.core.set_nat("ei")
    # Each learns the other through its LLQ, a few tens of milliseconds apart.
    a.core.learn_peer("b", b_pub, B_ULA, b.public, 0.0, nat="ei")
    net.run(0.04)
    b.core.learn_peer("a", a_pub, A_ULA, a.public, 0.04, nat="ei")
    net.run(1.5)
    exchange(net, a, b, 1.6)
    assert status(a, "b", 1.6)["path"] == status(b, "a", 1.6)["path"] == "direct"
    assert a.core.by_key[b_pub].endpoint == b.public and b.core.by_key[a_pub].endpoint == a.public
    # The first initiations left at once; a's first was dropped by b's NAT (b had not sent yet).
    assert handshakes_to(a, b.public)[0] == 0.0 and handshakes_to(b, a.public)[0] == 0.04
    net.run(30.0)
    # Punching stopped with the first authenticated packet: a few handshakes each, none after 1 s.
    for host, other in ((a, b), (b, a)):
        times = handshakes_to(host, other.public)
        assert 1 <= len(times) <= 4 and max(times) < 1.0, times
    assert not [e for e in a.events + b.events if isinstance(e, PathChanged) and e.path == "relay"]


def test_no_punching_for_a_mapped_endpoint_when_we_are_not_behind_a_nat() -> None:
    net, a, b, _a_pub, b_pub = setup()
    a.core.learn_peer("b", b_pub, B_ULA, b.public, 0.0)  # as before issue 13: wait for traffic
    net.run(10.0)
    assert a.sent == []
    a.core.learn_peer("b", b_pub, B_ULA, b.public, 10.0, nat="ei")  # an observed binding: punch it
    net.run(20.0)
    assert [round(t - 10.0, 2) for t in handshakes_to(a, b.public)] == list(PUNCH_SCHEDULE)  # bounded


def relayed_setup(*, block: bool = True) -> tuple[Net, Host, Host, bytes, bytes]:
    """Two endpoint-independent NATs, b with a relay allocation that it publishes; direct blocked."""
    net, a, b, a_pub, b_pub = setup()
    if block:
        net.blocked.add(frozenset((A_IP, B_IP)))
    relay = net.relay.allocate(b)
    b.core.relay = relay
    a.core.set_nat("ei")
    b.core.set_nat("ei")
    a.core.learn_peer("b", b_pub, B_ULA, b.public, 0.0, nat="ei", relay=relay.relayed)
    b.core.learn_peer("a", a_pub, A_ULA, a.public, 0.0, nat="ei")
    return net, a, b, a_pub, b_pub


def test_no_direct_path_within_the_punch_window_goes_through_the_peers_relay() -> None:
    net, a, b, a_pub, _b_pub = relayed_setup()
    rb = b.core.relay.relayed  # type: ignore[union-attr]
    net.run(PUNCH_WINDOW + 0.5)
    # a punched until the window closed, then sent its handshake to b's relayed address.
    assert handshakes_to(a, b.public) and max(handshakes_to(a, b.public)) < PUNCH_WINDOW
    assert handshakes_to(a, rb)[0] == PUNCH_WINDOW
    assert PathChanged("b", "relay", rb, rb) in a.events
    # b heard a through its own allocation and answers through it (wrapped, to the relay server).
    [changed] = [e for e in b.events if isinstance(e, PathChanged)]
    assert (changed.path, changed.endpoint, changed.relay) == ("relay", a.public, net.relay.address)
    assert b.core.by_key[a_pub].path.via == net.relay.address
    exchange(net, a, b, PUNCH_WINDOW + 1.0)
    sa, sb = status(a, "b", 4.0), status(b, "a", 4.0)
    assert (sa["path"], sa["relay"], sb["path"], sb["relay"]) == ("relay", rb, "relay", net.relay.address)
    assert b.core.counters.tx_relayed > 0 and b.core.counters.rx_relayed > 0
    assert b.core.counters.rx_malformed == a.core.counters.rx_malformed == 0


def test_a_relayed_path_upgrades_to_direct_when_a_probe_gets_through_and_keeps_its_sessions() -> None:
    net, a, b, _a_pub, _b_pub = relayed_setup()
    net.run(PUNCH_WINDOW + 1.0)
    exchange(net, a, b, 5.0)
    spis_a, spis_b = set(a.core.by_spi), set(b.core.by_spi)
    net.blocked.clear()  # the direct path works now (say, a firewall rule went)
    net.run(PUNCH_WINDOW + UPGRADE_INTERVAL + 1.0)
    assert status(a, "b", net.now)["path"] == status(b, "a", net.now)["path"] == "direct"
    assert PathChanged("b", "direct", b.public, None) in a.events
    assert PathChanged("a", "direct", a.public, None) in b.events
    # The same sessions: a path change moves datagrams, never keys.
    assert set(a.core.by_spi) == spis_a and set(b.core.by_spi) == spis_b
    before = len(net.delivered)
    exchange(net, a, b, net.now + 0.5)
    assert {src for _, _, src, _ in net.delivered[before:]} == {a.public, b.public}  # no relay in between


def test_when_the_direct_path_dies_the_peers_fall_back_to_the_relay_without_dropping_sessions() -> None:
    net, a, b, _a_pub, _b_pub = relayed_setup(block=False)
    net.run(2.0)
    exchange(net, a, b, 2.5)
    assert status(a, "b", 2.5)["path"] == "direct"
    net.blocked.add(frozenset((A_IP, B_IP)))  # the direct path dies
    spis = set(a.core.by_spi)
    net.send_packet(a, packet(A_ULA, B_ULA))  # unanswered: after keepalive + rekey timeout, a moves
    while status(a, "b", net.now)["path"] == "direct":
        assert net.now < 2.5 + 15.0 + 1.0  # keepalive + rekey timeout, and the jitter
        net.run(net.now + 0.05)
    assert net.now > 2.5 + 15.0
    assert set(a.core.by_spi) == spis  # the switch itself drops no session
    net.run(25.0)
    exchange(net, a, b, 26.0)
    assert status(b, "a", 26.0)["path"] == "relay"


def test_when_the_relay_dies_a_direct_path_is_punched() -> None:
    net, a, b, _a_pub, _b_pub = relayed_setup()
    net.run(PUNCH_WINDOW + 1.0)
    exchange(net, a, b, 5.0)
    net.blocked.clear()
    net.relay.alive = False  # coturn killed before any upgrade probe
    net.send_packet(a, packet(A_ULA, B_ULA))
    net.send_packet(b, packet(B_ULA, A_ULA))
    net.run(5.0 + 20.0)
    assert status(a, "b", net.now)["path"] == status(b, "a", net.now)["path"] == "direct"
    exchange(net, a, b, net.now + 0.5)


def test_per_destination_nats_go_through_the_relay_at_once() -> None:
    net, a, b, a_pub, b_pub = setup(per_destination=True)
    relay = net.relay.allocate(b)
    b.core.relay = relay
    a.core.set_nat("pd")
    b.core.set_nat("pd")
    a.core.learn_peer("b", b_pub, B_ULA, b.public, 0.0, nat="pd", relay=relay.relayed)
    assert PathChanged("b", "relay", relay.relayed, relay.relayed) in a.core.events()
    b.core.learn_peer("a", a_pub, A_ULA, a.public, 0.0, nat="pd")
    net.run(0.5)
    assert handshakes_to(a, b.public) == [] and handshakes_to(a, relay.relayed)[0] == 0.0
    exchange(net, a, b, 1.0)
    # Still relayed later: no direct probes toward a per-destination NAT.
    net.run(UPGRADE_INTERVAL * 2)
    assert status(a, "b", net.now)["path"] == "relay" and status(b, "a", net.now)["path"] == "relay"


def test_a_relayed_packet_does_not_move_a_live_direct_path() -> None:
    net, a, b, _a_pub, b_pub = relayed_setup(block=False)
    net.run(2.0)
    exchange(net, a, b, 2.5)
    rb = b.core.relay.relayed  # type: ignore[union-attr]
    sealed = b.core.outbound([packet(B_ULA, A_ULA)], [], 3.0, 1e9 + 3)
    [wire] = [d for f in sealed.sends for d in f.all_datagrams()]
    out = a.core.inbound([(wire, rb)], 3.0, 1e9 + 3)  # the same peer, through its relay
    assert out.tun_in_order() == [packet(B_ULA, A_ULA)]  # delivered
    peer = a.core.by_key[b_pub]
    assert (peer.endpoint, peer.path.kind) == (b.public, "direct")  # but the direct path stays
    later = 3.0 + 20.0  # silent directly for longer than FRESH_PACKET: the relayed path is taken
    sealed = b.core.outbound([packet(B_ULA, A_ULA)], [], later, 1e9 + later)
    [wire] = [d for f in sealed.sends for d in f.all_datagrams()]
    a.core.inbound([(wire, rb)], later, 1e9 + later)
    assert (peer.endpoint, peer.path.kind, peer.path.relay) == (rb, "relay", rb)


def test_stun_is_handed_out_and_relay_data_unwrapped_on_the_tunnel_socket() -> None:
    net, a, b, _a_pub, _b_pub = relayed_setup(block=False)
    net.run(2.0)
    core = b.core
    response = sw.encode(sw.BINDING, sw.SUCCESS, bytes(12),
                         [(sw.XOR_MAPPED_ADDRESS, sw.encode_xor_address(("192.0.2.1", 4500), bytes(12)))],
                         fingerprint=True)
    out = core.inbound([(response, STUN_SERVER)], 3.0, 1e9 + 3)
    assert out.stun == [(response, STUN_SERVER)] and core.counters.rx_malformed == 0
    # From our relay server: what does not unwrap but is STUN (a TURN response) goes out too.
    server = net.relay.address
    out = core.inbound([(response, server)], 3.0, 1e9 + 3)
    assert out.stun == [(response, server)] and core.counters.rx_malformed == 0
    # Relayed data in one GRO receive (two ChannelData of one size) is split, unwrapped and opened.
    sealed = a.core.outbound([packet(A_ULA, B_ULA), packet(A_ULA, B_ULA)], [], 3.0, 1e9 + 3)
    wires = [d for f in sealed.sends for d in f.all_datagrams()]
    wrapped = [core.relay.wrap(a.public, w) for w in wires]  # type: ignore[union-attr]
    assert len({len(w) for w in wrapped}) == 1
    out = core.inbound_gro([(b"".join(wrapped), server, len(wrapped[0]))], 3.0, 1e9 + 3)
    assert out.tun_in_order() == [packet(A_ULA, B_ULA)] * 2
    # Garbage from the relay server is malformed; ChannelData-looking bytes from anyone else are not
    # unwrapped (they are not ours: an SPI of another stack may begin 0x40).
    core.inbound([(b"\x40\x00\x00\x01xyz\x00", server), (wrapped[0], STUN_SERVER)], 3.0, 1e9 + 3)
    assert core.counters.rx_malformed == 1 and core.counters.rx_unknown_spi == 1


def test_status_names_the_path_since_when_and_the_relay() -> None:
    net, a, b, _a_pub, _b_pub = relayed_setup()
    net.run(PUNCH_WINDOW + 1.0)
    s = status(a, "b", 10.0)
    rb = b.core.relay.relayed  # type: ignore[union-attr]
    assert (s["path"], s["relay"], s["peer_relay"], s["nat"]) == ("relay", rb, rb, "ei")
    assert s["path_since"] == round(10.0 - PUNCH_WINDOW, 1)


def test_after_a_move_a_peer_reached_through_our_old_allocation_is_reached_directly_again() -> None:
    net, a, b, a_pub, _b_pub = relayed_setup()
    net.run(PUNCH_WINDOW + 1.0)
    assert b.core.by_key[a_pub].path.via == net.relay.address
    out = b.core.roamed(6.0, 1e9 + 6)
    peer = b.core.by_key[a_pub]
    assert (peer.endpoint, peer.path.kind, peer.path.via) == (a.public, "direct", None)
    assert [f.destination for f in out.sends] == [a.public]
