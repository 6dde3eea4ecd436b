"""Roaming in the tunnel core, in virtual time: telling peers where we are after a move, and keeping a
NAT's binding open from behind it (persistent keepalive)."""

from __future__ import annotations

from tests.unit.test_tunnel_peers import A_ADDR, A_ULA, B_ADDR, B_ULA, deliver, handshake, packet, pair
from tunneld.crypto.esp import Kind, classify
from tunneld.proto.tunnel import PERSISTENT_KEEPALIVE, Output, PeerMoved, TunnelCore

CAFE = ("::ffff:203.0.113.77", 61001)  # what the café's NAT makes of A's socket


def datagrams(out: Output, to: tuple[str, int]) -> list[bytes]:
    return [d for f in out.sends if f.destination == to for d in f.all_datagrams()]


def test_after_a_move_every_live_peer_learns_the_new_endpoint_from_one_keepalive() -> None:
    a, b, a_pub, b_pub = pair()
    a.learn_peer("b", b_pub, B_ULA, B_ADDR, 0.0)
    b.learn_peer("a", a_pub, A_ULA, None, 0.0)
    handshake(a, b, 0.0)
    assert b.by_key[a_pub].endpoint == A_ADDR
    out = a.roamed(30.0, 1e9 + 30)
    [keepalive] = datagrams(out, B_ADDR)
    assert classify(keepalive) is Kind.ESP  # authenticated: an ESP packet on the live session
    got = deliver(out, b, CAFE, 30.01, [])  # it leaves from the café, through its NAT
    assert b.by_key[a_pub].endpoint == CAFE and b.by_key[a_pub].endpoint_source == "packet"
    assert PeerMoved("a", CAFE) in got.events
    # b's own traffic now goes to the café at once (no waiting for a's handshake timer).
    reply = b.outbound([packet(B_ULA, A_ULA)], [], 30.02, 1e9 + 30)
    assert datagrams(reply, CAFE) and not datagrams(reply, A_ADDR)


def test_after_a_move_a_peer_with_an_old_session_gets_a_handshake() -> None:
    a, b, a_pub, b_pub = pair()
    a.learn_peer("b", b_pub, B_ULA, B_ADDR, 0.0)
    b.learn_peer("a", a_pub, A_ULA, None, 0.0)
    handshake(a, b, 0.0)
    out = a.roamed(200.0, 1e9 + 200)  # past reject_after_time: the session is gone
    [init] = datagrams(out, B_ADDR)
    assert classify(init) is Kind.CONTROL
    resp = deliver(out, b, CAFE, 200.01, [])
    assert b.by_key[a_pub].endpoint == CAFE  # an initiation is authenticated too
    assert datagrams(resp, CAFE)


def test_a_peer_that_publishes_nothing_and_a_peer_we_cannot_reach_get_nothing() -> None:
    a, _, _, b_pub = pair()
    a.learn_peer("b", b_pub, B_ULA, None, 0.0)  # no endpoint known: nothing to tell
    assert a.roamed(1.0, 1e9).sends == []


def run_idle(a: TunnelCore, b: TunnelCore, b_sees_a: tuple[str, int], until: float,
             step: float = 0.5) -> tuple[list[float], list[float]]:
    """Both idle; a polls its timers (and b answers what a sends). Returns when a sent anything to b,
    and the times at which b could not send to a (no session)."""
    a_pub = next(iter(b.by_key))
    sent, b_blind = [], []
    t = 0.0
    while t < until:
        t = round(t + step, 6)
        out = a.poll(t, 1e9 + t)
        if datagrams(out, B_ADDR):
            sent.append(t)
        for _ in range(4):  # the exchange this starts, to its end (a handshake is three messages)
            back = deliver(out, b, b_sees_a, t, [])
            out = deliver(back, a, B_ADDR, t, [])
        deliver(b.poll(t, 1e9 + t), a, B_ADDR, t, [])
        if b.by_key[a_pub].sendable(t) is None:
            b_blind.append(t)
    return sent, b_blind


def test_persistent_keepalive_holds_the_binding_and_the_session_for_as_long_as_we_are_idle() -> None:
    """Behind a NAT that maps nothing, a keeps its binding open: a packet toward b at least every
    PERSISTENT_KEEPALIVE seconds, and the sessions renewed before they expire, so b can send to a at
    any time, however long both stay idle."""
    a, b, a_pub, b_pub = pair()
    a.learn_peer("b", b_pub, B_ULA, B_ADDR, 0.0)
    b.learn_peer("a", a_pub, A_ULA, None, 0.0)
    a.set_persistent_keepalive(PERSISTENT_KEEPALIVE)
    sent, b_blind = run_idle(a, b, CAFE, until=900.0)
    assert sent[0] <= 1.0  # at once: b learns where a is without waiting for traffic
    gaps = [y - x for x, y in zip([0.0, *sent], sent, strict=False)]
    assert max(gaps) <= PERSISTENT_KEEPALIVE + 0.5, gaps
    assert b_blind == [] or max(b_blind) < 1.0, b_blind[:5]  # only before the first handshake ends
    assert b.by_key[a_pub].endpoint == CAFE
    assert a.by_key[b_pub].handshakes >= 900 // 180  # renewed, not left to expire


def test_without_persistent_keepalive_an_idle_peer_goes_quiet() -> None:
    a, b, a_pub, b_pub = pair()
    a.learn_peer("b", b_pub, B_ULA, B_ADDR, 0.0)
    b.learn_peer("a", a_pub, A_ULA, None, 0.0)
    handshake(a, b, 0.0)
    sent, b_blind = run_idle(a, b, A_ADDR, until=400.0)
    assert sent == []  # nothing keeps a NAT binding open
    assert b_blind and b_blind[-1] == 400.0  # and b loses the session: it cannot reach a first
    a.set_persistent_keepalive(None)
    assert a.by_key[b_pub].persistent_keepalive is None


def test_a_handshake_begun_offline_is_begun_again_from_the_new_network() -> None:
    """Offline, the move's initiation went nowhere (and its retry is 5 s away); arriving somewhere new,
    the handshake starts again at once rather than waiting for that retry."""
    a, _, _, b_pub = pair()
    a.learn_peer("b", b_pub, B_ULA, B_ADDR, 0.0)
    first = datagrams(a.roamed(10.0, 1e9 + 10), B_ADDR)  # offline: this one is lost
    again = datagrams(a.roamed(11.0, 1e9 + 11), B_ADDR)  # at the café, one second later
    assert len(first) == len(again) == 1 and classify(again[0]) is Kind.CONTROL and again != first
