"""Fuzzing the tunnel socket's demultiplexing (docs/protocol.md, "UDP encapsulation"): hostile datagrams
from our relay server and from anyone else, shaped like STUN, ChannelData, handshakes or ESP.

Invariant: `TunnelCore.inbound` and `inbound_gro` never raise; every datagram is counted once (our relay
server's as relayed, the rest as received, the unwrapped ones received again); nothing reaches the TUN
without a session; what is handed out as STUN is a whole STUN message, and comes from where it arrived.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import drbg
from tests.unit.nat_sim import Host, RelayServer
from tunneld.crypto.noise import generate_keypair
from tunneld.proto import stun_wire as sw
from tunneld.proto.core import Address
from tunneld.proto.tunnel import TunnelCore

SERVER = ("::ffff:203.0.113.50", 3478)
OTHER = ("::ffff:192.0.2.9", 3478)
PEER = ("::ffff:198.51.100.2", 4500)

_priv, _ = generate_keypair()
CORE = TunnelCore(_priv, bytes(32), rand=drbg(5))
CORE.add_peer("b", generate_keypair()[1], ipaddress.IPv6Address("fd00:1::b"), PEER)
_relay = RelayServer(*SERVER)
CORE.relay = _relay.allocate(Host("me", CORE, "::ffff:192.0.2.1"))
CHANNEL = _relay.channel("me", PEER)  # one bound channel: its data unwraps to PEER

BINDING = sw.encode(sw.BINDING, sw.SUCCESS, bytes(12),
                    [(sw.XOR_MAPPED_ADDRESS, sw.encode_xor_address(("192.0.2.1", 4500), bytes(12)))],
                    fingerprint=True)


def _flip(data: bytes, where: int, bit: int) -> bytes:
    if not data:
        return data
    i = where % len(data)
    return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:]


def _payload(r: random.Random) -> bytes:
    kind = r.randrange(3)
    rest = r.randbytes(r.randrange(200))
    if kind == 0:
        return rest
    if kind == 1:
        return b"\x00\x00\x00\x00" + rest  # behind the non-ESP marker
    return r.getrandbits(32).to_bytes(4, "big") + rest[:80]  # an SPI of any value


def _datagram(r: random.Random) -> bytes:
    """Random bytes, or genuine STUN and ChannelData mutated: flipped bits, cut, other channels."""
    kind = r.randrange(5)
    if kind == 0:
        return _payload(r)
    if kind == 1:
        return _flip(BINDING, r.randrange(1000), r.randrange(8))
    if kind == 2:
        return BINDING[:r.randrange(len(BINDING) + 1)]
    channel = r.choice([CHANNEL, 0x4001, 0x4FFF])
    wrapped = sw.encode_channel_data(channel, _payload(r))
    return wrapped if kind == 3 else _flip(wrapped, r.randrange(300), r.randrange(8))[:r.randrange(300)]


def _batch(seed: int) -> tuple[list[tuple[bytes, Address]], bool]:
    r = random.Random(seed)
    batch = [(_datagram(r), r.choice([SERVER, OTHER, PEER])) for _ in range(r.randrange(1, 4))]
    return batch, r.random() < 0.5


def _check(batch: list[tuple[bytes, Address]], gro: bool) -> None:
    c = CORE.counters
    before = (c.rx_datagrams, c.rx_relayed)
    if gro:
        out = CORE.inbound_gro([(d, s, 0) for d, s in batch], 1.0, 1e9)
    else:
        out = CORE.inbound(batch, 1.0, 1e9)
    relayed = sum(1 for _, s in batch if s == SERVER)
    assert c.rx_relayed - before[1] == relayed
    unwrapped = c.rx_datagrams - before[0] - (len(batch) - relayed)
    assert 0 <= unwrapped <= relayed
    assert out.tun_in_order() == []
    for data, source in out.stun:
        assert sw.is_stun(data) and (data, source) in batch


# Structured generation from one seed (cheap: the core takes microseconds, hypothesis' own strategies
# would take most of the time budget).
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**64))
def test_hostile_datagrams_on_the_tunnel_socket_are_sorted_and_counted(seed: int) -> None:
    _check(*_batch(seed))


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(seed=st.integers(0, 2**64))
def test_hostile_datagrams_on_the_tunnel_socket_are_sorted_and_counted_10k(seed: int) -> None:
    _check(*_batch(seed))


def test_the_harness_sees_stun_and_unwraps_channel_data() -> None:
    """Genuine inputs take the paths the fuzzing exercises: STUN handed out, our channel unwrapped."""
    out = CORE.inbound([(BINDING, OTHER)], 1.0, 1e9)
    assert out.stun == [(BINDING, OTHER)]
    before = CORE.counters.rx_datagrams
    CORE.inbound([(sw.encode_channel_data(CHANNEL, b"\xff"), SERVER)], 1.0, 1e9)  # a keepalive from PEER
    assert CORE.counters.rx_datagrams == before + 1 and CORE.counters.rx_keepalive >= 1
