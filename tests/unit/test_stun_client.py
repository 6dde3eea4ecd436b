"""The STUN Binding client core (tunneld.proto.stun) in virtual time, against in-memory servers."""

from __future__ import annotations

import random

import pytest

from tunneld.proto import stun_wire as wire
from tunneld.proto.core import Address, Transmit
from tunneld.proto.stun import (
    ENDPOINT_INDEPENDENT,
    PER_DESTINATION,
    UNKNOWN,
    NatKind,
    Observed,
    ServerFailed,
    StunClient,
    StunEvent,
)

S1: Address = ("203.0.113.53", 53)
S2: Address = ("203.0.113.53", 3478)  # the same host, another port: a distinct server for the NAT
MAPPED: Address = ("198.51.100.7", 40000)


class Counting:
    """``rand``: transaction IDs 01..., 02..., in order."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, size: int) -> bytes:
        assert size == wire.TRANSACTION_ID_LEN
        self.n += 1
        return bytes([self.n]) * size


def response(request: bytes, mapped: Address, *, legacy: bool = False, fingerprint: bool = True) -> bytes:
    """A server's Binding success to ``request`` naming ``mapped``."""
    tid = wire.decode(request).transaction_id
    attr = ((wire.MAPPED_ADDRESS, wire.encode_address(mapped)) if legacy
            else (wire.XOR_MAPPED_ADDRESS, wire.encode_xor_address(mapped, tid)))
    return wire.encode(wire.BINDING, wire.SUCCESS, tid, [attr], fingerprint=fingerprint)


def client(*servers: Address, **kw: float) -> StunClient:
    return StunClient(servers or (S1, S2), Counting(), **kw)  # type: ignore[arg-type]


def sent(c: StunClient) -> dict[Address, bytes]:
    out: list[Transmit] = c.transmits()
    by_dest = {t.destination: t.payload for t in out}
    assert len(by_dest) == len(out)
    return by_dest


def events(c: StunClient) -> list[StunEvent]:
    return c.events()


def test_a_round_asks_every_server_at_once_with_fingerprinted_requests() -> None:
    c = client()
    assert c.deadline() == 0.0
    c.poll(10.0)
    reqs = sent(c)
    assert set(reqs) == {S1, S2}
    tids = set()
    for payload in reqs.values():
        msg = wire.decode(payload)
        assert (msg.method, msg.cls) == (wire.BINDING, wire.REQUEST)
        assert wire.check_fingerprint(msg)
        assert wire.is_stun(payload)
        tids.add(msg.transaction_id)
    assert len(tids) == 2
    assert c.deadline() == pytest.approx(10.5)


def test_retransmissions_double_the_rto_then_give_up_after_rm_times_rto() -> None:
    c = client(S1)
    c.poll(0.0)
    first = sent(c)[S1]
    times = [0.0]
    while (d := c.deadline()) is not None and d < 20 and len(times) < 10:
        c.poll(d)
        out = c.transmits()
        if out:
            assert [t.payload for t in out] == [first]  # the same request, the same transaction ID
            times.append(d)
        else:
            break
    assert times == pytest.approx([0.0, 0.5, 1.5, 3.5])  # RFC 8489 §6.2.1 with Rc = 4
    assert d == pytest.approx(3.5 + 16 * 0.5)  # Rm x RTO after the last request
    assert events(c) == [ServerFailed(S1, "no answer after 4 requests")]
    c.poll(11.4)
    assert c.transmits() == [] and events(c) == []


def test_give_up_is_not_early() -> None:
    c = client(S1)
    c.poll(0.0)
    for t in (0.5, 1.5, 3.5, 11.49):
        c.poll(t)
    assert events(c) == []
    c.poll(11.5)
    assert [type(e) for e in events(c)] == [ServerFailed]


def test_an_answer_stops_the_retransmissions_and_reports_the_rtt() -> None:
    c = client(S1)
    c.poll(0.0)
    req = sent(c)[S1]
    c.poll(0.5)
    assert sent(c) == {S1: req}
    c.receive(response(req, MAPPED), S1, 0.57)
    evs = events(c)
    assert evs[0] == Observed(S1, MAPPED, pytest.approx(0.07))  # type: ignore[arg-type]
    assert evs[1:] == [NatKind(UNKNOWN, MAPPED)]  # one server: nothing to compare
    assert c.observed == {S1: MAPPED} and c.kind == UNKNOWN
    assert c.deadline() == pytest.approx(25.0)  # only the next round is left
    c.poll(24.9)
    assert c.transmits() == []


def test_a_mismatched_transaction_id_is_counted_and_dropped() -> None:
    c = client(S1)
    c.poll(0.0)
    req = sent(c)[S1]
    other = wire.encode(wire.BINDING, wire.REQUEST, b"\x77" * 12)
    c.receive(response(other, MAPPED), S1, 0.1)
    assert events(c) == [] and c.counters["unknown transaction"] == 1
    c.receive(response(req, MAPPED), S1, 0.2)  # the real answer still counts
    assert Observed(S1, MAPPED, pytest.approx(0.2)) in events(c)  # type: ignore[arg-type]
    c.receive(response(req, MAPPED), S1, 0.3)  # a duplicate: its transaction is over
    assert events(c) == [] and c.counters["unknown transaction"] == 2


def test_an_answer_from_another_source_is_counted_and_dropped() -> None:
    c = client(S1, S2)
    c.poll(0.0)
    reqs = sent(c)
    c.receive(response(reqs[S1], MAPPED), S2, 0.1)  # S1's transaction, from S2
    c.receive(response(reqs[S1], MAPPED), ("192.0.2.66", 53), 0.1)  # from a stranger
    assert events(c) == [] and c.counters["wrong source"] == 2
    assert c.observed == {}


def test_non_responses_and_bad_fingerprints_are_dropped() -> None:
    c = client(S1)
    c.poll(0.0)
    req = sent(c)[S1]
    c.receive(req, S1, 0.1)  # a request (a peer's, say)
    bad = bytearray(response(req, MAPPED))
    bad[-1] ^= 1
    c.receive(bytes(bad), S1, 0.1)
    c.receive(b"\x00" * 3, S1, 0.1)
    assert events(c) == []
    assert c.counters["not a binding response"] == 1 and c.counters["bad fingerprint"] == 1
    assert c.counters["parse error: not stun"] == 1
    c.receive(response(req, MAPPED, fingerprint=False), S1, 0.2)  # FINGERPRINT is optional in answers
    assert c.observed == {S1: MAPPED}


def test_legacy_mapped_address_and_ipv4_mapped_sources() -> None:
    c = client(S1)
    c.poll(0.0)
    req = sent(c)[S1]
    c.receive(response(req, MAPPED, legacy=True), ("::ffff:203.0.113.53", 53), 0.1)  # dual-stack socket
    assert c.observed == {S1: MAPPED}


def test_an_error_response_fails_the_server_with_its_code() -> None:
    c = client(S1)
    c.poll(0.0)
    tid = wire.decode(sent(c)[S1]).transaction_id
    err = wire.encode(wire.BINDING, wire.ERROR, tid,
                      [(wire.ERROR_CODE, wire.encode_error_code(400, "Bad\x07Request"))])
    c.receive(err, S1, 0.1)
    assert events(c) == [ServerFailed(S1, "error 400 Bad?Request")]
    c.poll(1.0)
    assert c.transmits() == []  # no retransmission after an answer, even an error


def test_kind_endpoint_independent_when_two_servers_agree() -> None:
    c = client()
    c.poll(0.0)
    reqs = sent(c)
    c.receive(response(reqs[S1], MAPPED), S1, 0.01)
    assert [type(e) for e in events(c)] == [Observed]  # the round is not over yet
    c.receive(response(reqs[S2], MAPPED), S2, 0.02)
    assert events(c)[-1] == NatKind(ENDPOINT_INDEPENDENT, MAPPED)
    assert c.kind == ENDPOINT_INDEPENDENT and c.mapped == MAPPED


def test_kind_per_destination_when_two_servers_disagree() -> None:
    c = client()
    c.poll(0.0)
    reqs = sent(c)
    c.receive(response(reqs[S1], MAPPED), S1, 0.01)
    c.receive(response(reqs[S2], (MAPPED[0], 40001)), S2, 0.02)
    assert events(c)[-1] == NatKind(PER_DESTINATION, None)
    assert c.observed == {S1: MAPPED, S2: (MAPPED[0], 40001)}


def test_duplicate_servers_are_asked_once_and_give_no_verdict() -> None:
    c = client(S1, ("203.0.113.53", 53))
    c.poll(0.0)
    reqs = sent(c)
    assert list(reqs) == [S1]
    c.receive(response(reqs[S1], MAPPED), S1, 0.01)
    assert events(c)[-1] == NatKind(UNKNOWN, MAPPED)


def test_kind_is_emitted_only_when_it_changes_and_one_answer_confirms_it() -> None:
    c = client()
    c.poll(0.0)
    reqs = sent(c)
    for s in (S1, S2):
        c.receive(response(reqs[s], MAPPED), s, 0.01)
    assert NatKind(ENDPOINT_INDEPENDENT, MAPPED) in events(c)
    c.poll(25.0)  # the next round: the same answers, no new verdict
    reqs = sent(c)
    assert set(reqs) == {S1, S2}
    for s in (S1, S2):
        c.receive(response(reqs[s], MAPPED), s, 25.01)
    assert [type(e) for e in events(c)] == [Observed, Observed]
    c.poll(50.0)  # S2 falls silent: S1's same answer keeps the verdict
    reqs = sent(c)
    c.receive(response(reqs[S1], MAPPED), S1, 50.01)
    t = 50.0
    while (d := c.deadline()) is not None and d < 70:
        t = d
        c.poll(t)
        c.transmits()
    evs = events(c)
    assert ServerFailed(S2, "no answer after 4 requests") in evs
    assert not any(isinstance(e, NatKind) for e in evs) and c.kind == ENDPOINT_INDEPENDENT
    assert c.observed == {S1: MAPPED}  # S2's old answer is not current


def test_a_changed_mapping_after_a_network_change() -> None:
    c = client()
    c.poll(0.0)
    old = sent(c)
    for s in (S1, S2):
        c.receive(response(old[s], MAPPED), s, 0.01)
    events(c)
    c.check(3.0)  # the network changed: a new round at once, with new transaction IDs
    new = sent(c)
    assert set(new) == {S1, S2} and all(new[s] != old[s] for s in new)
    c.receive(response(old[S1], MAPPED), S1, 3.01)  # a late answer through the old path
    assert events(c) == [] and c.counters["unknown transaction"] == 1
    moved: Address = ("192.0.2.200", 1024)
    for s in (S1, S2):
        c.receive(response(new[s], moved), s, 3.02)
    evs = events(c)
    assert evs[-1] == NatKind(ENDPOINT_INDEPENDENT, moved)
    assert c.observed == {S1: moved, S2: moved}
    assert c.deadline() == pytest.approx(28.0)  # rounds count from the check


def test_rounds_repeat_every_interval() -> None:
    c = client(S1, interval=5.0)
    c.poll(0.0)
    first = sent(c)[S1]
    c.receive(response(first, MAPPED), S1, 0.01)
    assert c.deadline() == 5.0
    c.poll(5.0)
    second = sent(c)[S1]
    assert wire.decode(second).transaction_id != wire.decode(first).transaction_id
    assert c.rounds == 2


def test_close_finishes_at_once_and_stops_everything() -> None:
    c = client()
    c.poll(0.0)
    reqs = sent(c)
    assert not c.finished()
    c.close(0.1)
    assert c.finished() and c.deadline() is None and c.transmits() == []
    c.receive(response(reqs[S1], MAPPED), S1, 0.2)
    c.poll(100.0)
    c.check(100.0)
    assert c.transmits() == [] and events(c) == [] and c.counters["closed"] == 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        StunClient([S1], interval=0)
    with pytest.raises(ValueError):
        StunClient([("stun.example.net", 3478)])  # IP literals only: names are resolved by the caller


def test_hostile_datagrams_never_raise_out_of_receive() -> None:
    c = client()
    c.poll(0.0)
    reqs = sent(c)
    good = [response(reqs[S1], MAPPED), response(reqs[S2], MAPPED, legacy=True)]
    rng = random.Random(1)
    for i in range(3000):
        data = bytearray(rng.choice(good))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if i % 3 == 0:
            data = data[: rng.randrange(len(data) + 1)]
        c.receive(bytes(data), rng.choice((S1, S2)), 0.1)
    assert sum(c.counters.values()) >= 2000  # nearly all of them were dropped and counted


def test_end_round_fails_the_silent_servers_and_gives_the_verdict_of_the_answers() -> None:
    c = client()
    c.poll(0.0)
    reqs = sent(c)
    c.receive(response(reqs[S1], MAPPED), S1, 0.01)
    events(c)
    c.end_round(1.0)
    assert events(c) == [ServerFailed(S2, "no answer yet"), NatKind(UNKNOWN, MAPPED)]
    c.poll(2.0)
    assert c.transmits() == [] and c.deadline() == 25.0  # nothing outstanding; the next round as planned


def test_a_round_still_outstanding_when_the_next_is_due_is_concluded_first() -> None:
    c = client(interval=2.0)
    c.poll(0.0)
    reqs = sent(c)
    c.receive(response(reqs[S1], MAPPED), S1, 0.1)
    c.poll(0.5)
    c.poll(1.5)
    c.transmits()
    events(c)
    c.poll(2.0)  # S2 has not answered, and its give-up time (11.5 s) is after the next round
    assert events(c) == [ServerFailed(S2, "no answer before the next round"), NatKind(UNKNOWN, MAPPED)]
    assert set(sent(c)) == {S1, S2}
