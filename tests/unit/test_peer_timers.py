"""tunneld.proto.peer alone: sessions (current / previous / next) and WireGuard's timers, in plain floats.

No trio and no handshake: Sessions are built from tunneld.crypto.esp.SecurityAssociation directly, `now` is a
number, and each timer hook is driven by hand, then checked through deadline() and poll() as
wireguard-go's device/timers.go would fire it.
"""

from __future__ import annotations

import itertools
import random

import pytest

from tunneld.crypto.esp import SecurityAssociation
from tunneld.proto import constants as C
from tunneld.proto.peer import Action, Peer, Session, Timers

T = Timers()
JITTER = C.REKEY_TIMEOUT_JITTER_MAX
WALL = 1_700_000_000.0
_spis = itertools.count(0x1000)


def session(created: float, initiator: bool, confirmed: bool | None = None) -> Session:
    """A session with fresh SAs (distinct SPIs); confirmed defaults to `initiator`, as TunnelCore does."""
    out = SecurityAssociation(next(_spis), bytes(32), bytes(4))
    inb = SecurityAssociation(next(_spis), bytes(32), bytes(4))
    return Session(outbound=out, inbound=inb, created=created, initiator=initiator,
                   confirmed=initiator if confirmed is None else confirmed)


def peer(seed: int = 0, timers: Timers = T) -> Peer:
    return Peer(name="b", public_key=bytes(32), ula=bytes(16), endpoint=("::1", 4500), timers=timers,
                rand=random.Random(seed).randbytes)


def test_defaults_are_the_protocol_constants() -> None:
    assert (T.rekey_after_time, T.reject_after_time, T.rekey_attempt_time, T.rekey_timeout,
            T.keepalive_timeout, T.rekey_after_messages) == (120.0, 180.0, 90.0, 5.0, 10.0, 1 << 60)
    assert pytest.approx(1 / 3) == JITTER


def test_idle_peer_has_no_deadline_and_poll_does_nothing() -> None:
    p = peer()
    assert p.deadline() is None
    assert p.poll(1e6) == ([], [])
    assert not p.handshake_in_progress()


# -- handshake_initiated / handshake_complete ------------------------------------------------------


def test_handshake_initiated_arms_retry_after_rekey_timeout_plus_jitter() -> None:
    for seed in range(50):
        p = peer(seed)
        p.handshake_initiated(100.0)
        assert p.handshake_started == 100.0
        assert p.retry_at is not None
        assert 105.0 <= p.retry_at <= 105.0 + JITTER
        assert p.deadline() == p.retry_at
        assert p.handshake_in_progress()
        assert p.poll(p.retry_at - 1e-6) == ([], [])  # not yet due
        assert p.poll(p.retry_at) == ([Action.RETRY], [])


def test_jitter_is_drawn_per_retry() -> None:
    p = peer(1)
    delays = set()
    for t in (0.0, 10.0, 20.0, 30.0):
        p.handshake_initiated(t)
        assert p.retry_at is not None
        delays.add(round(p.retry_at - t, 9))
    assert len(delays) == 4  # a fresh jitter each time, so peers do not retry in lockstep
    assert p.handshake_started == 0.0  # a retry keeps the start of the attempt


def _retry_until_gave_up(p: Peer, start: float) -> tuple[list[float], float]:
    """Play the adapter: poll at each deadline, and call handshake_initiated for every RETRY."""
    p.handshake_initiated(start)
    sent = [start]
    while True:
        now = p.deadline()
        assert now is not None
        actions, dropped = p.poll(now)
        assert dropped == []
        if Action.GAVE_UP in actions:
            assert actions == [Action.GAVE_UP]
            return sent, now
        if not actions:
            continue  # another timer (e.g. new-handshake, suppressed while retrying) was due
        assert actions == [Action.RETRY]
        p.handshake_initiated(now)
        sent.append(now)


@pytest.mark.parametrize("seed", range(10))
def test_retries_every_rekey_timeout_then_gives_up_after_rekey_attempt_time(seed: int) -> None:
    p = peer(seed)
    p.staged.extend([b"x"] * 5)
    p.data_sent(0.0)  # an armed new-handshake timer is cancelled by giving up too
    sent, gave_up_at = _retry_until_gave_up(p, 0.0)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert all(5.0 <= g <= 5.0 + JITTER for g in gaps)
    # The attempt is abandoned at the first retry time at or past rekey_attempt_time: ~18 initiations
    # (the first + 17 retries) for 90 s / (5 s + up to 1/3 s), as wireguard-go's MaxTimerHandshakes.
    assert sent[-1] < 90.0 <= gave_up_at <= sent[-1] + 5.0 + JITTER
    assert 17 <= len(sent) <= 19
    assert not p.handshake_in_progress()
    assert p.handshake_started is None and p.retry_at is None and p.new_handshake_at is None
    assert len(p.staged) == 0  # staged packets are dropped with the attempt (WireGuard does too)
    assert p.deadline() is None
    assert p.poll(gave_up_at + 1000.0) == ([], [])  # silent until there is traffic


def test_new_attempt_after_giving_up_starts_a_fresh_clock() -> None:
    p = peer(3)
    _retry_until_gave_up(p, 0.0)
    sent, gave_up_again = _retry_until_gave_up(p, 500.0)
    assert sent[0] == 500.0 and gave_up_again >= 590.0
    assert 17 <= len(sent) <= 19


def test_handshake_complete_stops_retrying_and_records_the_handshake() -> None:
    p = peer()
    p.handshake_initiated(0.0)
    p.handshake_complete(0.2, 1_700_000_000.2)
    assert not p.handshake_in_progress()
    assert p.retry_at is None and p.handshake_started is None
    assert p.handshakes == 1 and p.last_handshake_wall == 1_700_000_000.2
    assert p.deadline() is None
    assert p.poll(100.0) == ([], [])


# -- data_sent / any_authenticated_packet_received: the new-handshake timer -------------------------


def test_data_sent_without_answer_starts_a_new_handshake_after_keepalive_plus_rekey_timeout() -> None:
    p = peer()
    p.add_session(session(0.0, initiator=True), 0.0)
    p.data_sent(10.0)
    due = p.new_handshake_at
    # keepalive + rekey_timeout, plus up to 1/3 s of jitter as wireguard-go's timersDataSent
    assert due is not None and 25.0 <= due <= 25.0 + JITTER
    p.data_sent(12.0)  # not pushed back by more data: the first unanswered packet counts
    assert p.new_handshake_at == due
    assert p.deadline() == due
    assert p.poll(24.999) == ([], [])
    assert p.poll(due) == ([Action.INITIATE], [])
    assert p.new_handshake_at is None
    assert p.poll(25.0) == ([], [])  # fires once


def test_any_authenticated_packet_received_cancels_the_new_handshake_timer() -> None:
    p = peer()
    p.data_sent(0.0)
    p.any_authenticated_packet_received(3.0)
    assert p.new_handshake_at is None
    assert p.deadline() is None
    assert p.poll(100.0) == ([], [])


def test_new_handshake_timer_does_not_initiate_while_a_handshake_is_in_progress() -> None:
    p = peer()
    p.data_sent(0.0)
    p.handshake_initiated(14.0)  # e.g. a rekey already under way
    actions, _ = p.poll(15.0 + JITTER)  # the new-handshake timer is due (15 s plus its jitter)
    assert Action.INITIATE not in actions
    assert p.new_handshake_at is None
    assert p.retry_at is not None and p.retry_at >= 19.0  # the running attempt's retry is untouched


# -- data_received / any_authenticated_packet_sent: the keepalive timer -----------------------------


def test_data_received_without_reply_sends_a_keepalive_after_keepalive_timeout() -> None:
    p = peer()
    p.add_session(session(0.0, initiator=True), 0.0)
    p.data_received(30.0)
    assert p.keepalive_at == 40.0
    p.data_received(35.0)  # not pushed back
    assert p.keepalive_at == 40.0
    assert p.deadline() == 40.0
    assert p.poll(39.999) == ([], [])
    assert p.poll(40.0) == ([Action.KEEPALIVE], [])
    assert p.keepalive_at is None
    assert p.poll(40.0) == ([], [])


def test_any_authenticated_packet_sent_cancels_the_keepalive() -> None:
    p = peer()
    p.add_session(session(0.0, initiator=True), 0.0)
    p.data_received(30.0)
    p.any_authenticated_packet_sent(31.0)  # our data (or a handshake reply) answered it
    assert p.keepalive_at is None
    assert p.poll(41.0) == ([], [])


def test_keepalive_needs_a_sendable_session() -> None:
    p = peer()
    p.data_received(0.0)  # no session at all
    assert p.poll(10.0) == ([], [])
    assert p.keepalive_at is None  # disarmed anyway
    q = peer()
    q.add_session(session(0.0, initiator=False), 0.0)  # only an unconfirmed `next`
    q.data_received(0.0)
    assert q.poll(10.0) == ([], [])


def test_deadline_is_the_earliest_armed_timer_or_session_expiry() -> None:
    p = peer()
    p.add_session(session(0.0, initiator=True), 0.0)
    assert p.deadline() == 180.0  # the session's reject_after_time
    p.data_sent(100.0)
    assert p.new_handshake_at is not None and 115.0 <= p.new_handshake_at <= 115.0 + JITTER
    assert p.deadline() == p.new_handshake_at
    p.data_received(101.0)
    assert p.deadline() == 111.0
    p.handshake_initiated(102.0)
    assert p.retry_at is not None
    assert p.deadline() == min(111.0, p.retry_at)
    assert p.retry_at <= 111.0 - 3.0


def test_poll_fires_everything_due_at_once() -> None:
    p = peer()
    p.add_session(session(0.0, initiator=True), 0.0)
    p.data_received(0.0)
    p.data_sent(0.0)
    actions, dropped = p.poll(50.0)
    assert dropped == []
    assert actions == [Action.INITIATE, Action.KEEPALIVE]


# -- sessions ---------------------------------------------------------------------------------------


def test_initiator_sessions_become_current_at_once_and_rotate_through_previous() -> None:
    p = peer()
    s1, s2, s3 = (session(t, initiator=True) for t in (0.0, 120.0, 240.0))
    assert p.add_session(s1, 0.0) == []
    assert p.current is s1 and p.previous is None and p.next is None
    assert p.sendable(0.0) is s1
    assert p.add_session(s2, 120.0) == []
    assert p.current is s2 and p.previous is s1  # s1 still accepted for packets in flight
    assert p.add_session(s3, 240.0) == [s1]  # only one previous is kept
    assert p.current is s3 and p.previous is s2
    assert p.sessions() == [s3, s2]


def test_responder_session_waits_in_next_until_its_first_packet() -> None:
    p = peer()
    old = session(0.0, initiator=True)
    p.add_session(old, 0.0)
    new = session(100.0, initiator=False)
    assert p.add_session(new, 100.0) == []
    assert p.next is new and p.current is old
    assert not new.confirmed
    assert p.sendable(100.0) is old  # keep sending on the confirmed session meanwhile
    p.data_sent(100.0)
    # A packet on the old session changes nothing but the timers.
    assert p.received_on(old, 100.01, WALL + 100.01) == []
    assert p.next is new and p.current is old
    assert p.new_handshake_at is None  # any authenticated packet answers
    assert p.handshakes == 0  # answering an initiation is not a handshake yet
    # The first packet on `next` is the key confirmation: now the handshake counts.
    assert p.received_on(new, 100.02, WALL + 100.02) == []
    assert new.confirmed
    assert p.handshakes == 1 and p.last_handshake_wall == WALL + 100.02
    assert p.current is new and p.previous is old and p.next is None
    assert p.sendable(100.02) is new
    assert p.received_on(new, 100.03, WALL + 100.03) == []  # later packets on it change nothing
    assert p.current is new and p.previous is old
    assert p.handshakes == 1


def test_key_confirmation_as_responder_ends_our_own_pending_handshake() -> None:
    """Regression (fixed): we had started a handshake (its initiation was lost) when the peer's initiation
    arrived; we answered, and the peer's first packet on that session confirmed it. wireguard-go calls
    timersHandshakeComplete from ReceivedWithKeypair, which stops the retransmit timer: the session is
    up, no further initiation is sent. Peer.received_on used to count the handshake but leave retry_at and
    handshake_started armed, so at the retry time the adapter sends a redundant initiation (one more
    handshake and session rotation, and a chance to cross with the peer's)."""
    p = peer()
    p.handshake_initiated(0.0)  # our own attempt, lost
    s = session(0.5, initiator=False)
    p.add_session(s, 0.5)
    p.received_on(s, 0.6, WALL + 0.6)
    assert p.sendable(0.6) is s
    assert not p.handshake_in_progress()
    assert Action.INITIATE not in p.poll(10.0)[0]


def test_responder_session_drops_previous_and_promotion_keeps_current() -> None:
    # wireguard-go BeginSymmetricSession (responder): next = new, previous dropped at once;
    # ReceivedWithKeypair: previous = current, current = next.
    p = peer()
    s1, s2 = session(0.0, initiator=True), session(120.0, initiator=True)
    p.add_session(s1, 0.0)
    p.add_session(s2, 120.0)
    s3 = session(200.0, initiator=False)
    assert p.add_session(s3, 200.0) == [s1]
    assert p.received_on(s3, 200.1, WALL + 200.1) == []
    assert (p.current, p.previous, p.next) == (s3, s2, None)


def test_a_second_responder_session_replaces_the_unconfirmed_next() -> None:
    p = peer()
    first, second = session(0.0, initiator=False), session(5.0, initiator=False)
    p.add_session(first, 0.0)
    assert p.add_session(second, 5.0) == [first]  # its SPI must be unregistered
    assert p.next is second and p.current is None
    assert p.sendable(5.0) is None


def test_initiator_session_becomes_current_over_an_unconfirmed_next() -> None:
    """The initiator's fresh session always becomes current; an older `next` from a crossing
    handshake is no longer needed for sending, but wireguard-go keeps it as `previous` (see
    test_initiator_session_keeps_a_crossing_next_for_receiving); here we only check `current`."""
    p = peer()
    crossing = session(0.0, initiator=False)
    p.add_session(crossing, 0.0)
    mine = session(0.01, initiator=True)
    p.add_session(mine, 0.01)
    assert p.current is mine and p.next is None
    assert p.sendable(0.01) is mine


def test_initiator_session_keeps_a_crossing_next_for_receiving() -> None:
    """Regression (fixed): both sides initiate at once; each answers the other's initiation (a `next`) before
    its own response arrives. wireguard-go's BeginSymmetricSession then keeps that `next` as `previous`
    ("if next != nil { keypairs.next = nil; keypairs.previous = next }"), because the peer may already be
    sending on it (for the peer it is the session it initiated, confirmed by our response).
    Peer.add_session used to drop it instead, so the peer's packets on it were dropped as unknown SPI."""
    p = peer()
    crossing = session(0.0, initiator=False)
    p.add_session(crossing, 0.0)
    mine = session(0.01, initiator=True)
    dropped = p.add_session(mine, 0.01)
    assert crossing not in dropped
    assert p.current is mine and p.previous is crossing


def test_expire_drops_sessions_at_reject_after_time() -> None:
    p = peer()
    s1, s2 = session(0.0, initiator=True), session(120.0, initiator=True)
    p.add_session(s1, 0.0)
    p.add_session(s2, 120.0)
    assert p.deadline() == 180.0
    assert p.expire(179.999) == []
    assert p.expire(180.0) == [s1]
    assert p.previous is None and p.current is s2
    nxt = session(150.0, initiator=False)
    p.add_session(nxt, 150.0)  # a responder session (previous is already empty)
    assert p.current is s2 and p.next is nxt
    assert p.deadline() == 300.0
    # poll expires too, and returns what it dropped
    actions, dropped = p.poll(330.0)
    assert actions == [] and dropped == [s2, nxt]
    assert p.sessions() == [] and p.deadline() is None


def test_poll_at_the_deadline_fires_what_the_deadline_announced() -> None:
    """Regression (fixed): deadline() announces a session's expiry at `created + reject_after_time`, but
    expire() tested `now - created >= reject_after_time`. In floating point the two disagree for about one
    creation time in eight (here 76.4: (76.4 + 180) - 76.4 == 179.99999999999997). poll(deadline())
    then fires nothing and deadline() stays in the past, so a timer loop that sleeps until deadline()
    and polls spins without sleeping (forever under a virtual clock; until the real clock moves on
    in the daemon). wireguard-go has no such contract (its timers are time.Timer callbacks)."""
    created = 76.4
    assert (created + T.reject_after_time) - created < T.reject_after_time  # the rounding at stake
    p = peer()
    s = session(created, initiator=True)
    p.add_session(s, created)
    d = p.deadline()
    assert d == created + T.reject_after_time
    _, dropped = p.poll(d)
    assert dropped == [s]
    assert p.deadline() is None


def test_sendable_refuses_unconfirmed_expired_or_exhausted_sessions() -> None:
    p = peer()
    assert p.sendable(0.0) is None
    p.current = session(0.0, initiator=False, confirmed=False)
    assert p.sendable(0.0) is None  # unconfirmed: the responder must not send on it
    p.current.confirmed = True
    assert p.sendable(0.0) is p.current
    assert p.sendable(179.999) is p.current
    assert p.sendable(180.0) is None  # reject_after_time, even before poll() expires it
    s = session(0.0, initiator=True)
    p.current = s
    s.outbound.seq = s.outbound.limit
    assert p.sendable(1.0) is None  # sequence numbers used up


def test_wants_rekey_after_rekey_after_time_only_for_the_initiator() -> None:
    p = peer()
    assert p.wants_rekey(0.0)  # nothing to send on
    p.add_session(session(0.0, initiator=True), 0.0)
    assert not p.wants_rekey(119.999)
    assert p.wants_rekey(120.0)
    q = peer()
    r = session(0.0, initiator=False)
    q.add_session(r, 0.0)
    assert q.wants_rekey(0.0)  # only an unconfirmed `next`: nothing to send on yet
    q.received_on(r, 0.01, WALL + 0.01)
    assert not q.wants_rekey(120.0)  # the responder leaves the rekey to the initiator...
    assert not q.wants_rekey(179.999)
    assert q.wants_rekey(180.0)  # ...until its session is unusable


def test_wants_rekey_after_rekey_after_messages() -> None:
    p = peer(timers=Timers(rekey_after_messages=100))
    s = session(0.0, initiator=False, confirmed=True)
    p.current = s
    s.outbound.seq = 99
    assert not p.wants_rekey(1.0)
    s.outbound.seq = 100
    assert p.wants_rekey(1.0)  # by either side


def test_wants_rekey_on_receive_before_reject_only_for_the_initiator() -> None:
    edge = T.reject_after_time - T.keepalive_timeout - T.rekey_timeout  # 165 s
    p = peer()
    assert not p.wants_rekey_on_receive(0.0)
    p.add_session(session(0.0, initiator=True), 0.0)
    assert not p.wants_rekey_on_receive(edge - 0.001)
    assert p.wants_rekey_on_receive(edge)
    q = peer()
    r = session(0.0, initiator=False)
    q.add_session(r, 0.0)
    q.received_on(r, 0.0, WALL + 0.0)
    assert not q.wants_rekey_on_receive(edge)
    assert not q.wants_rekey_on_receive(179.0)


def test_shortened_timers_are_honoured() -> None:
    t = Timers(rekey_after_time=2.0, reject_after_time=3.0, rekey_attempt_time=1.0, rekey_timeout=0.25,
               keepalive_timeout=0.5)
    p = peer(timers=t)
    p.add_session(session(0.0, initiator=True), 0.0)
    assert p.wants_rekey(2.0) and p.sendable(2.9) is not None and p.sendable(3.0) is None
    assert p.wants_rekey_on_receive(3.0 - 0.5 - 0.25)
    p.data_sent(0.0)
    assert p.new_handshake_at is not None and 0.75 <= p.new_handshake_at <= 0.75 + JITTER
    p.data_received(0.0)
    assert p.keepalive_at == 0.5
    p.handshake_initiated(0.0)
    assert p.retry_at is not None and 0.25 <= p.retry_at <= 0.25 + JITTER


# -- the staged queue -------------------------------------------------------------------------------


def test_staged_queue_is_bounded_and_keeps_the_newest() -> None:
    p = peer()
    p.staged.extend(i.to_bytes(2, "big") for i in range(C.MAX_STAGED_PACKETS + 72))
    assert len(p.staged) == C.MAX_STAGED_PACKETS == 128
    assert p.staged[0] == (72).to_bytes(2, "big")  # the oldest were dropped, as WireGuard does
    assert p.staged[-1] == (C.MAX_STAGED_PACKETS + 71).to_bytes(2, "big")


def test_staged_queue_is_cleared_on_gave_up_only() -> None:
    p = peer(7)
    p.staged.extend([b"a", b"b"])
    p.handshake_initiated(0.0)
    for _ in range(5):  # retries keep the queue
        assert p.retry_at is not None
        now = p.retry_at
        assert p.poll(now) == ([Action.RETRY], [])
        p.handshake_initiated(now)
        assert list(p.staged) == [b"a", b"b"]
    _retry_until_gave_up(p, p.retry_at or 0.0)
    assert len(p.staged) == 0
