"""The DNS Push server session fuzzed: arbitrary bytes, and valid DSO messages (SUBSCRIBE, PUSH, RECONFIRM,
...) mutated, fed to sessions that hold subscriptions never raise out of ``receive``; a session either goes
on (and then still answers a KEEPALIVE) or is aborted and forgotten by the registry. More examples under
--runslow."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_dnsserver_push import BOB, T0, make, rd, subscribe
from tests.unit.test_dso_wire import QUICK, mutate, seeds, valid_message
from tunneld.dnsserver.push import PushServer, PushSession
from tunneld.dnsserver.store import AddRR
from tunneld.proto import dso_wire
from tunneld.proto.dso_wire import DsoMessage, Keepalive

SLOW = settings(max_examples=2_000, deadline=None, database=None,  # ~8 s: each case runs a whole session
                suppress_health_check=[HealthCheck.too_slow])


def _session() -> tuple[PushServer, PushSession]:
    server = make()
    session = server.open(True, T0)
    subscribe(session, BOB, msg_id=0xFFFF)
    return server, session


def _still_sound(server: PushServer, session: PushSession) -> None:
    """Aborted and forgotten, or still answering: never half-broken."""
    session.take()
    assert not server.counters["session aborted: internal error"]  # refused as input, not by a crash
    if session.closed:
        assert session not in server.sessions
        return
    session.receive(dso_wire.encode(DsoMessage(0xFFFE, (Keepalive(0, 10_000),))), T0)
    replies = [dso_wire.decode(w) for w in session.take()]
    assert replies and replies[-1].response and replies[-1].msg_id == 0xFFFE
    server.core.store.apply_update([AddRR(BOB, 60, rd("192.0.2.99"))], None, T0)
    server.changes([AddRR(BOB, 60, rd("192.0.2.99"))], T0)  # the registry still works for this session


def fuzz_case(seed: int) -> None:
    rnd = random.Random(seed)
    server, session = _session()
    for _ in range(4):
        wire = dso_wire.encode(valid_message(rnd))
        session.receive(mutate(rnd, wire) if rnd.random() < 0.7 else wire, T0 + rnd.random())
        _still_sound(server, session)


@QUICK
@given(seed=seeds)
@pytest.mark.quick_twin
def test_session_fuzz(seed: int) -> None:
    fuzz_case(seed)


@pytest.mark.slow
@SLOW
@given(seed=seeds)
def test_session_fuzz_2k(seed: int) -> None:
    fuzz_case(seed)


@QUICK
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_into_a_session_never_raise(data: bytes) -> None:
    server, session = _session()
    session.receive(data, T0)
    _still_sound(server, session)
    server, session = _session()
    session.receive(bytes.fromhex("000030000000000000000000") + data, T0)  # behind a DSO header
    _still_sound(server, session)
