"""The account watcher: LLQ clients per host question, records turned into PeerLearned/Gone/Rejected.

Most tests drive the Watcher with a fake client factory (events injected per question); one runs real
LLQClients against canned server messages built with dnspython."""

from __future__ import annotations

import ipaddress
import random
import time
from collections import Counter

import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import pytest

from tests.unit.dns_steps import SERVER, Sent, Step, WatcherView
from tests.unit.dns_steps import watcher as make_watcher
from tunneld.identity import ula_for
from tunneld.proto import records
from tunneld.proto.core import Address, Outbox
from tunneld.proto.llq import (
    Added,
    Established,
    Event,
    Failed,
    Fallback,
    LLQState,
    Removed,
)
from tunneld.proto.llq_wire import (
    LLQ_OP_SETUP,
    LLQOption,
    find_llq_option,
)
from tunneld.proto.tsig import TsigError, TsigKey, TsigSession
from tunneld.proto.watcher import PeerGone, PeerLearned, PeerRejected, QueryStatus, Watcher

DOMAIN = "members.example"
BOB_KEY = bytes(range(32))
CAROL_KEY = bytes(range(1, 33))
V4 = ipaddress.IPv4Address("198.51.100.7")
V4_NEW = ipaddress.IPv4Address("203.0.113.9")

Q = tuple[dns.name.Name, dns.rdatatype.RdataType]


class FakeClient(Outbox[Event]):
    """Stand-in for LLQClient: the test queues Steps (what the client sends and reports on its next
    receive or poll); start/close/poll are recorded."""

    def __init__(self, factory: FakeFactory, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> None:
        super().__init__()
        self.factory = factory
        self.qname = qname
        self.rdtype = rdtype
        self.state = LLQState.IDLE
        self.counters: Counter[str] = Counter()
        self.queued: list[Step[Event]] = []
        self.received: list[bytes] = []
        self.polled: list[float] = []
        self.next_deadline: float | None = None

    def start(self, now: float) -> None:
        self.state = LLQState.SETUP_SENT
        self.factory.started.append((self.qname, self.rdtype))
        rdtype = dns.rdatatype.to_text(self.rdtype)
        self._send(SERVER, f"start {self.qname} {rdtype}".encode())

    def close(self, now: float) -> None:
        self.state = LLQState.STOPPED
        self.factory.stopped.append((self.qname, self.rdtype))
        self._send(SERVER, b"stop " + self.qname.to_text().encode())

    def _next(self) -> None:
        if self.queued:
            step = self.queued.pop(0)
            for sent in step.transmits:
                self._send(SERVER, sent.wire)
            for event in step.events:
                if isinstance(event, Established | Added | Removed) and self.state != LLQState.POLLING:
                    self.state = LLQState.ESTABLISHED  # as the real client: answers mean it is set up
                self._emit(event)

    def receive(self, data: bytes, source: Address, now: float) -> None:
        self.received.append(data)
        self._next()

    def poll(self, now: float) -> None:
        self.polled.append(now)
        self._next()

    def deadline(self) -> float | None:
        return self.next_deadline


class FakeFactory:
    def __init__(self) -> None:
        self.clients: dict[Q, FakeClient] = {}
        self.started: list[Q] = []
        self.stopped: list[Q] = []
        self.args: list[tuple[int, TsigSession | None]] = []

    def __call__(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, *, server: Address,
                 rand: object, lease: int, tsig: TsigSession | None) -> FakeClient:
        client = FakeClient(self, qname, rdtype)
        self.clients[(qname, rdtype)] = client
        self.args.append((lease, tsig))
        return client

    def live(self) -> set[Q]:
        return {q for q, c in self.clients.items() if c.state != LLQState.STOPPED}


def wire_for(question: Q) -> bytes:
    return dns.message.make_response(dns.message.make_query(question[0], question[1])).to_wire()


def deliver(watcher: WatcherView, factory: FakeFactory, question: Q, events: list[Event],
            now: float = 1.0) -> tuple[list[Sent], list[object]]:
    client = factory.clients[question]
    client.queued.append(Step([Sent(b"ack")], events))
    out = watcher.receive(wire_for(question), now)
    assert client.received, "the message was not routed to its question's client"
    return out.transmits, [e for e in out.events if not isinstance(e, QueryStatus)]


def by_question(rrsets: list[dns.rrset.RRset]) -> dict[Q, list[dns.rrset.RRset]]:
    grouped: dict[Q, list[dns.rrset.RRset]] = {}
    for rrset in rrsets:
        grouped.setdefault((rrset.name, dns.rdatatype.RdataType.make(rrset.rdtype)), []).append(rrset)
    return grouped


BROWSE = records.names_to_browse(DOMAIN)[0]


def ptr(*names: str) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(BROWSE[0], 300, "IN", "PTR",
                                    [records.service_name(DOMAIN, n).to_text() for n in names])


def host(name: str = "bob", key: bytes = BOB_KEY, address: ipaddress.IPv4Address = V4,
         port: int = 4500) -> records.HostRecords:
    return records.HostRecords.derive(name, DOMAIN, key, port, [address])


def publish(watcher: WatcherView, factory: FakeFactory, rec: records.HostRecords,
            targets: bool = True) -> list[object]:
    """Deliver the host's records (except the browse PTR) as Added events, question by question, to the
    clients running (in build order, so a TXT starts the target clients before the target's records)."""
    events: list[object] = []
    target = records.target_name(DOMAIN, rec.public_key)
    for question, rrsets in by_question(records.build(rec, 300)).items():
        if question == BROWSE or (not targets and question[0] == target):
            continue
        if question not in factory.clients:
            continue
        events += deliver(watcher, factory, question, [Added(r) for r in rrsets])[1]
    return events + (settle(watcher, factory) if targets else [])


def settle(watcher: WatcherView, factory: FakeFactory) -> list[object]:
    """Answer every question still waiting for its first answer with an empty one, as the server does
    for names that have no records (the watcher judges a host only once all its questions answered)."""
    events: list[object] = []
    for question, client in list(factory.clients.items()):
        if client.state == LLQState.SETUP_SENT:
            events += deliver(watcher, factory, question, [Established((), 1, 7200)])[1]
    return events


def setup(own: str = "alice") -> tuple[Watcher, FakeFactory]:
    factory = FakeFactory()
    watcher = make_watcher(DOMAIN, own, rand=random.Random(1).randbytes, client_factory=factory)
    transmits = watcher.start(0.0)
    assert factory.started == [BROWSE]
    assert len(transmits) == 1
    return watcher, factory


def learn_bob(watcher: WatcherView, factory: FakeFactory,
              rec: records.HostRecords | None = None) -> list[object]:
    rec = rec or host()
    deliver(watcher, factory, BROWSE, [Added(ptr(rec.name))])
    return publish(watcher, factory, rec)


# -- tests ---------------------------------------------------------------------------------------------


def test_browse_ptr_starts_clients_for_the_host() -> None:
    watcher, factory = setup()
    transmits, events = deliver(watcher, factory, BROWSE, [Added(ptr("bob"))])
    assert events == []
    expected = records.names_to_watch(DOMAIN, "bob")
    assert factory.started[1:] == expected
    assert len(transmits) == 1 + len(expected)  # the browse client's ack plus one setup per question
    assert watcher.state["hosts"]["bob"]["complete"] is False


def test_own_name_is_ignored() -> None:
    watcher, factory = setup(own="Bob")
    deliver(watcher, factory, BROWSE, [Added(ptr("bob"))])
    assert factory.started == [BROWSE]
    assert watcher.state["hosts"] == {}


def test_complete_records_give_peer_learned_with_endpoint() -> None:
    watcher, factory = setup()
    deliver(watcher, factory, BROWSE, [Added(ptr("bob"))])
    rec = host()
    first = publish(watcher, factory, rec, targets=False)
    assert first == []  # the target's questions have not answered yet: neither learned nor rejected
    target = records.target_name(DOMAIN, BOB_KEY)
    assert (target, dns.rdatatype.A) in factory.live() and (target, dns.rdatatype.AAAA) in factory.live()
    events = publish(watcher, factory, rec)
    assert events == [PeerLearned(rec)]
    learned = events[0]
    assert isinstance(learned, PeerLearned)
    assert learned.endpoint == ("198.51.100.7", 4500)
    assert learned.host.ula == ula_for(DOMAIN, BOB_KEY)
    assert watcher.peers() == [rec]
    status = watcher.state["hosts"]["bob"]
    assert status["complete"] is True and status["rejected"] is None
    assert len(status["clients"]) == 5


def test_unchanged_records_are_not_learned_twice() -> None:
    watcher, factory = setup()
    learn_bob(watcher, factory)
    assert publish(watcher, factory, host()) == []


def test_address_change_learns_again() -> None:
    watcher, factory = setup()
    assert learn_bob(watcher, factory) == [PeerLearned(host())]
    target = (records.target_name(DOMAIN, BOB_KEY), dns.rdatatype.A)
    old = dns.rrset.from_text(target[0], 300, "IN", "A", str(V4))
    new = dns.rrset.from_text(target[0], 300, "IN", "A", str(V4_NEW))
    _, events = deliver(watcher, factory, target, [Removed(old), Added(new)])
    assert events == [PeerLearned(host(address=V4_NEW))]
    learned = events[0]
    assert isinstance(learned, PeerLearned) and learned.endpoint == ("203.0.113.9", 4500)


def test_wrong_ula_is_rejected_once_and_never_learned() -> None:
    watcher, factory = setup()
    deliver(watcher, factory, BROWSE, [Added(ptr("bob"))])
    good = host()
    events: list[object] = []
    for _ in range(2):
        for question, rrsets in by_question(records.build(good, 300)).items():
            if question == BROWSE or question not in factory.clients:
                continue
            if question == (records.host_name(DOMAIN, "bob"), dns.rdatatype.AAAA):
                # The AAAA of carol's key: not the ULA bob's key gives.
                wrong = str(ula_for(DOMAIN, CAROL_KEY))
                rrsets = [dns.rrset.from_text(question[0], 300, "IN", "AAAA", wrong)]
            events += deliver(watcher, factory, question, [Added(r) for r in rrsets])[1]
        events += settle(watcher, factory)
    assert not any(isinstance(e, PeerLearned) for e in events)
    rejected = [e for e in events if isinstance(e, PeerRejected)]
    assert len(rejected) == 1
    assert rejected[0].name == "bob" and rejected[0].reason.startswith("ula mismatch:")
    assert watcher.state["hosts"]["bob"]["rejected"].startswith("ula mismatch:")
    assert watcher.peers() == []


def test_rejected_host_that_fixes_its_records_is_learned() -> None:
    watcher, factory = setup()
    learn_bob(watcher, factory)
    aaaa = (records.host_name(DOMAIN, "bob"), dns.rdatatype.AAAA)
    good = dns.rrset.from_text(aaaa[0], 300, "IN", "AAAA", str(ula_for(DOMAIN, BOB_KEY)))
    bad = dns.rrset.from_text(aaaa[0], 300, "IN", "AAAA", str(ula_for(DOMAIN, CAROL_KEY)))
    _, events = deliver(watcher, factory, aaaa, [Removed(good), Added(bad)])
    assert events[0] == PeerGone("bob", BOB_KEY)
    assert isinstance(events[1], PeerRejected)
    _, events = deliver(watcher, factory, aaaa, [Removed(bad), Added(good)])
    assert events == [PeerLearned(host())]


def test_txt_removed_gives_peer_gone_and_stops_target_clients() -> None:
    watcher, factory = setup()
    learn_bob(watcher, factory)
    txt_q = (records.service_name(DOMAIN, "bob"), dns.rdatatype.TXT)
    txt = by_question(records.build(host(), 300))[txt_q]
    transmits, events = deliver(watcher, factory, txt_q, [Removed(r) for r in txt])
    assert events == [PeerGone("bob", BOB_KEY)]
    target = records.target_name(DOMAIN, BOB_KEY)
    assert set(factory.stopped) == {(target, dns.rdatatype.A), (target, dns.rdatatype.AAAA)}
    assert Sent(b"stop " + target.to_text().encode()) in transmits
    assert watcher.peers() == []
    assert watcher.state["hosts"]["bob"]["incomplete"].startswith("missing txt:")


def test_ptr_removed_gives_peer_gone_and_stops_all_host_clients() -> None:
    watcher, factory = setup()
    learn_bob(watcher, factory)
    _, events = deliver(watcher, factory, BROWSE, [Removed(ptr("bob"))])
    assert events == [PeerGone("bob", BOB_KEY)]
    assert set(factory.stopped) == set(records.names_to_watch(DOMAIN, "bob", BOB_KEY))
    assert factory.live() == {BROWSE}
    assert watcher.state["hosts"] == {}


def test_ptr_snapshot_adds_and_removes_hosts() -> None:
    watcher, factory = setup()
    deliver(watcher, factory, BROWSE, [Established((ptr("bob", "carol"),), 1, 7200)])
    assert set(watcher.state["hosts"]) == {"bob", "carol"}
    deliver(watcher, factory, BROWSE, [Removed(ptr("bob"))])
    assert set(watcher.state["hosts"]) == {"carol"}
    assert set(factory.stopped) == set(records.names_to_watch(DOMAIN, "bob"))


def test_key_change_forgets_old_key_and_watches_new_target() -> None:
    watcher, factory = setup()
    learn_bob(watcher, factory)
    new = host(key=CAROL_KEY)
    events: list[object] = []
    for question, rrsets in by_question(records.build(new, 300)).items():
        if question in factory.clients and question != BROWSE and question[0] != records.target_name(
                DOMAIN, CAROL_KEY):
            old = by_question(records.build(host(), 300))[question]
            change: list[Event] = [Removed(r) for r in old]
            change += [Added(r) for r in rrsets]
            events += deliver(watcher, factory, question, change)[1]
    events += settle(watcher, factory)
    assert PeerGone("bob", BOB_KEY) in events
    old_target = records.target_name(DOMAIN, BOB_KEY)
    assert (old_target, dns.rdatatype.A) in factory.stopped
    assert (records.target_name(DOMAIN, CAROL_KEY), dns.rdatatype.A) in factory.live()
    assert publish(watcher, factory, new) == [PeerLearned(new)]


def test_duplicate_key_is_rejected() -> None:
    watcher, factory = setup()
    learn_bob(watcher, factory)
    deliver(watcher, factory, BROWSE, [Added(ptr("carol"))])
    copy = host(name="carol")  # bob's key under another name: shares bob's target clients
    events = publish(watcher, factory, copy)
    assert [type(e) for e in events] == [PeerRejected]
    assert isinstance(events[0], PeerRejected) and events[0].reason.startswith("duplicate key:")
    assert watcher.peers() == [host()]
    # When bob leaves, carol is the only one with the key: it is learned.
    _, events = deliver(watcher, factory, BROWSE, [Removed(ptr("bob"))])
    assert events == [PeerGone("bob", BOB_KEY), PeerLearned(copy)]
    # The shared target clients stay while carol still uses them.
    target = records.target_name(DOMAIN, BOB_KEY)
    assert (target, dns.rdatatype.A) in factory.live()
    assert (records.host_name(DOMAIN, "bob"), dns.rdatatype.AAAA) not in factory.live()
    _, events = deliver(watcher, factory, BROWSE, [Removed(ptr("carol"))])
    assert events == [PeerGone("carol", BOB_KEY)]
    assert factory.live() == {BROWSE}


def test_failed_llq_is_reported_and_records_kept() -> None:
    watcher, factory = setup()
    learn_bob(watcher, factory)
    srv_q = (records.service_name(DOMAIN, "bob"), dns.rdatatype.SRV)
    factory.clients[srv_q].queued.append(Step([Sent(b"setup")], [Failed("NO-SUCH-LLQ")]))
    factory.clients[srv_q].next_deadline = 3.0
    out = watcher.poll(3.0)
    assert out == ([Sent(b"setup")], [QueryStatus(srv_q[0], srv_q[1], "failed", "NO-SUCH-LLQ")])
    assert watcher.peers() == [host()]
    assert watcher.state["counters"]["LLQ failed"] == 1


def test_rejected_host_leaving_emits_nothing() -> None:
    watcher, factory = setup()
    deliver(watcher, factory, BROWSE, [Added(ptr("bob"))])
    bad = host(port=4500)
    events: list[object] = []
    for question, rrsets in by_question(records.build(bad, 300)).items():
        if question[1] == dns.rdatatype.SRV:
            rrsets = [dns.rrset.from_text(question[0], 300, "IN", "SRV", "0 0 4500 elsewhere.example.")]
        if question in factory.clients and question != BROWSE:
            events += deliver(watcher, factory, question, [Added(r) for r in rrsets])[1]
    events += settle(watcher, factory)
    assert [type(e) for e in events] == [PeerRejected]
    assert isinstance(events[0], PeerRejected) and events[0].reason.startswith("srv target mismatch:")
    _, events = deliver(watcher, factory, BROWSE, [Removed(ptr("bob"))])
    assert events == []


def test_messages_are_routed_by_question() -> None:
    watcher, factory = setup()
    deliver(watcher, factory, BROWSE, [Added(ptr("bob"))])
    srv_q = (records.service_name(DOMAIN, "bob"), dns.rdatatype.SRV)
    txt_q = (records.service_name(DOMAIN, "bob"), dns.rdatatype.TXT)
    watcher.receive(wire_for(srv_q), 2.0)
    assert len(factory.clients[srv_q].received) == 1 and factory.clients[txt_q].received == []
    # Case does not matter in DNS names.
    upper = (dns.name.from_text(srv_q[0].to_text().upper()), srv_q[1])
    watcher.receive(wire_for(upper), 2.0)
    assert len(factory.clients[srv_q].received) == 2
    # Unknown question, garbage, two questions: counted and dropped.
    out = watcher.receive(wire_for((records.service_name(DOMAIN, "dave"), dns.rdatatype.SRV)), 2.0)
    assert out == ([], [])
    assert watcher.receive(b"\x00\x01garbage", 2.0) == ([], [])
    two = dns.message.make_query(srv_q[0], srv_q[1])
    two.find_rrset(two.question, txt_q[0], dns.rdataclass.IN, txt_q[1], create=True, force_unique=True)
    assert watcher.receive(two.to_wire(), 2.0) == ([], [])
    counters = watcher.state["counters"]
    assert counters["unknown question"] == 1
    assert counters["parse error: question count"] == 1  # two questions: refused before parsing (RFC 9619)
    assert sum(v for k, v in counters.items() if k.startswith("parse error")) == 2
    # From anywhere but the server: dropped before it reaches a client.
    assert watcher.receive(wire_for(srv_q), 2.0, source=("203.0.113.1", 53)) == ([], [])
    assert len(factory.clients[srv_q].received) == 2
    assert watcher.state["counters"]["not from the server"] == 1


def test_deadline_and_poll_aggregate_clients() -> None:
    watcher, factory = setup()
    deliver(watcher, factory, BROWSE, [Added(ptr("bob"))])
    srv_q = (records.service_name(DOMAIN, "bob"), dns.rdatatype.SRV)
    txt_q = (records.service_name(DOMAIN, "bob"), dns.rdatatype.TXT)
    assert watcher.deadline() is None
    factory.clients[BROWSE].next_deadline = 50.0
    factory.clients[srv_q].next_deadline = 10.0
    factory.clients[txt_q].next_deadline = 20.0
    assert watcher.deadline() == 10.0
    factory.clients[srv_q].queued.append(Step([Sent(b"retry")], [Fallback(900.0, "silence")]))
    out = watcher.poll(15.0)
    assert out.transmits == [Sent(b"retry")]
    assert out.events == [QueryStatus(srv_q[0], srv_q[1], "fallback", "silence")]
    assert factory.clients[srv_q].polled == [15.0]
    assert factory.clients[txt_q].polled == [] and factory.clients[BROWSE].polled == []
    # A poll answer (records from the fallback) is handled like events.
    rec = host()
    txt = by_question(records.build(rec, 300))[txt_q]
    factory.clients[txt_q].queued.append(Step([], [Added(r) for r in txt]))
    watcher.poll(20.0)
    assert (records.target_name(DOMAIN, BOB_KEY), dns.rdatatype.A) in factory.live()


def test_stop_stops_every_client() -> None:
    watcher, factory = setup()
    learn_bob(watcher, factory)
    transmits = watcher.stop(5.0)
    assert factory.live() == set()
    assert len(transmits) == 1 + 5
    assert watcher.deadline() is None
    assert watcher.receive(wire_for(BROWSE), 6.0) == ([], [])


def test_tsig_session_and_lease_reach_the_clients() -> None:
    factory = FakeFactory()
    key = TsigKey(dns.name.from_text(DOMAIN), bytes(range(32)))
    watcher = make_watcher(DOMAIN, "alice", lease=600, key=key, client_factory=factory)
    watcher.start(0.0)
    lease, tsig = factory.args[0]
    assert lease == 600 and tsig is not None and tsig.key == key
    factory2 = FakeFactory()
    make_watcher(DOMAIN, "alice", client_factory=factory2).start(0.0)
    assert factory2.args[0] == (7200, None)


# -- real LLQClients against canned server messages ---------------------------------------------------


def respond(query_wire: bytes, option: LLQOption, answers: list[dns.rrset.RRset]) -> bytes:
    response = dns.message.make_response(dns.message.from_wire(query_wire))
    response.use_edns(0, payload=1440, options=[option])
    response.answer.extend(answers)
    return response.to_wire()


def handshake(watcher: WatcherView, setup_wire: bytes, answers: list[dns.rrset.RRset], llq_id: int,
              now: float) -> tuple[list[Sent], list[object]]:
    """Challenge, then ACK with ``answers``; returns what the watcher emitted on the ACK."""
    out = watcher.receive(respond(setup_wire, LLQOption(1, LLQ_OP_SETUP, 0, llq_id, 3600), []), now)
    assert len(out.transmits) == 1  # the challenge response
    challenge_response = out.transmits[0].wire
    option = find_llq_option(dns.message.from_wire(challenge_response))
    assert option is not None and option.llq_id == llq_id
    option = LLQOption(1, LLQ_OP_SETUP, 0, llq_id, 3600)
    ack = watcher.receive(respond(challenge_response, option, answers), now)
    return ack.transmits, list(ack.events)


def questions_of(transmits: list[Sent]) -> dict[Q, bytes]:
    result: dict[Q, bytes] = {}
    for transmit in transmits:
        q = dns.message.from_wire(transmit.wire).question[0]
        result[(q.name, dns.rdatatype.RdataType.make(q.rdtype))] = transmit.wire
    return result


def test_real_llq_clients_end_to_end() -> None:
    watcher = make_watcher(DOMAIN, "alice", rand=random.Random(7).randbytes)
    [setup_wire] = [t.wire for t in watcher.start(0.0)]
    transmits, events = handshake(watcher, setup_wire, [ptr("bob")], 0x1111, 0.5)
    assert QueryStatus(BROWSE[0], BROWSE[1], "established") in events
    questions = questions_of(transmits)
    assert set(questions) == set(records.names_to_watch(DOMAIN, "bob"))
    rec = host()
    grouped = by_question(records.build(rec, 300))
    learned: list[object] = []
    new_setups: list[Sent] = []
    for i, (question, wire) in enumerate(sorted(questions.items(), key=str)):
        sent, got = handshake(watcher, wire, grouped[question], 0x2000 + i, 1.0)
        new_setups += sent
        learned += got
    target = questions_of(new_setups)
    assert set(target) == set(records.names_to_watch(DOMAIN, "bob", BOB_KEY)[3:])
    for i, (question, wire) in enumerate(sorted(target.items(), key=str)):
        learned += handshake(watcher, wire, grouped.get(question, []), 0x3000 + i, 2.0)[1]
    assert [e for e in learned if not isinstance(e, QueryStatus)] == [PeerLearned(rec)]
    status = watcher.state
    assert set(status["hosts"]["bob"]["clients"].values()) == {"established"}
    assert watcher.deadline() is not None
    # Stopping cancels every established LLQ with a lease-0 REFRESH.
    assert len(watcher.stop(3.0)) == 1 + 5


def test_response_without_qr_is_dropped_by_the_client() -> None:
    watcher = make_watcher(DOMAIN, "alice", rand=random.Random(3).randbytes)
    [setup_wire] = [t.wire for t in watcher.start(0.0)]
    msg = dns.message.from_wire(respond(setup_wire, LLQOption(1, LLQ_OP_SETUP, 0, 5, 3600), []))
    msg.flags &= ~dns.flags.QR
    assert watcher.receive(msg.to_wire(), 0.1) == ([], [])
    assert watcher.state["counters"]["not a query response"] == 1


def _server_signed(msg_id: int, secret: bytes, request_mac: bytes = b"") -> bytes:
    """A response from the server, signed by dnspython (at its clock) with the account key over
    `request_mac` (b"": unsolicited)."""
    name = dns.name.from_text(DOMAIN)
    msg = dns.message.Message(id=msg_id)
    msg.flags = dns.flags.QR
    msg.use_tsig({name: dns.tsig.Key(name, secret, "hmac-sha256")}, name)
    msg.request_mac = request_mac
    return msg.to_wire()


def test_tsig_session_checks_events_whatever_their_message_id() -> None:
    """The watcher's TSIG session: an answer is checked against its request's MAC; an unsolicited event
    is accepted even when its ID equals one of our requests' or acks' IDs (a server picks event IDs
    freely; remembering acks and checking events against them made such an event unverifiable, and the
    LLQ behind it stalled until the next refresh)."""
    secret = bytes(range(32))
    session = TsigSession(TsigKey(dns.name.from_text(DOMAIN), secret))
    now = time.time()
    request = session.sign(dns.message.make_query("x." + DOMAIN, "A", id=7).to_wire(), now)
    mac = dns.message.from_wire(request, keyring=False).tsig[0].mac  # type: ignore[index]
    session.verify(_server_signed(7, secret, mac), now)  # the answer to request 7
    session.verify(_server_signed(7, secret), now)  # an event that drew ID 7
    ack = dns.message.Message(id=9)
    ack.flags = dns.flags.QR
    session.sign(ack.to_wire(), now)
    session.verify(_server_signed(9, secret), now)  # the next event that drew the ID of our ack
    for wire in (_server_signed(7, bytes(32), mac), _server_signed(11, bytes(32))):
        with pytest.raises(TsigError, match="mac"):
            session.verify(wire, now)  # another key: refused either way


def test_identity_alone_is_learned_without_endpoint_then_its_endpoint_when_published() -> None:
    """A device behind a NAT that maps nothing is a member (its key is known) with no endpoint; when it
    gets one (a mapping), it is learned again with the endpoint, and without it again after."""
    watcher, factory = setup()
    deliver(watcher, factory, BROWSE, [Added(ptr("bob"))])
    alone = records.HostRecords.derive("bob", DOMAIN, BOB_KEY)
    events = publish(watcher, factory, alone)
    assert events == [PeerLearned(alone)]
    assert isinstance(events[0], PeerLearned) and events[0].endpoint is None and events[0].endpoints == []
    assert watcher.state["hosts"]["bob"]["complete"] is True
    mapped = host()
    target = records.target_name(DOMAIN, BOB_KEY)
    srv_q = (records.service_name(DOMAIN, "bob"), dns.rdatatype.SRV)
    a_q = (target, dns.rdatatype.A)
    grouped = by_question(records.build(mapped, 300))
    assert deliver(watcher, factory, srv_q, [Added(r) for r in grouped[srv_q]])[1] == []  # no address yet
    events = deliver(watcher, factory, a_q, [Added(r) for r in grouped[a_q]])[1]
    assert events == [PeerLearned(mapped)]
    events = deliver(watcher, factory, srv_q, [Removed(r) for r in grouped[srv_q]])[1]
    events += deliver(watcher, factory, a_q, [Removed(r) for r in grouped[a_q]])[1]
    assert events == [PeerLearned(alone)]  # the endpoint withdrawn, the member stays
