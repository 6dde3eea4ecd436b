"""Fuzzing the TURN client core: whatever the relay's address sends, `receive` and `unwrap` never raise
(only ParseError inside, counted), `unwrap` gives None or (peer, bytes), and the core keeps working.

Inputs are structured so they reach past the parser: answers built for the transactions actually in
flight (any class, error code, attributes, signed right, wrong or not at all), Data indications and
ChannelData, and byte-level mutations of all of these.
"""

from __future__ import annotations

import copy
import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.fake_turn import RELAY, FakeRelay
from tunneld.proto import stun_wire as sw
from tunneld.proto.turn import TurnClient

ME = ("192.0.2.10", 4500)
PEER = ("198.51.100.20", 4500)
USER, PASSWORD = "1700000000:laptop", "secret"
KEY = sw.long_term_key(USER, "example.net", PASSWORD)

ATTRS = [
    (sw.XOR_RELAYED_ADDRESS, lambda tid: sw.encode_xor_address(("203.0.113.9", 50000), tid)),
    (sw.XOR_MAPPED_ADDRESS, lambda tid: sw.encode_xor_address(ME, tid)),
    (sw.XOR_PEER_ADDRESS, lambda tid: sw.encode_xor_address(PEER, tid)),
    (sw.LIFETIME, lambda tid: sw.encode_u32(600)),
    (sw.LIFETIME, lambda tid: sw.encode_u32(0)),
    (sw.REALM, lambda tid: b"example.net"),
    (sw.NONCE, lambda tid: b"nonce-2"),
    (sw.DATA_ATTR, lambda tid: b"payload"),
    (sw.ALTERNATE_SERVER, lambda tid: sw.encode_address(("203.0.113.10", 3478))),
    (sw.ALTERNATE_SERVER, lambda tid: sw.encode_address(("2001:db8::1", 3478))),
    (sw.CHANNEL_NUMBER, lambda tid: sw.encode_channel_number(0x4000)),
]
CODES = [300, 400, 401, 403, 437, 438, 441, 442, 486, 508]


def _client(stage: int) -> tuple[TurnClient, FakeRelay]:
    counter = itertools.count(1)
    client = TurnClient(RELAY, USER, PASSWORD, lambda n: next(counter).to_bytes(n, "big"))
    relay = FakeRelay({USER: PASSWORD})
    client.permit([PEER[0]], 0.0)
    client.bind_channel(PEER, 0.0)
    client.start(0.0)
    for _ in range(stage):  # 0: bare Allocate in flight, 1: signed one, 2+: allocated, permissions...
        for t in client.transmits():
            for answer in relay.handle(t.payload, ME):
                client.receive(answer, RELAY, 0.0)
    return client, relay


def _answer(rng: random.Random, tids: list[bytes]) -> bytes:
    tid = rng.choice(tids) if tids and rng.random() < 0.8 else rng.randbytes(12)
    method = rng.choice([sw.ALLOCATE, sw.REFRESH, sw.CREATE_PERMISSION, sw.CHANNEL_BIND, sw.DATA, sw.SEND,
                         sw.BINDING])
    cls = rng.choice([sw.SUCCESS, sw.SUCCESS, sw.ERROR, sw.INDICATION, sw.REQUEST])
    attrs = [(t, make(tid)) for t, make in rng.sample(ATTRS, rng.randint(0, 6))]
    if cls == sw.ERROR or rng.random() < 0.1:
        attrs.insert(0, (sw.ERROR_CODE, sw.encode_error_code(rng.choice(CODES), "x")))
    return sw.encode(method, cls, tid, attrs, integrity_key=rng.choice([None, KEY, KEY, b"wrong"]))


def _pool(client: TurnClient, rng: random.Random) -> list[bytes]:
    """Datagrams for a client in one state: answers to its transactions in flight (which reach the state
    machine), others, Data indications, ChannelData and noise."""
    tids = list(client._txs)
    pool = [_answer(rng, tids) for _ in range(300)]
    pool += [FakeRelay({}).data_indication(rng.choice([PEER, ("192.0.2.1", 9)]), rng.randbytes(9),
                                           rng.randbytes(12)) for _ in range(20)]
    pool += [sw.encode_channel_data(rng.randint(0x4000, 0x4003), rng.randbytes(rng.randint(0, 30)))
             for _ in range(20)]
    pool += [rng.randbytes(rng.randint(0, 64)) for _ in range(10)]
    return pool


STAGES = [_client(stage)[0] for stage in range(4)]
_rng = random.Random(13)
POOLS = [_pool(c, _rng) for c in STAGES]

SLOW = settings(max_examples=10_000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=300, deadline=None)
seeds = st.integers(0, 2**64 - 1)


def _mutated(rnd: random.Random, base: bytes) -> bytes:
    how = rnd.randrange(4)
    if how == 1 and base:
        i = rnd.randrange(len(base))
        return base[:i] + bytes([rnd.randrange(256)]) + base[i + 1:]
    if how == 2:
        return base[:rnd.randrange(len(base) + 1)]
    return base


def _run(seed: int) -> None:
    rnd = random.Random(seed)
    stage = rnd.randrange(len(STAGES))
    client = copy.deepcopy(STAGES[stage])
    for now in range(1, rnd.randint(2, 4)):
        data = _mutated(rnd, rnd.choice(POOLS[stage]))
        if rnd.random() < 0.5:
            got = client.unwrap(data, RELAY, float(now))
            assert got is None or (isinstance(got[1], bytes) and got[0][0] == PEER[0])
        else:
            client.receive(data, RELAY, float(now))
        d = client.deadline()
        assert d is None or d >= 0
        client.poll(float(now))
        client.transmits()
        client.events()
        client.received()
    client.close(10.0)
    client.poll(100.0)
    client.wrap(PEER, b"still works")


@QUICK
@given(seeds)
def test_receive_and_unwrap_never_raise(seed: int) -> None:
    _run(seed)


@pytest.mark.slow
@SLOW
@given(seeds)
def test_receive_and_unwrap_never_raise_10k(seed: int) -> None:
    _run(seed)
