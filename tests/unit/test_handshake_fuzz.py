"""Fuzzing the tunnel port's handshake path with hostile datagrams up to 64 KB.

Invariant: for any bytes, the message parsers (`Initiation.parse`, `Response.parse`, `CookieReply.parse`,
`unframe`, `parse_tai64n`) return or raise ParseError; `Handshaker.receive` returns an event and counts
every `Dropped` under its reason; `TunnelCore.inbound` and `inbound_gro` never raise, count every
datagram and deliver nothing to the TUN that did not come from a session. The inputs are genuine
messages (an initiation, a response, a cookie reply) cut, bit-flipped, spliced, padded, with mac1
recomputed so they reach past it into the Noise AEADs, plus arbitrary bytes behind the marker.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import drbg
from tunneld.crypto.noise import MAC, public_key
from tunneld.proto import handshake as hs
from tunneld.proto.errors import ParseError
from tunneld.proto.tunnel import TunnelCore

I_PRIV, R_PRIV = bytes([0x11]) * 32, bytes([0x22]) * 32
I_PUB, R_PUB = public_key(I_PRIV), public_key(R_PRIV)
PSK = bytes([0x33]) * 32
WALL = 1_700_000_000.0
MAX = 65_535
I_ADDR = ("192.0.2.1", 4500)
R_ADDR = ("198.51.100.2", 4500)


def _genuine() -> tuple[bytes, bytes, bytes]:
    initiator = hs.Handshaker(I_PRIV, PSK, {R_PUB}, rand=drbg(1))
    responder = hs.Handshaker(R_PRIV, PSK, {I_PUB}, rand=drbg(2))
    d1, _ = initiator.initiate(R_PUB, 10.0, WALL)
    cookie = responder.receive(hs.unframe(d1), I_ADDR, 10.0, under_load=True)
    assert isinstance(cookie, hs.SendCookie)
    ev = responder.receive(hs.unframe(d1), I_ADDR, 10.0)
    assert isinstance(ev, hs.InitiationReceived)
    return hs.unframe(d1), hs.unframe(ev.datagram), hs.unframe(cookie.datagram)


INITIATION, RESPONSE, COOKIE = _genuine()
GENUINE = (INITIATION, RESPONSE, COOKIE)


def _fix_mac1(message: bytes, receiver: bytes) -> bytes:
    if len(message) < 32:
        return message
    b = message[:-32]
    return b + MAC(hs.mac1_key(receiver, PSK), b) + message[-16:]


def _build(kind: int, which: int, seed: int) -> bytes:
    """One hostile message, cheaply: the kind of damage and the message drawn by hypothesis, the rest
    (position, value, cut, size up to 64 KB, whether mac1 is recomputed) from a seeded generator, which
    keeps hypothesis's own cost per example low enough for 10k examples."""
    rnd = random.Random(seed)
    pos, val, cut = rnd.randrange(200), rnd.randrange(256), rnd.randrange(200)
    size = rnd.choice((rnd.randrange(300), rnd.randrange(MAX + 1)))
    fix = rnd.random() < 0.5
    g = GENUINE[which]
    if kind == 0:  # a byte changed
        i = pos % len(g)
        m = g[:i] + bytes([val]) + g[i + 1:]
    elif kind == 1:  # cut short
        m = g[: cut % (len(g) + 1)]
    elif kind == 2:  # padded, up to 64 KB
        m = g + rnd.randbytes(size % (MAX - len(g) + 1))
    elif kind == 3:  # a genuine head spliced onto random bytes of a message's length or any length
        tail = rnd.randbytes(max(0, (len(g) if size % 2 else size % MAX) - cut % len(g)))
        m = g[: cut % len(g)] + tail
    else:  # arbitrary bytes with a plausible first byte
        m = bytes([val % 4]) + rnd.randbytes(size % MAX)
    if fix:
        m = _fix_mac1(m, R_PUB if which == 0 else I_PUB)
    return m


messages = st.builds(_build, kind=st.integers(0, 4), which=st.integers(0, 2), seed=st.integers(0, 2**32))


def _check_parsers(m: bytes) -> None:
    for parse in (hs.Initiation.parse, hs.Response.parse, hs.CookieReply.parse):
        try:
            parsed = parse(m)
        except ParseError:
            continue
        assert parsed.encode() == m  # parsed once, nothing lost
    for f in (hs.unframe, hs.parse_tai64n):
        with contextlib.suppress(ParseError):
            f(m)


class World:
    """Long-lived receivers (a key computation each is too dear per example): an initiator with its
    initiation pending (so responses and cookie replies reach their AEADs) and a responder, plus a
    TunnelCore. `now` only goes forward."""

    def __init__(self) -> None:
        self.clock = itertools.count()
        self.initiator = hs.Handshaker(I_PRIV, PSK, {R_PUB}, rand=drbg(1))
        self.initiator.initiate(R_PUB, 10.0, WALL)  # the same pending initiation as INITIATION's
        self.responder = hs.Handshaker(R_PRIV, PSK, {I_PUB}, rand=drbg(3))
        self.core = TunnelCore(R_PRIV, PSK, rand=drbg(4))
        self.core.add_peer("i", I_PUB, ipaddress.IPv6Address("fd00::1"), I_ADDR)

    def now(self) -> float:
        return 10.0 + next(self.clock) * 0.001


WORLD = World()


def _check_handshaker(h: hs.Handshaker, m: bytes, src: tuple[str, int], now: float, load: bool) -> None:
    before = dict(h.drops)
    ev = h.receive(m, src, now, under_load=load)
    if isinstance(ev, hs.Dropped):
        assert h.drops[ev.reason] == before.get(ev.reason, 0) + 1
        assert sum(h.drops.values()) == sum(before.values()) + 1
    else:
        assert isinstance(ev, hs.InitiationReceived | hs.ResponseReceived | hs.CookieReceived | hs.SendCookie)
        assert h.drops == before
        if isinstance(ev, hs.SendCookie):
            assert len(ev.datagram) == 4 + hs.COOKIE_REPLY_LEN


def _check(m: bytes, flags: int) -> None:
    load, v6, gro = bool(flags & 1), bool(flags & 2), bool(flags & 4)
    _check_parsers(m)
    src = ("2001:db8::7", 4500) if v6 else I_ADDR
    now = WORLD.now()
    # Each example meets one of the two roles (the core is a responder and an initiator both).
    _check_handshaker(WORLD.initiator if gro else WORLD.responder, m, src, now, load)
    core = WORLD.core
    c = core.counters
    rx, rx_hs = c.rx_datagrams, c.rx_handshake
    datagram = hs.MARKER + m
    if gro:
        out = core.inbound_gro([(datagram + datagram, src, len(datagram)), (m, src, 0)], now, WALL + now)
        n = 3
    else:
        out = core.inbound([(datagram, src), (m, src)], now, WALL + now)
        n = 2
    assert c.rx_datagrams == rx + n
    assert c.rx_handshake - rx_hs <= n
    assert out.tun_in_order() == []  # nothing reaches the TUN without a session


# flags: forced load, an IPv6 source, the GRO path with the initiator's role (else the responder's).
@pytest.mark.quick_twin
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=messages, flags=st.integers(0, 7))
def test_hostile_handshake_messages_are_dropped_and_counted(m: bytes, flags: int) -> None:
    _check(m, flags)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(m=messages, flags=st.integers(0, 7))
def test_hostile_handshake_messages_are_dropped_and_counted_10k(m: bytes, flags: int) -> None:
    _check(m, flags)


def test_the_genuine_messages_get_through_the_harness() -> None:
    """The harness is honest: unmodified messages are accepted where they belong."""
    world = World()
    ev = world.responder.receive(INITIATION, I_ADDR, 10.0)
    assert isinstance(ev, hs.InitiationReceived)
    assert isinstance(world.initiator.receive(COOKIE, R_ADDR, 10.0), hs.CookieReceived)
    assert isinstance(world.initiator.receive(RESPONSE, R_ADDR, 10.0), hs.ResponseReceived)
    assert hs.Initiation.parse(INITIATION).encode() == INITIATION
