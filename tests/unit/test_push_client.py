"""The DNS Push client (tunneld.proto.push_client) against an in-memory server that keeps the contract of
docs/dnspush.md: the session starts with KEEPALIVE, each SUBSCRIBE is followed by a signed QUERY whose
answer is the whole set, PUSHes before it are ignored and after it are changes, the keepalive leaves on
time, a lost connection reconnects with backoff (or RETRY DELAY), and a server without Push is given up
on (the watcher falls back to LLQ). Everything from the network is counted, never raised (hypothesis)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.proto.dso_wire import (
    RCODE_DSOTYPENI,
    DsoMessage,
    Keepalive,
    Push,
    PushRecord,
    RetryDelay,
    Subscribe,
    UnknownTlv,
    Unsubscribe,
    decode,
    encode,
)
from tunneld.proto.llq import Added, Established, Failed, LLQState, Removed
from tunneld.proto.push_client import (
    PUSH_RETRY_INTERVAL,
    RECONNECT_MIN,
    RECONNECT_TRIES,
    RESPONSE_TIMEOUT,
    DropConnection,
    PushClient,
    PushSession,
    PushUnavailable,
    PushUp,
    Refused,
    SessionState,
    is_dso,
)
from tunneld.proto.tsig import TsigKey, TsigSession

ZONE = "members.example"
ZONE_NAME = dns.name.from_text(ZONE)
PUSH_SERVER = ("192.0.2.53", 853)
SECRET = bytes(range(32))
Q = tuple[dns.name.Name, dns.rdatatype.RdataType]
SERVER_KEEPALIVE = Keepalive(15_000, 60_000)  # the contract's: inactivity 15 s, keepalive interval 60 s


def rdata(rdtype: str, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


class FakeServer:
    """The server side of the contract, in memory: answers KEEPALIVE (with ``keepalive``, or ``rcode``),
    SUBSCRIBE (NOERROR, then a PUSH of what answers it now, as the contract says), and ordinary queries
    (from ``zone``, TSIG-signed by dnspython when ``secret`` is given)."""

    def __init__(self, zone: dict[Q, list[dns.rdata.Rdata]] | None = None, *, secret: bytes | None = None,
                 keepalive: Keepalive | None = SERVER_KEEPALIVE, keepalive_rcode: int = 0,
                 subscribe_rcode: int = 0, key_name: dns.name.Name = ZONE_NAME) -> None:
        self.zone = zone if zone is not None else {}
        self.key_name = key_name
        self.secret = secret
        self.keepalive = keepalive
        self.keepalive_rcode = keepalive_rcode
        self.subscribe_rcode = subscribe_rcode
        self.subs: dict[int, Q] = {}
        self.received: list[DsoMessage | dns.message.Message] = []
        self.initial_push = True

    def _keyring(self) -> dict[dns.name.Name, dns.tsig.Key] | None:
        if self.secret is None:
            return None
        return {self.key_name: dns.tsig.Key(self.key_name, self.secret, "hmac-sha256")}

    def handle(self, wire: bytes) -> list[bytes]:
        if not is_dso(wire):
            query = dns.message.from_wire(wire, keyring=self._keyring())
            self.received.append(query)
            response = dns.message.make_response(query)
            q = query.question[0]
            rrset = response.find_rrset(response.answer, q.name, q.rdclass, q.rdtype, create=True)
            for rd in self.zone.get((q.name, dns.rdatatype.RdataType.make(q.rdtype)), []):
                rrset.add(rd, 300)
            if not rrset:
                response.answer.clear()
            return [response.to_wire()]
        message = decode(wire)
        self.received.append(message)
        primary = message.primary
        if isinstance(primary, Keepalive) and message.msg_id:
            if self.keepalive_rcode:
                return [encode(DsoMessage(message.msg_id, (), response=True, rcode=self.keepalive_rcode))]
            tlvs = () if self.keepalive is None else (self.keepalive,)
            return [encode(DsoMessage(message.msg_id, tlvs, response=True))]
        if isinstance(primary, Subscribe):
            if self.subscribe_rcode:
                return [encode(DsoMessage(message.msg_id, (), response=True, rcode=self.subscribe_rcode))]
            question = (primary.name, dns.rdatatype.RdataType.make(primary.rtype))
            self.subs[message.msg_id] = question
            out = [encode(DsoMessage(message.msg_id, (), response=True))]
            held = self.zone.get(question, [])
            if held and self.initial_push:
                out.append(self.push([PushRecord.add(primary.name, 300, rd) for rd in held]))
            return out
        if isinstance(primary, Unsubscribe):
            self.subs.pop(primary.subscribe_id, None)
        return []

    @staticmethod
    def push(records: list[PushRecord]) -> bytes:
        return encode(DsoMessage(0, (Push(tuple(records)),)))


def exchange(session: PushSession, server: FakeServer, now: float, rounds: int = 20) -> list[object]:
    """Carry the session's messages to the server and its replies back until both are quiet; the
    session's events and every client's, in order."""
    events: list[object] = []
    for _ in range(rounds):
        sent = session.transmits()
        if not sent:
            break
        for t in sent:
            assert t.destination == PUSH_SERVER
            for reply in server.handle(t.payload):
                session.receive(reply, PUSH_SERVER, now)
        events += session.events()
    else:
        raise AssertionError("the exchange did not settle")
    events += session.events()
    for client in session.clients.values():
        events += client.events()
    return events


def client_events(client: PushClient) -> list[object]:
    return list(client.events())


NAME = dns.name.from_text("bob." + ZONE)
AAAA = dns.rdatatype.AAAA
ADDR1, ADDR2, ADDR3 = rdata("AAAA", "fd00::1"), rdata("AAAA", "fd00::2"), rdata("AAAA", "fd00::3")


def started(server: FakeServer, *, tsig: bool = False, now: float = 1000.0,
            rand: Callable[[int], bytes] | None = None) -> tuple[PushSession, PushClient]:
    key = TsigSession(TsigKey(ZONE_NAME, SECRET)) if tsig else None
    session = PushSession(PUSH_SERVER, rand=rand or random.Random(7).randbytes, tsig=key)
    session.start(now)
    client = session.client(NAME, AAAA)
    client.start(now)
    return session, client


def kinds(server: FakeServer) -> list[str]:
    out = []
    for m in server.received:
        if isinstance(m, DsoMessage):
            out.append(type(m.primary).__name__ if m.primary is not None else "response")
        else:
            out.append("QUERY")
    return out


# -- the session and a subscription --------------------------------------------------------------------------


def test_keepalive_first_then_subscribe_then_the_resync_query_gives_the_whole_set() -> None:
    now = time.time()  # the queries are TSIG-signed and dnspython checks them against its clock
    server = FakeServer({(NAME, AAAA): [ADDR1, ADDR2]}, secret=SECRET)
    session, client = started(server, tsig=True, now=now)
    assert session.state == SessionState.CONNECTING
    assert client.state == LLQState.SETUP_SENT
    events = exchange(session, server, now)
    assert kinds(server) == ["Keepalive", "Subscribe", "QUERY"]
    query = server.received[2]
    assert isinstance(query, dns.message.Message) and query.had_tsig  # signed, and dnspython verified it
    assert PushUp(60.0) in events
    established = [e for e in events if isinstance(e, Established)]
    assert len(established) == 1 and {rd for r in established[0].answers for rd in r} == {ADDR1, ADDR2}
    # The initial PUSH came before the answer: ignored (counted), the answer gave the set.
    assert session.counters["push before the resync answer"] == 2
    assert not [e for e in events if isinstance(e, Removed)]
    assert client.state == LLQState.ESTABLISHED and session.state == SessionState.UP


def test_pushes_after_the_answer_are_changes_including_collective_deletions() -> None:
    server = FakeServer({(NAME, AAAA): [ADDR1, ADDR2]})
    session, client = started(server)
    exchange(session, server, 1000.0)
    session.receive(server.push([PushRecord.add(NAME, 60, ADDR3), PushRecord.delete(NAME, ADDR1)]),
                    PUSH_SERVER, 1001.0)
    events = client_events(client)
    assert [type(e) for e in events] == [Removed, Added]
    assert {rd for rd in events[0].rrset} == {ADDR1}  # type: ignore[union-attr]
    assert {rd for rd in events[1].rrset} == {ADDR3}  # type: ignore[union-attr]
    assert {rd for r in client.records() for rd in r} == {ADDR2, ADDR3}
    # A duplicate changes nothing; a PUSH for a name nobody watches is counted.
    session.receive(server.push([PushRecord.add(NAME, 60, ADDR3)]), PUSH_SERVER, 1002.0)
    other = dns.name.from_text("carol." + ZONE)
    session.receive(server.push([PushRecord.add(other, 60, ADDR1)]), PUSH_SERVER, 1002.0)
    assert client_events(client) == []
    assert session.counters["push for no subscription"] == 1
    # The RRset removed collectively, then the whole name.
    session.receive(server.push([PushRecord.delete_rrset(NAME, AAAA)]), PUSH_SERVER, 1003.0)
    events = client_events(client)
    assert len(events) == 1 and isinstance(events[0], Removed)
    assert {rd for rd in events[0].rrset} == {ADDR2, ADDR3}
    assert client.records() == []
    session.receive(server.push([PushRecord.add(NAME, 60, ADDR1)]), PUSH_SERVER, 1004.0)
    session.receive(server.push([PushRecord.delete_name(NAME)]), PUSH_SERVER, 1004.0)
    assert [type(e) for e in client_events(client)] == [Added, Removed]
    assert client.records() == []


def test_keepalive_is_sent_within_the_interval_the_server_gave() -> None:
    server = FakeServer(keepalive=Keepalive(15_000, 20_000))  # 20 s
    session, _client = started(server)
    exchange(session, server, 1000.0)
    assert session.keepalive_interval == 20.0
    due = session.deadline()
    assert due is not None and 1000.0 < due <= 1000.0 + 20.0
    session.poll(due - 0.5)
    assert session.transmits() == []
    session.poll(due)
    sent = [decode(t.payload) for t in session.transmits()]
    assert len(sent) == 1 and isinstance(sent[0].primary, Keepalive) and sent[0].msg_id
    assert session.counters["keepalive sent"] == 1
    for reply in server.handle(encode(sent[0])):  # answered: the next one is due an interval later
        session.receive(reply, PUSH_SERVER, due + 0.1)
    assert session.state == SessionState.UP
    assert (session.deadline() or 0) > due + 10


def test_an_unanswered_request_drops_the_connection_and_resubscribes_after_the_backoff() -> None:
    server = FakeServer({(NAME, AAAA): [ADDR1]})
    session, client = started(server)
    exchange(session, server, 1000.0)
    client_events(client)
    session.poll(1100.0)  # the keepalive leaves ...
    sent = [decode(t.payload) for t in session.transmits()]
    assert isinstance(sent[0].primary, Keepalive)
    session.poll(1100.0 + RESPONSE_TIMEOUT)  # ... and is never answered: the link is dead
    events = session.events()
    assert len(events) == 1 and isinstance(events[0], DropConnection)
    assert session.state == SessionState.WAITING
    failed = client_events(client)
    assert len(failed) == 1 and isinstance(failed[0], Failed)
    assert client.state == LLQState.SETUP_SENT and {rd for r in client.records() for rd in r} == {ADDR1}
    lost_at = 1100.0 + RESPONSE_TIMEOUT
    reconnect = session.deadline()
    assert reconnect is not None and lost_at + RECONNECT_MIN <= reconnect <= lost_at + RECONNECT_MIN * 1.25
    session.poll(reconnect - 0.01)
    assert session.transmits() == []
    session.poll(reconnect)
    server.received.clear()
    server.zone[(NAME, AAAA)] = [ADDR2]  # changed while we were away
    events = exchange(session, server, reconnect)
    assert kinds(server) == ["Keepalive", "Subscribe", "QUERY"]
    assert [type(e) for e in events if not isinstance(e, PushUp)] == [Removed, Added, Established]


def test_retry_delay_is_respected() -> None:
    server = FakeServer()
    session, _client = started(server)
    exchange(session, server, 1000.0)
    retry = encode(DsoMessage(0, (RetryDelay(90_000),), rcode=dns.rcode.SERVFAIL))
    session.receive(retry, PUSH_SERVER, 1001.0)
    assert session.counters["retry delay"] == 1
    assert session.state == SessionState.WAITING
    assert session.deadline() == pytest.approx(1091.0)
    session.poll(1090.9)
    assert session.transmits() == []
    session.poll(1091.0)
    sent = [decode(t.payload) for t in session.transmits()]
    assert len(sent) == 1 and isinstance(sent[0].primary, Keepalive)
    # A RETRY DELAY while waiting only lengthens the wait.
    session2, _ = started(FakeServer())
    exchange(session2, FakeServer(), 1000.0)
    session2.connection_lost(1001.0, "reset")
    session2.receive(retry, PUSH_SERVER, 1001.5)
    assert session2.deadline() == pytest.approx(1091.5)


def test_a_retry_delay_in_an_error_response_is_respected() -> None:
    """A server that is up but overloaded answers the reconnection's KEEPALIVE with SERVFAIL and a RETRY
    DELAY: the next attempt waits that long."""
    server = FakeServer()
    session, _client = started(server)
    exchange(session, server, 1000.0)
    session.connection_lost(1001.0, "reset")
    now = session.deadline() or 0.0
    session.poll(now)
    sent = [decode(t.payload) for t in session.transmits()]
    assert isinstance(sent[0].primary, Keepalive)
    busy = DsoMessage(sent[0].msg_id, (RetryDelay(45_000),), response=True, rcode=dns.rcode.SERVFAIL)
    session.receive(encode(busy), PUSH_SERVER, now + 0.1)
    assert session.state == SessionState.WAITING
    assert (session.deadline() or 0) >= now + 0.1 + 45.0


@pytest.mark.parametrize("rcode", [RCODE_DSOTYPENI, dns.rcode.NOTIMP])
def test_a_server_without_push_is_given_up_and_tried_again_later(rcode: int) -> None:
    server = FakeServer(keepalive_rcode=rcode)
    session, client = started(server)
    events = exchange(session, server, 1000.0)
    unavailable = [e for e in events if isinstance(e, PushUnavailable)]
    assert len(unavailable) == 1 and unavailable[0].retry_in == PUSH_RETRY_INTERVAL
    assert [type(e) for e in client_events(client)] == [Refused]
    assert session.state == SessionState.UNAVAILABLE and not session.usable
    assert session.deadline() == 1000.0 + PUSH_RETRY_INTERVAL
    session.poll(1000.0 + PUSH_RETRY_INTERVAL)
    sent = [decode(t.payload) for t in session.transmits()]
    assert len(sent) == 1 and isinstance(sent[0].primary, Keepalive)
    assert session.counters["push retried"] == 1


def test_subscribe_answered_dsotypeni_makes_push_unavailable() -> None:
    server = FakeServer(subscribe_rcode=RCODE_DSOTYPENI)
    session, _client = started(server)
    events = exchange(session, server, 1000.0)
    assert any(isinstance(e, PushUnavailable) for e in events)
    assert session.state == SessionState.UNAVAILABLE


def test_a_refused_subscription_is_refused_alone() -> None:
    server = FakeServer(subscribe_rcode=dns.rcode.REFUSED)
    session, client = started(server)
    exchange(session, server, 1000.0)
    refused = [e for e in client_events(client) if isinstance(e, Refused)]
    assert len(refused) == 1 and "REFUSED" in refused[0].reason
    assert session.state == SessionState.UP and client.state == LLQState.STOPPED
    assert session.clients == {}


def test_the_first_connection_failing_gives_up_at_once_but_a_lost_one_is_retried() -> None:
    session, _client = started(FakeServer())
    session.connection_lost(1000.5, "connection refused")
    assert session.state == SessionState.UNAVAILABLE
    server = FakeServer()
    session, _client = started(server)
    exchange(session, server, 1000.0)
    session.connection_lost(1001.0, "reset by peer")
    assert session.state == SessionState.WAITING
    now = 1001.0
    for attempt in range(RECONNECT_TRIES):
        assert session.state == SessionState.WAITING, attempt
        now = session.deadline() or 0.0
        session.poll(now)
        session.transmits()
        session.connection_lost(now + 0.1, "connection refused")
    assert session.state == SessionState.UNAVAILABLE


def test_unknown_and_malformed_messages_are_counted() -> None:
    server = FakeServer()
    session, _client = started(server)
    exchange(session, server, 1000.0)
    session.receive(b"\x00" * 5, PUSH_SERVER, 1001.0)  # not even a header
    session.receive(encode(DsoMessage(999, (), response=True)), PUSH_SERVER, 1001.0)
    assert session.counters["response to nothing"] == 1
    assert any(k.startswith("parse error") for k in session.counters)
    # A request from the server with an unknown primary TLV: answered DSOTYPENI.
    session.receive(encode(DsoMessage(5, (UnknownTlv(0x7777, b"x"),))), PUSH_SERVER, 1001.0)
    answers = [decode(t.payload) for t in session.transmits()]
    assert answers == [DsoMessage(5, (), response=True, rcode=RCODE_DSOTYPENI)]
    assert session.state == SessionState.UP
    # A DSO message that does not decode: counted, and the connection is given up on.
    bad = bytearray(encode(DsoMessage(0, (RetryDelay(1),))))
    bad[-1:] = b""
    session.receive(bytes(bad), PUSH_SERVER, 1001.0)
    assert any(k.startswith("DSO parse error") for k in session.counters)
    assert any(isinstance(e, DropConnection) for e in session.events())
    assert session.state == SessionState.WAITING


def test_close_sends_nothing_and_unsubscribe_is_sent_while_up() -> None:
    server = FakeServer()
    session, client = started(server)
    exchange(session, server, 1000.0)
    client.close(1001.0)
    sent = [decode(t.payload) for t in session.transmits()]
    assert len(sent) == 1 and isinstance(sent[0].primary, Unsubscribe) and sent[0].msg_id == 0
    other = session.client(NAME, dns.rdatatype.TXT)
    other.start(1001.0)
    session.close(1002.0)
    other.close(1002.0)
    session.transmits()
    assert session.transmits() == [] and session.deadline() is None


def test_answers_that_are_not_ours_are_dropped() -> None:
    now = time.time()
    server = FakeServer({(NAME, AAAA): [ADDR1]}, secret=SECRET)
    session, client = started(server, tsig=True, now=now)
    exchange(session, server, now)
    stray = dns.message.make_response(dns.message.make_query(NAME, AAAA))
    session.receive(stray.to_wire(), PUSH_SERVER, now)
    assert session.counters["tsig rejected"] == 1
    assert client_events(client) == []


# -- fuzzing -----------------------------------------------------------------------------------------------


def _dso_messages() -> st.SearchStrategy[bytes]:
    records = st.sampled_from([PushRecord.add(NAME, 60, ADDR1), PushRecord.delete(NAME, ADDR2),
                               PushRecord.delete_rrset(NAME, AAAA), PushRecord.delete_name(NAME)])
    tlvs = st.one_of(
        st.builds(lambda r: (Push(tuple(r)),), st.lists(records, min_size=1, max_size=4)),
        st.builds(lambda d: (RetryDelay(d),), st.integers(0, 2**32 - 1)),
        st.builds(lambda a, b: (Keepalive(a, b),), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
        st.builds(lambda t, d: (UnknownTlv(t, d),), st.integers(0x100, 0xFFFF), st.binary(max_size=8)),
    )
    messages = st.builds(lambda i, t, r: DsoMessage(i, t, response=r > 0, rcode=r), st.integers(0, 3), tlvs,
                         st.integers(0, 11))

    def render(m: DsoMessage) -> bytes:
        try:
            return encode(m)
        except ValueError:
            return encode(DsoMessage(0, (Push((PushRecord.add(NAME, 1, ADDR3),)),)))
    return messages.map(render)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_dso_messages(), st.binary(max_size=64),
                          _dso_messages().map(lambda w: w[:-1] if len(w) > 12 else w)), max_size=6))
def test_receive_never_raises(messages: list[bytes]) -> None:
    server = FakeServer({(NAME, AAAA): [ADDR1]})
    session, client = started(server)
    exchange(session, server, 1000.0)
    for i, wire in enumerate(messages):
        session.receive(wire, PUSH_SERVER, 1001.0 + i)
        session.poll(1001.0 + i)
    assert session.state in set(SessionState)
    client_events(client)
