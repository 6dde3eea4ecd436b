"""The DNS Push server core (RFC 8765 on DSO, RFC 8490) in memory: sessions over a DnsCore with an in-memory
ZoneStore, zone changes applied to the store and fed to the registry as serve-dns feeds them (an UPDATE's
changes, the sweep's expired leases). Wire in and out through dso_wire, as a client sees it."""

from __future__ import annotations

import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from tests.unit.test_metrics import _samples
from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.metrics import DnsCollector
from tunneld.dnsserver.push import PushLimits, PushServer, PushSession, is_dso
from tunneld.dnsserver.serve import _Server
from tunneld.dnsserver.store import AddRR, Change, DeleteRR, Lease, ZoneStore
from tunneld.proto import dso_wire
from tunneld.proto.dso_wire import (
    DELETE_ONE_TTL,
    RCODE_DSOTYPENI,
    DsoMessage,
    Keepalive,
    Push,
    PushRecord,
    Reconfirm,
    RetryDelay,
    Subscribe,
    UnknownTlv,
    Unsubscribe,
)
from tunneld.services.metrics import renderer

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
T0 = 1_800_000_000.0
BOB = dns.name.from_text("bob.example.com.")
ALICE = dns.name.from_text("alice.example.com.")
A = dns.rdatatype.A


def make(limits: PushLimits | None = None) -> PushServer:
    core = DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 53), [account_key(bytes(32), DOMAIN)])
    return PushServer(core, limits)


def rd(text: str, rdtype: int = A) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


def apply(server: PushServer, changes: list[Change], at: float = T0, lease: int = 3600) -> None:
    """A zone change as serve-dns makes it: applied to the store, then fed to the registry."""
    server.core.store.apply_update(changes, Lease(lease, lease), at)
    server.changes(changes, at)


def send(session: PushSession, message: DsoMessage, at: float = T0) -> list[DsoMessage]:
    session.receive(dso_wire.encode(message), at)
    return out(session)


def out(session: PushSession) -> list[DsoMessage]:
    return [dso_wire.decode(w) for w in session.take()]


def subscribe(session: PushSession, name: dns.name.Name, rtype: int = A, msg_id: int = 7,
              rclass: int = dns.rdataclass.IN, at: float = T0) -> list[DsoMessage]:
    return send(session, DsoMessage(msg_id, (Subscribe(name, rtype, rclass),)), at)


def pushed(messages: list[DsoMessage]) -> list[PushRecord]:
    records: list[PushRecord] = []
    for m in messages:
        assert m.unidirectional and isinstance(m.primary, Push)
        records.extend(m.primary.records)
    return records


def test_keepalive_is_answered_with_the_servers_values() -> None:
    session = make().open(True, T0)
    [reply] = send(session, DsoMessage(3, (Keepalive(1000, 20_000),)))
    assert reply.response and reply.msg_id == 3 and reply.rcode == 0
    assert reply.tlvs == (Keepalive(15_000, 60_000),)


def test_a_member_subscribes_then_gets_every_change_removals_first() -> None:
    server = make()
    session = server.open(True, T0)
    [ack] = subscribe(session, BOB)  # a name that does not exist yet: accepted, nothing to push
    assert ack.response and ack.msg_id == 7 and ack.rcode == dns.rcode.NOERROR and ack.tlvs == ()
    apply(server, [AddRR(BOB, 300, rd("192.0.2.1"))])
    assert pushed(out(session)) == [PushRecord.add(BOB, 300, rd("192.0.2.1"))]
    apply(server, [DeleteRR(BOB, rd("192.0.2.1")), AddRR(BOB, 300, rd("192.0.2.2"))])
    assert pushed(out(session)) == [PushRecord(BOB, A, dns.rdataclass.IN, DELETE_ONE_TTL, rd("192.0.2.1")),
                                    PushRecord.add(BOB, 300, rd("192.0.2.2"))]


def test_subscribe_pushes_the_current_answer_right_after_its_response() -> None:
    server = make()
    apply(server, [AddRR(BOB, 300, rd("192.0.2.1")), AddRR(BOB, 300, rd("192.0.2.9"))])
    session = server.open(True, T0)
    ack, *rest = subscribe(session, BOB)
    assert ack.response and ack.rcode == dns.rcode.NOERROR
    assert {(r.rdata, r.ttl) for r in pushed(rest)} == {(rd("192.0.2.1"), 300), (rd("192.0.2.9"), 300)}


def test_any_subscribes_to_every_type_of_the_name() -> None:
    server = make()
    session = server.open(True, T0)
    subscribe(session, BOB, dns.rdatatype.ANY)
    apply(server, [AddRR(BOB, 300, rd("192.0.2.1")), AddRR(BOB, 60, rd('"hello"', dns.rdatatype.TXT))])
    assert {r.rtype for r in pushed(out(session))} == {A, dns.rdatatype.TXT}


def test_a_change_reaches_only_the_sessions_subscribed_at_its_name() -> None:
    server = make()
    watching, other = server.open(True, T0), server.open(True, T0)
    subscribe(watching, BOB)
    subscribe(other, ALICE)
    apply(server, [AddRR(BOB, 300, rd("192.0.2.1"))])
    assert len(pushed(out(watching))) == 1
    assert out(other) == []  # subscribed elsewhere: nothing
    apply(server, [AddRR(dns.name.from_text("carol.example.com."), 300, rd("192.0.2.3"))])
    assert out(watching) == [] and out(other) == []  # nobody watches carol


def test_without_a_certificate_only_the_public_view() -> None:
    server = make()
    apply(server, [AddRR(BOB, 300, rd("192.0.2.1"))])
    session = server.open(False, T0)
    [refused] = subscribe(session, BOB, msg_id=1)
    assert refused.rcode == dns.rcode.REFUSED
    [refused] = subscribe(session, dns.name.from_text("nobody.example.com."), msg_id=2)
    assert refused.rcode == dns.rcode.REFUSED  # whether or not a name exists, a stranger learns nothing
    ack, *soa = subscribe(session, ZONE, dns.rdatatype.SOA, msg_id=3)
    assert ack.rcode == dns.rcode.NOERROR
    [record] = pushed(soa)
    assert record.rtype == dns.rdatatype.SOA and record.added
    ack, *ns = subscribe(session, ZONE, dns.rdatatype.NS, msg_id=4)
    assert ack.rcode == dns.rcode.NOERROR and pushed(ns)[0].rdata == rd("ns.example.com.", dns.rdatatype.NS)
    assert server.counters["subscribe refused: not public"] == 2


def test_outside_the_zone_is_refused_and_a_class_other_than_in_or_any_is_formerr() -> None:
    session = make().open(True, T0)
    [reply] = subscribe(session, dns.name.from_text("bob.example.org."), msg_id=1)
    assert reply.rcode == dns.rcode.REFUSED
    [reply] = subscribe(session, BOB, rclass=dns.rdataclass.CH, msg_id=2)
    assert reply.rcode == dns.rcode.FORMERR
    [reply] = subscribe(session, BOB, rclass=dns.rdataclass.ANY, msg_id=3)
    assert reply.rcode == dns.rcode.NOERROR


def test_subscriptions_per_session_are_capped() -> None:
    server = make(PushLimits(max_subscriptions=2))
    session = server.open(True, T0)
    assert subscribe(session, BOB, msg_id=1)[0].rcode == dns.rcode.NOERROR
    assert subscribe(session, ALICE, msg_id=2)[0].rcode == dns.rcode.NOERROR
    assert subscribe(session, ZONE, dns.rdatatype.SOA, msg_id=3)[0].rcode == dns.rcode.REFUSED
    assert server.subscriptions == 2 and server.counters["subscribe refused: session limit"] == 1
    assert server.open(True, T0) is not session  # the cap is per session: another one may subscribe
    assert subscribe(server.open(True, T0), BOB, msg_id=3)[0].rcode == dns.rcode.NOERROR


def test_unsubscribe_stops_silently_and_an_unknown_id_is_counted() -> None:
    server = make()
    session = server.open(True, T0)
    subscribe(session, BOB, msg_id=9)
    assert send(session, DsoMessage(0, (Unsubscribe(9),))) == []
    apply(server, [AddRR(BOB, 300, rd("192.0.2.1"))])
    assert out(session) == [] and server.subscriptions == 0
    assert send(session, DsoMessage(0, (Unsubscribe(9),))) == []
    assert not session.closed and server.counters["unsubscribe: unknown ID"] == 1


def test_reconfirm_removes_a_record_that_is_gone_and_keeps_one_that_is_there() -> None:
    server = make()
    apply(server, [AddRR(BOB, 300, rd("192.0.2.1"))])
    session = server.open(True, T0)
    assert send(session, DsoMessage(0, (Reconfirm(BOB, rd("192.0.2.1")),))) == []
    [removal] = pushed(send(session, DsoMessage(0, (Reconfirm(BOB, rd("192.0.2.7")),))))
    assert removal == PushRecord.delete(BOB, rd("192.0.2.7"))


def test_an_unknown_primary_tlv_in_a_request_is_dsotypeni() -> None:
    session = make().open(True, T0)
    [reply] = send(session, DsoMessage(5, (UnknownTlv(0xF000, b"x"),)))
    assert reply.response and reply.msg_id == 5 and reply.rcode == RCODE_DSOTYPENI
    assert not session.closed


@pytest.mark.parametrize("wire", [
    b"\x00\x01\x30\x00" + bytes(8),  # a DSO header without a primary TLV
    b"\x12\x34\x01\x00\x00\x01" + bytes(6),  # a query, not DSO
    dso_wire.encode(DsoMessage(4, (), response=True)),  # a response to a request we never sent
    dso_wire.encode(DsoMessage(0, (UnknownTlv(0xF000, b""),))),  # unknown unidirectional
    dso_wire.encode(DsoMessage(0, (RetryDelay(10),))),  # only a server sends RETRY DELAY
    dso_wire.encode(DsoMessage(0, (Keepalive(0, 10_000),))),  # only a server sends it unidirectional
], ids=["no primary", "not dso", "response", "unknown unidirectional", "retry delay", "keepalive uni"])
def test_what_a_session_cannot_accept_aborts_it_counted(wire: bytes) -> None:
    server = make()
    session = server.open(True, T0)
    subscribe(session, BOB)
    session.receive(wire, T0)
    assert session.closed and session not in server.sessions and server.subscriptions == 0
    assert sum(n for k, n in server.counters.items() if k.startswith("session aborted")) == 1
    apply(server, [AddRR(BOB, 300, rd("192.0.2.1"))])
    assert session.take() == []  # an aborted session gets nothing more


def test_a_subscribe_reusing_an_id_in_use_aborts() -> None:
    session = make().open(True, T0)
    subscribe(session, BOB, msg_id=1)
    subscribe(session, ALICE, msg_id=1)
    assert session.reason == "subscribe ID in use"


def test_the_keepalive_limit_is_twice_the_interval_of_client_silence() -> None:
    server = make()
    session = server.open(True, T0)
    subscribe(session, BOB)  # subscribed: no inactivity timer
    assert session.deadline() == T0 + 120
    send(session, DsoMessage(2, (Keepalive(15_000, 60_000),)), at=T0 + 100)  # heard: the limit moves
    assert session.deadline() == T0 + 220
    session.poll(T0 + 219.9)
    assert not session.closed
    session.poll(T0 + 220)
    assert session.reason == "keepalive timeout"
    assert server.counters["session aborted: keepalive timeout"] == 1


def test_without_subscriptions_an_inactive_session_is_aborted() -> None:
    server = make()
    session = server.open(True, T0)
    send(session, DsoMessage(1, (Keepalive(15_000, 60_000),)))
    assert session.deadline() == T0 + 30  # twice the inactivity timeout: the client is delinquent
    send(session, DsoMessage(2, (Keepalive(15_000, 60_000),)), at=T0 + 20)  # keepalives are no operation
    assert session.deadline() == T0 + 30
    subscribe(session, BOB, msg_id=3, at=T0 + 25)
    assert session.deadline() == T0 + 25 + 120
    send(session, DsoMessage(0, (Unsubscribe(3),)), at=T0 + 50)  # the last one gone: inactive from now
    assert session.deadline() == T0 + 80
    session.poll(T0 + 80)
    assert session.reason == "inactivity timeout"


def test_ordinary_answers_keep_their_place_in_the_fifo() -> None:
    server = make()
    session = server.open(True, T0)
    subscribe(session, BOB)
    apply(server, [AddRR(BOB, 300, rd("192.0.2.1"))])  # generated before the query: goes first
    slot = session.reserve()  # the query is being answered
    apply(server, [AddRR(BOB, 300, rd("192.0.2.2"))])  # generated after: goes after the answer
    first = session.take()
    assert len(first) == 1 and pushed([dso_wire.decode(first[0])])[0].rdata == rd("192.0.2.1")
    answer = b"\x00\x01\x84\x00" + bytes(8)
    session.fill(slot, answer)
    then = session.take()
    assert then[0] == answer and pushed([dso_wire.decode(then[1])])[0].rdata == rd("192.0.2.2")
    assert session.queued == 0


def test_a_client_that_does_not_read_is_aborted() -> None:
    server = make(PushLimits(max_queued=2000))
    session = server.open(True, T0)
    subscribe(session, BOB)
    for i in range(1, 80):  # about 50 bytes a PUSH, never taken out
        apply(server, [AddRR(BOB, 300, rd(f"192.0.2.{i}"))])
    assert session.reason == "output not read" and session.queued == 0
    assert server.counters["session aborted: output not read"] == 1


def test_lease_expiry_pushes_the_removal() -> None:
    server = make()
    session = server.open(True, T0)
    subscribe(session, BOB)
    apply(server, [AddRR(BOB, 300, rd("192.0.2.1"))], lease=600)
    out(session)
    removed = server.core.store.expire(T0 + 601)
    server.changes(removed, T0 + 601)
    assert pushed(out(session)) == [PushRecord.delete(BOB, rd("192.0.2.1"))]


def test_a_large_change_is_split_into_pushes_that_fit() -> None:
    server = make()
    session = server.open(True, T0)
    subscribe(session, BOB, dns.rdatatype.TXT)
    texts = [rd('"' + f"{i:03d}" + "x" * 200 + '"', dns.rdatatype.TXT) for i in range(200)]
    apply(server, [AddRR(BOB, 60, t) for t in texts])
    messages = out(session)
    assert len(messages) > 1 and all(len(dso_wire.encode(m)) <= 65535 for m in messages)
    assert {r.rdata for r in pushed(messages)} == set(texts)


def test_closing_forgets_the_sessions_subscriptions() -> None:
    server = make()
    session = server.open(True, T0)
    subscribe(session, BOB)
    subscribe(session, ALICE, msg_id=8)
    assert server.subscriptions == 2
    server.close(session)
    assert server.subscriptions == 0 and not server.sessions


def test_is_dso_reads_the_opcode() -> None:
    assert is_dso(dso_wire.encode(DsoMessage(1, (Keepalive(0, 10_000),))))
    assert not is_dso(b"\x12\x34\x01\x00\x00\x01" + bytes(6)) and not is_dso(b"")


def test_the_dns_collector_shows_push_sessions_subscriptions_and_counters() -> None:
    push = make()
    server = _Server(push.core, None)
    server.push = push
    subscribe(push.open(True, T0), BOB)
    push.open(False, T0).receive(b"junk", T0)
    m = _samples(renderer(DnsCollector(server))())
    assert m["tunneld_dns_push_sessions", ()] == 1 and m["tunneld_dns_push_subscriptions", ()] == 1
    assert m["tunneld_dns_push_messages_total", (("what", "subscribed"),)] == 1
    assert m["tunneld_dns_push_messages_total", (("what", "session aborted: malformed"),)] == 1
