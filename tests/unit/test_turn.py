"""The TURN client core against an in-memory relay: the 401 dance, stale nonces, refresh timing,
permissions and channels, framing both ways, the goodbye, and what is dropped."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from tests.unit.fake_turn import REALM, RELAY, FakeRelay
from tunneld.proto import stun_wire as sw
from tunneld.proto import turn
from tunneld.proto.core import Address
from tunneld.proto.turn import (
    Allocated,
    AllocationFailed,
    AllocationLost,
    PermissionFailed,
    TurnClient,
)

ME: Address = ("192.0.2.10", 4500)  # our address as the relay sees it
PEER: Address = ("198.51.100.20", 4500)
USER, PASSWORD = "1700000000:laptop", "secret"


def counting_rand() -> Callable[[int], bytes]:
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


class Net:
    """The client and the fake relay, wired; `drop` decides which of the client's datagrams are lost."""

    def __init__(self, relay: FakeRelay | None = None, **kwargs: object) -> None:
        self.relay = relay or FakeRelay({USER: PASSWORD})
        self.client = TurnClient(RELAY, USER, PASSWORD, counting_rand(), **kwargs)  # type: ignore[arg-type]
        self.relays = {self.relay.address: self.relay}
        self.drop: Callable[[sw.Message], bool] = lambda m: False
        self.lost: list[sw.Message] = []

    def pump(self, now: float) -> None:
        for _ in range(20):
            out = self.client.transmits()
            if not out:
                return
            for t in out:
                msg = sw.decode(t.payload)
                if self.drop(msg):
                    self.lost.append(msg)
                    continue
                for answer in self.relays[t.destination].handle(t.payload, ME):
                    self.client.receive(answer, t.destination, now)
        raise AssertionError("no quiet after 20 rounds")

    def run_until(self, end: float, start: float = 0.0) -> float:
        """Poll at every deadline up to ``end``; the last time polled."""
        now = start
        for _ in range(10_000):
            d = self.client.deadline()
            if d is None or d > end:
                return now
            now = max(now, d)
            self.client.poll(now)
            self.pump(now)
        raise AssertionError("deadline loop did not settle")

    def allocate(self, now: float = 0.0) -> Allocated:
        self.client.start(now)
        self.pump(now)
        events = self.client.events()
        assert len(events) == 1 and isinstance(events[0], Allocated), events
        return events[0]


def test_the_401_dance_then_a_signed_allocate() -> None:
    net = Net()
    ev = net.allocate()
    first, second = net.relay.requests
    assert first.method == second.method == sw.ALLOCATE
    assert first.username() is None and first.get(sw.MESSAGE_INTEGRITY) is None
    assert first.requested_transport() == sw.PROTOCOL_UDP and first.software() == "tunneld"
    assert second.username() == USER and second.realm() == REALM and second.nonce() == "nonce-1"
    assert sw.check_integrity(second, sw.long_term_key(USER, REALM, PASSWORD))
    assert second.transaction_id != first.transaction_id  # RFC 8489 §9.2.4: a new transaction
    assert ev == Allocated(("203.0.113.9", 50000), ME, 600)
    assert net.client.relayed == ev.relayed and net.client.mapped == ME
    assert net.client.state == "allocated"


def test_wrong_password_fails_after_bounded_retries() -> None:
    net = Net(FakeRelay({USER: "other"}))
    net.client.start(0.0)
    net.pump(0.0)
    assert net.client.events() == [AllocationFailed(401, "Unauthorized")]
    assert len(net.relay.requests) == 1 + turn.MAX_AUTH_RETRIES
    assert net.client.deadline() is None and net.client.state == "failed"


def test_stale_nonce_is_followed_with_the_new_one() -> None:
    net = Net()
    net.allocate()
    net.relay.nonce = "nonce-2"
    net.client.permit([PEER[0]], 1.0)
    net.pump(1.0)
    stale, fresh = net.relay.requests[-2:]
    assert stale.method == fresh.method == sw.CREATE_PERMISSION
    assert stale.nonce() == "nonce-1" and fresh.nonce() == "nonce-2"
    assert net.relay.allocations[ME].permissions == {PEER[0]}
    assert net.client.events() == []


def test_allocation_is_refreshed_at_half_its_lifetime() -> None:
    net = Net()
    net.allocate()
    assert net.client.deadline() == 300.0
    net.client.poll(299.0)
    assert net.client.transmits() == []
    net.client.poll(300.0)
    net.pump(300.0)
    refresh = net.relay.requests[-1]
    assert refresh.method == sw.REFRESH and refresh.lifetime() == 600
    assert net.client.deadline() == 600.0 and net.client.events() == []


@pytest.mark.parametrize(("granted", "interval"), [(100, 60.0), (30, 27.0), (3600, 1800.0)])
def test_refresh_interval_for_short_and_long_lifetimes(granted: int, interval: float) -> None:
    relay = FakeRelay({USER: PASSWORD})
    relay.max_lifetime = granted
    net = Net(relay, lifetime=3600)
    assert net.allocate().lifetime == granted
    assert net.client.deadline() == interval


def test_refused_refresh_loses_the_allocation() -> None:
    net = Net()
    net.allocate()
    del net.relay.allocations[ME]  # the relay restarted
    net.run_until(300.0)
    assert net.client.events() == [AllocationLost("refresh refused: Allocation Mismatch (437)")]
    assert net.client.relayed is None and net.client.state == "lost" and net.client.deadline() is None


def test_requests_are_retransmitted_on_rfc_8489_schedule_then_given_up() -> None:
    net = Net()
    net.drop = lambda m: True
    net.client.start(0.0)
    net.pump(0.0)
    sent_at = [0.0]
    for _ in range(20):
        d = net.client.deadline()
        if d is None:
            break
        net.client.poll(d)
        if net.client.transmits():
            sent_at.append(d)
    assert sent_at == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # RFC 8489 §6.2.1: Rc = 7
    assert net.client.events() == [AllocationFailed(0, "no answer from the relay")]
    assert net.client.deadline() is None


def test_unanswered_refresh_loses_the_allocation_within_the_lifetime() -> None:
    net = Net()
    net.allocate()
    net.drop = lambda m: m.method == sw.REFRESH
    now = net.run_until(600.0)
    assert net.client.events() == [AllocationLost("refresh unanswered")]
    assert now == 300.0 + 39.5


def test_permissions_are_created_per_ip_refreshed_while_wanted_then_left_to_lapse() -> None:
    net = Net()
    net.allocate()
    net.client.permit(["198.51.100.20", "2001:DB8::1"], 10.0)
    out = net.client.transmits()
    peers = sorted(sw.decode(t.payload).xor_peer_address() or ("", 0) for t in out)
    assert peers == [("198.51.100.20", 0), ("2001:db8::1", 0)]
    for t in out:
        for answer in net.relay.handle(t.payload, ME):
            net.client.receive(answer, RELAY, 10.0)
    assert net.relay.allocations[ME].permissions == {"198.51.100.20", "2001:db8::1"}
    assert net.client.deadline() == 10.0 + turn.PERMISSION_REFRESH
    net.client.poll(250.0)
    net.pump(250.0)
    assert [m.method for m in net.relay.requests[-2:]] == [sw.CREATE_PERMISSION] * 2
    net.client.permit(["198.51.100.20"], 260.0)
    assert net.client.transmits() == []  # nothing new, and nothing to delete (RFC 8656 has no delete)
    net.client.poll(490.0)
    net.pump(490.0)
    assert [m.xor_peer_address() for m in net.relay.requests[-1:]] == [("198.51.100.20", 0)]
    assert net.relay.requests[-2].method == sw.REFRESH  # at 300: only one permission refreshed since


def test_permission_refused_is_reported_and_retried_later() -> None:
    net = Net()
    net.allocate()
    real = net.relay.handle

    def refusing(payload: bytes, source: Address) -> list[bytes]:
        msg = sw.decode(payload)
        if msg.method == sw.CREATE_PERMISSION:
            return [net.relay.error(msg, 403, "Forbidden", key=net.relay.key(USER))]
        return real(payload, source)

    net.relay.handle = refusing  # type: ignore[method-assign]
    net.client.permit([PEER[0]], 5.0)
    net.pump(5.0)
    assert net.client.events() == [PermissionFailed(PEER[0], 403)]
    assert net.client.deadline() == 5.0 + turn.FAILED_PERMISSION_RETRY


def test_permit_before_the_allocation_is_sent_once_allocated() -> None:
    net = Net()
    net.client.permit([PEER[0]], 0.0)
    net.allocate()
    assert net.relay.allocations[ME].permissions == {PEER[0]}


def test_channel_bind_then_channel_data_both_ways_and_refresh() -> None:
    net = Net()
    net.allocate()
    net.client.bind_channel(PEER, 1.0)
    bind = net.client.transmits()
    assert len(bind) == 2  # the channel's permission, and the binding
    # Before the relay confirms, data goes as a Send indication.
    msg = sw.decode(net.client.wrap(PEER, b"esp-1"))
    assert (msg.method, msg.cls) == (sw.SEND, sw.INDICATION)
    assert (msg.xor_peer_address(), msg.data()) == (PEER, b"esp-1")
    for t in bind:
        for answer in net.relay.handle(t.payload, ME):
            net.client.receive(answer, RELAY, 1.0)
    assert net.relay.allocations[ME].channels == {0x4000: PEER}
    framed = net.client.wrap(PEER, b"esp-2")
    assert sw.decode_channel_data(framed) == (0x4000, b"esp-2")
    # From the relay: ChannelData and Data indications both come back as (peer, payload).
    assert net.client.unwrap(sw.encode_channel_data(0x4000, b"in-1"), RELAY, 2.0) == (PEER, b"in-1")
    assert net.client.unwrap(net.relay.data_indication(PEER, b"in-2"), RELAY, 2.0) == (PEER, b"in-2")
    net.client.receive(sw.encode_channel_data(0x4000, b"in-3"), RELAY, 2.0)
    net.client.receive(net.relay.data_indication(PEER, b"in-4"), RELAY, 2.0)
    assert net.client.received() == [(PEER, b"in-3"), (PEER, b"in-4")]
    assert net.client.received() == []
    # The permission is refreshed at 240 s, the binding at 540 s.
    net.run_until(600.0, 2.0)
    binds = [m for m in net.relay.requests if m.method == sw.CHANNEL_BIND]
    assert len(binds) == 2 and {m.channel_number() for m in binds} == {0x4000}
    perms = [m for m in net.relay.requests if m.method == sw.CREATE_PERMISSION]
    assert len(perms) == 3  # at 1, 241, 481


def test_unwrap_refuses_other_sources_unknown_channels_and_unpermitted_peers() -> None:
    net = Net()
    net.allocate()
    net.client.permit([PEER[0]], 1.0)
    net.pump(1.0)
    assert net.client.unwrap(net.relay.data_indication(PEER, b"x"), ("192.0.2.99", 3478), 2.0) is None
    assert net.client.unwrap(net.relay.data_indication(PEER, b"x"), (RELAY[0], 3479), 2.0) is None
    assert net.client.unwrap(sw.encode_channel_data(0x4001, b"x"), RELAY, 2.0) is None
    assert net.client.unwrap(net.relay.data_indication(("192.0.2.77", 1), b"x"), RELAY, 2.0) is None
    assert net.client.unwrap(b"\x00\x00\x00\x01esp", RELAY, 2.0) is None
    assert net.client.unwrap(net.relay.data_indication(PEER, b"ok"), RELAY, 2.0) == (PEER, b"ok")
    c = net.client.counters
    assert c["wrong source"] == 2 and c["unknown channel"] == 1
    assert c["data from an unpermitted peer"] == 1 and c["parse error: not stun"] == 1


def test_answers_from_elsewhere_with_unknown_ids_or_bad_integrity_are_dropped() -> None:
    net = Net()
    net.client.start(0.0)
    [bare] = net.client.transmits()
    [challenge] = net.relay.handle(bare.payload, ME)
    net.client.receive(challenge, ("192.0.2.99", 3478), 0.1)  # right answer, wrong source
    other = sw.decode(challenge)
    forged = sw.encode(other.method, other.cls, bytes(12), other.attributes)
    net.client.receive(forged, RELAY, 0.1)  # unknown transaction
    assert net.client.transmits() == [] and net.client.counters["wrong source"] == 1
    assert net.client.counters["not an answer of ours"] == 1
    net.client.receive(challenge, RELAY, 0.2)
    [signed] = net.client.transmits()
    msg = sw.decode(signed.payload)
    [good] = net.relay.handle(signed.payload, ME)
    tampered = sw.encode(sw.ALLOCATE, sw.SUCCESS, msg.transaction_id, [
        (sw.XOR_RELAYED_ADDRESS, sw.encode_xor_address(("192.0.2.66", 1), msg.transaction_id)),
        (sw.XOR_MAPPED_ADDRESS, sw.encode_xor_address(ME, msg.transaction_id)),
        (sw.LIFETIME, sw.encode_u32(600))], integrity_key=b"wrong key")
    unsigned = sw.encode(sw.ALLOCATE, sw.SUCCESS, msg.transaction_id, sw.decode(tampered).attributes[:3])
    net.client.receive(tampered, RELAY, 0.3)
    net.client.receive(unsigned, RELAY, 0.3)
    assert net.client.events() == [] and net.client.counters["bad integrity"] == 1
    assert net.client.counters["unsigned success"] == 1
    net.client.receive(good, RELAY, 0.4)
    assert [type(e) for e in net.client.events()] == [Allocated]
    assert net.client.relayed == ("203.0.113.9", 50000)
    net.client.receive(good, RELAY, 0.5)  # a duplicate: the transaction is over
    assert net.client.counters["not an answer of ours"] == 2


def test_close_deletes_the_allocation_with_lifetime_zero() -> None:
    net = Net()
    net.allocate()
    net.client.close(5.0)
    assert not net.client.finished()
    net.pump(5.0)
    last = net.relay.requests[-1]
    assert last.method == sw.REFRESH and last.lifetime() == 0
    assert ME not in net.relay.allocations
    assert net.client.finished() and net.client.deadline() is None


def test_close_finishes_when_the_delete_goes_unanswered() -> None:
    net = Net()
    net.allocate()
    net.drop = lambda m: True
    net.client.close(5.0)
    net.pump(5.0)
    assert net.run_until(100.0, 5.0) == 5.0 + 39.5
    assert net.client.finished()


def test_close_before_any_allocation_is_immediate_and_after_a_signed_allocate_deletes_it() -> None:
    net = Net()
    net.client.close(0.0)
    assert net.client.finished() and net.client.transmits() == []
    net = Net()
    net.client.start(0.0)
    [bare] = net.client.transmits()
    net.client.close(0.0)  # only the bare Allocate in flight: the relay allocates nothing for it
    assert net.client.finished()
    net = Net()
    net.client.start(0.0)
    [bare] = net.client.transmits()
    for answer in net.relay.handle(bare.payload, ME):
        net.client.receive(answer, RELAY, 0.0)
    net.client.close(0.1)  # the signed Allocate is in flight: wait, then delete
    assert not net.client.finished()
    net.pump(0.1)
    assert ME not in net.relay.allocations and net.client.finished()
    assert net.client.events() == []


def test_a_stale_allocation_of_our_address_is_deleted_then_allocated_afresh() -> None:
    relay = FakeRelay({USER: PASSWORD})
    Net(relay).allocate()  # an earlier run of ours, same address
    net = Net(relay)
    ev = net.allocate()
    methods = [(m.method, m.lifetime()) for m in relay.requests[2:]]
    assert methods == [(sw.ALLOCATE, 600), (sw.ALLOCATE, 600), (sw.REFRESH, 0), (sw.ALLOCATE, 600)]
    assert ev.relayed == ("203.0.113.9", 50001)


def test_try_alternate_moves_to_the_named_server() -> None:
    net = Net()
    alternate: Address = ("203.0.113.10", 3478)
    net.relays[alternate] = FakeRelay({USER: PASSWORD}, alternate)

    def redirect(payload: bytes, source: Address) -> list[bytes]:
        msg = sw.decode(payload)
        return [sw.encode(msg.method, sw.ERROR, msg.transaction_id, [
            (sw.ERROR_CODE, sw.encode_error_code(300, "Try Alternate")),
            (sw.ALTERNATE_SERVER, sw.encode_address(alternate))])]

    net.relay.handle = redirect  # type: ignore[method-assign]
    ev = net.allocate()
    assert net.client.server == alternate
    assert ev.relayed == ("203.0.113.10", 50000)
    assert [m.method for m in net.relays[alternate].requests] == [sw.ALLOCATE, sw.ALLOCATE]


def test_new_credentials_serve_the_next_allocation() -> None:
    relay = FakeRelay({USER: PASSWORD, "1800000000:laptop": "newer"})
    net = Net(relay)
    net.allocate()
    net.client.set_credentials("1800000000:laptop", "newer")
    net.run_until(300.0)
    assert relay.requests[-1].method == sw.REFRESH and relay.requests[-1].username() == USER
    net.client.close(301.0)
    net.pump(301.0)
    net.client.start(302.0)
    net.pump(302.0)
    assert relay.requests[-1].username() == "1800000000:laptop"
    assert [type(e) for e in net.client.events()] == [Allocated]


def test_a_relays_reason_phrase_is_kept_printable_and_short() -> None:
    net = Net()
    net.client.start(0.0)
    [bare] = net.client.transmits()
    msg = sw.decode(bare.payload)
    net.client.receive(sw.encode(sw.ALLOCATE, sw.ERROR, msg.transaction_id, [
        (sw.ERROR_CODE, sw.encode_error_code(486, "Quota\nReached\x1b[2J" + "x" * 500))]), RELAY, 0.1)
    [ev] = net.client.events()
    assert ev == AllocationFailed(486, ("Quota?Reached?[2J" + "x" * 500)[:turn.MAX_REASON])


def test_permitted_and_bound_show_what_the_relay_confirmed() -> None:
    net = Net()
    net.allocate()
    net.client.permit(["192.0.2.50"], 1.0)
    net.client.bind_channel(PEER, 1.0)
    assert net.client.permitted() == frozenset() and net.client.bound() == frozenset()
    net.pump(1.0)
    assert net.client.permitted() == {"192.0.2.50", PEER[0]} and net.client.bound() == {PEER}
    del net.relay.allocations[ME]
    net.run_until(300.0, 1.0)  # the refresh finds the allocation gone
    assert net.client.permitted() == frozenset() and net.client.bound() == frozenset()


def test_rest_credentials_are_the_documented_vector_with_the_default_day() -> None:
    secret = b"08b3277f255f6a01b25a31d6d1a067f9526d5525b2f82215636ed7708c88b82d"  # docs/protocol.md
    assert turn.rest_credentials(secret, "laptop", 1700086400 - 86400 + 0.9) == (
        "1700086400:laptop", "XUGIx7/ivTVF4PKJw88nynxZveg=")


def test_the_class_decides_success_or_error_and_an_error_needs_a_code() -> None:
    net = Net()
    net.client.start(0.0)
    [bare] = net.client.transmits()
    tid = sw.decode(bare.payload).transaction_id
    codeless = sw.encode(sw.ALLOCATE, sw.ERROR, tid, [(sw.REALM, b"x"), (sw.NONCE, b"y")])
    net.client.receive(codeless, RELAY, 0.1)
    assert net.client.counters["error without a code"] == 1 and net.client.transmits() == []
    # A success carrying an ERROR-CODE is a success (here: one without the addresses, so a failure 400).
    net.client.receive(sw.encode(sw.ALLOCATE, sw.SUCCESS, tid, [
        (sw.ERROR_CODE, sw.encode_error_code(486, "Quota"))]), RELAY, 0.2)
    assert net.client.events() == [
        AllocationFailed(400, "allocate answer without a relayed or mapped address or a lifetime")]


def test_a_redirect_of_a_signed_request_must_be_signed() -> None:
    net = Net()
    net.client.start(0.0)
    [bare] = net.client.transmits()
    for answer in net.relay.handle(bare.payload, ME):
        net.client.receive(answer, RELAY, 0.0)
    [signed] = net.client.transmits()
    tid = sw.decode(signed.payload).transaction_id
    attrs = [(sw.ERROR_CODE, sw.encode_error_code(300, "Try Alternate")),
             (sw.ALTERNATE_SERVER, sw.encode_address(("203.0.113.66", 3478)))]
    net.client.receive(sw.encode(sw.ALLOCATE, sw.ERROR, tid, attrs), RELAY, 0.1)
    assert net.client.counters["unsigned redirect"] == 1 and net.client.server == RELAY
    net.client.receive(sw.encode(sw.ALLOCATE, sw.ERROR, tid, attrs, integrity_key=net.relay.key(USER)),
                       RELAY, 0.2)
    assert net.client.server == ("203.0.113.66", 3478)
