"""Fuzzing of the transfer reader (tunneld.proto.xfr) and the NOTIFY parser (tunneld.proto.notify_wire).

Three properties, on transfers of 10 to 2000 records rendered and signed by dnspython (tests.unit.test_xfr):
- any answer sequence of SOAs and records, cut into messages at random, signed at a random cadence, is
  read into a result that gives back exactly the records sent, in order, or refused with ParseError;
- a transfer with bytes changed, cut or inserted anywhere ends in ParseError (nothing else) or, for a
  change outside the MAC's reach (the case of a TSIG RR's names, RFC 8945 §4.3.3), in the same result;
- NOTIFY bytes changed at random: the same, with the same Notify.
Seeded (a seed per example) so that a failure replays; ``--runslow`` runs 300 examples of each transfer
property instead of 100 (about 25 s: each example renders and signs up to 2000 records with dnspython).
"""

from __future__ import annotations

import random
import time

import dns.name
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_xfr import KEY, ZONE, devices, read_all, render, soa
from tests.unit.test_xfr_notify import notify
from tunneld.proto.errors import ParseError
from tunneld.proto.notify_wire import read_notify
from tunneld.proto.xfr import (
    Full,
    Incremental,
    TransferQuery,
    TransferReader,
    UpToDate,
    ZoneRecord,
    transfer_query,
)

QUICK = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**64 - 1)
NOW = time.time()


def random_answer(rnd: random.Random, ours: int | None) -> list[ZoneRecord]:
    """A well-formed answer most of the time (full, incremental or up to date), sometimes a broken one."""
    size = rnd.choice([10, 50, 200, 2000]) if rnd.random() < 0.2 else rnd.randrange(10, 300)
    pool = devices(size, start=rnd.randrange(500))
    final = rnd.randrange(1 << 32)
    kind = rnd.random()
    if ours is not None and kind < 0.1:
        answer = [soa(ours if rnd.random() < 0.5 else (ours - rnd.randrange(1, 1000)) % (1 << 32))]
    elif ours is None or kind < 0.4:
        answer = [soa(final), *pool, soa(final)]
    else:
        steps = rnd.randrange(1, 6)
        serial = ours
        answer = [soa((ours + steps * 7) % (1 << 32))]
        chunks = [pool[i::steps] for i in range(steps)]
        for chunk in chunks:
            cut = rnd.randrange(len(chunk) + 1)
            new = (serial + 7) % (1 << 32)
            answer += [soa(serial), *chunk[:cut], soa(new), *chunk[cut:]]
            serial = new
        answer.append(soa(serial))
    if rnd.random() < 0.25:  # break it: drop, swap or duplicate a record
        i, j = rnd.randrange(len(answer)), rnd.randrange(len(answer))
        op = rnd.randrange(3)
        if op == 0 and len(answer) > 1:
            del answer[i]
        elif op == 1:
            answer[i], answer[j] = answer[j], answer[i]
        else:
            answer.insert(i, answer[j])
    return answer


def flatten(result: object, ours: int | None) -> list[ZoneRecord]:
    """The answer sequence a result stands for (RFC 1995 §4, RFC 5936 §2.2)."""
    if isinstance(result, UpToDate):
        return [soa(result.serial)]
    if isinstance(result, Full):
        return [result.soa, *result.records, result.soa]
    assert isinstance(result, Incremental)
    out = [result.soa]
    for diff in result.diffs:
        out += [soa(diff.old_serial), *diff.removed, soa(diff.new_serial), *diff.added]
    return [*out, result.soa]


def query(rnd: random.Random) -> tuple[TransferQuery, int | None]:
    ours = None if rnd.random() < 0.3 else rnd.randrange(1 << 32)
    return transfer_query(ZONE, KEY, rnd.randrange(1 << 16), NOW, None if ours is None else soa(ours)), ours


def sequence_case(seed: int) -> None:
    rnd = random.Random(seed)
    q, ours = query(rnd)
    answer = random_answer(rnd, ours)
    per_message = rnd.choice([1, 3, 17, 100, 500] if len(answer) < 50 else [17, 100, 500])
    messages = render(q, answer, per_message=per_message, signed_every=rnd.randrange(1, 9),
                      question_every=rnd.random() < 0.5)
    try:
        result = read_all(TransferReader(q, KEY), messages, NOW)
    except ParseError:
        return
    if result is None:
        return  # the answer stopped short of its end (a broken one): the reader still waits
    assert flatten(result, ours) == answer


def mutation_case(seed: int) -> None:
    rnd = random.Random(seed)
    q, ours = query(rnd)
    answer = random_answer(rnd, ours)
    messages = render(q, answer, per_message=rnd.choice([5, 40, 300]), signed_every=rnd.randrange(1, 4))
    try:
        expected = read_all(TransferReader(q, KEY), messages, NOW)
    except ParseError:
        expected = None
    i = rnd.randrange(len(messages))
    wire = bytearray(messages[i])
    for _ in range(rnd.randrange(1, 4)):
        p = rnd.randrange(len(wire))
        op = rnd.randrange(3)
        if op == 0:
            wire[p] ^= 1 << rnd.randrange(8)
        elif op == 1:
            del wire[p:p + rnd.randrange(1, 40)]
        else:
            wire[p:p] = rnd.randbytes(rnd.randrange(1, 8))
    mutated = [*messages[:i], bytes(wire), *messages[i + 1:]]
    reader = TransferReader(q, KEY)
    try:
        for m in mutated:
            got = reader.feed(m, NOW)
    except ParseError:
        return
    assert got == expected  # only a change the MAC does not cover (the case of a TSIG name) passes


def notify_case(seed: int) -> None:
    rnd = random.Random(seed)
    wire = bytearray(notify(rnd.randrange(1 << 32) if rnd.random() < 0.8 else None).to_wire())
    expected = read_notify(bytes(wire), ZONE, KEY, NOW)
    for _ in range(rnd.randrange(1, 4)):
        p = rnd.randrange(len(wire))
        if rnd.random() < 0.6:
            wire[p] ^= 1 << rnd.randrange(8)
        else:
            del wire[p:p + rnd.randrange(1, 20)]
    try:
        got = read_notify(bytes(wire), ZONE, KEY, NOW)
    except ParseError:
        return
    assert got == expected  # a change the MAC does not cover (the case of a TSIG name) changes nothing


@QUICK
@given(seed=seeds)
@pytest.mark.quick_twin
def test_reader_gives_back_what_was_sent_or_refuses(seed: int) -> None:
    sequence_case(seed)


@QUICK
@given(seed=seeds)
@pytest.mark.quick_twin
def test_reader_refuses_changed_transfers(seed: int) -> None:
    mutation_case(seed)


@settings(max_examples=400, deadline=None)
@given(seed=seeds)
def test_notify_refuses_changed_bytes(seed: int) -> None:
    notify_case(seed)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048))
def test_readers_on_hypothesis_bytes(data: bytes) -> None:
    q = transfer_query(ZONE, KEY, 0x1234, NOW, soa(1))
    for wire in (data, bytes.fromhex("123484000001000100000000") + data):
        with pytest.raises(ParseError):
            TransferReader(q, KEY).feed(wire, NOW)
        with pytest.raises(ParseError):
            read_notify(wire, dns.name.from_text("home.example.net."), KEY, NOW)


@pytest.mark.slow
@SLOW
@given(seed=seeds)
def test_reader_gives_back_what_was_sent_or_refuses_slow(seed: int) -> None:
    sequence_case(seed)


@pytest.mark.slow
@SLOW
@given(seed=seeds)
def test_reader_refuses_changed_transfers_slow(seed: int) -> None:
    mutation_case(seed)
