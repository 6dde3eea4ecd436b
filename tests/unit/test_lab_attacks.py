"""The attack generators of lab.attacks: the payloads are what they claim to be, and a flood stops at its
count or its duration, whichever comes first."""

from __future__ import annotations

import os
import struct
import time

import dns.message
import pytest

from lab import attacks
from tunneld.proto.handshake import Dropped, Handshaker
from tunneld.proto.handshake_wire import Initiation, unframe


def test_pointer_bomb_is_a_long_name_and_pointers_to_it() -> None:
    wire = attacks.pointer_bomb(1400)
    assert 1300 < len(wire) <= 1400
    _id, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", wire)
    assert (flags, qd, ns, ar) == (0, 1, 0, 0)
    name_end = 12 + 2 * attacks.BOMB_LABELS + 1
    assert wire[12:name_end] == b"\x01a" * attacks.BOMB_LABELS + b"\x00"
    records = wire[name_end + 4:]
    assert len(records) == an * 14 and an >= 80
    for i in range(an):  # owner and target: a pointer to the question name at offset 12
        rr = records[14 * i:14 * (i + 1)]
        assert rr[:2] == rr[12:] == b"\xc0\x0c"
    assert len(attacks.pointer_bomb(65535)) <= 65535


def test_reflection_queries_are_small_and_ask_for_a_big_buffer() -> None:
    for wire in attacks.reflection_queries("lab.tunneld.test").values():
        q = dns.message.from_wire(wire)
        assert len(wire) < 70 and q.payload == 65535 and q.edns == 0


def test_initiations_are_well_formed_and_what_a_stranger_can_make() -> None:
    victim = Handshaker(os.urandom(32), os.urandom(32), set())
    pool = attacks.handshake_initiations(victim.public_key, 3)
    assert len(set(pool)) == 3
    for payload in pool:
        Initiation.parse(unframe(payload))  # the format is valid (ParseError otherwise)
        # A stranger knows the victim's public key, not the account PSK: refused at mac1, before any DH.
        assert victim.receive(unframe(payload), ("198.51.100.2", 4500), 1.0) == Dropped("bad-mac1")


def test_initiations_with_the_account_psk_pass_mac1() -> None:
    psk = os.urandom(32)
    victim = Handshaker(os.urandom(32), psk, set())
    for payload in attacks.handshake_initiations(victim.public_key, 3, psk=psk):
        # Past mac1, the X25519 work finds a static key the victim does not know.
        assert victim.receive(unframe(payload), ("198.51.100.2", 4500), 1.0) == Dropped("unknown-peer")


def test_a_flood_stops_at_its_count() -> None:
    sent: list[int] = []
    r = attacks.paced(attacks.Bounds(count=50, rate=1e6, duration=5), sent.append)
    assert sent == list(range(50)) and r["sent"] == 50


def test_a_flood_stops_at_its_duration_and_keeps_its_rate() -> None:
    sent: list[int] = []
    t0 = time.monotonic()
    r = attacks.paced(attacks.Bounds(count=10_000, rate=100, duration=0.3), sent.append)
    assert time.monotonic() - t0 < 1.0
    assert 20 <= len(sent) <= 31, len(sent)  # about 100/s for 0.3 s
    assert r["sent"] == len(sent)


@pytest.mark.parametrize(("count", "rate", "duration"), [
    (0, 1, 1), (attacks.MAX_COUNT + 1, 1, 1), (1, 0, 1), (1, 1, 0), (1, 1, attacks.MAX_SECONDS + 1)])
def test_unbounded_floods_are_refused(count: int, rate: float, duration: float) -> None:
    with pytest.raises(ValueError):
        attacks.Bounds(count, rate, duration)
